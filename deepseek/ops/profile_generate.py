"""``ds profile generate``: prefill vs decode of a model directory through the engine ``ds generate`` runs, read
against the weight-streaming floor.

The model is loaded as ``ds generate`` loads it (:func:`deepseek.generate.pipeline`, its ``precision`` choice for
decoding) and generates through :func:`deepseek.generate.engine.generate_stream`: ``batch`` prompts of
``prompt_len`` random token ids (seeded; special tokens excluded), greedy, ``new_tokens`` each (``ignore_eos``, so
every step has the whole batch). One short warm-up generation, then ``rounds`` plain generations (medians), then
one under ``torch.profiler`` for the trace, the roofline and the profiler's overhead.

- prefill seconds = time to the first token (the prompt's forward and the first sample);
- decode seconds per step = the rest ÷ (``new_tokens`` − 1); a step yields one token per sequence;
- weight-streaming floor = bytes one decode step must read (weights: :func:`~deepseek.ops.flops.decode_weight_bytes`;
  KV cache at the mean context) ÷ measured bandwidth; MBU = floor ÷ measured step time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from deepseek.data.tokenizer import SPECIAL_TOKENS
from deepseek.generate.engine import generate_stream
from deepseek.generate.params import SamplingParams
from deepseek.generate.pipeline import pipeline
from deepseek.ops.breakdown import OpPoint, accumulate_points
from deepseek.ops.flops import (attention_flops_per_token, decode_weight_bytes, kv_cache_bytes_per_token,
                                n_active_params, weight_bytes)
from deepseek.ops.memory import cuda_memory, peak_rss_bytes, rss_bytes
from deepseek.ops.peaks import machine_facts, measured_peaks
from deepseek.ops.report import summary_png, write_profile_json
from deepseek.ops.trace import merge_chrome_traces


def random_prompts(tokenizer, vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` ids drawn from the vocabulary without its special tokens."""
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS} - {None}
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, prompt_len), generator=gen)].tolist()


def _timed_generation(model, tokenizer, prompts, new_tokens: int, on_step: Optional[Callable[[], None]] = None
                      ) -> tuple[float, float]:
    """(seconds to the first token, seconds of the whole generation); ``on_step`` after each decode step."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start, first, events = time.perf_counter(), None, 0
    for _ in generate_stream(model, tokenizer, prompts, params):
        events += 1
        if events % len(prompts) == 0:  # a step's tokens are all out
            if first is None:
                first = time.perf_counter()
            if on_step is not None:
                on_step()
    return first - start, time.perf_counter() - start


def profile_generate(model_dir: str | Path, *, batch: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                     rounds: int = 3, precision: str = "auto", out: Path = Path("runs/profile"),
                     peak_seconds: float = 0.6) -> dict:
    """Profile generation from ``model_dir`` (see the module's docstring); writes trace.json, summary.png and
    profile.json into ``out`` and returns profile.json's content."""
    if batch < 1 or prompt_len < 1 or new_tokens < 2 or rounds < 1:
        raise ValueError(f"--batch, --prompt-len and --rounds must be >= 1 and --new-tokens >= 2 "
                         f"(got {batch}, {prompt_len}, {new_tokens}, {rounds})")
    pipe = pipeline("text-generation", str(model_dir), precision=precision)
    model, tokenizer = pipe.model, pipe.tokenizer
    cfg = model.config
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    device = next(model.parameters()).device
    prompts = random_prompts(tokenizer, min(cfg.vocab_size, tokenizer.get_vocab_size()), batch, prompt_len)
    _timed_generation(model, tokenizer, prompts, 2)  # warm-up: kernels, few-row product arrangements

    prefill, decode, rss = [], [], []
    for _ in range(rounds):
        first, whole = _timed_generation(model, tokenizer, prompts, new_tokens)
        prefill.append(first)
        decode.append((whole - first) / (new_tokens - 1))
        rss.append(rss_bytes())

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points: dict = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # One schedule cycle over the whole generation (no warm-up: the plain rounds warmed up), so that each step is a
    # ProfilerStep: #0 the prefill, then one per decode step.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ww]armup.*")
        steps = schedule(wait=0, warmup=0, active=new_tokens + 1)
    with profile(activities=activities, record_shapes=True, with_flops=True, profile_memory=True,
                 schedule=steps) as prof:
        _, profiled_whole = _timed_generation(model, tokenizer, prompts, new_tokens, prof.step)
    accumulate_points(prof.events(), points)
    paths = {"trace": out / "trace.json", "summary_png": out / "summary.png", "profile_json": out / "profile.json"}
    with tempfile.TemporaryDirectory(prefix="ds-profile-") as scratch:
        prof.export_chrome_trace(str(Path(scratch) / "trace.json"))
        merge_chrome_traces([Path(scratch) / "trace.json"], paths["trace"])  # written atomically into place

    dtype = next(model.parameters()).dtype
    precision_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    memory = {"peak_rss_bytes": peak_rss_bytes(), "steady_rss_bytes": int(statistics.median(rss)),
              **cuda_memory(device)}
    peaks = measured_peaks(device, peak_seconds)  # after the high-water mark is read: its operands are not the run's
    bandwidth = peaks["memory_bandwidth_bytes_per_s"]
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    kv_per_token = kv_cache_bytes_per_token(model)
    mean_context = prompt_len + new_tokens / 2
    step_weight_bytes = decode_weight_bytes(model, batch)
    step_kv_bytes = batch * mean_context * kv_per_token
    floor = (step_weight_bytes + step_kv_bytes) / bandwidth
    prefill_flops = batch * prompt_len * (2 * n_active_params(model)
                                          + attention_flops_per_token(model, prompt_len, passes=1))
    peak = peaks["matmul_flops"].get(precision_name)
    plain_total = prefill_s + decode_s * (new_tokens - 1)
    result = {
        "kind": "generate",
        "machine": machine_facts(device),
        "precision": precision_name,
        "peaks": peaks,
        "config": {"model_dir": str(model_dir), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "rounds": rounds},
        "n_active_params": n_active_params(model),
        "flops_per_token": 2 * n_active_params(model) + attention_flops_per_token(model, int(mean_context), passes=1),
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "mfu": prefill_flops / prefill_s / peak if peak else None,
        "decode_seconds_per_token": decode_s,
        "decode_tokens_per_s": batch / decode_s,
        "tokens_per_s": batch * new_tokens / plain_total,
        "step_seconds": decode_s,
        "weight_bytes": weight_bytes(model),
        "decode_weight_bytes_per_step": step_weight_bytes,
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes": batch * (prompt_len + new_tokens) * kv_per_token,
        "weight_streaming_floor_seconds": floor,
        "achieved_bandwidth_bytes_per_s": (step_weight_bytes + step_kv_bytes) / decode_s,
        "mbu": floor / decode_s,
        "overhead": profiled_whole / plain_total - 1.0,
        "memory": memory,
        "breakdown": {"prefill": prefill_s, "decode": decode_s * (new_tokens - 1)},
        "expert_load": [],
        "top_ops": [p.to_dict() for p in sorted(points.values(), key=lambda p: -p.seconds)[:12]],
    }
    summary_png(result, paths["summary_png"])
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    write_profile_json(result, paths["profile_json"])
    return result


__all__ = ["OpPoint", "profile_generate", "random_prompts"]
