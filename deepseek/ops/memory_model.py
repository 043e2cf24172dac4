"""How many bytes a model takes, from its config alone: weights in each stored format, the KV cache per token,
the activations a training step keeps for backward, and the trainer's gradients and optimizer state.

Weights are counted exactly: the model is built on the meta device (no memory, no initialisation), quantized into
a skeleton for the compressed formats, and its ``state_dict`` is what ``ds.save`` writes into model.safetensors.
The KV cache is the engines' layout (:class:`~deepseek.nn.kv_cache.KVCache`, :class:`~deepseek.nn.slot_cache.
SlotKVCache`): keys and values of every layer, ``n_kv_heads * head_dim`` wide, in the weights' dtype (no latent
cache). Activations are a formula (:func:`activation_floats_per_token`) fitted to, and checked against, the tensors
autograd saves in a real forward (:func:`saved_activation_bytes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from deepseek.models.config import ModelConfig

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_FORMATS = ("int8-dynamic", "int8-weight", "int4-weight")  # deepseek.nn.quantized.SCHEMES
WEIGHT_FORMATS = (*FLOAT_FORMATS, *QUANTIZED_FORMATS)

# What the trainer keeps per trainable parameter: fp32 weights (bf16 runs autocast, the weights stay fp32, so
# there is no separate master copy), an fp32 gradient, and AdamW's two fp32 moments (exp_avg, exp_avg_sq).
TRAIN_WEIGHT_BYTES = 4
TRAIN_GRAD_BYTES = 4
TRAIN_OPTIMIZER_BYTES = 8

# The parts a tensor belongs to, which decide how each parallel layout splits it.
PARTS = ("embedding", "attention", "dense_ffn", "router", "routed_experts", "shared_experts", "norm", "head")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WeightTensor:
    """One tensor of the saved model: its name, the part and layer it belongs to (None outside blocks), size."""

    name: str
    part: str
    layer: Optional[int]
    numel: int
    nbytes: int


def _part_of(name: str) -> tuple[str, Optional[int]]:
    match = _BLOCK.match(name)
    if match is None:
        if name.startswith("embed."):
            return "embedding", None
        if name.startswith("lm_head."):
            return "head", None
        return "norm", None  # the final norm
    layer, rest = int(match.group(1)), match.group(2)
    if rest.startswith("attn_norm.") or rest.startswith("ffn_norm."):
        part = "norm"
    elif rest.startswith("attn."):
        part = "attention"
    elif rest.startswith("ffn.experts."):
        part = "routed_experts"
    elif rest.startswith("ffn.router."):
        part = "router"
    elif rest.startswith("ffn.shared"):
        part = "shared_experts"
    else:
        part = "dense_ffn"
    return part, layer


def check_weight_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; formats: {', '.join(WEIGHT_FORMATS)}")
    return fmt


def weight_tensors(cfg: ModelConfig, fmt: str = "fp32", *, group_size: int = 32,
                   embeddings: bool = True) -> list[WeightTensor]:
    """Every tensor ``ds.save`` writes for a model of ``cfg`` stored as ``fmt`` (fp32, bf16, fp16, or a
    ``ds compress`` scheme with its ``group_size`` and whether ``embeddings`` are quantized), exactly."""
    from deepseek.models.transformer import MoETransformer

    check_weight_format(fmt)
    with torch.device("meta"):
        model = MoETransformer(cfg)
        if fmt in QUANTIZED_FORMATS:
            from deepseek.nn.quantized import quantize_modules

            quantize_modules(model, fmt, group_size=group_size, embeddings=embeddings, skeleton=True)
        elif fmt != "fp32":
            model = model.to(FLOAT_FORMATS[fmt])
    tensors = []
    for name, tensor in model.state_dict().items():
        part, layer = _part_of(name)
        tensors.append(WeightTensor(name, part, layer, tensor.numel(), tensor.numel() * tensor.element_size()))
    return tensors


def weight_bytes(cfg: ModelConfig, fmt: str = "fp32", **quantization) -> int:
    """Bytes of model.safetensors' tensors for ``cfg`` stored as ``fmt`` (see :func:`weight_tensors`)."""
    return sum(t.nbytes for t in weight_tensors(cfg, fmt, **quantization))


