"""``ds finetune run``: supervised (``method: sft``), preference (``method: dpo``), reward-model (``method: reward``,
:mod:`deepseek.finetune.reward`), GRPO (``method: grpo``, :mod:`deepseek.finetune.grpo`) or mixed (``method: mixed``,
:mod:`deepseek.finetune.mixed`) fine-tuning of a model directory, fully or through LoRA adapters: this module
dispatches to them.

Legend: B rows, T tokens of a packed row.

``finetune(config)`` loads ``config.init`` with :func:`deepseek.models.directory.load`, adds adapters when the
config has a ``lora`` section (everything else frozen) or trains every parameter, reads and packs the SFT chats
(:mod:`deepseek.finetune.sft`) or the preference pairs (:mod:`deepseek.finetune.preference`, loss
:class:`DPOLoss`), and hands model, batches and loss to the same
:class:`~deepseek.train.trainer.Trainer` as ``ds train``: metrics.jsonl, checkpoints, exact ``--resume``. The result
is ``run_dir/adapter`` (an adapter directory naming its base: PEFT's format when the base has a Hugging Face
Mixtral export, else ours, :mod:`deepseek.models.adapters`) or ``run_dir/model`` (a model directory).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.finetune.config import FinetuneConfig, SFTDataConfig
from deepseek.finetune.objectives import dpo_loss, reference_logprobs, sequence_logprobs
from deepseek.finetune.preference import PreferenceBatch, collate_pairs, read_preference_jsonl, trim_padding
from deepseek.finetune.sft import IGNORE_INDEX, pack, read_sft_jsonl, sft_targets
from deepseek.models.adapters import save_adapter, writes_peft_format
from deepseek.models.directory import load, save
from deepseek.nn.lora import apply_lora
from deepseek.nn.quantized import QuantizedExperts, QuantizedLinear
from deepseek.parallel import ParallelPlan
from deepseek.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class SFTBatch:
    """Packed rows, each [B, T]: ``inputs`` token ids, ``targets`` (next-token labels, -100 = no loss),
    ``positions`` (0 at every example's start) and ``document_ids`` (padding -1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor


def sft_loss(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens of a packed batch (fused head + loss)."""
    return model(batch.inputs, targets=batch.targets, document_ids=batch.document_ids, positions=batch.positions)


def sft_rows(path: str, tokenizer: Any, seq_len: int, *, pack_rows: bool, on_bad: str) -> Optional[SFTBatch]:
    """Every row of an SFT JSONL file, packed (or one example per row), as one :class:`SFTBatch` of all rows;
    None when the file has no usable row."""
    examples = read_sft_jsonl(path, tokenizer, max_len=seq_len, on_bad=on_bad)
    if not examples:
        return None
    if pack_rows:
        batches = pack(examples, seq_len)
    else:  # one example per row: pack() of a single example never shares its row
        batches = [b for ex in examples for b in pack([ex], seq_len)]
    ids_BT = torch.cat([b.ids for b in batches])
    document_ids_BT = torch.cat([b.document_ids for b in batches])
    targets_BT = sft_targets(torch.cat([b.labels for b in batches]), document_ids_BT)
    return SFTBatch(ids_BT, targets_BT, torch.cat([b.positions for b in batches]), document_ids_BT)


class SFTLoader:
    """Batches of ``batch_size`` rows drawn from ``rows`` in a seeded order reshuffled every epoch (an epoch's
    leftover rows start the next batch). ``state_dict()`` is the position, so a resumed run sees the same batches.

    With ``world_size`` data-parallel ranks, every rank draws the same global batch and keeps rows
    ``[rank * B / W, (rank + 1) * B / W)`` of it: the ranks together train on what one process would."""

    def __init__(self, rows: SFTBatch, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be a multiple of the {world_size} data-parallel "
                              f"processes (and 0 <= rank < {world_size}, got rank {rank})")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0

    def _rows(self) -> int:
        return getattr(self.rows, dataclasses.fields(self.rows)[0].name).shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self._rows(), generator=generator)

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self) -> SFTBatch:
        n, need, picked = self._rows(), self.batch_size, []
        while need:
            take = min(need, n - self.cursor)
            picked.append(self._order(self.epoch)[self.cursor:self.cursor + take])
            self.cursor, need = self.cursor + take, need - take
            if self.cursor == n:
                self.epoch, self.cursor = self.epoch + 1, 0
        share = self.batch_size // self.world_size
        index = torch.cat(picked)[self.rank * share:(self.rank + 1) * share]
        return type(self.rows)(*(getattr(self.rows, f.name)[index] for f in dataclasses.fields(self.rows)))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


@torch.no_grad()
def evaluate_sft(model: nn.Module, rows: SFTBatch, batch_size: int) -> dict[str, float]:
    """Mean loss per scored (assistant) token over all rows: ``{"val_loss": ...}``."""
    device = next(model.parameters()).device
    nats, scored = 0.0, 0
    for start in range(0, rows.inputs.shape[0], batch_size):
        part = SFTBatch(*(t[start:start + batch_size].to(device) for t in (rows.inputs, rows.targets, rows.positions,
                                                                            rows.document_ids)))
        count = int((part.targets != IGNORE_INDEX).sum())
        if count:
            nats += float(sft_loss(model, part)) * count
            scored += count
    return {"val_loss": nats / scored} if scored else {}


def preference_rows(path: str, tokenizer: Any, seq_len: int, *, on_bad: str) -> Optional[PreferenceBatch]:
    """Every pair of a preference JSONL file as one right-padded :class:`PreferenceBatch`; None when none is usable."""
    pairs = read_preference_jsonl(path, tokenizer, max_len=seq_len, on_bad=on_bad)
    return collate_pairs(pairs) if pairs else None


class DPOLoss:
    """``loss_fn(model, batch)`` of DPO for the Trainer: chosen and rejected in one policy forward of 2B rows, the
    reference's log-probs of the same rows under no_grad (``reference`` None: the model with its LoRA adapters
    disabled), then :func:`~deepseek.finetune.objectives.dpo_loss`. ``last`` holds the last call's metrics
    (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``, floats)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference: Optional[nn.Module] = None):
        self.beta, self.label_smoothing, self.reference = beta, label_smoothing, reference
        self.last: dict[str, float] = {}

    def terms(self, model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = trim_padding(batch)  # padded to the file's longest pair: forwards over all-padding columns are waste
        ids_BT = torch.cat([batch.chosen_ids, batch.rejected_ids])
        mask_BT = torch.cat([batch.chosen_mask, batch.rejected_mask])
        if self.reference is not None and next(self.reference.parameters()).device != ids_BT.device:
            self.reference.to(ids_BT.device)
        policy_B = sequence_logprobs(model, ids_BT, mask_BT)
        ref_B = reference_logprobs(model, ids_BT, mask_BT, reference=self.reference)
        n = batch.chosen_ids.shape[0]
        return dpo_loss(policy_B[:n], policy_B[n:], ref_B[:n], ref_B[n:], beta=self.beta,
                        label_smoothing=self.label_smoothing)

    def __call__(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        loss, metrics = self.terms(model, batch)
        self.last = {name: float(value) for name, value in metrics.items()}
        log.info("dpo loss %.4f %s", float(loss.detach()), " ".join(f"{k}={v:.4f}" for k, v in self.last.items()))
        return loss


@torch.no_grad()
def evaluate_dpo(model: nn.Module, rows: PreferenceBatch, batch_size: int, loss: DPOLoss) -> dict[str, float]:
    """DPO loss and reward metrics over all pairs (means weighted by pairs): ``val_loss``, ``val_rewards/...``."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = rows.chosen_ids.shape[0]
    try:
        for start in range(0, total, batch_size):
            part = PreferenceBatch(*(getattr(rows, f.name)[start:start + batch_size].to(device)
                                     for f in dataclasses.fields(rows)))
            value, metrics = loss.terms(model, part)
            n = part.chosen_ids.shape[0]
            for name, figure in {"val_loss": value, **{f"val_{k}": v for k, v in metrics.items()}}.items():
                sums[name] = sums.get(name, 0.0) + float(figure) * n
    finally:
        model.train(training)
    return {name: figure / total for name, figure in sums.items()}


def prepare_model(config: FinetuneConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``config.init``, adapted (LoRA) or made fully trainable, in training mode."""
    model, tokenizer = load(config.init)
    if model.config.max_seq_len < config.seq_len:
        raise ConfigError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    lora = config.lora_config()
    quantized = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))})
    if lora is None and quantized:  # its integer weights take no gradient: only norms would train
        raise ConfigError(f"init: {config.init} is quantized ({', '.join(quantized)}); a full fine-tune would train "
                          f"only its floating-point norms. Add a lora section (QLoRA), or fine-tune the "
                          f"unquantized model")
    if lora is None:
        model.requires_grad_(True)
    else:
        torch.manual_seed(config.seed)
        try:
            summary = apply_lora(model, lora)
        except ValueError as exc:
            raise ConfigError(f"lora: {exc}") from None
        fmt = "PEFT's (Hugging Face Mixtral names)" if writes_peft_format(model, summary.modules) else "deepseek's"
        log.info("LoRA: %s; the adapter will be saved in %s format", summary, fmt)
    return model.train(), tokenizer


