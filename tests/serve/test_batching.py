"""DynamicBatcher: batches form as specified, outputs go back to their requests, limits hold under load."""

import asyncio
import threading

import pytest
import torch

from deepseek.serve.batching import BatcherClosedError, DeadlineExceededError, DynamicBatcher, QueueFullError


class Model:
    """y = 2x + row sum; records every batch it is given. ``gate`` (when set) blocks a call until opened."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[torch.Tensor] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, inputs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        x = inputs["x"]
        self.batches.append(x.clone())
        return {"y": 2 * x, "s": x.sum(dim=tuple(range(1, x.dim())))}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order():
    model = Model()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=64, timeout_ms=20)
        xs = [torch.full((1, 4), float(i)) for i in range(100)]
        outs = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        await batcher.stop()
        return xs, outs, batcher.stats

    xs, outs, stats = run(main())
    for x, out in zip(xs, outs):
        assert torch.equal(out["y"], 2 * x) and torch.equal(out["s"], x.sum(dim=1))
    # All 100 were queued before the batcher ran: one full batch at once, the rest when the delay ran out.
    assert [b.shape[0] for b in model.batches] == [64, 36]
    assert stats.batches == 2 and stats.mean_batch_size == 50


def test_preferred_sizes_cut_early_and_multi_row_requests_stay_whole():
    model = Model()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=16, timeout_ms=10, preferred_batch_sizes=[8])
        xs = [torch.randn(n, 3) for n in [3, 2, 3, 4, 1, 5, 2]]  # 20 rows
        outs = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        await batcher.stop()
        return xs, outs

    xs, outs = run(main())
    # 20 rows ≥ max 16: cut at once, whole requests only (3+2+3+4+1, the 5 does not fit, the 2 does).
    assert [b.shape[0] for b in model.batches] == [15, 5]
    assert torch.equal(model.batches[0][:13], torch.cat(xs[:5])) and torch.equal(model.batches[1], xs[5])
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out["y"], 2 * x)


def test_preferred_size_below_the_maximum():
    model = Model()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=64, timeout_ms=10, preferred_batch_sizes=[8])
        await asyncio.gather(*(batcher.submit({"x": torch.ones(1, 2)}) for _ in range(20)))
        await batcher.stop()

    run(main())
    assert [b.shape[0] for b in model.batches] == [8, 8, 4]


def test_ragged_inputs_are_padded_and_incompatible_ones_run_apart():
    model = Model()

    async def main():
        padded = DynamicBatcher(model, max_batch_size=8, timeout_ms=10, pad_values={"x": 0.0})
        a, b = torch.ones(1, 3), torch.ones(1, 5)
        out_a, out_b = await asyncio.gather(padded.submit({"x": a}), padded.submit({"x": b}))
        await padded.stop()
        strict = DynamicBatcher(model, max_batch_size=8, timeout_ms=10)
        out_c, out_d = await asyncio.gather(strict.submit({"x": a}), strict.submit({"x": b}))
        await strict.stop()
        return out_a, out_b, out_c, out_d

    out_a, out_b, out_c, out_d = run(main())
    assert [tuple(t.shape) for t in model.batches] == [(2, 5), (1, 3), (1, 5)]
    assert torch.equal(model.batches[0][0], torch.tensor([1.0, 1, 1, 0, 0]))
    assert out_a["s"].item() == 3 and out_b["s"].item() == 5
    assert torch.equal(out_c["y"], 2 * torch.ones(1, 3)) and torch.equal(out_d["y"], 2 * torch.ones(1, 5))


def test_full_queue_rejects_at_once_and_late_requests_expire_without_compute():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, timeout_ms=1, max_queue_size=2)
        first = asyncio.ensure_future(batcher.submit({"x": torch.zeros(1, 1)}))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait)  # first is computing
        late = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 1)}, timeout_ms=1))
        queued = asyncio.ensure_future(batcher.submit({"x": torch.full((1, 1), 2.0)}))
        await asyncio.sleep(0)  # let both enqueue
        with pytest.raises(QueueFullError):
            await batcher.submit({"x": torch.full((1, 1), 3.0)})
        with pytest.raises(DeadlineExceededError):
            await late
        gate.set()
        await first
        assert (await queued)["y"].item() == 4.0
        await batcher.stop()
        return batcher.stats

    stats = run(main())
    seen = [b.item() for b in model.batches]
    assert seen == [0.0, 2.0]  # the expired request never reached the model
    assert stats.rejected == 1 and stats.expired == 1


def test_a_cancelled_request_is_dropped_before_compute():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, timeout_ms=1)
        first = asyncio.ensure_future(batcher.submit({"x": torch.zeros(1, 1)}))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait)
        gone = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 1)}))  # the client that disconnects
        kept = asyncio.ensure_future(batcher.submit({"x": torch.full((1, 1), 2.0)}))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await first
        await kept
        await batcher.stop()

    run(main())
    assert [b.item() for b in model.batches] == [0.0, 2.0]


def test_model_errors_fail_their_batch_only_and_stop_drains():
    calls = []

    def flaky(inputs):
        calls.append(inputs["x"].shape[0])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": inputs["x"] + 1}

    async def main():
        batcher = DynamicBatcher(flaky, max_batch_size=4, timeout_ms=5)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit({"x": torch.zeros(1)})
        pending = [asyncio.ensure_future(batcher.submit({"x": torch.full((1,), float(i))})) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop(drain=True)  # returns only after every queued request is answered
        assert all(p.done() for p in pending)
        with pytest.raises(BatcherClosedError):
            await batcher.submit({"x": torch.zeros(1)})
        return [p.result()["y"].item() for p in pending]

    assert run(main()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_bad_requests_are_refused_clearly():
    async def main():
        batcher = DynamicBatcher(Model(), max_batch_size=2)
        with pytest.raises(ValueError, match="maximum batch size"):
            await batcher.submit({"x": torch.zeros(3, 1)})
        with pytest.raises(ValueError, match="same leading batch dimension"):
            await batcher.submit({"x": torch.zeros(1, 1), "z": torch.zeros(2, 1)})
        await batcher.stop()

    run(main())
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DynamicBatcher(Model(), max_batch_size=4, preferred_batch_sizes=[8])


def test_priorities_and_delayed_timeouts_reorder_the_queue():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, timeout_ms=0, priority_levels=2, timeout_action="delay")
        first = asyncio.ensure_future(batcher.submit({"x": torch.zeros(1, 1)}))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait)  # first is computing
        late = asyncio.ensure_future(batcher.submit({"x": torch.ones(1, 1)}, timeout_ms=1, priority=1))
        low = asyncio.ensure_future(batcher.submit({"x": torch.full((1, 1), 2.0)}, priority=2))
        high = asyncio.ensure_future(batcher.submit({"x": torch.full((1, 1), 3.0)}, priority=1))
        await asyncio.sleep(0)  # all three queued
        deadline = batcher._queue[0].deadline
        while asyncio.get_running_loop().time() < deadline + 0.001:  # until `late` has expired (a condition, not a delay)
            await asyncio.sleep(0.001)
        gate.set()
        results = await asyncio.gather(first, late, low, high)
        await batcher.stop()
        return results

    results = run(main())
    # `late` expired while queued: with "delay" it is not failed but runs after every unexpired request,
    # even the lower-priority one; `high` (priority 1) overtakes `low` (priority 2).
    assert [b.item() for b in model.batches] == [0.0, 3.0, 2.0, 1.0]
    assert [r["y"].item() for r in results] == [0.0, 2.0, 4.0, 6.0]
