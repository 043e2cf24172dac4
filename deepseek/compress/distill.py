"""Knowledge distillation: a smaller student learns from a teacher's softened output distribution.

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

(Hinton et al. 2015). The KL term is averaged per row: per token for a language model (logits [B, T, V]
flattened to [B*T, V], ignored positions left out), per example for a classifier ([B, C]). Dividing the
logits by T spreads the teacher's probability over the classes it ranks second and third, which is what the
student learns from; the T^2 factor keeps that term's gradients the same size whatever T is (the softmax
gradient shrinks as 1/T^2 for large T), so ``alpha`` weighs the two terms the same way at every T.

    cfg = student_config(teacher.config, n_layers=2)                 # half of a 4-layer teacher
    student = init_student_from_teacher(teacher, cfg)               # layers 0 and 3, embeddings, norm, head
    distill_lm(teacher, student, finetune_config(data, run_dir, steps=150), temperature=1.0, alpha=0.7)

T = 1 with alpha = 0.7 won on the byte-level tiny LM; T = 2 made the student worse than no teacher there
(the teacher is far from confident, so softening only flattens it). Measured in docs/compression-distill.md.

Training goes through :func:`deepseek.compress.finetune.finetune`, so the progress bar, metrics.jsonl,
checkpoints and exact resume are the Trainer's; the evaluation there is the student's plain cross-entropy.
Legend: B batch, T tokens, V vocabulary, C classes, N rows (B*T kept tokens, or B examples).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.compress.finetune import finetune
from deepseek.models.config import ModelConfig
from deepseek.models.transformer import MoETransformer
from deepseek.train.trainer import LossFn, TrainResult
from deepseek.train.config import TrainConfig

# Expert-indexed tensors of an MoE layer: [E, ...]. A student with fewer experts takes the teacher's first E.
EXPERT_TENSORS = ("ffn.router.weight", "ffn.router.expert_bias", "ffn.experts.gate_up", "ffn.experts.down")


# -- the loss ------------------------------------------------------------------------------------------

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: Optional[torch.Tensor] = None, *, temperature: float = 2.0, alpha: float = 0.5,
                      ignore_index: int = -100) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``, a scalar.

    Logits are [B, T, V] (language model) or [B, C] (classifier), student and teacher of the same shape;
    ``targets`` [B, T] or [B] (``ignore_index`` = no target: the position counts in neither term). The KL is
    ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)`` summed over the vocabulary and
    averaged over the kept rows ("batchmean" over [N, V]); computed in fp32 whatever the autocast dtype.
    Without ``targets`` there is no hard-label term, so ``alpha`` must be 1.0 (teacher-only distillation).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same vocabulary / classes needed)")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got temperature={temperature}, alpha={alpha}")
    if targets is None and alpha != 1.0:
        raise ValueError("distillation_loss without targets has no cross-entropy term: pass alpha=1.0, or targets")
    s_NV = student_logits.reshape(-1, student_logits.shape[-1]).float()
    t_NV = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    y_N = None if targets is None else targets.reshape(-1)
    if y_N is not None and y_N.shape[0] != s_NV.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(student_logits.shape)}")
    log_s_NV = F.log_softmax(s_NV / temperature, dim=-1)
    kl_N = F.kl_div(log_s_NV, F.log_softmax(t_NV / temperature, dim=-1), reduction="none", log_target=True).sum(-1)
    if y_N is None:
        kl = kl_N.mean()
    else:  # "batchmean" over the kept rows, as a masked mean: no host sync, no copy of the kept rows
        keep_N = y_N != ignore_index  # masked_fill, not a product: a padding row's NaN must not leak in
        kl = kl_N.masked_fill(~keep_N, 0.0).sum() / keep_N.sum().clamp_min(1)
    loss = alpha * temperature**2 * kl
    if alpha < 1.0:
        log_p_NV = log_s_NV if temperature == 1.0 else F.log_softmax(s_NV, dim=-1)
        loss = loss + (1.0 - alpha) * F.nll_loss(log_p_NV, y_N, ignore_index=ignore_index)
    return loss


# -- the student ----------------------------------------------------------------------------------------

def student_config(teacher_config: ModelConfig, *, n_layers: Optional[int] = None,
                   n_routed_experts: Optional[int] = None, d_model: Optional[int] = None,
                   **overrides: Any) -> ModelConfig:
    """The teacher's config made smaller: fewer layers, experts or a narrower width; any other ModelConfig field
    as a keyword. The vocabulary stays (distillation compares distributions over it); values derived from
    changed ones follow: ``first_k_dense`` at most ``n_layers``, ``top_k`` at most the experts, ``head_dim``
    re-derived from a new ``d_model`` (``n_heads`` kept), the shared-expert width from a new ``moe_ffn_dim``."""
    if "vocab_size" in overrides and overrides["vocab_size"] != teacher_config.vocab_size:
        raise ValueError("a student must keep the teacher's vocabulary to be distilled from it")
    fields = dataclasses.asdict(teacher_config)
    changes = {k: v for k, v in dict(n_layers=n_layers, n_routed_experts=n_routed_experts, d_model=d_model).items()
               if v is not None}
    changes.update(overrides)
    if "n_layers" in changes and "first_k_dense" not in changes:
        changes["first_k_dense"] = min(teacher_config.first_k_dense, changes["n_layers"])
    if "n_routed_experts" in changes and "top_k" not in changes:
        changes["top_k"] = min(teacher_config.top_k, changes["n_routed_experts"])
    if "d_model" in changes and "head_dim" not in changes and \
            teacher_config.head_dim == teacher_config.d_model // teacher_config.n_heads:
        changes["head_dim"] = None
    if "moe_ffn_dim" in changes and "shared_ffn_dim" not in changes and \
            teacher_config.shared_ffn_dim == teacher_config.n_shared_experts * teacher_config.moe_ffn_dim:
        changes["shared_ffn_dim"] = None
    unknown = set(changes) - set(fields)
    if unknown:
        raise TypeError(f"student_config: unknown ModelConfig fields {sorted(unknown)}")
    return ModelConfig(**{**fields, **changes})


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layer each student layer starts from: evenly spaced, the first and the last kept
    (``round(i * (L_t - 1) / (L_s - 1))``): 4 -> 2 takes layers [0, 3], 8 -> 4 takes [0, 2, 5, 7], 2 -> 1 takes [0]."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student needs 1..{n_teacher} layers (the teacher's), got {n_student}")
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _teacher_slice(name: str, student_shape: torch.Size, teacher_tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The teacher tensor for a student tensor, or None where the shapes make it meaningless (random init)."""
    if teacher_tensor.shape == student_shape:
        return teacher_tensor
    fewer_experts = (name.endswith(EXPERT_TENSORS) and teacher_tensor.dim() == len(student_shape)
                     and teacher_tensor.shape[1:] == student_shape[1:] and student_shape[0] < teacher_tensor.shape[0])
    return teacher_tensor[:student_shape[0]] if fewer_experts else None