@dataclass
class Objective:
    """One objective's parts for the Trainer: its batch iterator, ``loss_fn(model, batch)`` and evaluation (None
    without held-out data)."""

    batches: Any
    loss_fn: Any
    eval_fn: Optional[Callable[[nn.Module], dict[str, float]]] = None


def build_objective(config: FinetuneConfig, term: str, section: SFTDataConfig, tokenizer: Any,
                    reference: Optional[nn.Module], where: str = "data",
                    plan: Optional[ParallelPlan] = None) -> Objective:
    """The ``sft``, ``dpo`` or ``rl`` (GRPO) objective reading the files of the data ``section`` (named ``where``
    in errors); ``reference`` is the frozen copy of a full fine-tune (None with LoRA); ``plan``: this rank's share
    of every batch under ``--nproc``."""
    plan = plan or ParallelPlan()
    micro = config.train_config().micro_batch
    if term == "rl":
        from deepseek.finetune.grpo import GRPOLoss, PromptLoader, read_prompts
        from deepseek.finetune.reward import load_reward_model

        prompts = read_prompts(section.train, tokenizer, config.seq_len - config.grpo.max_new_tokens,
                               on_bad=section.on_bad, prompt_style=config.grpo.prompt_style)
        if not prompts:
            raise ConfigError(f"{where}.train: {section.train} has no usable prompt (rows need a string 'prompt' of "
                              f"at most seq_len - grpo.max_new_tokens tokens)")
        reward_model = load_reward_model(config.grpo.reward_model)[0] if config.grpo.reward_model else None
        loss = GRPOLoss(config.grpo, prompts, tokenizer, reference=reference, reward_model=reward_model)
        held_out = read_prompts(section.eval, tokenizer, config.seq_len - config.grpo.max_new_tokens,
                                on_bad=section.on_bad, prompt_style=config.grpo.prompt_style) if section.eval else []
        if section.eval and not held_out:
            warnings.warn(f"{where}.eval: {section.eval} has no usable prompt; no evaluation")
        return Objective(PromptLoader(len(prompts), config.batch_size, config.seed), loss,
                         (lambda m: loss.evaluate(m, held_out)) if held_out else None)
    dpo = term == "dpo"
    read = ((lambda path: preference_rows(path, tokenizer, config.seq_len, on_bad=section.on_bad)) if dpo else
            (lambda path: sft_rows(path, tokenizer, config.seq_len, pack_rows=config.pack, on_bad=section.on_bad)))
    what = "preference pair" if dpo else "SFT row"
    train_rows = read(section.train)
    if train_rows is None:
        raise ConfigError(f"{where}.train: {section.train} has no usable {what} (all bad, longer than "
                          f"seq_len={config.seq_len}, or the file is empty)")
    eval_rows = read(section.eval) if section.eval else None
    if section.eval and eval_rows is None:  # e.g. a held-out split that --module left empty
        warnings.warn(f"{where}.eval: {section.eval} has no usable {what}; no evaluation")
    loss_fn: Any = DPOLoss(config.dpo.beta, config.dpo.label_smoothing, reference) if dpo else sft_loss
    eval_fn = None
    if eval_rows is not None:
        eval_fn = ((lambda m: evaluate_dpo(m, eval_rows, micro, loss_fn)) if dpo else
                   (lambda m: evaluate_sft(m, eval_rows, micro)))
    loader = SFTLoader(train_rows, config.batch_size, config.seed, rank=plan.data_rank,
                       world_size=plan.data_parallel_size)
    return Objective(loader, loss_fn, eval_fn)


