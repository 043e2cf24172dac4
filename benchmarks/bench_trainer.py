"""Trainer throughput and overhead: ``ds train``'s loop vs a bare PyTorch loop vs HF Mixtral, and the loader alone.

The `small` preset (the quickstart's model) on real data: the prepared standard library with a 4096-token BPE
(``runs/quickstart/data`` when ``ds quickstart`` made it, else the stdlib's json/email/asyncio packages prepared
into a temporary folder), batch 16 x 256 tokens, bf16 autocast (what the quickstart uses) and fp32.

Cases, timed interleaved in one process (every case once per round, rotating order; ``--steps`` optimizer
steps per measurement), per precision:

  small/trainer        the real :class:`deepseek.train.Trainer` built exactly as ``ds train`` builds it
                       (``load_train_config`` -> ``build_model`` -> ``make_loader`` -> ``Trainer(..., lm_loss)``),
                       running ONE long ``fit()`` with the default logging (log_every=10, metrics.jsonl,
                       TensorBoard, the progress printer), eval_every=0, checkpoint.every=0, save_final=false
  small/bare           the same config and initial weights in the loop a user would write by hand:
                       AdamW(foreach) + the same batches already in memory + autocast +
                       ``model(ids, targets=...)`` + backward + step + zero_grad, nothing else
  mx/trainer, mx/bare  the same two on the Mixtral-expressible variant of `small`
                       (``router=softmax, n_shared_experts=0, first_k_dense=0, tie_embeddings=false``):
                       Mixtral has no shared expert, sigmoid router, dense first layer or tied head
  mx/hf                ``transformers.MixtralForCausalLM`` with that variant's config and the same initial
                       weights (``hf_anchor.hf_mixtral_from_ours``), bare loop as above with
                       ``model(input_ids=ids, labels=ids, use_cache=False).loss``, same autocast
  loader/1-source      ``TokenLoader.next_batch()`` alone, 16 x 256, the prepared folder
  loader/3-mix         the same folder as three sources mixed 8:1:1

How the trainer is charged. Its ``fit()`` runs in a worker thread for the whole benchmark; the loader it
iterates is wrapped so that ``next()`` (a) records the wall time since the previous ``next()`` -- one complete
iteration of the real loop: loading the batch, ``train_step`` (micro-batching, autocast, loss, aux-loss
hook, backward, loss ``.item()``, gradient-norm clipping, the balancing pre-step hook, AdamW over the
decay/no-decay groups, zero_grad, scheduler, router statistics) and everything ``fit()`` does after it
(metrics.jsonl + TensorBoard + progress line every 10th step, eval/checkpoint/time-limit checks) -- and
(b) after ``--steps`` iterations hands control back to the main thread and waits, so the other cases run
while the trainer is parked *between* two iterations, outside any timed interval. The bare and HF loops
likewise run in persistent threads of their own, so every training case computes in its own thread with
its own malloc arena (run from the main thread, the bare loops reused memory HF and the loader had left in
the main arena and page-faulted half as often as the trainer threads: an artifact of the harness, not of
the trainer). Exactly one thread computes at any time (semaphore hand-off). What is not charged:
``fit()``'s one-off setup and teardown (run folder, SummaryWriter, final eval) -- per run, not per step.
(The tok/s on the trainers' progress lines, printed to stderr, count the parked time too: ignore them.)

Log steps: with ``--steps`` 1 one measurement in ten contains the every-10th-step log write, which a
median can hide, so the logging cost is also measured directly (overhead breakdown), the log steps' own
iteration times are reported, and the trainer's overhead is given both as the median of per-round ratios
and as the ratio of summed times (which keeps every slow step, the host's stalls included).

Checked once (not part of the script): a bare loop run in a persistent worker thread, ``train_step`` called
directly in the main thread and the threaded ``fit()`` ran within noise of the bare loop in the main thread
(median time per step 0.90-0.96x of it, per-round ratios spreading ±30%; 10 rounds, mx bf16, 1 thread).

MFU = 6 * N_active * tokens/s / peak, N_active as in bench_train.py: parameters without the input
embedding, routed experts counted top_k / E, lm_head included -- for the tied `small` preset the head IS the
embedding matrix, so its V x D is added back. Peaks: 2048^2 fp32 / bf16 matmuls measured in this run (best of
bursts before and after the timing); fp32 cases against the fp32 peak, bf16 cases against the bf16 peak.

Targets: trainer overhead = 1 - trainer tok/s / bare tok/s <= 5%; ours through the trainer >= 1.2x HF bare
loop at the same config and precision; loader alone >= 20x the trainer's tokens/s.

    python benchmarks/bench_trainer.py [--rounds 16] [--steps 1] [--threads N] [--precisions bf16 fp32]
"""

