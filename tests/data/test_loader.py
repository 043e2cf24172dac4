"""TokenLoader and eval_batches: the sampling spec (checked against a slow reference), mixing, curriculum,
exact resumption, data-parallel slicing, and evaluation that scores every token once."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from deepseek.data import DataError, TokenDataset, TokenLoader, eval_batches, prepare, train_tokenizer


def texts(tag: str, n: int) -> list[str]:
    return [f"{tag} document {i}:\n" + f"    value_{tag} = {i} * {j}\n" * (3 + i % 5) for i in range(n) for j in (1,)]


@pytest.fixture
def sources(make_dataset):
    """Three prepared datasets of different sizes: general (large), code, domain (small: epochs wrap fast)."""
    return {"general": (make_dataset("general", texts("general", 60)), 8),
            "code": (make_dataset("code", texts("code", 20)), 1),
            "domain": (make_dataset("domain", ["domain document:\n    value_domain = 0 * 1\n"]), 1)}  # 33 tokens


def reference_batches(sources: dict, *, batch_size: int, curriculum: list, seed: int, steps: int):
    """The sampling rule written out plainly: per-source permuted windows, per-step mixing draws."""
    datasets = [TokenDataset(path) for path, _ in sources.values()]
    tokens = [ds.slice(0, len(ds)).astype(np.int64) for ds in datasets]
    weights = np.array([w for _, w in sources.values()], float)
    state = [{"epoch": 0, "cursor": 0, "seq_len": curriculum[0][1]} for _ in datasets]
    for step in range(steps):
        seq_len = [length for start, length in curriculum if start <= step][-1]
        for s in state:
            if s["seq_len"] != seq_len:
                s.update(seq_len=seq_len, cursor=0, epoch=s["epoch"] + 1)
        picks = np.random.default_rng([seed, 0, step]).choice(len(datasets), size=batch_size, p=weights / weights.sum())
        if len(datasets) == 1:
            picks = [0] * batch_size
        rows = []
        for k in picks:
            s, width = state[k], seq_len + 1
            order = np.random.default_rng([seed, 1, k, s["epoch"], seq_len]).permutation(len(tokens[k]) // width)
            window = order[s["cursor"]]
            s["cursor"] += 1
            if s["cursor"] == len(order):
                s.update(epoch=s["epoch"] + 1, cursor=0)
            rows.append(tokens[k][window * width:(window + 1) * width])
        yield torch.from_numpy(np.stack(rows))


def take(loader: TokenLoader, n: int) -> list:
    return [loader.next_batch() for _ in range(n)]


def test_batches_follow_the_reference_rule(sources):
    curriculum = [(0, 8), (4, 16), (9, 5)]
    loader = TokenLoader(sources, batch_size=16, curriculum=curriculum, seed=3)
    expected = reference_batches(sources, batch_size=16, curriculum=curriculum, seed=3, steps=14)
    for batch, rows in zip(take(loader, 14), expected):
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64
        assert batch.inputs.shape == batch.targets.shape == (16, batch.seq_len)
        assert batch.inputs.is_contiguous() and batch.targets.is_contiguous()
        assert torch.equal(batch.inputs, rows[:, :-1]) and torch.equal(batch.targets, rows[:, 1:])
        assert sum(batch.source_counts.values()) == 16


def test_single_source_visits_every_window_once_per_epoch(make_dataset):
    path = make_dataset("one", texts("one", 6))
    ds = TokenDataset(path)
    windows = len(ds) // 9
    loader = TokenLoader(path, batch_size=1, seq_len=8)
    seen = Counter(tuple(torch.cat([b.inputs[0], b.targets[0, -1:]]).tolist()) for b in take(loader, windows))
    assert seen == Counter(tuple(ds.slice(i * 9, i * 9 + 9).tolist()) for i in range(windows))
    assert loader.state_dict()["sources"][0] | {"tokens": 0} == {"name": "data", "tokens": 0, "epoch": 1, "cursor": 0,
                                                                  "seq_len": 8}


def test_mixing_ratios(sources):
    loader = TokenLoader(sources, batch_size=16, seq_len=8)
    counts = {"general": 0, "code": 0, "domain": 0}
    for batch in take(loader, 200):
        for name, n in batch.source_counts.items():
            counts[name] += n
    share = {name: n / 3200 for name, n in counts.items()}
    assert abs(share["general"] - 0.8) < 0.03 and abs(share["code"] - 0.1) < 0.03 and abs(share["domain"] - 0.1) < 0.03


def test_curriculum_switches_at_the_given_steps(sources):
    loader = TokenLoader(sources, batch_size=4, curriculum=[(0, 8), (3, 16), (5, 4)])
    assert [b.seq_len for b in take(loader, 7)] == [8, 8, 8, 16, 16, 4, 4]
    assert [loader.seq_len_at(s) for s in (0, 2, 3, 4, 5, 10**9)] == [8, 8, 16, 16, 4, 4]
    assert loader.state_dict()["sources"][0]["epoch"] >= 2  # each switch began a fresh pass


def test_deterministic_from_seed(sources):
    a, b, c = (TokenLoader(sources, batch_size=8, seq_len=8, seed=s) for s in (0, 0, 1))
    for x, y, z in zip(take(a, 5), take(b, 5), take(c, 5)):
        assert torch.equal(x.inputs, y.inputs) and x.source_counts == y.source_counts
    assert not all(torch.equal(x.inputs, z.inputs) for x, z in zip(take(a, 5), take(c, 5)))


@pytest.mark.parametrize("k", [0, 1, 3, 4, 6, 9])
def test_resume_reproduces_the_uninterrupted_run(sources, k):
    curriculum = [(0, 8), (4, 16)]  # k = 3, 4: around the switch; "domain" wraps its epoch every ~2 batches
    run = TokenLoader(sources, batch_size=16, curriculum=curriculum, seed=7)
    expected = take(run, 12)
    first = TokenLoader(sources, batch_size=16, curriculum=curriculum, seed=7)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = TokenLoader(sources, batch_size=16, curriculum=curriculum, seed=7)
    resumed.load_state_dict(state)
    for want, got in zip(expected[k:], take(resumed, 12 - k)):
        assert got.step == want.step and got.seq_len == want.seq_len
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
    if k == 3:  # the tiny "domain" source has wrapped around before the curriculum switch
        assert first.state_dict()["sources"][2]["epoch"] >= 1 and first.state_dict()["sources"][2]["seq_len"] == 8


def test_ranks_split_the_global_batch(sources):
    single = take(TokenLoader(sources, batch_size=8, seq_len=8, seed=2), 4)
    ranks = [take(TokenLoader(sources, batch_size=8, seq_len=8, seed=2, rank=r, world_size=4), 4) for r in range(4)]
    for step, batch in enumerate(single):
        parts = [rank[step] for rank in ranks]
        assert all(p.inputs.shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p.inputs for p in parts]), batch.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts]), batch.targets)
        assert {n: sum(p.source_counts[n] for p in parts) for n in batch.source_counts} == batch.source_counts
    # A state saved by one world size resumes in another: the global batch is the same.
    state = TokenLoader(sources, batch_size=8, seq_len=8, seed=2, rank=1, world_size=4)
    take(state, 2)
    solo = TokenLoader(sources, batch_size=8, seq_len=8, seed=2)
    solo.load_state_dict(state.state_dict())
    assert torch.equal(solo.next_batch().inputs, single[2].inputs)


def test_iteration_is_endless(make_dataset):
    loader = TokenLoader(make_dataset("one", texts("one", 2)), batch_size=2, seq_len=4)
    assert [b.step for _, b in zip(range(100), loader)] == list(range(100))
    assert next(loader).step == 100 and iter(loader) is loader


def test_errors(sources, make_dataset, tmp_path, write_jsonl):
    tiny = make_dataset("tiny", ["x"])
    with pytest.raises(DataError, match="source 'tiny' .* has 2 tokens, fewer than one window of seq_len \\+ 1 = 9"):
        TokenLoader({"tiny": (tiny, 1)}, batch_size=2, seq_len=8)
    with pytest.raises(DataError, match="source 'data' .* fewer than one window of seq_len \\+ 1 = 17"):
        TokenLoader(tiny, batch_size=2, curriculum=[(0, 1), (5, 16)])
    with pytest.raises(ValueError, match="weight must be a positive number"):
        TokenLoader({"a": (sources["code"][0], 0)}, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="divisible by world_size"):
        TokenLoader(sources, batch_size=6, seq_len=4, world_size=4)
    for bad in (dict(), dict(seq_len=4, curriculum=[(0, 4)]), dict(curriculum=[(1, 4)]),
                dict(curriculum=[(0, 4), (0, 8)]), dict(seq_len=0)):
        with pytest.raises(ValueError):
            TokenLoader(sources, batch_size=2, **bad)
    loader = TokenLoader(sources, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="loader state is for sources"):
        loader.load_state_dict(TokenLoader({"code": sources["code"]}, batch_size=2, seq_len=4).state_dict())
    with pytest.raises(ValueError, match="seed 5"):
        loader.load_state_dict(TokenLoader(sources, batch_size=2, seq_len=4, seed=5).state_dict())
    with pytest.raises(ValueError, match="not a TokenLoader state"):
        loader.load_state_dict({"step": 1})
    write_jsonl(tmp_path / "other.jsonl", texts("other", 3))
    prepare([tmp_path / "other.jsonl"], train_tokenizer(texts("other", 3), vocab_size=300), tmp_path / "other",
            val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="source 'other' .* another tokenizer"):
        TokenLoader({"code": sources["code"], "other": tmp_path / "other"}, batch_size=2, seq_len=4)


def test_eval_batches_score_every_token_once(make_dataset):
    path = make_dataset("eval", texts("eval", 7), val_fraction=0.5)
    ds = TokenDataset(path, "val")
    stream = torch.from_numpy(ds.slice(0, len(ds)).astype(np.int64))
    batches = eval_batches(path, batch_size=3, seq_len=16)
    windows = (len(ds) - 1) // 16
    assert len(batches) == -(-windows // 3) and batches.num_targets == windows * 16
    got = list(batches)
    assert [x.shape[0] for x, _ in got][:-1] == [3] * (len(got) - 1) and 1 <= got[-1][0].shape[0] <= 3
    inputs, targets = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert targets.dtype == torch.int64 and targets.is_contiguous()
    assert torch.equal(targets.flatten(), stream[1:1 + windows * 16])  # each target exactly once, in order
    assert torch.equal(inputs.flatten(), stream[:windows * 16])
    assert [torch.equal(x, y) for (x, _), (y, _) in zip(got, batches)] == [True] * len(got)  # re-iterable
    capped = eval_batches(path, batch_size=2, seq_len=16, max_batches=2)
    capped_windows = min(windows, 2 * 2)  # the split is drawn by a hash of the document's path: few windows happen
    assert len(list(capped)) == -(-capped_windows // 2) and capped.num_targets == capped_windows * 16
    assert batches.bits_per_byte(np.log(2)) == pytest.approx(ds.num_tokens / ds.num_bytes)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_batches(path, batch_size=2, seq_len=len(ds))


def test_dataset_reads_across_shards(make_dataset):
    one = TokenDataset(make_dataset("one", texts("x", 9)))
    many = TokenDataset(make_dataset("many", texts("x", 9), shard_tokens=40))
    loader_one = TokenLoader(one.path, batch_size=4, seq_len=16)
    loader_many = TokenLoader(many.path, batch_size=4, seq_len=16)
    for a, b in zip(take(loader_one, 10), take(loader_many, 10)):
        assert torch.equal(a.inputs, b.inputs)
