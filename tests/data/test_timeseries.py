"""TimeSeriesSampler: windows by the last event, time splits with a gap and no leakage, balanced batches."""

import numpy as np
import pytest
import torch

from deepseek.config import ConfigError
from deepseek.data import TimeSeriesSampler


def random_events(n=600, accounts=20, seed=0):
    rng = np.random.default_rng(seed)
    account = rng.integers(0, accounts, n)
    time = rng.uniform(0, 100, n)
    label = (rng.random(n) < 0.05).astype(np.int64)
    return account, time, label


def make_sampler(**kw):
    account, time, label = random_events()
    args = dict(window=5, val_start=60.0, test_start=80.0, gap=5.0) | kw
    return TimeSeriesSampler(account, time, label, **args), account, time, label


def test_window_is_the_accounts_latest_events_ending_at_the_labelled_one():
    sampler = TimeSeriesSampler([7, 7, 3, 7, 7], [4.0, 1.0, 2.0, 3.0, 9.0], [0, 0, 0, 1, 0], window=3,
                                val_start=5.0, test_start=8.0)
    # account 7 in time order: event 1 (t=1), 3 (t=3), 0 (t=4), 4 (t=9)
    assert sampler.history_NW.tolist() == [[1, 3, 0], [-1, -1, 1], [-1, -1, 2], [-1, 1, 3], [3, 0, 4]]
    idx, y = sampler.windows("train")
    assert idx.tolist() == [[-1, -1, 1], [-1, -1, 2], [-1, 1, 3], [1, 3, 0]] and y.tolist() == [0, 0, 1, 0]
    x = torch.arange(5.0)[:, None] + 1
    assert TimeSeriesSampler.gather(x, idx)[2, :, 0].tolist() == [0.0, 2.0, 4.0]


def test_splits_follow_time_with_a_gap_and_no_history_crosses_into_a_later_split():
    sampler, account, time, _ = make_sampler()
    ends = {"train": 60.0 - 5.0, "val": 80.0 - 5.0, "test": np.inf}
    starts = {"train": -np.inf, "val": 60.0, "test": 80.0}
    seen = set()
    for split in ("train", "val", "test"):
        events = sampler.split_events(split).numpy()
        assert len(events) > 0 and seen.isdisjoint(events)
        seen |= set(events.tolist())
        assert (time[events] >= starts[split]).all() and (time[events] < ends[split]).all()
        assert (np.diff(time[events]) >= 0).all()
        idx, _ = sampler.windows(split)
        for row, event in zip(idx.numpy(), events):
            history = row[row >= 0]
            assert history[-1] == event
            assert (account[history] == account[event]).all()  # one account per window
            assert (time[history] <= time[event]).all() and (time[history] < ends[split]).all()
            assert (np.diff(time[history]) >= 0).all()
    in_gap = ((time >= 55) & (time < 60)) | ((time >= 75) & (time < 80))
    assert seen == set(np.nonzero(~in_gap)[0].tolist())  # events in a gap are labelled in no split


def test_standardizer_is_fitted_on_the_training_period_only():
    sampler, _, time, _ = make_sampler()
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(len(time), 3))).float()
    before = sampler.fit_standardizer(x)
    later = torch.from_numpy(time >= 55.0)
    x_changed = x.clone()
    x_changed[later] = 1e6  # anything in the gap, validation or test periods must not move the statistics
    after = sampler.fit_standardizer(x_changed)
    assert torch.equal(before.mean_F, after.mean_F) and torch.equal(before.std_F, after.std_F)
    train = sampler.train_period()
    assert torch.allclose(before(x)[train].mean(0), torch.zeros(3), atol=1e-5)


def test_balanced_batches_are_seeded_resumable_and_roughly_balanced():
    sampler, *_ = make_sampler()
    _, y = sampler.windows("train")
    batches = sampler.balanced_batches("train", batch_size=400, seed=3)
    first = [next(batches) for _ in range(3)]
    assert 0.4 < y[first[0]].float().mean().item() < 0.6  # ~5% positives drawn about half the time
    again = sampler.balanced_batches("train", batch_size=400, seed=3)
    again.load_state_dict({"batch": 2, "seed": 3})
    assert torch.equal(next(again), first[2])
    assert not torch.equal(first[0], first[1])


def test_bad_arguments_are_config_errors():
    account, time, label = random_events()
    with pytest.raises(ConfigError, match="val_start < test_start - gap"):
        TimeSeriesSampler(account, time, label, window=4, val_start=80, test_start=60)
    with pytest.raises(ConfigError, match="window"):
        TimeSeriesSampler(account, time, label, window=0, val_start=60, test_start=80)
    with pytest.raises(ConfigError, match="one length"):
        TimeSeriesSampler(account[:5], time, label, window=4, val_start=60, test_start=80)
    sampler, *_ = make_sampler()
    with pytest.raises(ConfigError, match="split"):
        sampler.windows("holdout")