def trainable_tensors(cfg: ModelConfig) -> list[WeightTensor]:
    """The parameters the trainer updates (the router's balancing bias is a buffer: not trained by AdamW)."""
    from deepseek.models.transformer import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg)
    return [WeightTensor(name, *_part_of(name), p.numel(), p.numel() * p.element_size())
            for name, p in model.named_parameters()]


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one stream's KV cache takes per token: keys and values of every layer, ``n_kv_heads * head_dim``
    each, in ``dtype`` (the engines use the weights' dtype; a quantized model keeps fp32 norms, so fp32)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def activation_floats_per_token(cfg: ModelConfig, tp: int = 1, layers: Optional[int] = None,
                                checkpointing: bool = False) -> float:
    """4-byte words autograd keeps per token of a training micro-batch (fp32, dense attention): what backward
    needs of each layer, plus the final norm and the chunked loss.

    Per layer: the residual stream and both norms' inputs and outputs (4·D), q/k/v after projection and rotary
    (2·q width + 2·kv width), the attention's log-sum-exp per head (H) and rotary tables (2·Dh). A dense FFN adds
    2·D + 4·ffn (SwiGLU's gate, up, product and activation); a MoE layer adds 2·D + E (router scores) + per chosen
    expert 3·D (dispatched input, output, weight) + 4·F + 8 (expert SwiGLU and int64 indices), and 4·(shared
    width) for the shared experts. Fitted to :func:`saved_activation_bytes` over 36 random configs (largest
    deviation 0.4 %) and checked in tests/ops/test_plan.py. ``tp`` divides the widths tensor parallelism splits
    (heads, FFN and expert widths); ``layers`` counts only that many of the model's layers (a pipeline stage).
    ``checkpointing`` (the trainer's ``gradient_checkpointing``): each block keeps only its input (D) and backward
    recomputes one block at a time, so the largest single layer is added once.
    """
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    q_width, kv_width = h * dh, cfg.n_kv_heads * dh
    n_layers = cfg.n_layers if layers is None else layers
    n_dense = min(cfg.first_k_dense, n_layers)
    n_moe = n_layers - n_dense
    attention = 4 * d + (2 * q_width + 2 * kv_width + h + 2 * dh) / tp
    dense = attention + 2 * d + 4 * cfg.ffn_dim / tp
    k = cfg.top_k
    shared = cfg.shared_ffn_dim if cfg.n_shared_experts > 0 else 0  # the model builds no shared SwiGLU without
    moe = attention + 2 * d + cfg.n_routed_experts + k * (3 * d + 8) + (4 * k * cfg.moe_ffn_dim + 4 * shared) / tp - 4
    outside = 3 * d + 19  # final norm, the loss's saved input gradient [N, D], targets
    if checkpointing:
        largest = max([dense] * (n_dense > 0) + [moe] * (n_moe > 0), default=0)
        return n_layers * d + largest + outside
    return n_dense * dense + n_moe * moe + outside


def activation_bytes_per_token(cfg: ModelConfig, tp: int = 1, layers: Optional[int] = None,
                               checkpointing: bool = False) -> float:
    """Bytes of :func:`activation_floats_per_token` (fp32 words)."""
    return 4 * activation_floats_per_token(cfg, tp, layers, checkpointing)


def activation_bytes(cfg: ModelConfig, tokens: int, tp: int = 1, layers: Optional[int] = None,
                     head: bool = True, checkpointing: bool = False) -> float:
    """Bytes autograd keeps over one training micro-batch of ``tokens`` tokens: :func:`activation_bytes_per_token`
    times the tokens, plus (``head``: the stage with the LM head) the head's fp32 gradient [V, D], which the
    chunked loss (:func:`deepseek.nn.loss.linear_cross_entropy`) forms during the forward and saves for backward."""
    per_step = 4 * cfg.vocab_size * cfg.d_model if head else 0
    return activation_bytes_per_token(cfg, tp, layers, checkpointing) * tokens + per_step


def saved_activation_bytes(model: torch.nn.Module, ids_BT: torch.Tensor) -> int:
    """Measured: bytes of the distinct tensors autograd saves for backward in one training forward of ``model``
    on ``ids_BT`` (with the LM loss), the weights excluded. What :func:`activation_bytes_per_token` estimates."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(ids_BT, targets=ids_BT)
    finally:
        model.train(was_training)
    return sum(saved.values())


def layer_tensors(tensors: list[WeightTensor], layers: range) -> Iterator[WeightTensor]:
    """The tensors of the blocks in ``layers``."""
    return (t for t in tensors if t.layer is not None and t.layer in layers)
