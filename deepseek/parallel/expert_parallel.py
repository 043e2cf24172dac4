"""Expert parallelism: each of the ``ep`` ranks keeps ``E / ep`` of every MoE layer's routed experts, and the
(token, expert) pairs travel to the rank that owns their expert and back by all-to-all.

Legend: N tokens on this rank, D model width, F expert width, E routed experts, K experts per token,
W ep ranks, L = E / W experts per rank, P this rank's (token, expert) pairs (N * K), R pairs received.

Applied from outside the model: the expert weights are sliced in place and the :class:`GroupedExperts`
instance's ``dispatcher`` is replaced by :class:`AllToAllDispatch` (the router, shared experts and everything
else stay as they are: replicated and data-parallel). One forward:

1. pairs sorted by expert (so also by owner rank: rank ``w`` owns experts ``w*L .. w*L+L-1``;
   :func:`~deepseek.nn.dispatch.sort_by_expert`, as in the local sorted dispatch);
2. per-expert pair counts exchanged (``all_to_all_single``, equal splits), read on the host for the splits;
3. the pairs' token rows exchanged with an uneven ``dist.all_to_all_single`` wrapped in an autograd function
   (backward = the reverse exchange; gloo and NCCL both take uneven and empty splits);
4. received rows regrouped by local expert, one grouped matmul per projection (the experts' own
   :meth:`~deepseek.nn.experts.GroupedProduct.grouped`, on the local slices);
5. results sent back by the reverse all-to-all, weighted by the routing weights and scatter-added per token
   (:func:`~deepseek.nn.dispatch.combine`).

Gradients: an expert's gradient on its owner rank sums the contributions of every ep rank's tokens, each taken
through that rank's own (local mean) loss; :func:`expert_parameters` names the parameters whose gradients the
plan reduces over ``dp_replicate x dp_shard`` only (and scales by ``1 / data-parallel size``), see
:meth:`deepseek.parallel.plan.MeshPlan._apply_expert_parallel`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from deepseek.config import ConfigError
from deepseek.nn.dispatch import combine, sort_by_expert
from deepseek.nn.experts import GroupedExperts, GroupedProduct

EXPERT_PARAMS = ("gate_up", "down")


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows whose backward is the reverse exchange (``dist.all_to_all_single`` with split
    sizes: gloo and NCCL both take uneven and empty splits)."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_MD.new_empty(sum(out_splits), *x_MD.shape[1:])
        dist.all_to_all_single(out, x_MD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def _all_to_all(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows ``x`` split ``in_splits`` to the ranks in order; returns the rows received, ``out_splits`` per rank."""
    return _AllToAll.apply(x_MD, out_splits, in_splits, group)


class AllToAllDispatch:
    """The :class:`~deepseek.nn.dispatch.Dispatcher` of an expert-parallel layer: this rank holds experts
    ``[rank * L, rank * L + L)`` of ``n_experts`` and the pairs travel to their owners and back (see the module doc).

    Installed from outside as the experts module's ``dispatcher``; the products are the module's own
    (:meth:`~deepseek.nn.experts.GroupedProduct.grouped` on the local slices).
    """

    def __init__(self, group, n_experts: int):
        self.group = group
        self.world = dist.get_world_size(group)
        self.n_experts = n_experts
        self.n_local = n_experts // self.world

    def __call__(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                 compute: GroupedExperts) -> torch.Tensor:
        W, L = self.world, self.n_local
        order, counts_E, _ = sort_by_expert(experts_NK, self.n_experts)  # grouped by expert, hence by owner rank
        token_of_pair = order // experts_NK.shape[1]
        # recv_WL[w, l]: pairs rank w sends to this rank's local expert l.
        recv_WL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_WL, counts_E, group=self.group)
        recv_WL = recv_WL.view(W, L)
        # Host sync, needed: the exchange sizes are data-dependent.
        in_splits = counts_E.view(W, L).sum(1).tolist()
        out_splits = recv_WL.sum(1).tolist()

        x_PD = x_ND[token_of_pair].to(compute.rows_dtype(x_ND))
        x_RD = _all_to_all(x_PD, out_splits, in_splits, self.group)  # ordered by (source rank, local expert)

        # Regroup the received rows by local expert (stable: by source rank within an expert).
        local_expert_of_row = torch.arange(L, device=x_ND.device).repeat(W).repeat_interleave(recv_WL.flatten())
        regroup = local_expert_of_row.argsort(stable=True)
        counts_L = recv_WL.sum(0)
        local = GroupedProduct(_local(compute.gate_up), _local(compute.down))
        y_RD = local.grouped(x_RD[regroup], counts_L, counts_L.cumsum(0).to(torch.int32))
        y_RD = y_RD[regroup.argsort()]  # back to (source rank, local expert) order

        y_PD = _all_to_all(y_RD, in_splits, out_splits, self.group)  # back in this rank's pair order
        return combine(y_PD, weights_NK.flatten()[order], token_of_pair, x_ND.shape[0])


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's experts: the parameter itself, or its local slice when :func:`distribute_experts` made it a
    DTensor (differentiable: the gradient comes back as a DTensor of the same placements)."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def expert_modules(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """Every routed-experts module of ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedExperts)]


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The sharded expert parameters (qualified names), in a fixed order."""
    return [(f"{name}.{p}", getattr(m, p)) for name, m in expert_modules(model) for p in EXPERT_PARAMS]


def check_expert_split(modules: list[tuple[str, GroupedExperts]], ep: int) -> None:
    """ConfigError unless ``ep`` divides every layer's routed experts (and there are any)."""
    if not modules:
        raise ConfigError("parallel.ep > 1 needs a model with routed experts (MoE layers)")
    for name, experts in modules:
        if experts.n_experts % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide the {experts.n_experts} routed experts of {name} "
                              f"(model.n_routed_experts must be a multiple of ep)")


