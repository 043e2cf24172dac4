"""Pruning for our own MoE transformer: magnitude sparsity, structured channel/head pruning, expert pruning.

Legend: E routed experts, F expert (or dense) FFN width, D model width, H query heads, Hkv key/value heads,
Dh head dim, G = H / Hkv query heads per key/value group, L MoE layers.

- :func:`prune_unstructured` zeroes the smallest weights (stored densely: no size or speed gain, a study tool
  and the first step of sparse formats).
- :func:`prune_channels` removes FFN channels and attention heads and returns a really smaller model.
- :func:`prune_experts` removes (or merges away) the least used routed experts, measured by
  :func:`gather_router_stats` on calibration batches.

Structured methods return a new :class:`MoETransformer` with a new :class:`ModelConfig`, so the pruned
model is an ordinary model directory after ``ds.save`` and every stage (``ds.load``, ``ds generate``,
``ds serve``) uses it unchanged. Written for this architecture on purpose: the coupled slices (gate row +
up row + down column of a channel, the q rows + o columns of a head, an expert's router row, bias and
weights) are spelled out here instead of being discovered by a dependency-graph library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Union

import torch
import torch.nn.functional as F

from deepseek.models.config import ModelConfig
from deepseek.models.directory import model_from_state
from deepseek.models.transformer import MoETransformer
from deepseek.nn.attention import Attention
from deepseek.nn.mlp import SwiGLU
from deepseek.nn.moe import MoE
from deepseek.nn.quantized import is_quantized


@dataclass
class PruneReport:
    """What a pruning call did.

    ``parameters_before`` / ``parameters_after``: parameter counts (unstructured pruning stores zeros densely,
    so the count stays and ``details["nonzero_parameters"]`` says how many are left nonzero). ``sparsity``:
    for :func:`prune_unstructured` the fraction of zeros over the pruned tensors; for the structured methods
    the fraction of parameters removed, ``1 - after / before``. ``details``: method-specific, JSON-ready.
    """

    method: str
    parameters_before: int
    parameters_after: int
    sparsity: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, e.g. for ``ds.save(..., compression=report.to_dict())``."""
        return dataclasses.asdict(self)


# -- argument checks ---------------------------------------------------------------------------------

