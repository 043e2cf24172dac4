"""The parallel layouts ``ds plan`` can plan — exactly those :mod:`deepseek.parallel` implements — and what each
one keeps on a device.

    ddp[=N]   data-parallel replicas (DDP): every device holds everything
    fsdp[=N]  fully sharded data parallelism (FSDP2): parameters, gradients and optimizer state divided by N
    tp=N      tensor parallelism: attention heads, dense/shared FFN and expert widths divided by N
    ep=N      expert parallelism: the routed experts divided by N
    pp=N      pipeline parallelism: the layers cut into N stages (the first holds the embedding, the last the head)

A layout without a number takes what the others leave of ``--devices``. Combinations :class:`~deepseek.parallel.
plan.MeshPlan` refuses (tp with ep, ep with pp) are refused here too; context/sequence parallelism does not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from deepseek.config import ConfigError
from deepseek.models.config import ModelConfig
from deepseek.parallel.pipeline import stage_layers  # noqa: F401 - the pipeline's own split, re-exported for plans

LAYOUT_NAMES = {"ddp": "dp_replicate", "fsdp": "dp_shard", "tp": "tp", "ep": "ep", "pp": "pp"}
UNSUPPORTED = {"cp": "context parallelism", "sp": "sequence parallelism", "zero1": "ZeRO-1 (optimizer-only sharding)",
               "zero2": "ZeRO-2", "hsdp": "hsdp (write it as ddp=R with fsdp=S)"}


class LayoutError(ConfigError):
    """A ``--layout`` that does not parse, is not implemented, or does not fit the model or ``--devices``."""


@dataclass(frozen=True)
class Layout:
    """The degree of each mesh dimension; their product is the number of devices."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.ep * self.pp

    @property
    def data_parallel(self) -> int:
        """Devices that take distinct rows of each global batch (as :class:`~deepseek.parallel.ParallelConfig`)."""
        return self.dp_replicate * self.dp_shard * self.ep

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 shards the parameters (dp_shard > 1; tp layouts are wrapped in FSDP too)."""
        return self.dp_shard > 1 or self.tp > 1

    def describe(self) -> str:
        names = {v: k for k, v in LAYOUT_NAMES.items()}
        parts = [f"{names[d]}={getattr(self, d)}" for d in ("pp", "dp_replicate", "dp_shard", "ep", "tp")
                 if getattr(self, d) > 1]
        return " x ".join(parts) or "one device"


def parse_layout(specs: list[str], devices: Optional[int] = None) -> Layout:
    """A :class:`Layout` from ``--layout`` values (``["fsdp=4", "tp=2"]`` or ``["fsdp=4,tp=2"]``) and ``--devices``.

    One name may go without a degree (``fsdp``): it takes ``devices / (the others)``. Without ``--devices`` a
    layout with such a name is an error; without any name the layout is ``ddp`` over ``devices`` (default 1)."""
    tokens = [t.strip() for spec in specs for t in spec.split(",") if t.strip()]
    degrees: dict[str, int] = {}
    open_dim: Optional[str] = None
    for token in tokens:
        name, _, value = token.partition("=")
        name = name.strip().lower()
        if name in UNSUPPORTED:
            raise LayoutError(f"--layout {token}: {UNSUPPORTED[name]} is not implemented in deepseek.parallel; "
                              f"layouts: ddp, fsdp, tp=N, ep=N, pp=N")
        if name not in LAYOUT_NAMES:
            raise LayoutError(f"--layout {token}: unknown layout {name!r}; layouts: ddp, fsdp, tp=N, ep=N, pp=N")
        dim = LAYOUT_NAMES[name]
        if dim in degrees or dim == open_dim:
            raise LayoutError(f"--layout: {name} given twice")
        if not value:
            if name in ("tp", "ep", "pp"):
                raise LayoutError(f"--layout {token}: {name} needs a degree, e.g. {name}=2")
            if open_dim is not None:
                raise LayoutError("--layout: only one of ddp/fsdp may go without a degree")
            open_dim = dim
            continue
        try:
            degree = int(value)
        except ValueError:
            raise LayoutError(f"--layout {token}: the degree must be a whole number, got {value!r}") from None
        if degree < 1:
            raise LayoutError(f"--layout {token}: the degree must be positive, got {degree}")
        degrees[dim] = degree
    if devices is not None and devices < 1:
        raise LayoutError(f"--devices must be positive, got {devices}")
    fixed = math.prod(degrees.values())
    if open_dim is None and devices is not None and devices != fixed:
        if "dp_replicate" in degrees or devices % fixed:
            raise LayoutError(f"--layout {','.join(tokens) or 'ddp'} uses {fixed} devices, --devices says {devices}")
        open_dim = "dp_replicate"  # the rest of the devices are replicas, as parallel.dp_replicate=-1 does
    if open_dim is not None:
        if devices is None:
            raise LayoutError(f"--layout {','.join(tokens)}: a layout without a degree needs --devices")
        if devices % fixed:
            raise LayoutError(f"--devices {devices} is not a multiple of the {fixed} devices the other degrees use")
        degrees[open_dim] = devices // fixed
    layout = Layout(**degrees)
    if layout.tp > 1 and layout.ep > 1:
        raise LayoutError("--layout: tp combined with ep is not implemented in deepseek.parallel (tp composes with "
                          "fsdp, ddp and pp)")
    if layout.ep > 1 and layout.pp > 1:
        raise LayoutError("--layout: ep combined with pp is not implemented in deepseek.parallel (ep composes with "
                          "ddp and fsdp)")
    return layout


def check_layout_fits_model(layout: Layout, cfg: ModelConfig) -> None:
    """Raise :class:`LayoutError` where the model does not split as the layout asks (what the plans check)."""
    problems = []
    if layout.tp > 1:
        for name in ("n_heads", "n_kv_heads", "moe_ffn_dim", "ffn_dim"):
            if getattr(cfg, name) % layout.tp:
                problems.append(f"model.{name}={getattr(cfg, name)} is not divisible by tp={layout.tp}")
        if cfg.n_shared_experts and cfg.shared_ffn_dim % layout.tp:
            problems.append(f"model.shared_ffn_dim={cfg.shared_ffn_dim} is not divisible by tp={layout.tp}")
    if layout.ep > 1 and cfg.n_routed_experts % layout.ep:
        problems.append(f"model.n_routed_experts={cfg.n_routed_experts} is not divisible by ep={layout.ep}")
    if layout.pp > 1:
        if layout.pp > cfg.n_layers:
            problems.append(f"pp={layout.pp} needs at least {layout.pp} layers (the model has {cfg.n_layers})")
        if cfg.tie_embeddings:
            problems.append("pp with model.tie_embeddings=true is not supported by deepseek.parallel.pipeline")
    if problems:
        raise LayoutError("--layout " + layout.describe() + ": " + "; ".join(problems))


def tensor_divisor(part: str, layout: Layout) -> int:
    """How many devices share one tensor of ``part`` (before FSDP): tp slices attention, dense and shared FFN and
    the experts' widths; ep splits the routed experts; router, norms, embedding and head are replicated."""
    divisor = 1
    if part in ("attention", "dense_ffn", "shared_experts", "routed_experts"):
        divisor *= layout.tp
    if part == "routed_experts":
        divisor *= layout.ep
    return divisor


def fsdp_divisor(part: str, layout: Layout) -> int:
    """FSDP's further division: dp_shard for every parameter, times ep for the non-expert ones under ep (they are
    sharded over dp_shard x ep), while the ep-local experts are left out of FSDP (deepseek.parallel.plan)."""
    if not layout.fsdp:
        return 1
    if layout.ep > 1:
        return 1 if part == "routed_experts" else layout.dp_shard * layout.ep
    return layout.dp_shard