def apply_expert_parallel(model: nn.Module, ep_group, ep_rank: Optional[int] = None) -> list[str]:
    """Keep this rank's ``E / ep`` experts of every MoE layer and route tokens to their owners by all-to-all.

    ``ep_group``: the process group of the ranks that share the experts out (this rank's ``ep`` mesh slice).
    The model must be identical on every rank beforehand (same seed). Returns the qualified names of the sharded
    expert parameters (their gradients need their own reduction). Raises ConfigError if ``E`` is not divisible
    by ``ep``.
    """
    world = dist.get_world_size(ep_group)
    rank = dist.get_rank(ep_group) if ep_rank is None else ep_rank
    modules = expert_modules(model)
    check_expert_split(modules, world)
    for name, experts in modules:
        E = experts.n_experts
        L = E // world
        with torch.no_grad():
            for p in EXPERT_PARAMS:
                full = getattr(experts, p)
                setattr(experts, p, nn.Parameter(full[rank * L:(rank + 1) * L].clone(), requires_grad=full.requires_grad))
        experts.dispatcher = AllToAllDispatch(ep_group, E)
    return [name for name, _ in expert_parameters(model)]


def distribute_experts(model: nn.Module, mesh, placements: tuple) -> None:
    """Present every rank-local expert parameter as a DTensor over ``mesh`` (sharing its storage; ``placements``:
    ``Shard(0)`` on ep, e.g. the ep mesh alone), so that it sits among FSDP's DTensors as one more layout:
    foreach optimizers, the gradient norm (its ``Shard(0)`` part summed over ep by ``full_tensor``), clipping,
    DCP and the full state dict all take it as it is. The gradient stays a rank-local sum until
    :meth:`ExpertGradients.sync` reduces it over the other data-parallel dimensions."""
    from torch.distributed.tensor import DTensor

    for _, experts in expert_modules(model):
        for p in EXPERT_PARAMS:
            local = getattr(experts, p)
            setattr(experts, p, nn.Parameter(DTensor.from_local(local.detach(), mesh, placements, run_check=False),
                                             requires_grad=local.requires_grad))


@torch.no_grad()
def gather_experts(model: nn.Module, ep_group) -> dict[str, torch.Tensor]:
    """Every expert parameter whole (all ep shards concatenated in expert order), on every rank. Collective."""
    world = dist.get_world_size(ep_group)
    full = {}
    for name, p in expert_parameters(model):
        shards = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(shards, p.detach().contiguous(), group=ep_group)
        full[name] = torch.cat(shards)
    return full


def full_model(model: nn.Module, ep_group, main: bool) -> Optional[nn.Module]:
    """An ordinary model (fresh ``type(model)(model.config)``) with every expert, on ``main``; None elsewhere.
    Collective over ``ep_group``."""
    experts = gather_experts(model, ep_group)
    if not main:
        return None
    state = {**model.state_dict(), **experts}
    whole = type(model)(model.config).to(next(model.parameters()).device)
    whole.load_state_dict(state)
    return whole


class ExpertGradients:
    """The gradient reduction and norm of the sharded experts in a ``dp_replicate x dp_shard x ep`` layout.

    The loss of each of the ``data_parallel_size`` ranks is a mean over its own rows, and the one-process
    gradient is the mean of those ranks' gradients. Non-expert parameters get it from DDP's average (or FSDP's
    averaging reduce-scatter) over every data-parallel rank. An expert's gradient on its owner already *sums*
    the contributions of the tokens of all ``ep`` ranks (backward through the all-to-all), so the ranks that hold
    the same experts (``replicate_group``: the ``dp_replicate x dp_shard`` ranks of this ep coordinate) sum their
    gradients and divide by ``data_parallel_size``.
    """

    def __init__(self, model: nn.Module, replicate_group, ep_group, data_parallel_size: int):
        self.params = [p for _, p in expert_parameters(model)]
        self.replicate_group, self.ep_group = replicate_group, ep_group
        self.scale = 1.0 / data_parallel_size

    @torch.no_grad()
    def sync(self) -> None:
        """After the step's last backward: sum over ``replicate_group``, divide by the data-parallel size."""
        grads = []
        for p in self.params:
            if p.grad is None:  # no micro-batch routed a token to this rank's experts: a zero gradient
                p.grad = torch.zeros_like(p)
            grads.append(_local(p.grad))  # a DTensor's (distribute_experts) local sum, reduced in place
        if self.replicate_group is not None:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.replicate_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        torch._foreach_mul_(grads, self.scale)

    def total_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of the gradients of ``params``: replicated gradients count once, the experts' of
        every ep rank are summed in (their squares, over the ep group)."""
        from torch.nn.utils import get_total_norm

        expert_ids = {id(p) for p in self.params}
        mine = [p.grad for p in params if id(p) in expert_ids]
        rest = [p.grad for p in params if id(p) not in expert_ids]
        device = params[0].grad.device
        expert_sq = get_total_norm(mine, 2.0).float() ** 2 if mine else torch.zeros((), device=device)
        dist.all_reduce(expert_sq, group=self.ep_group)
        rest_sq = get_total_norm(rest, 2.0).float() ** 2 if rest else torch.zeros((), device=device)
        return (rest_sq + expert_sq).sqrt()
