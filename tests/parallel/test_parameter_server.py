"""Asynchronous parameter-server training (torch.distributed.rpc): it converges, it survives a worker killed
with SIGKILL, and a gradient staler than ``parallel.staleness`` is dropped and its batch computed again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import deepseek as ds
from deepseek.data import Batch
from deepseek.train.parameter_server import ParameterServer, process_gone
from deepseek.models.transformer import MoETransformer
from deepseek.train.config import load_train_config

from .runs import ROOT, run_env


def overrides(run_dir, data_dir, max_steps):
    # a sigmoid router: its aux-loss-free bias update runs on the server from the load the workers report
    return [f"run_dir={run_dir}", f"data.path={data_dir}", f"max_steps={max_steps}", "batch_size=8",
            "precision=fp32", "device=cpu", "log_every=1", "eval_every=0", "data.seq_len=64", "data.eval_batches=1",
            "progress=false", "tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=2",
            "checkpoint.every=0", "model.n_layers=1", "model.d_model=64", "model.router=sigmoid",
            "model.bias_update_speed=0.01", "parallel.mode=parameter_server"]


def start(run_dir, data_dir, max_steps, nproc=3, extra=()):
    """1 server + (nproc - 1) workers: `ds train --nproc N parallel.mode=parameter_server`."""
    config = run_dir.parent / "ps.yaml"
    config.write_text("seed: 0\n")
    cmd = [sys.executable, "-m", "deepseek.cli.main", "train", str(config), "--nproc", str(nproc),
           *overrides(run_dir, data_dir, max_steps), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("the parameter-server run did not finish:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    return out


def records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def check_training(run_dir, max_steps):
    recs = records(run_dir)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, max_steps + 1))  # every update logged once, in order
    items = [r["item"] for r in steps]
    assert len(set(items)) == len(items)  # no batch applied twice
    losses = [r["loss"] for r in steps]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # it learns (byte-level json source: ~5.6 -> below 4)
    assert recs[-1]["step"] == max_steps and "val_loss" in recs[-1]
    model, tokenizer = ds.load(run_dir / "model")
    biases = [v for k, v in model.state_dict().items() if k.endswith("expert_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # balancing ran from the workers' loads
    return recs, steps


def test_two_workers_converge(tmp_path, data_dir):
    """Both workers contribute whatever their start-up order: the first round hands each a batch before either gets
    a second, and no first gradient is dropped as stale (staleness bound >= max_steps)."""
    run_dir = tmp_path / "ps"
    out = finish(start(run_dir, data_dir, max_steps=30, extra=["parallel.staleness=30"]))
    assert "trained 30 steps" in out
    _, steps = check_training(run_dir, 30)
    assert {r["worker"] for r in steps} == {1, 2}  # both workers contributed
    status = json.loads((run_dir / "parameter_server.json").read_text())
    assert status["version"] == 30 and status["lost"] == 0
    assert {w["state"] for w in status["workers"].values()} == {"done"}


def test_a_killed_worker_does_not_stop_training(tmp_path, data_dir):
    run_dir, max_steps = tmp_path / "ps-kill", 150
    proc = start(run_dir, data_dir, max_steps=max_steps)
    try:
        deadline = time.monotonic() + 90
        while True:  # wait until worker 1 has contributed a few updates, then SIGKILL it
            recs = records(run_dir)
            if sum(r.get("worker") == 1 and "loss" in r for r in recs) >= 3:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "worker 1 never contributed"
            time.sleep(0.02)
        pid = next(r["pid"] for r in recs if r.get("event") == "worker_joined" and r["worker"] == 1)
        os.kill(pid, signal.SIGKILL)
    finally:
        out = finish(proc)
    assert f"worker rank 1 (pid {pid}) died (signal 9)" in out  # the launcher saw it
    recs, steps = check_training(run_dir, max_steps)
    lost = [r for r in recs if r.get("event") == "worker_lost"]
    assert [r["worker"] for r in lost] == [1] and lost[0]["step"] < max_steps  # reported, mid-run
    assert lost[0]["reason"] == f"process {pid} is gone"
    after = [r for r in steps if r["step"] > lost[0]["step"]]
    assert after and {r["worker"] for r in after} == {2}  # worker 2 carried on alone
    for item in lost[0]["requeued"]:  # the batch the dead worker held was done by worker 2
        assert any(r["item"] == item and r["worker"] == 2 for r in after)
    status = json.loads((run_dir / "parameter_server.json").read_text())
    assert status["lost"] == 1 and status["workers"]["1"]["state"] == "lost"


# -- the server's logic in one process, no RPC ------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def batches(vocab):
    generator = torch.Generator().manual_seed(0)
    step = 0
    while True:
        rows = torch.randint(0, vocab, (4, 9), generator=generator)
        yield Batch(rows[:, :-1], rows[:, 1:], step, 8, {"default": 4})
        step += 1


def gradient(model, work):
    model.load_state_dict(work.state)
    model.zero_grad()
    loss = model(work.batch.inputs, targets=work.batch.targets)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.item()


@pytest.fixture
def server():
    config = load_train_config(None, ["model.n_layers=1", "model.d_model=32", "model.vocab_size=64",
                                      "max_steps=10", "device=cpu", "tensorboard=false", "parallel.staleness=1"])
    torch.manual_seed(0)
    model = MoETransformer(config.model_config())
    clock = Clock()
    ps = ParameterServer(model, config, batches=batches(64), clock=clock, lease_s=5.0)
    ps.clock_ = clock
    return ps


def test_a_gradient_staler_than_the_bound_is_dropped_and_its_batch_requeued(server):
    worker_model = MoETransformer(server.model.config)
    for w in (1, 2, 3):
        server.register(w)
    work = {w: server.get_work(w) for w in (1, 2, 3)}  # all three pulled version 0
    assert [work[w].item for w in (1, 2, 3)] == [0, 1, 2] and {wk.version for wk in work.values()} == {0}
    r1 = server.push(1, work[1].item, work[1].version, *gradient(worker_model, work[1]))
    assert (r1.status, r1.version, r1.staleness) == ("applied", 1, 0)
    r2 = server.push(2, work[2].item, work[2].version, *gradient(worker_model, work[2]))
    assert (r2.status, r2.version, r2.staleness) == ("applied", 2, 1)  # 1 behind: within the bound
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    steps_before = server.optimizer.state_dict()["state"][0]["step"].item()
    r3 = server.push(3, work[3].item, work[3].version, *gradient(worker_model, work[3]))
    assert (r3.status, r3.version, r3.staleness) == ("stale", 2, 2)  # 2 behind a bound of 1: dropped
    for key, value in server.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the parameters did not move
    assert server.optimizer.state_dict()["state"][0]["step"].item() == steps_before
    assert server.status()["stale"] == 1 and server.workers[3].stale == 1
    again = server.get_work(3)  # the same batch, computed again from fresh parameters
    assert again.item == work[3].item and again.version == 2
    assert torch.equal(again.batch.inputs, work[3].batch.inputs)
    assert server.push(3, again.item, again.version, *gradient(worker_model, again)).status == "applied"


def test_a_silent_worker_loses_its_lease_and_its_batch_goes_to_another(server):
    worker_model = MoETransformer(server.model.config)
    server.register(1)
    server.register(2)
    held = server.get_work(1)
    server.clock_.now = 3.0
    server.get_work(2)  # worker 2 is heard from; worker 1 stays silent past the 5 s lease
    server.clock_.now = 6.0
    assert server.reap() == [1]
    assert server.workers[1].state == "lost" and server.live_workers() == [2]
    taken = server.get_work(2)
    assert taken.item == held.item  # re-queued at the front
    late = server.push(1, held.item, held.version, *gradient(worker_model, held))
    assert late.status == "expired" and server.version == 0  # the late gradient of a lost lease is ignored
    assert server.workers[1].state == "working"  # but the slow worker is back in the pool
    assert server.push(2, taken.item, taken.version, *gradient(worker_model, taken)).status == "applied"


def test_the_first_round_waits_for_every_worker(server):
    """A worker's second batch waits until every expected worker has its first (here: worker 2 joins late)."""
    import threading

    server.expected_workers = 2
    server.register(1)
    first = server.get_work(1)  # its first batch: no waiting
    second = []
    fast = threading.Thread(target=lambda: second.append(server.get_work(1)))
    fast.start()
    fast.join(timeout=0.5)
    assert fast.is_alive() and second == []  # worker 1 waits for worker 2's first batch
    server.register(2)
    late = server.get_work(2)
    fast.join(timeout=30)
    assert not fast.is_alive() and [first.item, late.item, second[0].item] == [0, 1, 2]


def test_training_ends_after_max_steps(server):
    worker_model = MoETransformer(server.model.config)
    server.register(1)
    for step in range(1, 11):
        work = server.get_work(1)
        assert server.push(1, work.item, work.version, *gradient(worker_model, work)).version == step
    assert server.done and server.get_work(1) is None and server.workers[1].state == "done"
    assert server.push(1, 10, 10, {}, 0.0).status == "done"


def test_process_gone_sees_a_killed_unreaped_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_gone(proc.pid) and not process_gone(os.getpid())
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(proc.pid):  # a zombie until reaped: still gone
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert process_gone(proc.pid)
