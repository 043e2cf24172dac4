"""Short measurements on this machine for ``ds plan`` when no ``profile.json`` is given: decode and prefill
tokens/s through the generation engine, training tokens/s through the trainer's step, and (in a fresh process,
so that nothing earlier inflates it) the peak resident memory a few training steps add.

Each is small on purpose (a few decode steps, a few training steps): the plan needs an order of magnitude per
device, and ``ds profile`` is the tool that measures carefully.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from deepseek.models.config import ModelConfig
from deepseek.ops.memory import peak_rss_bytes


@dataclass
class DecodeMeasurement:
    """Tokens/s of one replica generating for ``streams`` sequences at once (eager, this process's threads)."""

    streams: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # generated tokens of all streams per second, after the first token


@dataclass
class TrainMeasurement:
    """Tokens/s of the trainer's forward + backward + AdamW step on one device, fp32."""

    rows: int
    seq_len: int
    steps: int
    tokens_per_s: float


def measure_decode(model: torch.nn.Module, tokenizer, streams: int, prompt_tokens: int = 16,
                   new_tokens: int = 16) -> DecodeMeasurement:
    """Generate ``new_tokens`` (end-of-sequence ignored) for ``streams`` prompts of ``prompt_tokens`` random ids
    through :func:`deepseek.generate.generate_stream`; prefill is timed to the first token, decode after it."""
    from deepseek.generate import SamplingParams
    from deepseek.generate.engine import generate_stream

    if streams < 1 or new_tokens < 2:
        raise ValueError("measure_decode needs streams >= 1 and new_tokens >= 2")
    prompt_tokens = max(1, min(prompt_tokens, model.config.max_seq_len - new_tokens))
    vocab = min(model.config.vocab_size, tokenizer.get_vocab_size())
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (streams, prompt_tokens), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    # Warm-up: the first products pick their kernels (few-row arrangements are timed once per shape).
    for _ in generate_stream(model, tokenizer, prompts, SamplingParams(max_new_tokens=3, ignore_eos=True)):
        pass
    start = time.perf_counter()
    first = last = None
    produced = 0
    for event in generate_stream(model, tokenizer, prompts, params):
        now = time.perf_counter()
        if event.token_id is None:
            continue
        produced += 1
        if first is None:
            first = now
        last = now
    decoded = produced - streams  # the first token of each stream comes with the prefill
    decode_s = max(last - first, 1e-9)
    return DecodeMeasurement(streams, prompt_tokens, new_tokens, streams * prompt_tokens / max(first - start, 1e-9),
                             decoded / decode_s)


def _train_step_runner(cfg: ModelConfig, rows: int, seq_len: int, seed: int = 0, checkpointing: bool = False):
    """A model, its optimizer and a function running one trainer step (ForwardBackward + AdamW) on random ids."""
    from deepseek.models.transformer import MoETransformer
    from deepseek.train.config import OptimizerConfig
    from deepseek.train.optim import build_optimizer
    from deepseek.train.step import ForwardBackward

    torch.manual_seed(seed)
    model = MoETransformer(cfg).train()
    model.gradient_checkpointing = checkpointing
    optimizer = build_optimizer(model, OptimizerConfig())
    step = ForwardBackward(model, lambda m, ids: m(ids, targets=ids))
    ids = torch.randint(0, cfg.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)  # as the Trainer does: gradients are freed between steps
        step([ids])
        optimizer.step()

    return model, run


def measure_train(cfg: ModelConfig, rows: int, seq_len: int, steps: int = 3,
                  checkpointing: bool = False) -> TrainMeasurement:
    """Tokens/s of ``steps`` trainer steps of ``rows`` x ``seq_len`` tokens after one warm-up step."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    _, run = _train_step_runner(cfg, rows, seq_len, checkpointing=checkpointing)
    run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return TrainMeasurement(rows, seq_len, steps, rows * seq_len * steps / (time.perf_counter() - start))


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_training_memory(cfg: ModelConfig, rows: int, seq_len: int, steps: int = 2, threads: int = 1,
                         checkpointing: bool = False) -> dict:
    """Measured in a fresh Python process: the peak RSS increase of building the model and optimizer and running
    ``steps`` trainer steps, over the RSS after imports. ``{"peak_rss_increase_bytes", "baseline_rss_bytes"}``."""
    spec = json.dumps({"config": cfg.to_dict(), "rows": rows, "seq_len": seq_len, "steps": steps,
                       "threads": threads, "checkpointing": checkpointing})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-m", "deepseek.ops.measure", spec], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(spec: dict) -> dict:
    """The child side of :func:`peak_training_memory` (imports are done before the baseline is read)."""
    import deepseek.models.transformer  # noqa: F401 - imported before the baseline, like the step's modules
    import deepseek.train.optim  # noqa: F401
    import deepseek.train.step  # noqa: F401

    torch.set_num_threads(spec["threads"])
    cfg = ModelConfig.from_dict(spec["config"])
    # Page in the code the step runs (libtorch kernels count as resident memory once touched) with the same
    # architecture at the smallest widths, so that the baseline holds it and the increase is data.
    small = dataclasses.replace(cfg, vocab_size=min(cfg.vocab_size, 64), d_model=2 * cfg.n_heads * 2,
                                head_dim=2, ffn_dim=8, moe_ffn_dim=8, shared_ffn_dim=8 * cfg.n_shared_experts)
    _train_step_runner(small, 1, 8, checkpointing=spec["checkpointing"])[1]()
    baseline = _rss_bytes()
    _, run = _train_step_runner(cfg, spec["rows"], spec["seq_len"], checkpointing=spec["checkpointing"])
    for _ in range(spec["steps"]):
        run()
    return {"peak_rss_increase_bytes": peak_rss_bytes() - baseline, "baseline_rss_bytes": baseline}


def device_memory_bytes(override_gib: Optional[float] = None) -> tuple[int, str]:
    """The memory one device offers and where the number comes from: ``--device-memory`` GiB, else the CUDA
    device's total (untested here: no GPU), else this machine's RAM (psutil)."""
    if override_gib is not None:
        if override_gib <= 0:
            raise ValueError(f"--device-memory must be positive, got {override_gib}")
        return int(override_gib * 2**30), "--device-memory"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"CUDA {torch.cuda.get_device_name(0)} total"
    import psutil

    return psutil.virtual_memory().total, "this machine's RAM (psutil)"


def as_dict(measurement) -> dict:
    return asdict(measurement)


if __name__ == "__main__":  # the memory probe's child process
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
