"""The MoE language model, top to bottom: embedding -> blocks (attention, dense or MoE FFN) -> norm -> head.

Legend: B batch, T tokens, S keys, D model width, V vocabulary, E experts.
The model targets one device; parallelism, quantization and serving are applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek.config import ConfigError
from deepseek.models.config import ModelConfig
from deepseek.nn import (Attention, AttentionInputs, GroupedExperts, MoE, MoEConfig, RMSNorm, Router, RouterConfig,
                         RotaryEmbedding, SwiGLU)
from deepseek.nn.attention_mask import AttentionPattern
from deepseek.nn.few_rows import few_row_linear
from deepseek.nn.kv_cache import AttentionCache
from deepseek.nn.loss import linear_cross_entropy
from deepseek.nn.quantized import QuantizedWeight


@dataclass
class RouterStats:
    """Routing of the last forward: ``tokens_per_expert`` is [n_moe_layers, E] (counts of token-expert pairs)."""

    tokens_per_expert: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None

    @property
    def load_fraction(self) -> torch.Tensor:
        """Share of each layer's routed pairs that went to each expert: [n_moe_layers, E], rows sum to 1."""
        return self.tokens_per_expert / self.tokens_per_expert.sum(dim=-1, keepdim=True).clamp_min(1)

    @property
    def max_over_mean(self) -> torch.Tensor:
        """Per layer, the busiest expert's load over the mean load (1.0 = perfectly balanced)."""
        mean = self.tokens_per_expert.mean(dim=-1).clamp_min(1e-9)
        return self.tokens_per_expert.max(dim=-1).values / mean


def moe_config(cfg: ModelConfig) -> MoEConfig:
    """The settings of one MoE layer of a model of ``cfg``."""
    router = RouterConfig(n_experts=cfg.n_routed_experts, top_k=cfg.top_k, kind=cfg.router,
                          norm_topk_prob=cfg.norm_topk_prob, scaling=cfg.routed_scaling_factor,
                          aux_loss_coef=cfg.aux_loss_coef, bias_update_speed=cfg.bias_update_speed)
    return MoEConfig(d_model=cfg.d_model, ffn_dim=cfg.moe_ffn_dim, router=router, n_shared_experts=cfg.n_shared_experts,
                     shared_ffn_dim=cfg.shared_ffn_dim, shared_expert_gate=cfg.shared_expert_gate)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attention_bias,
                              cfg.qk_norm, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if layer < cfg.first_k_dense:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)
        else:
            self.ffn = MoE(moe_config(cfg))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x_BTD = x_BTD + self.dropout(self.attn(self.attn_norm(x_BTD), inputs, self.layer))
        return x_BTD + self.dropout(self.ffn(self.ffn_norm(x_BTD)))


