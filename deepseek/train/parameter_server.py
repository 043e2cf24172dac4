"""Asynchronous parameter-server training (``parallel.mode: parameter_server``) on ``torch.distributed.rpc``.

Rank 0 is the server: it owns the model, AdamW, the schedule, the data loader and a version counter (the number
of updates applied). Ranks 1..N-1 are workers that loop::

    work = server.get_work(me)        # pull: a batch (a work item) + the current parameters and their version
    grads = backward(model, work.batch)
    server.push(me, work.item, work.version, grads)   # push: the server applies it, asynchronously

The server applies each pushed gradient as it arrives (under a lock), unless it is *stale*: computed from
parameters more than ``parallel.staleness`` versions old. A stale gradient is dropped and its batch re-queued,
to be computed again from fresh parameters. Work is pulled, so a fast worker simply takes more of it (the
scheduler rebalances by itself); a worker whose process is gone (same machine) or that was not heard from for
``parallel.ps_lease_s`` seconds is declared lost, and the batch it held goes back to the front of the queue for the
others: a killed worker does not stop training. In the first round every worker gets a batch before any worker gets
its second (bounded by the lease), so a worker that starts up later than the others still takes part.

Launch: ``ds train CONFIG --nproc N parallel.mode=parameter_server`` (or ``python -m
deepseek.train.parameter_server --nproc N CONFIG key=value…``) starts the N processes itself, not under
torchrun: torchrun's agent tears the whole group down when one worker dies, which is exactly what this
mode must survive. See docs/parameter_server.md.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.data import TokenDataset
from deepseek.models.directory import save
from deepseek.models.transformer import MoETransformer
from deepseek.nn.moe import Router, update_router_biases
from deepseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deepseek.train.clipping import GradientClipper
from deepseek.train.config import TrainConfig, load_train_config
from deepseek.train.lm import build_model, data_paths, ensure_prepared, evaluate_lm, lm_loss, make_loader
from deepseek.train.metrics import MetricsLog, StepProgress
from deepseek.train.optim import build_optimizer, build_scheduler
from deepseek.train.step import ForwardBackward, autocast, move_batch, split_batch
from deepseek.train.trainer import TrainResult, autocast_dtype, count_items, resolve_device

SERVER_NAME = "ps"
STATUS_FILE = "parameter_server.json"


def worker_name(rank: int) -> str:
    return f"worker{rank}"


def ps_settings(config: TrainConfig) -> tuple[int, float]:
    """(parallel.staleness, parallel.ps_lease_s) of a config."""
    return int(config.parallel.staleness), float(config.parallel.ps_lease_s)


# -- the server's state machine (no RPC in here: testable in one process) ---------------------------------------


@dataclass
class WorkItem:
    """What a worker pulls: batch number ``item`` of the run, and the parameters at ``version``."""

    item: int
    batch: Any
    version: int
    state: dict[str, torch.Tensor]


@dataclass
class _Lease:
    worker: int
    batch: Any
    since: float


@dataclass
class _Worker:
    pid: int = 0
    host: str = ""
    state: str = "working"  # working | lost | done
    applied: int = 0
    stale: int = 0
    pulled: int = 0  # batches handed to it
    last_seen: float = 0.0


@dataclass
class PushResult:
    status: str  # applied | stale | expired | done
    version: int
    staleness: int = 0


class ParameterServer:
    """The model, its optimizer and the work queue, shared by the RPC threads under one lock.

    ``batches`` yields the global batches in order; batch ``i`` is work item ``i``. ``clock`` is injectable so
    the lease logic can be tested without waiting.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, batches: Any, log: Any = None,
                 tokenizer: Any = None, clock: Callable[[], float] = time.monotonic,
                 staleness: Optional[int] = None, lease_s: Optional[float] = None, expected_workers: int = 0):
        self.config, self.model, self.batches, self.tokenizer, self.clock = config, model, batches, tokenizer, clock
        self.expected_workers = expected_workers  # the first round waits for this many (0: no first round)
        default_staleness, default_lease = ps_settings(config)
        self.staleness = default_staleness if staleness is None else staleness
        self.lease_s = default_lease if lease_s is None else lease_s
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, config.optimizer, device_type=self.device.type)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.max_steps)
        self.clipper = GradientClipper(config.clip)
        self.params = dict(model.named_parameters())
        self.routers = {name: m for name, m in model.named_modules()
                        if isinstance(m, Router) and m.kind == "sigmoid"}
        self.log = log
        self.version = 0  # updates applied = the optimizer step
        self.next_item = 0
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()  # re-queued (item, batch), first
        self.leases: dict[int, _Lease] = {}
        self.workers: dict[int, _Worker] = {}
        self.counts = collections.Counter()  # stale, expired, requeued, lost
        self.lock = threading.Condition()
        self.started = clock()
        self.window_items, self.window_start = 0, clock()
        self.last_figures: dict[str, float] = {"loss": float("nan")}
        self.on_step: Optional[Callable[[int], None]] = None  # called under the lock after each applied update

    @property
    def done(self) -> bool:
        return self.version >= self.config.max_steps

    # -- what the RPC handlers call ----------------------------------------------------------------------

    def register(self, worker: int, pid: int = 0, host: str = "") -> None:
        with self.lock:
            self.workers[worker] = _Worker(pid=pid, host=host, last_seen=self.clock())
            self._event("worker_joined", worker, pid=pid, host=host)
            self.lock.notify_all()

    def get_work(self, worker: int) -> Optional[WorkItem]:
        """The next batch for ``worker`` with the current parameters, or None when training is over."""
        with self.lock:
            info = self._seen(worker)
            self._wait_for_first_round(info)
            if self.done:
                info.state = "done"
                self.lock.notify_all()
                return None
            if self.queue:
                item, batch = self.queue.popleft()
            else:
                item, batch = self.next_item, next(self.batches)
                self.next_item += 1
            self.leases[item] = _Lease(worker, batch, self.clock())
            info.pulled += 1
            self.lock.notify_all()  # a worker waiting for the first round may go on
            # clone: the reply is serialized after this returns, while the optimizer may already be updating
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return WorkItem(item, batch, self.version, state)

    def push(self, worker: int, item: int, version: int, grads: dict[str, torch.Tensor], loss: float,
             aux_loss: Optional[float] = None, router_load: Optional[dict[str, torch.Tensor]] = None) -> PushResult:
        """Apply ``worker``'s gradient of ``item``, computed from parameters at ``version``, unless it is stale."""
        with self.lock:
            self._seen(worker)
            if self.done:
                return PushResult("done", self.version)
            lease = self.leases.get(item)
            if lease is None or lease.worker != worker:  # the lease ran out and the batch went to another worker
                self.counts["expired"] += 1
                return PushResult("expired", self.version)
            del self.leases[item]
            staleness = self.version - version
            if staleness > self.staleness:
                self.counts["stale"] += 1
                self.workers[worker].stale += 1
                self.queue.appendleft((item, lease.batch))  # compute it again from fresh parameters
                self.counts["requeued"] += 1
                return PushResult("stale", self.version, staleness)
            self._apply(grads, router_load)
            self.workers[worker].applied += 1
            self.window_items += count_items(lease.batch)
            self._log_step(worker, item, loss, aux_loss, staleness, lease.batch)
            if self.on_step is not None:
                self.on_step(self.version)
            self.lock.notify_all()
            return PushResult("applied", self.version, staleness)

    def reap(self) -> list[int]:
        """Declare lost the workers not heard from within the lease, and those on this machine whose process is
        gone; re-queue their batches; returns them."""
        with self.lock:
            now, lost, reasons = self.clock(), [], {}
            for worker, info in self.workers.items():
                if info.state != "working":
                    continue
                if now - info.last_seen > self.lease_s:
                    reasons[worker] = f"silent for more than parallel.ps_lease_s={self.lease_s:g}s"
                elif info.host == socket.gethostname() and info.pid and process_gone(info.pid):
                    reasons[worker] = f"process {info.pid} is gone"
                else:
                    continue
                info.state = "lost"
                lost.append(worker)
            for worker in lost:
                items = sorted(i for i, lease in self.leases.items() if lease.worker == worker)
                for item in reversed(items):  # to the front, in their original order
                    self.queue.appendleft((item, self.leases.pop(item).batch))
                self.counts["lost"] += 1
                self.counts["requeued"] += len(items)
                self._event("worker_lost", worker, reason=reasons[worker], requeued=items,
                            silent_s=round(now - self.workers[worker].last_seen, 2))
            if lost:
                self.lock.notify_all()
            return lost

    def live_workers(self) -> list[int]:
        return [w for w, info in self.workers.items() if info.state == "working"]

    def status(self) -> dict[str, Any]:
        """What ``run_dir/parameter_server.json`` holds: the version, the counters and every worker."""
        with self.lock:
            return {"version": self.version, "max_steps": self.config.max_steps, "staleness_bound": self.staleness,
                    "lease_s": self.lease_s, **{k: self.counts[k] for k in ("stale", "expired", "requeued", "lost")},
                    "workers": {str(w): {"pid": i.pid, "state": i.state, "applied": i.applied, "stale": i.stale}
                                for w, i in sorted(self.workers.items())}}

    # -- internals (called with the lock held) ----------------------------------------------------------------

    def _wait_for_first_round(self, info: _Worker) -> None:
        """The first round: every expected worker pulls its first batch before any worker pulls its second, so that
        a worker that starts up late still takes part and the run does not hinge on start-up order. A worker lost
        before then no longer counts; one that has not pulled within ``lease_s`` of the start is not waited for."""
        while (info.pulled and not self.done and self.clock() < self.started + self.lease_s
               and sum(w.pulled > 0 or w.state == "lost" for w in self.workers.values()) < self.expected_workers):
            self.lock.wait(timeout=0.25)

    def _seen(self, worker: int) -> _Worker:
        info = self.workers.setdefault(worker, _Worker())
        if info.state == "lost":  # it was only slow: it works again (its old lease is gone)
            self._event("worker_rejoined", worker)
        if info.state != "done":
            info.state = "working"
        info.last_seen = self.clock()
        return info

    def _apply(self, grads: dict[str, torch.Tensor], router_load: Optional[dict[str, torch.Tensor]]) -> None:
        for name, param in self.params.items():
            grad = grads.get(name)
            param.grad = None if grad is None else grad.to(param.device, param.dtype)
        if router_load:
            for name, load in router_load.items():
                self.routers[name].load_accum += load.to(self.routers[name].load_accum.device)
            update_router_biases(self.model)  # DeepSeek-V3 balancing, from the load the workers saw
        clip = self.clipper(self.params.values())
        lr = self.optimizer.param_groups[0]["lr"]
        if clip.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.version += 1
        self.last_figures = {"lr": lr, "grad_norm": clip.grad_norm, "clip_threshold": clip.threshold,
                             "clipped": clip.clipped, "skipped": not clip.finite}

    def _log_step(self, worker: int, item: int, loss: float, aux_loss: Optional[float], staleness: int,
                  batch: Any) -> None:
        self.last_figures = {"loss": loss, **self.last_figures}
        if aux_loss is not None:
            self.last_figures["aux_loss"] = aux_loss
        if self.log is None or (self.version % self.config.log_every and not self.done):
            return
        now = self.clock()
        throughput = self.window_items / (now - self.window_start) if now > self.window_start else 0.0
        self.window_items, self.window_start = 0, now
        self.log.log({"step": self.version, **self.last_figures, "tokens_per_s": round(throughput, 1),
                      "seq_len": getattr(batch, "seq_len", None), "worker": worker, "item": item,
                      "staleness": staleness, "stale_dropped": self.counts["stale"],
                      "requeued": self.counts["requeued"], "workers_alive": len(self.live_workers()),
                      "elapsed_s": round(now - self.started, 2)})

    def _event(self, event: str, worker: int, **extra: Any) -> None:
        if self.log is not None:
            self.log.log({"step": self.version, "event": event, "worker": worker, **extra})

    # -- checkpoint state ---------------------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """The run state besides model/optimizer/scheduler. Batches in flight are not in it: a resumed run
        continues with the batches after the last one handed out."""
        state = {"step": self.version, "clipper": self.clipper.state_dict(), "next_item": self.next_item}
        if hasattr(self.batches, "state_dict"):
            state["data"] = self.batches.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.version = int(state["step"])
        self.next_item = int(state.get("next_item", self.version))
        self.clipper.load_state_dict(state["clipper"])
        if "data" in state and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` on this machine has exited (a zombie not yet reaped by its parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


# -- the RPC surface: module functions run on rank 0 by the RPC threads ------------------------------------------

_SERVER: Optional[ParameterServer] = None
_READY = threading.Event()
_MODEL_CONFIG: Any = None


def _rpc_register(worker: int, pid: int, host: str) -> Any:
    _READY.wait()  # the server may still be preparing the data
    if _SERVER is None:
        raise RuntimeError("the parameter server failed to start (see rank 0's error)")
    _SERVER.register(worker, pid, host)
    return _MODEL_CONFIG


def _rpc_get_work(worker: int) -> Optional[WorkItem]:
    assert _SERVER is not None
    return _SERVER.get_work(worker)


def _rpc_push(worker: int, item: int, version: int, grads: dict[str, torch.Tensor], loss: float,
              aux_loss: Optional[float], router_load: Optional[dict[str, torch.Tensor]]) -> PushResult:
    assert _SERVER is not None
    return _SERVER.push(worker, item, version, grads, loss, aux_loss, router_load)


def _init_rpc(rank: int, world_size: int, timeout_s: float) -> None:
    from torch.distributed import rpc

    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{addr}:{port}", rpc_timeout=timeout_s,
                                              num_worker_threads=max(8, 2 * world_size))
    name = SERVER_NAME if rank == 0 else worker_name(rank)
    with warnings.catch_warnings():  # rpc's own rendezvous uses a gloo group the deprecated way (pytorch#149393)
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def train_parameter_server(config: TrainConfig) -> TrainResult:
    """This process's part of a parameter-server run: rank 0 serves, ranks 1.. work (RANK / WORLD_SIZE)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 2:
        raise ConfigError("parallel.mode=parameter_server needs a server and at least one worker: "
                          "run with --nproc 2 or more")
    _init_rpc(rank, world_size, config.parallel.timeout_s)
    if rank == 0:
        return _serve(config, world_size)
    return _work(config, rank)