def finetune(config: FinetuneConfig, parallel: Optional[ParallelPlan] = None) -> TrainResult:
    """Run the fine-tune ``config`` describes (what ``ds finetune run`` does); the result lands in
    ``run_dir/adapter`` (LoRA), ``run_dir/model`` (full) or ``run_dir/reward`` (``method: reward``).
    ``parallel``: this rank's plan under torchrun (:func:`deepseek.finetune.distributed.finetune_distributed`);
    each rank then trains on its share of every batch, and rank 0 writes the result (methods sft and dpo)."""
    plan = parallel or ParallelPlan()
    if plan.data_parallel_size > 1 and config.method not in ("sft", "dpo"):
        raise ConfigError(f"--nproc: method {config.method} runs in one process (sampling and the reward head "
                          f"are not data-parallel yet); methods sft and dpo take --nproc")
    config.check_paths()
    if config.method == "mixed" and config.micro_batch_size not in (0, config.batch_size):
        raise ConfigError("micro_batch_size: method: mixed draws one batch per term per step and does not split "
                          "it; leave micro_batch_size at 0")
    model, tokenizer = prepare_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kind = "LoRA" if config.lora is not None else "full"
    if plan.is_main:
        print(f"{kind} fine-tune ({config.method}) of {config.init}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.2f}%)", flush=True)
    train_config = config.train_config()
    if config.method == "reward":
        return _finetune_reward(config, model, tokenizer)
    terms = config.mixed_terms() if config.method == "mixed" else {"rl" if config.method == "grpo" else
                                                                    config.method: 1.0}
    # DPO and GRPO compare with a reference: with LoRA the base (adapters disabled), else a frozen copy of the init
    # model (twice the weights in memory)
    needs_reference = config.lora is None and ({"dpo", "rl"} & set(terms))
    reference = copy.deepcopy(model).requires_grad_(False).eval() if needs_reference else None
    sections = config.data_sections()
    objectives = {term: build_objective(config, term, section, tokenizer, reference, where, plan)
                  for term, (where, section) in zip(terms, sections.items())}
    if config.method == "mixed":
        from deepseek.finetune.mixed import MixedLoader, MixedLoss
        from deepseek.finetune.objectives import MixedObjective

        batches: Any = MixedLoader({term: o.batches for term, o in objectives.items()})
        loss_fn: Any = MixedLoss(MixedObjective(terms), {term: o.loss_fn for term, o in objectives.items()})
        evals = {term: o.eval_fn for term, o in objectives.items() if o.eval_fn is not None}
        eval_fn = (lambda m: {f"{name[:4]}{term}/{name[4:]}" if name.startswith("val_") else name: value
                              for term, fn in evals.items() for name, value in fn(m).items()}) if evals else None
    else:
        (only,) = objectives.values()
        batches, loss_fn, eval_fn = only.batches, only.loss_fn, only.eval_fn

    def save_result(m: nn.Module, path: Path) -> None:  # the Trainer's final save of run_dir/model
        if config.lora is not None:
            save_adapter(m, path.with_name("adapter"), base_model_name_or_path=str(config.init))
        else:
            save(m, tokenizer, path)

    # sampling (GRPO) is no side-effect-free trial of the precision: only plain losses time it
    trial = loss_fn if config.method in ("sft", "dpo") else None
    trainer = Trainer(model, train_config, batches=batches, loss_fn=loss_fn, eval_fn=eval_fn, tokenizer=tokenizer,
                      save_model=save_result, trial_loss_fn=trial, parallel=plan)
    try:
        return trainer.fit()
    finally:
        plan.close()  # DDP reducers go before the process group
        trainer.parallel_model = trainer.step_fn = None


