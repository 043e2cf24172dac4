"""A seeded generator of synthetic card transactions per account over time, with fraud planted as bursts.

The generating process (also written out in examples/fraud/README.md) follows the Sparkov generator and the
fraud-detection handbook's simulator (see docs/applications.md for the sources):

Accounts. Each of ``accounts`` cardholders has a home (lat, lon) uniform over a 15° x 45° box, a typical
amount ``mu ~ U(10, 80)`` dollars, a rate of ``U(0.3, 3)`` transactions per day, a taste over the 14 merchant
categories (Dirichlet(0.5) on top of a base popularity where electronics, jewelry and online shopping are rare),
and an hour of day it usually shops at (``U(9, 20)``).

Genuine transactions. Per day a Poisson number of transactions; hour ~ N(the account's hour, 3 h) clipped to
the day; category from the account's taste; amount ~ Gamma(2, mu * category scale / 2) (travel, electronics and
jewelry cost several times groceries); the merchant lies within N(0, 0.3°) of home. Each account takes a trip
with probability 0.5 per 90 days (2–6 days, 3–15° away): then merchants are near the trip's destination and
travel purchases are likelier. So far jumps and large amounts are not fraud by themselves.

Fraud. An account is compromised with probability ``compromise_rate`` (at most once), at a uniform moment;
from then a burst of fraudulent transactions follows, in one of three planted patterns (genuine transactions go
on around them):

- card testing (40 %): 2–4 tiny online amounts ($0.5–3, online shopping / misc) minutes apart, then 1–3 large
  purchases (5–15 x mu; electronics, jewelry, online shopping) within the next hours, far from home;
- geography jump (40 %): 3–6 purchases 10–25° from home within 1–3 h of the compromise, 2–6 x mu, in
  shopping / electronics / gas, at night;
- quiet takeover (20 %): 3–5 purchases near home at the account's usual amounts, but in categories the account
  rarely uses, within a day, at night: the hard case.

Every fraudulent transaction is labelled 1; about 0.3–0.6 % of transactions are fraud with the defaults
(compare 0.39 % in Sparkov's test file, 0.13 % in PaySim, < 1 % in the handbook).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES = ("grocery_pos", "gas_transport", "food_dining", "entertainment", "shopping_pos", "shopping_net",
              "health_fitness", "travel", "electronics", "jewelry", "misc_net", "home", "kids_pets", "personal_care")
CATEGORY_SCALE = np.array([1.0, 0.8, 1.2, 1.5, 2.0, 2.0, 1.5, 5.0, 4.0, 6.0, 1.0, 3.0, 1.0, 0.8])
CATEGORY_POPULARITY = np.array([8, 6, 6, 3, 4, 1, 2, 1, 0.5, 0.3, 1, 2, 2, 3], dtype=float)
CAT = {name: i for i, name in enumerate(CATEGORIES)}
PATTERNS = ("card_testing", "geo_jump", "quiet_takeover")


@dataclass
class Transactions:
    """Columns of N transactions, sorted by time. ``time`` in days from the start; ``pattern`` -1 for genuine."""

    account: np.ndarray   # int64 [N]
    time: np.ndarray      # float64 [N] days
    amount: np.ndarray    # float64 [N] dollars
    category: np.ndarray  # int64 [N] index into CATEGORIES
    lat: np.ndarray       # float64 [N] merchant latitude
    lon: np.ndarray       # float64 [N] merchant longitude
    home_lat: np.ndarray  # float64 [N] the cardholder's home (known to the bank, as in Sparkov's lat/long)
    home_lon: np.ndarray
    is_fraud: np.ndarray  # int64 [N]
    pattern: np.ndarray   # int64 [N] index into PATTERNS, -1 for genuine

    def __len__(self) -> int:
        return len(self.time)

    def save(self, path) -> None:
        np.savez_compressed(path, **self.__dict__)

    @classmethod
    def load(cls, path) -> "Transactions":
        with np.load(path) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _genuine(rng, days, home, mu, rate, taste, hour) -> list[tuple]:
    rows = []
    trips = []
    for start in range(0, days, 90):
        if rng.random() < 0.5:
            begin = start + rng.uniform(0, 84)
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(3, 15)
            trips.append((begin, begin + rng.uniform(2, 6), home + dist * np.array([np.sin(angle), np.cos(angle)])))
    travel_taste = taste.copy()
    travel_taste[CAT["travel"]] += 0.3
    travel_taste /= travel_taste.sum()
    for day in range(days):
        for _ in range(rng.poisson(rate)):
            t = day + np.clip(rng.normal(hour, 3.0), 0, 23.99) / 24
            trip = next((c for b, e, c in trips if b <= t < e), None)
            centre, p = (home, taste) if trip is None else (trip, travel_taste)
            cat = rng.choice(len(CATEGORIES), p=p)
            amount = rng.gamma(2.0, mu * CATEGORY_SCALE[cat] / 2)
            lat, lon = centre + rng.normal(0, 0.3, 2)
            rows.append((t, amount, cat, lat, lon, 0, -1))
    return rows


def _fraud(rng, start, home, mu, taste, pattern) -> list[tuple]:
    rows = []
    night = np.floor(start) + rng.uniform(0, 5) / 24  # bursts run at night, after the compromise
    t = max(start, night)
    if pattern == 0:  # card testing, then large online purchases far away
        far = home + rng.uniform(8, 30) * rng.choice([-1, 1], 2)
        for _ in range(rng.integers(2, 5)):
            t += rng.uniform(1, 10) / 1440
            rows.append((t, rng.uniform(0.5, 3), rng.choice([CAT["shopping_net"], CAT["misc_net"]]), *far, 1, 0))
        for _ in range(rng.integers(1, 4)):
            t += rng.uniform(10, 180) / 1440
            cat = rng.choice([CAT["electronics"], CAT["jewelry"], CAT["shopping_net"]])
            rows.append((t, mu * rng.uniform(5, 15), cat, *(far + rng.normal(0, 0.2, 2)), 1, 0))
    elif pattern == 1:  # geography jump: a burst of purchases far from home
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(10, 25)
        far = home + dist * np.array([np.sin(angle), np.cos(angle)])
        t += rng.uniform(1, 3) / 24
        for _ in range(rng.integers(3, 7)):
            t += rng.uniform(5, 60) / 1440
            cat = rng.choice([CAT["shopping_pos"], CAT["electronics"], CAT["gas_transport"]])
            rows.append((t, mu * rng.uniform(2, 6), cat, *(far + rng.normal(0, 0.3, 2)), 1, 1))
    else:  # quiet takeover: usual amounts near home, in the categories the account rarely uses
        rare = np.argsort(taste)[:4]
        for _ in range(rng.integers(3, 6)):
            t += rng.uniform(0.5, 5) / 24
            cat = rng.choice(rare)
            rows.append((t, rng.gamma(2.0, mu * CATEGORY_SCALE[cat] / 2), cat, *(home + rng.normal(0, 0.3, 2)), 1, 2))
    return rows


def generate(accounts: int = 1000, days: int = 180, compromise_rate: float = 0.2, seed: int = 0,
             progress: bool = False) -> Transactions:
    """Transactions of ``accounts`` cardholders over ``days`` days (module docs), sorted by time; seeded.
    ``progress`` shows a progress bar over the accounts."""
    rng = np.random.default_rng(seed)
    columns = []
    account_ids = range(accounts)
    if progress:
        from rich.progress import track
        account_ids = track(account_ids, description="generating accounts", transient=True)
    for account in account_ids:
        home = np.array([rng.uniform(30, 45), rng.uniform(-120, -75)])
        mu, rate, hour = rng.uniform(10, 80), rng.uniform(0.3, 3.0), rng.uniform(9, 20)
        taste = rng.dirichlet(np.full(len(CATEGORIES), 0.5)) + CATEGORY_POPULARITY / CATEGORY_POPULARITY.sum()
        taste /= taste.sum()
        rows = _genuine(rng, days, home, mu, rate, taste, hour)
        if rng.random() < compromise_rate:
            start = rng.uniform(1, days - 1)
            pattern = rng.choice(len(PATTERNS), p=[0.4, 0.4, 0.2])
            rows += [r for r in _fraud(rng, start, home, mu, taste, pattern) if r[0] < days]
        for row in rows:
            columns.append((account, *row, *home))
    data = np.array(columns, dtype=np.float64).reshape(-1, 10)
    data = data[np.lexsort((data[:, 0], data[:, 1]))]  # by time (account breaks ties)
    as_int = lambda col: data[:, col].astype(np.int64)  # noqa: E731
    return Transactions(account=as_int(0), time=data[:, 1], amount=np.round(data[:, 2], 2), category=as_int(3),
                        lat=data[:, 4], lon=data[:, 5], home_lat=data[:, 8], home_lon=data[:, 9],
                        is_fraud=as_int(6), pattern=as_int(7))