class MoETransformer(nn.Module):
    """Decoder-only transformer with Mixture-of-Experts feed-forward layers.

    ``model(ids_BT)`` returns logits [B, T, V]. Options: ``cache`` (a :class:`~deepseek.nn.KVCache` or
    :class:`~deepseek.nn.SlotKVCache`, anything with the :class:`~deepseek.nn.kv_cache.AttentionCache` interface,
    for incremental decoding), ``attention_mask`` [B, T] (1 = token, 0 = padding), ``document_ids`` [B, T] (packed
    rows: tokens attend only within their own document, positions restart at each; see
    :meth:`~deepseek.nn.attention_mask.AttentionPattern.uncached`), ``positions`` [B, T] (rotary positions, to override
    the derived ones), ``return_router_stats`` (returns ``(logits, RouterStats)``), ``logits_to_keep`` (compute logits
    for the last n positions only).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up, std=std)
                nn.init.normal_(module.down, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Hugging Face's name for setting :attr:`gradient_checkpointing` (what ``TrainConfig.gradient_checkpointing``
        sets): each block is recomputed in backward (non-reentrant), trading time for activation memory."""
        if gradient_checkpointing_kwargs not in (None, {}, {"use_reentrant": False}):
            raise ConfigError(f"gradient_checkpointing_kwargs: only use_reentrant=False is supported (blocks are "
                              f"recomputed by torch.utils.checkpoint, non-reentrant), got {gradient_checkpointing_kwargs!r}")
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Hugging Face's name for clearing :attr:`gradient_checkpointing`."""
        self.gradient_checkpointing = False

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, ids_BT: torch.Tensor, *, cache: Optional[AttentionCache] = None,
                attention_mask: Optional[torch.Tensor] = None, return_router_stats: bool = False,
                logits_to_keep: int = 0, targets: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
        """Logits [B, T, V]; with ``targets`` [B, T] (-100 = ignore) the mean next-token cross-entropy instead.

        The ``targets`` path never materialises the logits (see :func:`deepseek.nn.loss.linear_cross_entropy`):
        the same loss and gradients as ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())``, faster.
        """
        if ids_BT.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, tokens], got {tuple(ids_BT.shape)}")
        inputs = self._attention_inputs(ids_BT, cache, attention_mask, document_ids, positions)
        x_BTD = self.embed(ids_BT)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x_BTD = checkpoint(block, x_BTD, inputs, use_reentrant=False)
            else:
                x_BTD = block(x_BTD, inputs)
        if cache is not None:
            cache.advance(ids_BT.shape[1])
        if logits_to_keep > 0:  # generation only needs the last position: skip the head elsewhere
            x_BTD = x_BTD[:, -logits_to_keep:]
        x_BTD = self.norm(x_BTD)
        head = self.embed if self.lm_head is None else self.lm_head
        if hasattr(head, "head_logits"):  # a quantized (or fake-quantized) head computes its own product
            out = head.head_logits(x_BTD)
            if targets is not None:
                out = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        elif targets is not None:
            head_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
            out = linear_cross_entropy(x_BTD.flatten(0, 1), head_VD, targets.flatten())
        else:
            out = self._head(x_BTD)
        if self.training:
            self._accumulate_expert_load()
        if return_router_stats:
            return out, self.router_stats()
        return out

    def _head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V], with the product arranged for this CPU when decoding (a few rows, no grad).

        Decoding is bound by reading weights, and the head is the largest of them. How fast CPU BLAS streams it
        depends on the CPU and the arrangement (``F.linear``, ``(W @ x.T).T``, or ``x @ W_DV`` with a cached
        contiguous [D, V] copy, rebuilt whenever the weight changes): :func:`deepseek.nn.few_rows.few_row_linear`
        measures them once per shape and keeps the fastest.
        """
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        rows = x_BTD.shape[0] * x_BTD.shape[1]
        if rows > 16 or x_BTD.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x_BTD, weight_VD)
        x_ND = x_BTD.reshape(rows, -1)

        def transposed() -> torch.Tensor:
            # The cache holds the weight it was made from: a replacement could otherwise be allocated at a freed
            # weight's address with the same version and pass for it.
            key = (weight_VD.data_ptr(), weight_VD._version, weight_VD.dtype)
            cached = self.__dict__.get("_head_DV_cache")  # (weight, key, [D, V] copy)
            if cached is None or cached[0] is not weight_VD or cached[1] != key:
                cached = self.__dict__["_head_DV_cache"] = (weight_VD, key, weight_VD.detach().t().contiguous())
            return cached[2]

        return few_row_linear(x_ND, weight_VD, transposed=transposed).reshape(*x_BTD.shape[:2], -1)

    def _attention_inputs(self, ids_BT, cache: Optional[AttentionCache], attention_mask, document_ids=None,
                          positions=None) -> AttentionInputs:
        """Positions and mask of this forward: laid out by the cache when there is one, whichever cache it is."""
        cfg = self.config
        B, T = ids_BT.shape
        valid_BT = None if attention_mask is None else attention_mask.to(device=ids_BT.device, dtype=torch.bool)
        pattern = AttentionPattern(cfg.attention == "sparse", cfg.window, cfg.n_global_tokens)
        if cache is None:
            self._check_length(T)
            layout = pattern.uncached(B, T, valid_BT, ids_BT.device, document_ids, positions)
        else:
            if document_ids is not None or positions is not None:
                raise ValueError("document_ids and positions are for forwards without a KV cache (packed training)")
            if cache.batch_size != B:
                raise ValueError(f"KV cache holds {cache.batch_size} sequences, input has {B}")
            length = cache.length_after(T)
            if length is not None:
                self._check_length(length)  # before the cache is touched
            layout = cache.begin_forward(T, valid_BT, pattern)
        cos, sin = self.rope(layout.positions_BT)
        return AttentionInputs(cos, sin, mask=layout.mask, is_causal=layout.is_causal,
                               blocked_sparse=layout.blocked_sparse, window=cfg.window, n_global=cfg.n_global_tokens,
                               cache=cache)

    def _check_length(self, n_slots: int) -> None:
        # A position never exceeds its slot, so checking the slot count on the host is enough (no sync).
        if n_slots > self.config.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.config.max_seq_len} of this model")

    # -- routing statistics and balancing ----------------------------------------------------------

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def router_stats(self) -> Optional[RouterStats]:
        """Routing of the last forward (None for a model without MoE layers or before any forward)."""
        routers = self.routers()
        if not routers or routers[0].last_tokens_per_expert is None:
            return None
        counts = torch.stack([r.last_tokens_per_expert for r in routers])
        return RouterStats(counts, self.aux_loss())

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the routers' load-balancing losses from the last training forward (None if disabled)."""
        losses = [r.aux_loss for r in self.routers() if r.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def _accumulate_expert_load(self) -> None:
        # Done here, not in the router, so that a checkpointed block's recomputation does not count twice.
        for router in self.routers():
            if router.last_tokens_per_expert is not None:
                router.load_accum += router.last_tokens_per_expert

    # -- sizes -------------------------------------------------------------------------------------

    def num_parameters(self, active: bool = False, embedding: bool = True) -> int:
        """Parameter count; ``active`` counts only top_k of the routed experts (per-token compute)."""
        total = 0
        for name, p in self.named_parameters():
            if not embedding and name == "embed.weight":
                continue
            n = p.numel()
            if active and (name.endswith("experts.gate_up") or name.endswith("experts.down")):
                n = n * self.config.top_k // self.config.n_routed_experts
            total += n
        for name, module in self.named_modules():  # quantized weights are integer buffers, not parameters
            if isinstance(module, QuantizedWeight):
                if not embedding and name.startswith("embed."):
                    continue
                n = module.out_features * module.in_features
                if active and ".experts." in name:
                    n = n * self.config.top_k // self.config.n_routed_experts
                total += n
        return total