from __future__ import annotations

import argparse
import copy
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, interleaved, machine_info, matmul_peak_gflops, median, paired_ratio,  # noqa: E402
                    print_machine, print_table, setup_path, spread, write_results)

setup_path()
import torch  # noqa: E402

from deepseek.data import TokenDataset, TokenLoader, prepare, python_stdlib_dir, train_tokenizer  # noqa: E402
from deepseek.data.prepare import is_validation_document  # noqa: E402
from deepseek.data.sources import iter_documents  # noqa: E402
from deepseek.train.lm import build_model, lm_loss, make_loader  # noqa: E402
from deepseek.train.trainer import Trainer  # noqa: E402
from deepseek.train.config import load_train_config  # noqa: E402
from hf_anchor import hf_mixtral_from_ours  # noqa: E402

QUICKSTART_DATA = REPO_ROOT / "runs" / "quickstart" / "data"
MIXTRAL_VARIANT = ["model.router=softmax", "model.n_shared_experts=0", "model.first_k_dense=0",
                   "model.tie_embeddings=false"]
VARIANTS = {"small": [], "mx": MIXTRAL_VARIANT}
OVERHEAD_TARGET, HF_TARGET, LOADER_TARGET = 0.05, 1.2, 20.0


# -- data --------------------------------------------------------------------------------------------

def data_dir(scratch: Path) -> tuple[Path, str]:
    """The quickstart's prepared stdlib if present, else json/email/asyncio prepared with a 4096 BPE."""
    if (QUICKSTART_DATA / "index.json").is_file():
        return QUICKSTART_DATA, "runs/quickstart/data (the prepared stdlib, 4096-token BPE)"
    stdlib = python_stdlib_dir()
    sources = [str(stdlib / name) for name in ("json", "email", "asyncio")]
    exclude = ["*/test/*", "*/tests/*", "*/__pycache__/*"]
    texts = (d.text for d in iter_documents(sources, exclude=exclude) if not is_validation_document(d.name, 0.03))
    tokenizer = train_tokenizer(texts, 4096)
    out = scratch / "data"
    prepare(sources, tokenizer, out, val_fraction=0.03, exclude=exclude, progress=False)
    return out, "stdlib json/email/asyncio prepared here (4096-token BPE)"


# -- the trainer, advanced a few steps at a time from the main thread ----------------------------------

def minor_faults() -> int:
    """Minor page faults of the calling thread so far (fresh memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def counting_faults(fn, tally: dict, name: str):
    """``fn`` that also adds the calling thread's minor page faults to ``tally[name]``."""
    def run():
        start = minor_faults()
        out = fn()
        tally[name] = tally.get(name, 0) + minor_faults() - start
        return out
    return run


class _Stop(Exception):
    pass