def _finetune_reward(config: FinetuneConfig, lm: nn.Module, tokenizer: Any) -> TrainResult:
    """``method: reward``: a :class:`~deepseek.finetune.objectives.RewardModel` on ``lm`` trained on the
    preference pairs of ``data``; the result is ``run_dir/reward`` (:mod:`deepseek.finetune.reward`)."""
    from deepseek.finetune.reward import RewardLoss, evaluate_reward, reward_model_of, save_reward_model

    train_config = config.train_config()
    if train_config.gradient_checkpointing:  # the flag lives on the LM, not on the reward model around it
        lm.gradient_checkpointing = True
        train_config = dataclasses.replace(train_config, gradient_checkpointing=False)
    model = reward_model_of(lm, config.seed)
    read = lambda path: preference_rows(path, tokenizer, config.seq_len, on_bad=config.data.on_bad)  # noqa: E731
    train_rows = read(config.data.train)
    if train_rows is None:
        raise ConfigError(f"data.train: {config.data.train} has no usable preference pair (all bad, longer than "
                          f"seq_len={config.seq_len}, or the file is empty)")
    eval_rows = read(config.data.eval) if config.data.eval else None
    if config.data.eval and eval_rows is None:
        warnings.warn(f"data.eval: {config.data.eval} has no usable preference pair; no evaluation")
    eval_fn = (lambda m: evaluate_reward(m, eval_rows, train_config.micro_batch)) if eval_rows is not None else None

    def save_result(m: nn.Module, path: Path) -> None:
        save_reward_model(m, tokenizer, path.with_name("reward"), base=str(config.init),
                          adapter=config.lora is not None)

    loss_fn = RewardLoss()
    trainer = Trainer(model, train_config, batches=SFTLoader(train_rows, config.batch_size, config.seed),
                      loss_fn=loss_fn, eval_fn=eval_fn, save_model=save_result, trial_loss_fn=loss_fn)
    # (no tokenizer for the checkpoints: they hold the reward model's state dict, head included, not a model dir)
    return trainer.fit()


def result_path(config: FinetuneConfig) -> Path:
    """Where ``finetune(config)`` writes its result."""
    if config.method == "reward":
        return Path(config.run_dir) / "reward"
    return Path(config.run_dir) / ("adapter" if config.lora is not None else "model")


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """``ds lora merge``: the model directory ``base`` with the adapter directory ``adapter`` (either format)
    folded into its weights, written as the model directory ``out``."""
    from deepseek.models.adapters import load_adapter
    from deepseek.nn.lora import merge_lora

    model, tokenizer = load(base)
    load_adapter(model, adapter)
    merge_lora(model)
    return save(model, tokenizer, out)


__all__ = ["DPOLoss", "FinetuneConfig", "Objective", "SFTBatch", "SFTLoader", "build_objective", "evaluate_dpo",
           "evaluate_sft", "finetune", "merge_adapter", "prepare_model", "preference_rows", "result_path", "sft_loss",
           "sft_rows"]
