"""Quantization-aware training: train through the rounding a quantized model will do, then convert.

    prepare_qat(model, "int8-dynamic")          # Linear, experts, embedding fake-quantize their weights (and
    finetune(model, config)                     #   for int8-dynamic their input rows) in every forward
    convert_qat(model)                          # the same modules, really quantized (deepseek.nn.quantized)

Fake quantization rounds with exactly the functions the converted model uses (:mod:`deepseek.nn.quantized`),
so after ``convert_qat`` the model computes what training saw, up to float summation order. Gradients pass
the rounding unchanged (straight-through estimator). The fake-quantized modules keep the parameter names of
the originals, so QAT checkpoints are ordinary checkpoints and resume like any other run. torchao's QAT does
not cover int8 dynamic activations (pytorch/ao#2992) nor our 3-D expert weights, hence this small module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.dispatch import SORTED
from deepseek.nn.experts import GroupedProduct
from deepseek.nn.moe import GroupedExperts, Router
from deepseek.nn.quantized import (MIN_FEATURES, check_scheme, dequantize_int4_groups, dequantize_int8_rows,
                                   is_quantized, quantize_int4_groups, quantize_int8_rows, quantize_modules,
                                   quantize_tokens_int8)


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded.to(x.dtype) - x).detach()


def fake_quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 32) -> torch.Tensor:
    """``w`` as the quantized model will see it (per-row int8, or grouped int4), with identity gradients."""
    if scheme == "int4-weight":
        rounded = dequantize_int4_groups(*quantize_int4_groups(w, group_size))
    else:
        rounded = dequantize_int8_rows(*quantize_int8_rows(w))
    return _straight_through(w, rounded)


def fake_quantize_rows(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """For ``int8-dynamic``: each row (token) rounded to int8 with its own scale; other schemes: unchanged."""
    if scheme != "int8-dynamic":
        return x
    flat = x.reshape(-1, x.shape[-1])
    q, scale = quantize_tokens_int8(flat.detach())
    return _straight_through(x, (q.float() * scale).view(x.shape))


class FakeQuantLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, scheme: str, group_size: int):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: the optimizer keeps them
        self.scheme, self.group_size = scheme, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight, self.scheme, self.group_size)
        return F.linear(fake_quantize_rows(x, self.scheme), weight.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    head_logits = forward


class FakeQuantEmbedding(nn.Embedding):
    """Embedding rows and (tied) head product as the quantized table gives them."""

    def __init__(self, embedding: nn.Embedding, scheme: str, group_size: int):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        self.weight = embedding.weight
        self.scheme, self.group_size = scheme, group_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quantize_weight(self.weight, self.scheme, self.group_size))

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight, self.scheme, self.group_size)
        return F.linear(fake_quantize_rows(x, self.scheme), weight.to(x.dtype))


class FakeQuantExperts(GroupedExperts):
    """Grouped experts whose weights (and, for int8-dynamic, rows) are fake-quantized; always the sorted dispatch,
    over a :class:`~deepseek.nn.experts.GroupedProduct` of the rounded weights (rows rounded through ``rows_fn``)."""

    def __init__(self, experts: GroupedExperts, scheme: str, group_size: int):
        with torch.device("meta"):  # placeholder weights: the original parameters replace them below
            super().__init__(experts.n_experts, experts.gate_up.shape[-1], experts.ffn_dim, dispatcher=SORTED)
        self.gate_up, self.down = experts.gate_up, experts.down
        self.scheme, self.group_size = scheme, group_size

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        rounded = GroupedProduct(fake_quantize_weight(self.gate_up, self.scheme, self.group_size),
                                 fake_quantize_weight(self.down, self.scheme, self.group_size),
                                 rows_fn=lambda rows: fake_quantize_rows(rows, self.scheme))
        return self.dispatcher(x_ND, weights_NK, experts_NK, rounded)


_FAKE = (FakeQuantLinear, FakeQuantEmbedding, FakeQuantExperts)


def prepare_qat(model: nn.Module, scheme: str, *, group_size: int = 32, embeddings: bool = True) -> nn.Module:
    """Swap in fake-quantized modules for exactly what :func:`deepseek.compress.quantize.quantize` quantizes."""
    check_scheme(scheme)
    if is_quantized(model) or is_qat(model):
        raise ValueError("model is already quantized or prepared for QAT")

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            replacement: Optional[nn.Module] = None
            if isinstance(child, Router):
                continue
            if isinstance(child, GroupedExperts):
                replacement = FakeQuantExperts(child, scheme, group_size)
            elif isinstance(child, nn.Linear) and child.out_features >= MIN_FEATURES:
                replacement = FakeQuantLinear(child, scheme, group_size)
            elif embeddings and isinstance(child, nn.Embedding):
                replacement = FakeQuantEmbedding(child, scheme, group_size)
            if replacement is not None:
                setattr(parent, name, replacement)
            else:
                walk(child)

    walk(model)
    model.qat = {"scheme": scheme, "group_size": group_size, "embeddings": embeddings}
    return model


def is_qat(model: nn.Module) -> bool:
    return any(isinstance(m, _FAKE) for m in model.modules())


@torch.no_grad()
def convert_qat(model: nn.Module) -> nn.Module:
    """Replace the fake-quantized modules by really quantized ones (in place); returns the model in eval mode."""
    settings = getattr(model, "qat", None)
    if settings is None or not is_qat(model):
        raise ValueError("model was not prepared with prepare_qat")

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantExperts):
                with torch.device("meta"):
                    plain = GroupedExperts(child.n_experts, child.gate_up.shape[-1], child.ffn_dim)
                plain.gate_up, plain.down = child.gate_up, child.down
            elif isinstance(child, FakeQuantLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
            elif isinstance(child, FakeQuantEmbedding):
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim, device="meta")
                plain.weight = child.weight
            else:
                walk(child)
                continue
            setattr(parent, name, plain)

    walk(model)
    del model.qat
    model.eval()
    return quantize_modules(model, settings["scheme"], group_size=settings["group_size"],
                            embeddings=settings["embeddings"])