class SteppedBatches:
    """Wraps the trainer's loader: times each whole loop iteration and parks the loop between measurements."""

    def __init__(self, loader):
        self.loader = loader
        self.go, self.parked = threading.Semaphore(0), threading.Semaphore(0)
        self.quota, self.elapsed, self.stop = 0, 0.0, False
        self.t_start, self.faults_start, self.faults = None, 0, 0  # minor page faults of this thread, timed part
        self.iterations: list[float] = []  # every timed iteration, in order (step 1 first)

    def __iter__(self):
        return self

    def __next__(self):
        now = time.perf_counter()
        if self.t_start is not None:  # the previous iteration of fit()'s loop ends here
            dt = now - self.t_start
            self.elapsed += dt
            self.faults += minor_faults() - self.faults_start
            self.iterations.append(dt)
            self.quota -= 1
        if self.quota <= 0:
            self.t_start = None
            self.parked.release()
            self.go.acquire()
            if self.stop:
                raise _Stop
        self.faults_start = minor_faults()
        self.t_start = time.perf_counter()
        return next(self.loader)


class ThreadedTrainer:
    """A Trainer whose single ``fit()`` runs in a worker thread; ``advance(k)`` runs k iterations, returns seconds."""

    def __init__(self, trainer: Trainer, batches: SteppedBatches):
        self.trainer, self.batches, self.error = trainer, batches, None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()
        self.batches.parked.acquire()  # fit() set up and waits for its first batch

    def _fit(self):
        try:
            self.trainer.fit()
        except _Stop:
            pass
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc
            self.batches.parked.release()
        else:
            self.error = RuntimeError("fit() finished: max_steps too small for this many rounds")
            self.batches.parked.release()

    def advance(self, k: int) -> float:
        self.batches.quota, self.batches.elapsed = k, 0.0
        self.batches.go.release()
        self.batches.parked.acquire()
        if self.error is not None:
            raise self.error
        return self.batches.elapsed

    def close(self):
        self.batches.stop = True
        self.batches.go.release()
        self.thread.join()


class Worker:
    """Runs ``fn()`` on request in its own persistent thread -- the bare and HF loops, so that every training
    case computes in a thread of its own (its own malloc arena), exactly like the threaded trainer."""

    def __init__(self, fn):
        self.fn, self.faults, self.error, self.stop = fn, 0, None, False
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            self.go.acquire()
            if self.stop:
                return
            try:
                start = minor_faults()
                self.fn()
                self.faults += minor_faults() - start
            except BaseException as exc:  # surfaced in the main thread
                self.error = exc
            self.done.release()

    def __call__(self):
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error

    def close(self):
        self.stop = True
        self.go.release()
        self.thread.join()


def train_config(variant: str, precision: str, data: Path, run_dir: Path, max_steps: int):
    """The TrainConfig ``ds train`` would build for these overrides: the quickstart's model, batch and precision,
    AdamW (lr 2e-3, weight decay 0.1) with dynamic clipping, a fixed length of 256.

    The schedule is constant (no warm-up) so that the trainer's weights follow the same path as the bare
    loops' constant-lr AdamW: routing balance, hence MoE speed, then evolves alike in every case. The
    scheduler still runs every step; its cost does not depend on the shape.
    """
    overrides = [
        f"run_dir={run_dir}", f"max_steps={max_steps}", "seed=0", "batch_size=16", f"precision={precision}",
        "device=cpu", "log_every=10", "eval_every=0", "time_limit_minutes=0", "progress=true", "tensorboard=true",
        "model.preset=small", f"data.path={data}", "data.seq_len=256",
        "optimizer.lr=2e-3", "optimizer.weight_decay=0.1", "schedule.warmup_steps=0", "schedule.decay=constant",
        "clip.mode=dynamic",
        "checkpoint.every=0", "checkpoint.save_final=false", *VARIANTS[variant],
    ]
    return load_train_config(None, overrides), overrides


# -- bare loops ----------------------------------------------------------------------------------------

def bare_loop(model, batches, bf16: bool, hf: bool):
    """k steps of the loop a user writes by hand, over batches already in memory."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, foreach=True)
    state = {"i": 0}

    def steps(k: int) -> None:
        for _ in range(k):
            inputs, targets = batches[state["i"] % len(batches)]
            state["i"] += 1
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                if hf:  # the idiomatic HF call: labels in, loss out (HF shifts the labels itself)
                    loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
                else:
                    loss = model(inputs, targets=targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return steps


def n_active(model) -> int:
    """bench_train.py's N_active; a tied head is the embedding matrix, so its V x D is added back."""
    n = model.num_parameters(active=True, embedding=False)
    if model.config.tie_embeddings:
        n += model.embed.weight.numel()
    return n