def _check_model(model: Any, what: str) -> MoETransformer:
    if not isinstance(model, MoETransformer) or not isinstance(getattr(model, "config", None), ModelConfig):
        hint = " (unwrap torch.compile / DDP first: pass model._orig_mod or model.module)" if (
            hasattr(model, "_orig_mod") or hasattr(model, "module")) else ""
        raise TypeError(f"{what} expects a deepseek MoETransformer, got {type(model).__name__}{hint}")
    if is_quantized(model):
        raise ValueError(f"{what}: the model is quantized; prune the floating-point model, then quantize")
    return model


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _nonzero(model: torch.nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


# -- unstructured magnitude pruning -------------------------------------------------------------------

def prunable_weights(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The weights :func:`prune_unstructured` prunes, by state-dict name.

    Every Linear weight of the blocks (attention q/k/v/o, dense and shared SwiGLU gate/up/down) and the 3-D
    expert weights (``experts.gate_up`` [E, 2F, D], ``experts.down`` [E, D, F]). Left dense: the embedding,
    ``lm_head`` (the output embedding, often tied to it), norms, routers (weight and balancing bias), the
    shared expert's scalar ``shared_gate`` (a router-like gate), and all biases.
    """
    out: dict[str, torch.Tensor] = {}
    for bname, block in model.blocks.named_children():
        for mname, module in block.named_modules():
            prefix = f"blocks.{bname}.{mname}"
            if isinstance(module, Attention):
                for proj in ("q", "k", "v", "o"):
                    out[f"{prefix}.{proj}.weight"] = getattr(module, proj).weight
            elif isinstance(module, SwiGLU):
                for proj in ("gate", "up", "down"):
                    out[f"{prefix}.{proj}.weight"] = getattr(module, proj).weight
            elif isinstance(module, MoE):
                out[f"{prefix}.experts.gate_up"] = module.experts.gate_up
                out[f"{prefix}.experts.down"] = module.experts.down
    return out


@torch.no_grad()
def prune_unstructured(model: MoETransformer, sparsity: float, *,
                       scope: Literal["global", "layer"] = "global") -> PruneReport:
    """Zero the smallest-magnitude weights of ``model`` in place (zeros stored densely); returns a report.

    Pruned: every Linear weight of the blocks (attention q/k/v/o, dense and shared-expert SwiGLU gate/up/down)
    and the 3-D expert weights ``gate_up`` [E, 2F, D] and ``down`` [E, D, F]. Not pruned: the embedding and
    ``lm_head`` (output embedding), norms, the router (weight and ``expert_bias``), ``shared_gate``, biases —
    see :func:`prunable_weights`.

    ``scope="global"``: one magnitude threshold over all pruned tensors together, so layers that matter less
    lose more. ``scope="layer"``: the same fraction ``sparsity`` of every tensor, and of every expert's own
    [2F, D] / [D, F] matrix for the expert weights. Ties at the threshold are pruned too (so an already sparse
    tensor can end slightly above the target).

    The report's ``sparsity`` is the achieved fraction of zeros over the pruned tensors; ``details`` holds
    ``tensors`` (name -> sparsity), ``nonzero_parameters`` and ``model_sparsity`` (zeros over all
    parameters). Note that a later fine-tune makes the zeros nonzero again unless they are re-applied.
    """
    model = _check_model(model, "prune_unstructured")
    sparsity = _check_fraction(sparsity, "sparsity")
    scope = _check_choice(scope, "scope", ("global", "layer"))
    weights = prunable_weights(model)
    if not weights:
        raise ValueError("the model has no prunable weights")
    threshold = None
    if sparsity > 0 and scope == "global":
        magnitudes = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
        k = int(round(sparsity * magnitudes.numel()))
        if k > 0:
            threshold = float(magnitudes.kthvalue(k).values)
        del magnitudes
        if threshold is not None:
            for w in weights.values():
                w.masked_fill_(w.abs().float() <= threshold, 0)
    elif sparsity > 0:
        for name, w in weights.items():
            # Expert weights [E, R, C]: one fraction per expert matrix; 2-D weights: per tensor.
            magnitudes = w.detach().abs().float().reshape(w.shape[0] if w.dim() == 3 else 1, -1)
            k = int(round(sparsity * magnitudes.shape[1]))
            if k == 0:
                continue
            thresholds = magnitudes.kthvalue(k, dim=1, keepdim=True).values
            w.masked_fill_((magnitudes <= thresholds).view(w.shape), 0)

    per_tensor = {name: 1.0 - int(torch.count_nonzero(w)) / w.numel() for name, w in weights.items()}
    pruned_total = sum(w.numel() for w in weights.values())
    pruned_zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in weights.values())
    total = model.num_parameters()
    nonzero = _nonzero(model)
    details = {"scope": scope, "requested_sparsity": sparsity, "pruned_parameters": pruned_total,
               "nonzero_parameters": nonzero, "model_sparsity": 1.0 - nonzero / total, "tensors": per_tensor}
    if threshold is not None:
        details["threshold"] = threshold
    return PruneReport("unstructured", total, total, pruned_zeros / pruned_total, details)


# -- structured pruning: FFN channels and attention heads ---------------------------------------------

def kept_count(n: int, ratio: float, round_to: int) -> int:
    """Channels kept out of ``n`` when pruning ``ratio``: ``floor(n * (1 - ratio) / round_to) * round_to``,
    at least ``round_to``; all ``n`` when ``n < round_to``."""
    if n < round_to:
        return n
    return max(math.floor(n * (1 - ratio) / round_to) * round_to, round_to)


def kept_heads_per_group(group: int, ratio: float) -> int:
    """Query heads kept in each kv group of ``group`` heads: ``group * (1 - ratio)`` rounded to the nearest
    integer (halves up), between 1 and ``group``. Nearest, not floor: a head is a coarse unit (a floor keeps
    2 of 4 heads at ratio 0.3, which cost the quickstart model 2.5x its perplexity; 3 of 4 cost little)."""
    return min(group, max(1, math.floor(group * (1 - ratio) + 0.5)))


def _top_sorted(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last dim, in ascending index order (keeps layouts)."""
    return importance.topk(k, dim=-1).indices.sort(dim=-1).values


def _swiglu_keep(state: dict, prefix: str, keep: int) -> torch.Tensor:
    """Keep the ``keep`` channels of a dense SwiGLU with the largest L1 norm (gate row + up row + down column)."""
    gate, up, down = (state[f"{prefix}.{p}.weight"] for p in ("gate", "up", "down"))
    importance = gate.abs().sum(1).float() + up.abs().sum(1).float() + down.abs().sum(0).float()  # [F]
    idx = _top_sorted(importance, keep)
    state[f"{prefix}.gate.weight"] = gate[idx]
    state[f"{prefix}.up.weight"] = up[idx]
    state[f"{prefix}.down.weight"] = down[:, idx]
    return idx


def _experts_keep(state: dict, prefix: str, keep: int) -> torch.Tensor:
    """Per expert, keep its own ``keep`` channels of largest L1 norm: gate_up [E, 2F, D], down [E, D, F]."""
    gate_up, down = state[f"{prefix}.gate_up"], state[f"{prefix}.down"]
    n = down.shape[-1]
    gate_EFD, up_EFD = gate_up[:, :n], gate_up[:, n:]
    importance_EF = gate_EFD.abs().sum(-1).float() + up_EFD.abs().sum(-1).float() + down.abs().sum(1).float()
    idx_EF = _top_sorted(importance_EF, keep)  # [E, keep]: every expert chooses its own channels
    rows = idx_EF.unsqueeze(-1).expand(-1, -1, gate_up.shape[-1])
    state[f"{prefix}.gate_up"] = torch.cat([gate_EFD.gather(1, rows), up_EFD.gather(1, rows)], dim=1)
    state[f"{prefix}.down"] = down.gather(2, idx_EF.unsqueeze(1).expand(-1, down.shape[1], -1))
    return idx_EF


def _heads_keep(state: dict, prefix: str, attn: Attention, per_group: int) -> list[int]:
    """Keep ``per_group`` query heads in every kv group, by L1 norm of the head's q rows + o columns."""
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, o = state[f"{prefix}.q.weight"], state[f"{prefix}.o.weight"]  # [H*Dh, D], [D, H*Dh]
    importance_H = q.reshape(H, Dh, -1).abs().sum((1, 2)).float() + o.reshape(-1, H, Dh).abs().sum((0, 2)).float()
    group = H // Hkv  # query head h reads kv head h // group: keep the grouping intact
    in_group = _top_sorted(importance_H.view(Hkv, group), per_group)  # [Hkv, per_group]
    heads = (in_group + torch.arange(Hkv, device=in_group.device).unsqueeze(1) * group).flatten()
    rows = (heads.unsqueeze(1) * Dh + torch.arange(Dh, device=heads.device)).flatten()  # the kept heads' rows
    state[f"{prefix}.q.weight"] = q[rows]
    if f"{prefix}.q.bias" in state:
        state[f"{prefix}.q.bias"] = state[f"{prefix}.q.bias"][rows]
    state[f"{prefix}.o.weight"] = o[:, rows]
    return heads.tolist()


def _rebuild(model: MoETransformer, config: ModelConfig, state: dict[str, torch.Tensor]) -> MoETransformer:
    """A new model of ``config`` holding ``state`` (cloned: nothing shares memory with the original)."""
    device = next(model.parameters()).device
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    new = model_from_state(config, state, "pruned model", error=RuntimeError).to(device)
    new.gradient_checkpointing = model.gradient_checkpointing
    return new.train(model.training)


@torch.no_grad()
def prune_channels(model: MoETransformer, ratio: float, *, heads: bool = True,
                   round_to: int = 16) -> tuple[MoETransformer, PruneReport]:
    """Structured pruning that shrinks the model: FFN channels and attention query heads, by L1 norm.

    FFN: a channel i is gate row i + up row i + down column i; its importance the sum of their L1 norms.
    Dense layers keep ``ffn_dim`` channels, the shared expert ``shared_ffn_dim``, and every routed expert the
    same ``moe_ffn_dim`` (the config has one width) but chosen per expert. Kept count out of n:
    ``floor(n * (1 - ratio) / round_to) * round_to``, at least ``round_to`` (n when n < round_to) — see
    :func:`kept_count`.

    Heads (``heads=True``): importance = L1 norm of the head's q rows + o columns. Every kv group
    keeps the same number of its G query heads, ``G * (1 - ratio)`` rounded to nearest and at least 1
    (:func:`kept_heads_per_group`), so ``n_heads`` stays a multiple
    of ``n_kv_heads`` and query head h still reads kv head ``h // (n_heads / n_kv_heads)``. Key/value heads
    are not pruned (with plain multi-head attention, G = 1, no head is removed). ``head_dim`` is written
    explicitly into the new config.

    Returns ``(new_model, report)``: a new :class:`MoETransformer` (same device and dtype, the original is
    untouched) with a new :class:`ModelConfig`. Embedding, norms, routers, ``lm_head`` are copied unchanged.
    """
    model = _check_model(model, "prune_channels")
    ratio = _check_fraction(ratio, "ratio")
    round_to = _check_int(round_to, "round_to", 1)
    if not isinstance(heads, bool):
        raise ValueError(f"heads must be True or False, got {heads!r}")
    cfg = model.config
    state = dict(model.state_dict())
    changes: dict[str, Any] = {}
    kept_heads: list[list[int]] = []
    n_dense, n_moe = cfg.first_k_dense, cfg.n_layers - cfg.first_k_dense

    group = cfg.n_heads // cfg.n_kv_heads
    per_group = kept_heads_per_group(group, ratio) if heads else group
    if per_group < group:
        for i, block in enumerate(model.blocks):
            kept_heads.append(_heads_keep(state, f"blocks.{i}.attn", block.attn, per_group))
        changes.update(n_heads=per_group * cfg.n_kv_heads, head_dim=cfg.head_dim)
    if n_dense:
        keep = kept_count(cfg.ffn_dim, ratio, round_to)
        for i in range(n_dense):
            _swiglu_keep(state, f"blocks.{i}.ffn", keep)
        changes["ffn_dim"] = keep
    if n_moe:
        keep = kept_count(cfg.moe_ffn_dim, ratio, round_to)
        for i in range(n_dense, cfg.n_layers):
            _experts_keep(state, f"blocks.{i}.ffn.experts", keep)
        changes["moe_ffn_dim"] = keep
        if cfg.n_shared_experts:
            keep = kept_count(cfg.shared_ffn_dim, ratio, round_to)
            for i in range(n_dense, cfg.n_layers):
                _swiglu_keep(state, f"blocks.{i}.ffn.shared", keep)
            changes["shared_ffn_dim"] = keep
        else:
            changes["shared_ffn_dim"] = 0  # explicit, so that the default (n_shared * moe_ffn_dim) stays 0
    new_config = dataclasses.replace(cfg, **changes)
    new = _rebuild(model, new_config, state)

    before, after = model.num_parameters(), new.num_parameters()
    sizes = ("n_heads", "head_dim", "ffn_dim", "moe_ffn_dim", "shared_ffn_dim")
    details = {"ratio": ratio, "round_to": round_to, "heads": heads,
               "before": {k: getattr(cfg, k) for k in sizes}, "after": {k: getattr(new_config, k) for k in sizes}}
    if kept_heads:
        details["kept_heads"] = kept_heads
    return new, PruneReport("channels", before, after, 1.0 - after / before, details)


# -- expert pruning ----------------------------------------------------------------------------------

@torch.no_grad()
def gather_router_stats(model: MoETransformer,
                        batches: Iterable[Union[torch.Tensor, tuple[torch.Tensor, ...]]]) -> torch.Tensor:
    """Token-expert pair counts per MoE layer over calibration ``batches``: float64 [n_moe_layers, E].

    ``batches`` yields token ids [B, T], or tuples whose first element they are (e.g.
    ``deepseek.data.eval_batches(path, split="train", ...)``). Runs the model in eval mode without
    gradients (no balancing state is touched) and restores its mode afterwards. Counts include the
    balancing bias of sigmoid routers, i.e. they are the experts really chosen.
    """
    model = _check_model(model, "gather_router_stats")
    if model.config.n_moe_layers == 0:
        raise ValueError("the model has no MoE layers (first_k_dense == n_layers): nothing to count")
    device = next(model.parameters()).device
    counts: Optional[torch.Tensor] = None
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise ValueError("batches must yield token ids [batch, tokens] (or tuples starting with them)")
            _, stats = model(ids.to(device), return_router_stats=True, logits_to_keep=1)  # the head is not needed
            step = stats.tokens_per_expert.to(torch.float64)
            counts = step if counts is None else counts + step
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("batches yielded nothing: no router statistics gathered")
    return counts.cpu()


@torch.no_grad()
def prune_experts(model: MoETransformer, *, keep: int, stats: torch.Tensor,
                  mode: Literal["drop", "merge"] = "drop") -> tuple[MoETransformer, PruneReport]:
    """Keep the ``keep`` most used routed experts of every MoE layer; returns ``(new_model, report)``.

    ``stats`` [n_moe_layers, E] are usage counts (:func:`gather_router_stats`). Per layer the ``keep`` experts
    with the largest counts stay (in their original order, ties to the lower index): their router rows,
    ``expert_bias`` entries and ``gate_up`` / ``down`` slices are copied.

    ``mode="drop"``: the other experts are removed; their tokens are routed to the next-best kept experts.
    ``mode="merge"``: each dropped expert d is first folded into the kept expert k whose router weight row is
    most similar (cosine) to d's: k's ``gate_up`` and ``down`` become the usage-weighted average
    ``(u_k W_k + sum_d u_d W_d) / (u_k + sum_d u_d)`` over k and the experts merged into it (``u`` = counts;
    when all of them are 0, W_k stays). Router rows and biases of kept experts are not changed, so routing
    among kept experts is the same as in ``drop`` — merge changes what those experts compute.

    Shared experts, attention and dense layers are unchanged. The new config has ``n_routed_experts=keep``;
    ``keep`` must lie in ``[top_k, E)``.
    """
    model = _check_model(model, "prune_experts")
    cfg = model.config
    mode = _check_choice(mode, "mode", ("drop", "merge"))
    E, L = cfg.n_routed_experts, cfg.n_moe_layers
    if L == 0:
        raise ValueError("the model has no MoE layers (first_k_dense == n_layers): no experts to prune")
    if isinstance(keep, bool) or not isinstance(keep, int) or not cfg.top_k <= keep < E:
        raise ValueError(f"keep must be an integer in [top_k, n_routed_experts) = [{cfg.top_k}, {E}) "
                         f"(top_k experts per token must remain), got {keep!r}")
    if not isinstance(stats, torch.Tensor) or tuple(stats.shape) != (L, E):
        shape = tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(f"stats must be a tensor [n_moe_layers, n_routed_experts] = [{L}, {E}] "
                         f"(from gather_router_stats), got {shape}")
    stats = stats.detach().to("cpu", torch.float64)
    if not torch.isfinite(stats).all() or (stats < 0).any():
        raise ValueError("stats must be finite, non-negative usage counts")

    state = dict(model.state_dict())
    kept_all, merged_into, kept_share = [], [], []
    for layer in range(L):
        prefix = f"blocks.{cfg.first_k_dense + layer}.ffn"
        usage = stats[layer]
        order = torch.sort(-usage, stable=True).indices  # most used first; ties to the lower index
        kept = order[:keep].sort().values
        dropped = order[keep:].sort().values
        kept_all.append(kept.tolist())
        kept_share.append(float(usage[kept].sum() / usage.sum()) if usage.sum() > 0 else 0.0)
        router_w = state[f"{prefix}.router.weight"]
        gate_up, down = state[f"{prefix}.experts.gate_up"], state[f"{prefix}.experts.down"]
        dev = router_w.device
        if mode == "merge":
            similarity = F.cosine_similarity(router_w[dropped].float().unsqueeze(1),
                                             router_w[kept].float().unsqueeze(0), dim=-1)  # [E - keep, keep]
            target = similarity.argmax(dim=1)  # position in `kept` each dropped expert folds into
            merged_into.append({int(d): int(kept[t]) for d, t in zip(dropped, target)})
            new_gate_up, new_down = gate_up[kept.to(dev)].clone(), down[kept.to(dev)].clone()
            for slot, k in enumerate(kept.tolist()):
                members = [k] + [int(d) for d, t in zip(dropped, target) if int(t) == slot]
                weights = usage[members]
                if len(members) == 1 or weights.sum() == 0:
                    continue
                w = (weights / weights.sum()).to(device=dev, dtype=torch.float32)
                idx = torch.tensor(members, device=dev)
                new_gate_up[slot] = (gate_up[idx].float() * w.view(-1, 1, 1)).sum(0).to(gate_up.dtype)
                new_down[slot] = (down[idx].float() * w.view(-1, 1, 1)).sum(0).to(down.dtype)
        else:
            new_gate_up, new_down = gate_up[kept.to(dev)], down[kept.to(dev)]
        state[f"{prefix}.experts.gate_up"], state[f"{prefix}.experts.down"] = new_gate_up, new_down
        state[f"{prefix}.router.weight"] = router_w[kept.to(dev)]
        state[f"{prefix}.router.expert_bias"] = state[f"{prefix}.router.expert_bias"][kept.to(dev)]
    new_config = dataclasses.replace(cfg, n_routed_experts=keep)
    new = _rebuild(model, new_config, state)

    before, after = model.num_parameters(), new.num_parameters()
    details: dict[str, Any] = {"mode": mode, "keep": keep, "experts_before": E, "kept_experts": kept_all,
                               "kept_usage_share": kept_share}
    if mode == "merge":
        details["merged_into"] = [{str(d): k for d, k in m.items()} for m in merged_into]
    return new, PruneReport(f"experts-{mode}", before, after, 1.0 - after / before, details)


__all__ = ["PruneReport", "gather_router_stats", "kept_count", "kept_heads_per_group", "prunable_weights", "prune_channels",
           "prune_experts", "prune_unstructured"]
