"""``ds plan``: memory per device and the number of replicas/devices a target needs.

    serving  = plan_serving(cfg, "fp32", streams=8, context=2048, target_tokens_per_s=5000, tokens_per_s=...)
    training = plan_training(cfg, layout, tokens_per_step=65536, seq_len=2048, tokens_per_s_per_device=...)

Memory comes from :mod:`deepseek.ops.memory_model` (weights exact from the config, KV cache the engines' layout,
activations a formula checked against measurement) split by :mod:`deepseek.ops.layout`; throughput comes from a
measured number (``ds profile``'s profile.json, or a short run of :mod:`deepseek.ops.measure`). Each term says how
it was obtained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from deepseek.models.config import ModelConfig
from deepseek.ops.layout import Layout, check_layout_fits_model, fsdp_divisor, stage_layers, tensor_divisor
from deepseek.ops.memory_model import (FLOAT_FORMATS, TRAIN_GRAD_BYTES, TRAIN_OPTIMIZER_BYTES, TRAIN_WEIGHT_BYTES,
                                       activation_bytes, kv_cache_bytes_per_token, trainable_tensors,
                                       weight_tensors)

LOSS_CHUNK_BYTES = 8 << 20  # deepseek.nn.loss: the chunked loss's one logits buffer is at most this


class PlanError(ValueError):
    """A target or option ``ds plan`` cannot plan for (a ValueError: the CLI prints it as one line)."""


@dataclass
class MemoryTerm:
    name: str
    bytes: float
    how: str  # "exact" (counted from the model), "engine layout", "formula", ...


@dataclass
class Plan:
    """One plan: the memory terms of one device, whether they fit, and the devices the target needs."""

    kind: str  # "serve" or "train"
    terms: list[MemoryTerm]
    device_memory_bytes: int
    device_memory_source: str
    throughput: dict  # the measured per-device number and where it comes from
    devices: int  # replicas (serve) or devices (train) the target needs
    details: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_memory_bytes

    def to_dict(self) -> dict:
        return {"kind": self.kind, "terms": [asdict(t) for t in self.terms], "total_bytes": self.total_bytes,
                "device_memory_bytes": self.device_memory_bytes, "device_memory_source": self.device_memory_source,
                "fits": self.fits, "throughput": self.throughput, "devices": self.devices, **self.details}


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise PlanError(f"{name} must be positive, got {value}")


def plan_serving(cfg: ModelConfig, weights: str, *, streams: int, context: int, target_tokens_per_s: float,
                 tokens_per_s: float, throughput_source: str, device_memory: tuple[int, str],
                 group_size: int = 32) -> Plan:
    """One replica of ``ds serve`` (the continuous-batching engine) running ``streams`` sequences of up to
    ``context`` tokens with weights stored as ``weights``; replicas = ceil(target / measured tokens/s)."""
    _positive("--serve-tokens-per-s", target_tokens_per_s)
    _positive("--streams", streams)
    _positive("--context", context)
    _positive("the measured tokens/s per replica", tokens_per_s)
    if context > cfg.max_seq_len:
        raise PlanError(f"--context {context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    weight_total = sum(t.nbytes for t in weight_tensors(cfg, weights, group_size=group_size))
    kv_dtype = FLOAT_FORMATS.get(weights, FLOAT_FORMATS["fp32"])  # a quantized model keeps fp32 norms -> fp32 cache
    per_token = kv_cache_bytes_per_token(cfg, kv_dtype)
    slots = streams + 1  # the engine preallocates one slot per running sequence plus one staging slot for prefill
    terms = [MemoryTerm(f"weights ({weights})", weight_total, "exact: the saved tensors of the meta-built model"),
             MemoryTerm(f"KV cache ({slots} slots x {context} tokens)", per_token * slots * context,
                        f"engine layout: {per_token:,} B/token = 2 x {cfg.n_layers} layers x {cfg.n_kv_heads} kv "
                        f"heads x {cfg.head_dim} x {kv_dtype.itemsize} B")]
    replicas = math.ceil(target_tokens_per_s / tokens_per_s)
    return Plan("serve", terms, *device_memory,
                {"tokens_per_s_per_replica": tokens_per_s, "source": throughput_source}, replicas,
                {"target_tokens_per_s": target_tokens_per_s, "streams": streams, "context": context,
                 "kv_cache_bytes_per_token": per_token, "weights_format": weights})


def training_terms(cfg: ModelConfig, layout: Layout, tokens_per_step: int, micro_batches: int = 1,
                   checkpointing: bool = False) -> tuple[list[MemoryTerm], int]:
    """The memory terms of the busiest device of ``layout`` training ``cfg`` (fp32 weights, AdamW) on
    ``tokens_per_step`` tokens per optimizer step cut into ``micro_batches`` per data-parallel rank (with
    ``checkpointing``: the trainer's gradient_checkpointing), and which pipeline stage that device holds."""
    check_layout_fits_model(layout, cfg)
    _positive("--train-tokens-per-step", tokens_per_step)
    _positive("--micro-batches", micro_batches)
    params = trainable_tensors(cfg)
    buffer_bytes = sum(t.nbytes for t in weight_tensors(cfg)) - sum(t.nbytes for t in params)  # router biases
    micro_tokens = math.ceil(tokens_per_step / layout.data_parallel / micro_batches)
    best: Optional[tuple[list[MemoryTerm], int]] = None
    for stage in range(layout.pp):
        layers = stage_layers(cfg.n_layers, layout.pp, stage)
        first, last = stage == 0, stage == layout.pp - 1

        def held(t) -> bool:
            if t.layer is not None:
                return t.layer in layers
            return (t.part == "embedding" and first) or (t.part in ("head", "norm") and last) or \
                (cfg.tie_embeddings and t.part == "embedding")

        numel = sum(t.numel / (tensor_divisor(t.part, layout) * fsdp_divisor(t.part, layout))
                    for t in params if held(t))
        terms = [MemoryTerm("weights (fp32)", numel * TRAIN_WEIGHT_BYTES + buffer_bytes * len(layers) / cfg.n_layers,
                            "exact count, divided by the layout"),
                 MemoryTerm("gradients (fp32)", numel * TRAIN_GRAD_BYTES, "exact count, divided by the layout"),
                 MemoryTerm("AdamW state (2 x fp32)", numel * TRAIN_OPTIMIZER_BYTES,
                            "exact count, divided by the layout")]
        if layout.fsdp and any(fsdp_divisor(t.part, layout) > 1 for t in params):
            # FSDP gathers one block's whole (tp-sliced) weights before it runs and prefetches the next; the
            # ep-local experts are outside FSDP and never gathered.
            block = max(sum(t.numel / tensor_divisor(t.part, layout) for t in params
                            if t.layer == i and fsdp_divisor(t.part, layout) > 1) for i in layers)
            terms.append(MemoryTerm("FSDP gathered blocks (2 x 1 block)", 2 * block * TRAIN_WEIGHT_BYTES,
                                    "estimate: current + prefetched block"))
        in_flight = min(layout.pp, micro_batches) if layout.pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches
        what = "activations, checkpointed" if checkpointing else "activations"
        terms.append(MemoryTerm(f"{what} ({micro_tokens:,} tokens x {in_flight} in flight)",
                                activation_bytes(cfg, micro_tokens * in_flight, layout.tp, len(layers), head=last,
                                                 checkpointing=checkpointing),
                                "formula (checked against autograd's saved tensors and peak RSS)"))
        if last:
            chunk = min(micro_tokens, max(16, LOSS_CHUNK_BYTES // (4 * cfg.vocab_size))) * cfg.vocab_size * 4
            terms.append(MemoryTerm("loss logits chunk", chunk, "exact: deepseek.nn.loss's buffer"))
        if best is None or sum(t.bytes for t in terms) > sum(t.bytes for t in best[0]):
            best = (terms, stage)
    return best


def plan_training(cfg: ModelConfig, layout: Layout, *, tokens_per_step: int, tokens_per_s_per_device: float,
                  throughput_source: str, device_memory: tuple[int, str], micro_batches: int = 1,
                  step_time_s: Optional[float] = None, checkpointing: bool = False) -> Plan:
    """Memory of the busiest device of ``layout`` and the devices needed: the layout's own count, or, with a target
    ``step_time_s``, at least ceil(tokens per step / (measured tokens/s per device x step time)) (ideal scaling:
    communication is not modelled; the memory terms stay those of the layout's devices)."""
    _positive("the measured tokens/s per device", tokens_per_s_per_device)
    terms, stage = training_terms(cfg, layout, tokens_per_step, micro_batches, checkpointing)
    devices = layout.devices
    details = {"layout": layout.describe(), "layout_degrees": asdict(layout), "layout_devices": devices,
               "tokens_per_step": tokens_per_step,
               "micro_batches": micro_batches, "busiest_stage": stage,
               "gradient_checkpointing": checkpointing,
               "step_time_s": tokens_per_step / (tokens_per_s_per_device * devices)}
    if step_time_s is not None:
        _positive("--step-time", step_time_s)
        needed = math.ceil(tokens_per_step / (tokens_per_s_per_device * step_time_s))
        devices = max(devices, needed)  # the layout's devices already reach the step time when it needs fewer
        details.update(target_step_time_s=step_time_s, devices_for_step_time=needed)
    return Plan("train", terms, *device_memory,
                {"tokens_per_s_per_device": tokens_per_s_per_device, "source": throughput_source}, devices, details)


def read_profile(path, kind: str) -> tuple[float, str]:
    """The per-device tokens/s of a ``ds profile`` profile.json of ``kind`` ("generate": decode_tokens_per_s,
    "train": tokens_per_s) and a description of where it came from."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise PlanError(f"--profile {file}: no such file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"--profile {file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise PlanError(f"--profile {file}: kind is {found!r}; this plan needs a `ds profile {kind}` profile")
    key = "decode_tokens_per_s" if kind == "generate" else "tokens_per_s"
    value = data.get(key)
    if not isinstance(value, (int, float)) or value <= 0:
        raise PlanError(f"--profile {file}: {key} is missing or not a positive number")
    machine = data.get("machine")
    where = machine.get("cpu") or machine.get("device") if isinstance(machine, dict) else machine
    # a decode rate holds for the batch it was measured at: say which, so a plan for other --streams is read as such
    batch = data.get("config", {}).get("batch") if isinstance(data.get("config"), dict) else None
    at = f", profiled at batch {batch}" if kind == "generate" and batch else ""
    return float(value), f"measured by ds profile ({file.name}{', ' + str(where) if where else ''}{at})"