# -- overhead breakdown: the trainer's per-step extras, each timed alone ----------------------------------

def per_call_ms(fn, calls: int = 20) -> float:
    """Median over 3 bursts of the mean milliseconds per call."""
    fn()
    bursts = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        bursts.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(bursts)


def overhead_breakdown(config, model0, batch, scratch: Path) -> dict[str, float]:
    """Milliseconds per step of each thing fit()/train_step do beyond the bare loop (small preset)."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    from deepseek.nn.moe import update_router_biases
    from deepseek.train.metrics import MetricsLog, StepProgress
    from deepseek.train.optim import build_optimizer, build_scheduler

    model = copy.deepcopy(model0).train()
    bf16 = config.precision == "bf16"
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model(batch.inputs, targets=batch.targets).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    out: dict[str, float] = {}
    out["grad-norm (get_total_norm + .item)"] = per_call_ms(lambda: get_total_norm(grads, 2.0).item())
    norm = get_total_norm(grads, 2.0)

    def clip():
        clip_grads_with_norm_(params, 1.0, norm)  # scales every gradient (when the norm is over the threshold)
    out["clip (clip_grads_with_norm_, when clipping)"] = per_call_ms(clip)
    for g, s in zip(grads, saved):
        g.copy_(s)
    out["router_stats + float (every step)"] = per_call_ms(
        lambda: float(model.router_stats().max_over_mean.max()))
    out["aux_loss() lookup"] = per_call_ms(lambda: model.aux_loss())
    out["update_router_biases (pre-step hook)"] = per_call_ms(lambda: update_router_biases(model))
    out["model.train() (every step)"] = per_call_ms(lambda: model.train())

    trainer_opt = build_optimizer(model, config.optimizer)
    bare_opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, foreach=True)
    t_trainer = per_call_ms(trainer_opt.step, 5)
    t_bare = per_call_ms(bare_opt.step, 5)
    out["AdamW 2 groups - 1 group"] = t_trainer - t_bare
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": irrelevant to timing
        sched = build_scheduler(trainer_opt, config.schedule, config.max_steps)
        out["scheduler.step"] = per_call_ms(sched.step)

    log = MetricsLog(scratch / "log-probe", tensorboard=True)
    progress = StepProgress(1000, 0, enabled=True)
    record = {"step": 10, "loss": 5.1, "lr": 1e-3, "grad_norm": 0.9, "clip_threshold": 1.0, "clipped": False,
              "skipped": False, "expert_load_max_over_mean": 1.3, "tokens_per_s": 1234.5, "seq_len": 256,
              "elapsed_s": 10.0}
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        progress.console.file = io.StringIO()  # the line is formatted and written, just not shown
        log_ms = per_call_ms(lambda: (log.log(record), progress.update(10, {"loss": 5.1, "throughput": 1234.5,
                                                                             "lr": 1e-3, "grad_norm": 0.9})))
    log.close()
    progress.close()
    out["log record + progress line / log_every"] = log_ms / config.log_every
    return out


# -- main ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "fp32"],
                    help="default: fp32, and bf16 where this CPU runs bf16 products fast")
    ap.add_argument("--loader-batches", type=int, default=100, help="next_batch() calls per loader measurement")
    ap.add_argument("--budget", type=float, default=300.0, help="stop after this many seconds (>= 3 rounds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precisions is None:
        from deepseek.hardware import bf16_products_fast, hardware_profile
        args.precisions = ["bf16", "fp32"] if bf16_products_fast(hardware_profile()) else ["fp32"]
    info = machine_info()
    print_machine(info)
    t_script = time.perf_counter()

    scratch = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    data, data_note = data_dir(scratch)
    tokenizer = TokenDataset(data, "train").tokenizer()
    print(f"data: {data_note}; {TokenDataset(data, 'train').num_tokens / 1e6:.2f}M training tokens")

    warmup = 2
    per_case_steps = (warmup + args.rounds) * args.steps
    max_steps = per_case_steps + 10  # never reached: the benchmark stops fit() first
    cases, trainers, workers, meta, tokens_per_step = {}, [], {}, {}, 16 * 256
    first_loss, logit_diff, small_cfg, small_init = {}, None, None, None
    ours_models = {}  # case -> our model, to compare where training took the routing balance
    for precision in args.precisions:
        bf16 = precision == "bf16"
        for variant in VARIANTS:
            cfg, overrides = train_config(variant, precision, data, scratch / f"run-{variant}-{precision}", max_steps)
            model = build_model(cfg, tokenizer)
            init = copy.deepcopy(model)
            # The bare loops get the same batches the trainer's loader yields, materialised up front.
            ref = make_loader(cfg)
            batches = [(b.inputs, b.targets) for b in (ref.next_batch() for _ in range(per_case_steps))]
            wrapped = SteppedBatches(make_loader(cfg))
            trainer = Trainer(model, cfg, batches=wrapped, loss_fn=lm_loss, tokenizer=tokenizer)
            threaded = ThreadedTrainer(trainer, wrapped)
            trainers.append(threaded)
            meta[variant] = dict(overrides=overrides, n_active=n_active(init),
                                 n_params=init.num_parameters(), config=init.config.to_dict())
            cases[f"{variant}/trainer-{precision}"] = (lambda t: lambda: t.advance(args.steps))(threaded)
            bare_model = copy.deepcopy(init)
            step = bare_loop(bare_model, batches, bf16, hf=False)
            workers[f"{variant}/bare-{precision}"] = Worker((lambda s: lambda: s(args.steps))(step))
            cases[f"{variant}/bare-{precision}"] = workers[f"{variant}/bare-{precision}"]
            ours_models[f"{variant}/trainer-{precision}"] = model
            ours_models[f"{variant}/bare-{precision}"] = bare_model
            if variant == "small" and small_cfg is None:
                small_cfg, small_init = cfg, init
            if variant == "mx":
                hf = hf_mixtral_from_ours(init)
                if logit_diff is None:  # same weights => same function (checked, not assumed)
                    with torch.no_grad():
                        ids = batches[0][0][:2, :64]
                        logit_diff = (init.eval()(ids) - hf.eval()(ids).logits).abs().max().item()
                        tgt = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
                        first_loss = {"ours": init(ids, targets=tgt).item(),
                                      "hf": hf(input_ids=ids, labels=ids).loss.item()}
                    init.train()
                step = bare_loop(hf, batches, bf16, hf=True)
                workers[f"mx/hf-{precision}"] = Worker((lambda s: lambda: s(args.steps))(step))
                cases[f"mx/hf-{precision}"] = workers[f"mx/hf-{precision}"]

    def loader_case(sources):
        loader = TokenLoader(sources, batch_size=16, seq_len=256, seed=0)
        return lambda: [loader.next_batch() for _ in range(args.loader_batches)]
    cases["loader/1-source"] = loader_case(data)
    cases["loader/3-mix"] = loader_case({"general": (data, 8.0), "code": (data, 1.0), "domain": (data, 1.0)})
    faults: dict[str, int] = {}  # minor page faults per case, counted in the thread that computes it
    cases = {k: counting_faults(v, faults, k) if k.startswith("loader/") else v for k, v in cases.items()}

    n = meta["small"]
    print(f"small: {n['n_params'] / 1e6:.2f}M params, N_active {n['n_active'] / 1e6:.2f}M; mixtral-expressible "
          f"variant (mx): {meta['mx']['n_params'] / 1e6:.2f}M params, N_active {meta['mx']['n_active'] / 1e6:.2f}M "
          f"(no input embedding, top_k of E, head included)")
    print(f"mx vs HF, same weights: max |logits ours - HF| = {logit_diff:.2e}; first-step loss ours "
          f"{first_loss['ours']:.6f}, HF {first_loss['hf']:.6f}")

    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    times = interleaved(cases, rounds=args.rounds, warmup=warmup, budget_s=args.budget)
    peak = {"fp32": max(peak["fp32"], matmul_peak_gflops(torch.float32)),
            "bf16": max(peak["bf16"], matmul_peak_gflops(torch.bfloat16))}
    iterations = {}
    for threaded, name in zip(trainers, [k for k in cases if "/trainer-" in k]):
        iterations[name] = threaded.batches.iterations
        faults[name] = threaded.batches.faults
    for name, worker in workers.items():
        faults[name] = worker.faults
        worker.close()
        threaded.close()
    breakdown = overhead_breakdown(small_cfg, small_init, make_loader(small_cfg).next_batch(), scratch) \
        if small_cfg is not None else {}

    # -- report ----------------------------------------------------------------------------------------
    rounds = len(times[next(iter(times))])
    tps = {}
    for name, ts in times.items():
        per = args.loader_batches if name.startswith("loader/") else args.steps
        tps[name] = [per * tokens_per_step / t for t in ts]
    rows, results, verdicts = [], {}, []
    for precision in args.precisions:
        for variant in VARIANTS:
            for kind in ("trainer", "bare", "hf"):
                name = f"{variant}/{kind}-{precision}"
                if name not in times:
                    continue
                mfu = median(tps[name]) * 6 * meta[variant]["n_active"] / (peak[precision] * 1e9)
                note = ""
                entry = dict(tokens_per_s=tps[name], mfu=mfu)
                if kind == "trainer":
                    bare = times[f"{variant}/bare-{precision}"]
                    ratio = paired_ratio(bare, times[name])  # trainer tok/s / bare tok/s, per round
                    over_med = 1 - median(ratio)
                    over_sum = 1 - sum(bare) / sum(times[name])
                    ok = over_med <= OVERHEAD_TARGET
                    note = (f"overhead {100 * over_med:.1f}% (rounds {100 * (1 - max(ratio)):.1f}.."
                            f"{100 * (1 - min(ratio)):.1f}%; summed {100 * over_sum:.1f}%)")
                    verdicts.append([f"{variant} trainer overhead, {precision}", "<= 5%",
                                     f"{100 * over_med:.1f}% (summed {100 * over_sum:.1f}%)",
                                     "met" if ok else "MISSED"])
                    entry.update(overhead_median=over_med, overhead_summed=over_sum, ratio_to_bare=ratio)
                    if variant == "mx":
                        hf = paired_ratio(times[f"mx/hf-{precision}"], times[name])
                        note += f"; {median(hf):.2f}x HF ({min(hf):.2f}-{max(hf):.2f})"
                        verdicts.append([f"mx trainer / HF bare, {precision}", ">= 1.2x", f"{median(hf):.2f}x",
                                         "met" if median(hf) >= HF_TARGET else "MISSED"])
                        entry.update(ratio_to_hf=hf)
                elif kind == "bare" and variant == "mx":
                    hf = paired_ratio(times[f"mx/hf-{precision}"], times[name])
                    note = f"{median(hf):.2f}x HF ({min(hf):.2f}-{max(hf):.2f})"
                    entry.update(ratio_to_hf=hf)
                rows.append([name, spread(tps[name]), f"{100 * mfu:.1f}% of {precision}", note])
                results[name] = entry
    trainer_names = [k for k in times if "/trainer-" in k]
    fastest = max(trainer_names, key=lambda k: median(tps[k]))
    for loader in ("loader/1-source", "loader/3-mix"):
        ratio = paired_ratio(times[fastest], [t * args.steps / args.loader_batches for t in times[loader]])
        rows.append([loader, spread(tps[loader]), "",
                     f"{median(ratio):.0f}x the fastest trainer case ({fastest}), min {min(ratio):.0f}x"])
        results[loader] = dict(tokens_per_s=tps[loader], ratio_to_fastest_trainer=ratio)
        verdicts.append([f"{loader} / trainer tok/s", ">= 20x", f"{median(ratio):.0f}x",
                         "met" if median(ratio) >= LOADER_TARGET else "MISSED"])

    print(f"\nbatch 16x256 = {tokens_per_step} tokens/step; {rounds} rounds x {args.steps} steps "
          f"(loader: x {args.loader_batches} batches); threads {torch.get_num_threads()}; peaks: fp32 "
          f"{peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s (2048^2 matmul, this run)")
    print("small = the `small` preset; mx = its Mixtral-expressible variant (softmax router, no shared expert, "
          "no dense first layer, untied head) -- the only one HF Mixtral can run, so the HF ratio is on mx")
    print_table(["case", "tokens/s median (min-max)", "MFU", "vs bare / HF / trainer (paired medians)"], rows)
    print()
    print_table(["target", "want", "measured", "verdict"], verdicts)

    # Where the trainer's time goes beyond the bare loop: its per-step extras timed alone.
    step_ms = {}
    for name in trainer_names:
        its = iterations[name][warmup * args.steps:]
        log_steps = [t for i, t in enumerate(its, warmup * args.steps + 1) if i % small_cfg.log_every == 0]
        other = [t for i, t in enumerate(its, warmup * args.steps + 1) if i % small_cfg.log_every]
        step_ms[name] = dict(median_ms=1e3 * median(other), log_step_median_ms=1e3 * median(log_steps)
                             if log_steps else None)
    print("\ntrainer iterations (ms, median): " + "; ".join(
        f"{k} {v['median_ms']:.0f} other steps, {v['log_step_median_ms'] or float('nan'):.0f} log steps"
        for k, v in step_ms.items()))
    calls = {k: len(v) + warmup for k, v in times.items()}
    faults_per_step = {k: faults[k] / (calls[k] * args.steps) for k in times if "/loader" not in k and k in faults}
    print("minor page faults per step (warm-up included): " + ", ".join(
        f"{k} {v:.0f}" for k, v in faults_per_step.items()))
    balance = {}
    for name, model in ours_models.items():
        stats = model.router_stats() if name in times else None
        if stats is not None:
            balance[name] = float(stats.max_over_mean.mean())
    print("expert load max/mean at the last step (mean over MoE layers; same batches, so trainer and bare "
          "should be alike): " + ", ".join(f"{k} {v:.2f}" for k, v in balance.items()))
    if breakdown:
        bare_ms = 1e3 * median(times[f"small/bare-{small_cfg.precision}"]) / args.steps
        total = sum(v for k, v in breakdown.items() if "when clipping" not in k)
        print(f"\ntrainer extras per step, small {small_cfg.precision}, each timed alone "
              f"(bare step median {bare_ms:.0f} ms):")
        print_table(["extra", "ms/step", "% of a bare step"],
                    [[k, f"{v:.3f}", f"{100 * v / bare_ms:.2f}%"] for k, v in breakdown.items()]
                    + [["sum (clip excluded: only when clipping)", f"{total:.3f}", f"{100 * total / bare_ms:.2f}%"]])
    print(f"\nwhole script: {time.perf_counter() - t_script:.0f} s")
    write_results("bench_trainer", dict(
        machine=info, data=data_note, batch=16, seq=256, steps_per_measurement=args.steps, rounds=rounds,
        peak_gflops=peak, variants=meta, logit_diff_vs_hf=logit_diff, first_step_loss=first_loss,
        cases=results, verdicts=verdicts, trainer_iterations_s=iterations, trainer_step_ms=step_ms,
        overhead_breakdown_ms=breakdown, expert_load_max_over_mean=balance, minor_faults_per_step=faults_per_step))
    shutil.rmtree(scratch, ignore_errors=True)  # run folders (metrics.jsonl, TensorBoard) and any prepared data


if __name__ == "__main__":
    main()