def _serve(config: TrainConfig, world_size: int) -> TrainResult:
    from torch.distributed import rpc

    global _SERVER, _MODEL_CONFIG
    run_dir = Path(config.run_dir)
    started = time.perf_counter()
    log = None
    progress = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_prepared(config.data, config.model_config().vocab_size, progress=config.progress)
        paths = [p for p, _ in data_paths(config.data).values()]
        tokenizer = TokenDataset(paths[0], "train").tokenizer()
        model = build_model(config, tokenizer).to(resolve_device(config.device))
        log = MetricsLog(run_dir, tensorboard=config.tensorboard, metrics_port=config.metrics_port,
                         metrics_host=config.metrics_host)
        server = ParameterServer(model, config, batches=make_loader(config), log=log, tokenizer=tokenizer,
                                 expected_workers=world_size - 1)
        resumed = None
        if config.checkpoint.resume and (path := latest_checkpoint(run_dir / "checkpoints")) is not None:
            server.load_training_state(load_checkpoint(path, model=model, optimizer=server.optimizer,
                                                       scheduler=server.scheduler, verify=False))
            resumed = server.version
        log.truncate_after(server.version)
        progress = StepProgress(config.max_steps, server.version, enabled=config.progress, unit="tok/s")

        def on_step(step: int) -> None:  # under the server's lock: model, optimizer and data agree
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < config.max_steps:
                save_checkpoint(run_dir / "checkpoints", step, model=model, optimizer=server.optimizer,
                                scheduler=server.scheduler, state=server.training_state(), tokenizer=tokenizer,
                                keep_last=config.checkpoint.keep_last)

        server.on_step = on_step
        _MODEL_CONFIG = model.config
        _SERVER = server
        _READY.set()

        eval_seq_len = config.data.schedule()[-1][1]

        def evaluate() -> Optional[dict[str, float]]:
            with server.lock:  # a consistent snapshot, evaluated outside the lock while updates go on
                eval_model = copy.deepcopy(model).eval()
            with torch.no_grad(), autocast(server.device.type, autocast_dtype(config.precision, server.device)):
                results = evaluate_lm(eval_model, paths, batch_size=config.micro_batch, seq_len=eval_seq_len,
                                      max_batches=config.data.eval_batches or None)
            if results:
                log.log({"step": server.version, **results})
                progress.print("eval step {}: {}".format(server.version,
                                                         "  ".join(f"{k} {v:.4f}" for k, v in results.items())))
            return results or None

        status_path = run_dir / STATUS_FILE
        next_eval = (server.version // config.eval_every + 1) * config.eval_every if config.eval_every else None
        last_progress = -1
        # Until max_steps updates are applied: reap silent workers, evaluate, report.
        while True:
            with server.lock:
                server.lock.wait(timeout=0.25)
                version, done = server.version, server.done
            server.reap()
            _write_status(status_path, server.status())
            if version != last_progress:
                progress.update(version, server.last_figures)
                last_progress = version
            if done:
                break
            if next_eval is not None and version >= next_eval:
                evaluate()
                next_eval += config.eval_every
            # no worker left: fail once all have joined and been lost (or a missing one had timeout_s to join)
            # (done is read again: the last update may have landed, and the workers left, since it was read above)
            if not server.live_workers() and not server.done and (
                    len(server.workers) == world_size - 1 or time.perf_counter() - started > config.parallel.timeout_s):
                raise RuntimeError(f"parameter server: no live worker at step {version} (joined: "
                                   f"{sorted(server.workers)} of {world_size - 1}); nothing left to train with")
        final_eval = evaluate()
        if config.checkpoint.save_final:
            save_checkpoint(run_dir / "checkpoints", server.version, model=model, optimizer=server.optimizer,
                            scheduler=server.scheduler, state=server.training_state(), tokenizer=tokenizer,
                            keep_last=config.checkpoint.keep_last)
            save(model, tokenizer, run_dir / "model",
                 generation={"max_new_tokens": 128, "temperature": 0.8, "top_p": 0.95})
        # Tell every live worker that training is over (each asks for work and gets None), within a lease.
        deadline = time.monotonic() + server.lease_s
        while time.monotonic() < deadline:
            server.reap()
            with server.lock:
                if not server.live_workers():
                    break
                server.lock.wait(timeout=0.25)
        _write_status(status_path, server.status())
        figures = server.last_figures
        return TrainResult(server.version, float(figures.get("loss", math.nan)), time.perf_counter() - started,
                           False, resumed, final_eval)
    finally:
        _READY.set()
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
        # not graceful: a graceful shutdown waits for every worker, and a dead one never answers
        rpc.shutdown(graceful=False)
        _SERVER = None


def _write_status(path: Path, status: dict[str, Any]) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, path)