@torch.no_grad()
def init_student_from_teacher(teacher: MoETransformer, config: ModelConfig, *, seed: int = 0) -> MoETransformer:
    """A new student built from ``config`` (random init seeded with ``seed``), then filled from the teacher.

    The rule: student layer ``i`` takes teacher layer ``layer_map(L_t, L_s)[i]``; every tensor whose shape
    equals the teacher's is copied (embedding, final norm, head, attention, norms, dense or MoE FFN); an MoE
    layer with fewer experts takes the teacher's first ``E_s`` experts and their router rows; anything else
    (a different width, a dense layer where the teacher has MoE) keeps the random initialisation.
    The copied names are listed in ``student.init_report["copied"]``, the others in ``["random"]``.
    """
    if config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab_size {config.vocab_size} != teacher's {teacher.config.vocab_size}")
    torch.manual_seed(seed)
    student = MoETransformer(config)
    mapping = layer_map(teacher.config.n_layers, config.n_layers)
    source = teacher.state_dict()
    copied, random_init = [], []
    for name, tensor in student.state_dict().items():
        teacher_name = name
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            teacher_name = f"blocks.{mapping[int(index)]}.{rest}"
        value = _teacher_slice(name, tensor.shape, source[teacher_name]) if teacher_name in source else None
        if value is None:
            random_init.append(name)
        else:
            tensor.copy_(value)
            copied.append(name)
    student.init_report = {"layer_map": mapping, "copied": copied, "random": random_init}
    return student.to(next(teacher.parameters()).device)


# -- training --------------------------------------------------------------------------------------------

def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _teacher_forward(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, in eval mode (whatever happened to it since) on the batch's device."""
    teacher.eval()
    if next(teacher.parameters()).device != inputs.device:  # the Trainer moved the student and the batches
        teacher.to(inputs.device)
    return teacher(inputs)


def lm_distill_loss_fn(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """A Trainer ``loss_fn(model, batch)`` for :class:`deepseek.data.Batch`: the student's logits against the
    teacher's on ``batch.inputs``, hard targets ``batch.targets``. The teacher is frozen, runs in eval mode
    under ``torch.no_grad()`` and inside the Trainer's autocast (the same precision as the student)."""
    _frozen(teacher)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        student_logits = model(batch.inputs)
        with torch.no_grad():
            teacher_logits = _teacher_forward(teacher, batch.inputs)
        return distillation_loss(student_logits, teacher_logits, batch.targets, temperature=temperature, alpha=alpha)

    return loss_fn


def classifier_distill_loss_fn(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """A Trainer ``loss_fn(model, (inputs, labels))`` for classifiers (logits [B, C]); teacher as in
    :func:`lm_distill_loss_fn`. ``labels`` may be None (then pass ``alpha=1.0``)."""
    _frozen(teacher)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        student_logits = model(inputs)
        with torch.no_grad():
            teacher_logits = _teacher_forward(teacher, inputs)
        return distillation_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)

    return loss_fn


def distill_lm(teacher: nn.Module, student: nn.Module, config: TrainConfig, *, temperature: float, alpha: float,
               tokenizer: Any = None) -> TrainResult:
    """Train ``student`` in place on ``config.data`` against ``teacher`` for ``config.max_steps`` steps.

    ``config`` is usually :func:`deepseek.compress.finetune.finetune_config` (``resume=True`` continues an
    interrupted run from its newest checkpoint in ``config.run_dir``). Returns the Trainer's result; its
    ``final_eval`` is the student's plain validation cross-entropy.
    """
    if getattr(student, "config", None) is not None and getattr(teacher, "config", None) is not None \
            and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab_size {student.config.vocab_size} != teacher's {teacher.config.vocab_size}")
    return finetune(student, config, tokenizer=tokenizer,
                    loss_fn=lm_distill_loss_fn(teacher, temperature=temperature, alpha=alpha))
