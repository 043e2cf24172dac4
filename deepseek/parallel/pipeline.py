"""Pipeline parallelism: the layers of an :class:`~deepseek.models.transformer.MoETransformer` cut into ``pp``
stages from outside the model, run by a ``torch.distributed.pipelining`` schedule (1F1B or GPipe).

Stage 0 holds the embedding and the first blocks, middle stages hold blocks, the last stage holds its blocks,
the final norm and the head; the LM loss is computed on the last stage from its logits and the targets.
Each rank keeps only its stage's submodules: the others are dropped from its copy of the model (an
``nn.Identity`` in place of a foreign block, None for a foreign embedding, norm or head), so the optimizer,
the clipper and the MoE balancing of the training loop see this stage's parameters and routers only, under their
original names. Layers are split evenly (the first ``n_layers % pp`` stages take one more).

The rest of the layout applies to the stage module: tensor parallelism slices its blocks, FSDP2 makes it the
root ``FSDPModule`` that the ``PipelineStage`` runs (the schedule defers the reduce-scatter to the step's last
micro-batch), or DDP wraps it over ``dp_replicate``. The gradient norm and the gathered whole model handle the
stages' DTensors.

Legend: B batch (one micro-batch), T tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek.config import ConfigError
from deepseek.nn import AttentionInputs
from deepseek.parallel.env import tensor_device

if TYPE_CHECKING:
    from deepseek.parallel.plan import EvalFn, StepFn


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The blocks of ``stage`` when ``n_layers`` are split evenly over ``pp`` stages."""
    if n_layers < pp:
        raise ConfigError(f"parallel.pp={pp} needs at least {pp} layers to put one on each stage; "
                          f"the model has n_layers={n_layers}")
    per, extra = divmod(n_layers, pp)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


def check_pipeline_model(model: nn.Module, pp: int) -> None:
    """ConfigError for a model this pipeline split cannot cut (before any work)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks") or not hasattr(model, "rope"):
        raise ConfigError(f"parallel.pp needs a deepseek MoETransformer, got {type(model).__name__}")
    stage_layers(cfg.n_layers, pp, 0)
    if cfg.attention != "dense":
        raise ConfigError("parallel.pp supports dense attention only (model.attention=sparse is not split yet)")
    if cfg.tie_embeddings:
        raise ConfigError("parallel.pp with model.tie_embeddings=true is not supported: the embedding (first "
                          "stage) and the head (last stage) would share one weight across ranks")
    if cfg.aux_loss_coef > 0:
        raise ConfigError("parallel.pp with model.aux_loss_coef > 0 is not supported yet (the routers' aux loss "
                          "lives on every stage); use the aux-loss-free sigmoid router balancing")


class PipelineStageModule(nn.Module):
    """One stage of an MoETransformer: [embed] -> its blocks -> [norm -> head], over the model's own submodules.

    ``forward(x)`` takes token ids [B, T] on the first stage and hidden states [B, T, D] elsewhere; it returns
    hidden states [B, T, D], or logits [B, T, V] on the last stage.
    """

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in layers)
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self._model = [model]  # not a submodule (its parameters are these); rope tables, flags, expert load
        self.autocast: Callable[[], Any] = contextlib.nullcontext  # the step's autocast, set by Pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        with self.autocast():
            if self.embed is not None:
                x = self.embed(x)
            B, T, _ = x.shape
            model._check_length(T)
            # What MoETransformer._attention_inputs gives a dense model without cache or padding, rebuilt here
            # from the shape: later stages never see the token ids.
            cos, sin = model.rope(torch.arange(T, device=x.device).expand(B, T))
            inputs = AttentionInputs(cos, sin, is_causal=True)
            recompute = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
            for block in self.blocks:
                x = checkpoint(block, x, inputs, use_reentrant=False) if recompute else block(x, inputs)
            if model.training:
                model._accumulate_expert_load()  # this stage's routers, once per micro-batch as in the model
            if self.norm is None:
                return x
            return F.linear(self.norm(x), self.lm_head.weight)


def _drop_other_stages(model: nn.Module, layers: range, first: bool, last: bool) -> None:
    """Remove the submodules of the other stages from this rank's copy (names of the kept ones unchanged)."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = nn.Identity()
    if not first:
        model.embed = None
    if not last:
        model.norm = None
        if model.lm_head is not None:
            model.lm_head = None


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This stage's state dict as whole CPU tensors: DTensors (the stage module sharded by FSDP or tp) gathered
    over their mesh, in state-dict order on every rank of the stage."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