def _work(config: TrainConfig, rank: int) -> TrainResult:
    """A worker: pull a batch and the parameters, push the gradient, until the server says it is over."""
    from torch.distributed import rpc

    started = time.perf_counter()
    device = resolve_device(config.device)
    steps, loss = 0, math.nan
    clean = False
    try:
        model_config = rpc.rpc_sync(SERVER_NAME, _rpc_register, args=(rank, os.getpid(), socket.gethostname()),
                                     timeout=0)  # 0 = no limit
        model = MoETransformer(model_config).to(device)
        model.gradient_checkpointing = config.gradient_checkpointing
        routers = {name: m for name, m in model.named_modules() if isinstance(m, Router) and m.kind == "sigmoid"}
        accum = config.batch_size // config.micro_batch
        # The trainer's own forward/backward: accumulation over micro-batches, autocast, the aux loss.
        forward_backward = ForwardBackward(model, lm_loss, device.type, autocast_dtype(config.precision, device))
        while True:
            work = rpc.rpc_sync(SERVER_NAME, _rpc_get_work, args=(rank,))
            if work is None:
                break
            model.load_state_dict(work.state)
            model.train()
            for r in routers.values():
                r.load_accum.zero_()
            micro_batches = [move_batch(micro, device) for micro in split_batch(work.batch, accum)]
            loss_sum, aux_sum = forward_backward(micro_batches)
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            load = {n: r.load_accum.clone() for n, r in routers.items()} or None
            loss = loss_sum / accum
            rpc.rpc_sync(SERVER_NAME, _rpc_push, args=(rank, work.item, work.version, grads, loss,
                                                       aux_sum / accum if aux_sum is not None else None, load))
            model.zero_grad(set_to_none=True)
            steps += 1
        clean = True
    finally:
        rpc.shutdown(graceful=False)
    return TrainResult(steps, loss, time.perf_counter() - started, stopped_early=not clean)


# -- launching N processes (not under torchrun: a dead worker must not end the job) ------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_parameter_server(nproc: int, args: list[str], *, command: Optional[list[str]] = None,
                            env: Optional[dict[str, str]] = None, grace_s: float = 30.0) -> int:
    """Start ``nproc`` local processes of ``ds <args>`` (rank 0 = server) and wait for the server.

    Not torchrun: its agent stops every worker when one fails, and this mode exists to keep training through
    that. A worker that dies is reported here and re-planned around by the server; the job's exit status is
    the server's. Workers still running ``grace_s`` after the server exits are terminated.
    """
    if nproc < 2:
        raise ValueError(f"a parameter server needs at least 2 processes (server + worker), got {nproc}")
    command = command or [sys.executable, "-m", "deepseek.cli.main"]
    base = {**(env if env is not None else os.environ), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([*command, *args], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    reported: set[int] = set()
    try:
        while procs[0].poll() is None:
            for r, p in enumerate(procs[1:], start=1):
                code = p.poll()
                if code not in (None, 0) and r not in reported:
                    reported.add(r)
                    how = f"signal {-code}" if code < 0 else f"exit status {code}"
                    print(f"parameter server launcher: worker rank {r} (pid {p.pid}) died ({how}); "
                          f"training goes on with the others", file=sys.stderr, flush=True)
            time.sleep(0.2)
        deadline = time.monotonic() + grace_s
        for p in procs[1:]:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return procs[0].returncode
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m deepseek.train.parameter_server [--nproc N] [CONFIG] key=value…`` (what ``ds train`` wires to)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    nproc = 0
    if "--nproc" in argv:
        i = argv.index("--nproc")
        nproc = int(argv[i + 1])
        del argv[i:i + 2]
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path is not None else argv
    config = load_train_config(path, overrides)  # a bad config fails before anything starts
    if nproc:
        return launch_parameter_server(nproc, argv, command=[sys.executable, "-m", "deepseek.train.parameter_server"])
    result = train_parameter_server(config)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result.step} steps in {result.elapsed_s:.0f}s, final loss {result.loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