class Pipeline:
    """This rank's pipeline stage and its schedule, and the pipeline's answers to the plan's hooks.

    ``mesh`` is the job's device mesh with a ``pp`` dimension; the stage talks to its neighbours over the pp
    sub-group. Build it with the unsharded model; :attr:`stage_module` is what the rest of the layout (tp, FSDP, or
    DDP over ``dp_replicate``) shards or wraps.
    """

    def __init__(self, model: nn.Module, mesh, schedule: str, device: torch.device):
        self.pp = mesh["pp"].size()
        check_pipeline_model(model, self.pp)
        self.config = model.config
        self.stage = mesh.get_local_rank("pp")
        self.group = mesh["pp"].get_group()
        self.schedule_name = schedule
        self.device = device
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        layers = stage_layers(self.config.n_layers, self.pp, self.stage)
        self.stage_module = PipelineStageModule(model, layers, self.first, self.last)
        _drop_other_stages(model, layers, self.first, self.last)
        # The ranks holding the same layers (same pp coordinate): expert loads are summed over these only.
        # Every rank creates every group, in the same order (new_group is collective).
        for s in range(self.pp):
            group = torch_dist.new_group(mesh.mesh[s].flatten().tolist())
            if s == self.stage:
                self.data_group = group
        self._schedule = None
        self._schedule_key: Optional[tuple] = None
        self._losses: list[torch.Tensor] = []
        self._scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss  # the step's loss scaling (fp16)

    # -- training ---------------------------------------------------------------------------------------

    def _build_schedule(self, submodule: nn.Module, n_micro: int, rows: int, seq_len: int, logits_dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if self.schedule_name == "1F1B" and n_micro < self.pp:
            raise ConfigError(f"parallel.pp_schedule=1F1B needs at least pp={self.pp} micro-batches per step, got "
                              f"{n_micro} (batch_size / micro_batch_size); use more micro-batches or GPipe")
        D, V = self.config.d_model, self.config.vocab_size
        meta = torch.device("meta")
        # Shapes given up front (static mode): no metadata-inference forward, which would run the routers on
        # empty tensors and count their load.
        # requires_grad marks the activations whose gradients travel back between the stages.
        hidden = torch.empty(rows, seq_len, D, device=meta, requires_grad=True)
        inputs = torch.empty(rows, seq_len, dtype=torch.long, device=meta) if self.first else hidden
        outputs = torch.empty(rows, seq_len, V, dtype=logits_dtype, device=meta, requires_grad=True) if self.last \
            else hidden
        stage = PipelineStage(submodule, self.stage, self.pp, self.device, input_args=inputs, output_args=outputs,
                              group=self.group)
        schedule_cls = Schedule1F1B if self.schedule_name == "1F1B" else ScheduleGPipe
        # scale_grads: the schedule divides the summed gradients by the micro-batch count, as the training
        # loop's step does with each micro-batch's loss.
        # Every stage gets the loss_fn (only the last calls it): a schedule without one runs forward only.
        return schedule_cls(stage, n_microbatches=n_micro, loss_fn=self._loss_fn, scale_grads=True)

    def _loss_fn(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
        self._losses.append(loss.detach())
        return self._scale(loss)

    def forward_backward(self, model: nn.Module, micro_batches: list[Any], step: "StepFn") -> tuple[float, float]:
        """Forward and backward of the step's micro-batches through the pipeline, ``model`` being this rank's stage
        module as the plan wrapped it (FSDP, DDP or plain), in ``step``'s autocast and loss scaling;
        ``(loss_sum, 0.0)``, the same on every stage (the loss is broadcast from the last stage)."""
        if not all(hasattr(m, "inputs") and hasattr(m, "targets") for m in micro_batches):
            raise ConfigError("parallel.pp trains language models: batches need `inputs` and `targets`")
        self.stage_module.autocast = step.autocast
        self._scale = step.scale
        n_micro = len(micro_batches)
        rows, seq_len = micro_batches[0].inputs.shape
        logits_dtype = step.autocast_dtype or torch.float32
        key = (n_micro, rows, seq_len, logits_dtype)
        if key != self._schedule_key:  # a new sequence length (curriculum) needs new receive buffers
            self._schedule = self._build_schedule(model, n_micro, rows, seq_len, logits_dtype)
            self._schedule_key = key
        self._losses = []
        if self.first:
            self._schedule.step(torch.cat([m.inputs for m in micro_batches]))
        elif self.last:
            self._schedule.step(target=torch.cat([m.targets for m in micro_batches]), return_outputs=False)
        else:
            self._schedule.step()
        loss_sum = torch.stack(self._losses).double().sum() if self.last else torch.zeros((), dtype=torch.float64)
        loss_sum = loss_sum.to(tensor_device(self.device))
        torch_dist.broadcast(loss_sum, src=torch_dist.get_global_rank(self.group, self.pp - 1), group=self.group)
        return loss_sum.item(), 0.0

    def global_grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The L2 norm of every stage's gradients (this stage holds ``params``): squares summed over the pp group.
        A stage's own norm counts DTensor gradients (FSDP shards, tp slices) once over their mesh."""
        from deepseek.parallel.grad_norm import total_grad_norm

        local = total_grad_norm(params)
        squared = local.detach().double().square().to(tensor_device(self.device))
        torch_dist.all_reduce(squared, group=self.group)
        return squared.sqrt().to(local.device, local.dtype)

    # -- the whole model ---------------------------------------------------------------------------------

    def full_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The whole model on global rank 0, from the stages of its pipeline (None elsewhere). Collective: every
        rank gathers its stage's DTensors (if any), then the pp group that holds rank 0 sends them to it; the other
        pipelines (data-parallel replicas) return None."""
        state = _full_state(model)  # collective over each stage's data-parallel mesh when sharded (FSDP, tp)
        if 0 not in torch_dist.get_process_group_ranks(self.group):
            return None
        gathered = [None] * self.pp if torch_dist.get_rank() == 0 else None
        torch_dist.gather_object(state, gathered, dst=0, group=self.group)
        if torch_dist.get_rank() != 0:
            return None
        from deepseek.models.transformer import MoETransformer

        with torch.random.fork_rng(devices=[]):  # the fresh model's init must not move this rank's RNG
            full = MoETransformer(self.config)
        merged = {k: v for part in gathered for k, v in part.items()}
        full.load_state_dict(merged, strict=True)
        full.gradient_checkpointing = model.gradient_checkpointing
        return full.to(self.device)

    def evaluate(self, model: nn.Module, eval_fn: "EvalFn") -> Optional[dict[str, float]]:
        """``eval_fn`` on the whole model gathered on rank 0 from ``model`` (this rank's copy, other stages dropped);
        the results are broadcast to every rank."""
        full = self.full_model(model)
        results: list[Any] = [None]
        if full is not None:
            full.eval()
            with torch.no_grad():
                results[0] = eval_fn(full)
        torch_dist.broadcast_object_list(results, src=0)
        return results[0]

    def close(self) -> None:
        self._schedule = None

