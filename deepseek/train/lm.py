"""Training a deepseek language model from a :class:`TrainConfig`: data, model, loss, evaluation, final save.

``train_lm(config)`` is what ``ds train`` runs. It prepares the data when the config says how and it has not
been prepared yet, builds the model from ``model.preset`` + fields (its vocabulary sized to the tokenizer
unless the config sets ``model.vocab_size``: ``vocab_from_tokenizer``), and hands everything to
:class:`~deepseek.train.trainer.Trainer`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tokenizers import Tokenizer

from deepseek.config import ConfigError
from deepseek.data import (DataError, TokenDataset, TokenLoader, byte_tokenizer, eval_batches, iter_documents,
                           load_tokenizer_file, prepare, python_stdlib_dir, train_tokenizer)
from deepseek.data.prepare import is_validation_document
from deepseek.models.directory import save
from deepseek.models.transformer import MoETransformer
from deepseek.parallel import ParallelPlan, barrier, build_plan, destroy, init_distributed, rank_errors
from deepseek.train.config import DataConfig, TrainConfig
from deepseek.train.trainer import Trainer, TrainResult, resolve_device


def lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of a :class:`deepseek.data.Batch` (fused head + loss, no logits kept)."""
    return model(batch.inputs, targets=batch.targets)


def expand_source(source: str) -> str:
    return source.replace("{stdlib}", str(python_stdlib_dir()))


def data_paths(data: DataConfig) -> dict[str, tuple[str, float]]:
    """The prepared directories of a data section as {name: (path, weight)}."""
    if data.sources:
        return {name: (expand_source(str(spec["path"])), float(spec.get("weight", 1.0)))
                for name, spec in data.sources.items()}
    if not data.path:
        raise ConfigError("data: set `path` (a directory from `ds prepare`) or `sources`")
    return {"default": (expand_source(data.path), 1.0)}


def ensure_prepared(data: DataConfig, vocab_size: int, *, progress: bool = True) -> None:
    """Prepare ``data.path`` from ``data.prepare_from`` unless it already holds prepared tokens."""
    for name, (path, _) in data_paths(data).items():
        if (Path(path) / "index.json").is_file():
            continue
        if not data.prepare_from or data.sources:
            raise DataError(f"{path} is not a prepared data directory (no index.json); "
                            f"run `ds prepare` or set data.prepare_from")
        sources = [expand_source(s) for s in data.prepare_from]
        tokenizer = build_tokenizer(data.tokenizer, sources, data.exclude, vocab_size, data.val_fraction)
        prepare(sources, tokenizer, path, val_fraction=data.val_fraction, exclude=data.exclude, progress=progress)


def build_tokenizer(spec: str, sources: list[str], exclude: list[str], vocab_size: int,
                    val_fraction: float) -> Tokenizer:
    """``byte``, a tokenizer.json path, or ``train`` (BPE on the documents that will be training data)."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "train":
        texts = (doc.text for doc in iter_documents(sources, exclude=exclude)
                 if not is_validation_document(doc.name, val_fraction))
        return train_tokenizer(texts, vocab_size)
    return load_tokenizer_file(expand_source(spec))


def tokens_per_step(config: TrainConfig):
    """Tokens of step ``step`` (0-based) under the sequence-length curriculum: what a time budget plans with."""
    schedule = config.data.schedule()

    def tokens(step: int) -> float:
        return float(config.batch_size * next(t for start, t in reversed(schedule) if start <= step))

    return tokens


def make_loader(config: TrainConfig, *, rank: int = 0, world_size: int = 1) -> TokenLoader:
    paths = data_paths(config.data)
    sources: Any = next(iter(paths.values()))[0] if len(paths) == 1 and not config.data.sources else paths
    return TokenLoader(sources, batch_size=config.batch_size, curriculum=config.data.schedule(), seed=config.seed,
                       rank=rank, world_size=world_size)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, paths: list[str], *, batch_size: int, seq_len: int,
                max_batches: Optional[int] = None, split: str = "val") -> dict[str, float]:
    """Validation loss (nats per token), perplexity, and bits per byte when whole splits were scored."""
    device = next(model.parameters()).device
    nats, scored, bits, byte_count, complete = 0.0, 0, 0.0, 0, True
    for path in paths:
        dataset = TokenDataset(path, split)
        if dataset.num_tokens <= seq_len:
            continue  # too short for one window: nothing to score
        batches = eval_batches(path, split=split, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
        source_nats = sum(model(x.to(device), targets=y.to(device)).float().item() * y.numel() for x, y in batches)
        nats, scored = nats + source_nats, scored + batches.num_targets
        if batches.num_targets == (dataset.num_tokens - 1) // seq_len * seq_len:  # all but a sub-window tail
            bits += batches.bits_per_byte(source_nats / batches.num_targets) * dataset.num_bytes
            byte_count += dataset.num_bytes
        else:
            complete = False
    if not scored:
        return {}
    loss = nats / scored
    results = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if complete:
        results["val_bits_per_byte"] = bits / byte_count
    return results


def build_model(config: TrainConfig, tokenizer: Tokenizer) -> MoETransformer:
    model_config = config.model_config()
    if config.vocab_from_tokenizer:
        model_config.vocab_size = tokenizer.get_vocab_size()
    elif tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ConfigError(f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.get_vocab_size()} tokens")
    if config.data.max_seq_len > model_config.max_seq_len:
        raise ConfigError(f"data seq_len {config.data.max_seq_len} exceeds model.max_seq_len {model_config.max_seq_len}")
    torch.manual_seed(config.seed)
    return MoETransformer(model_config)


def train_lm(config: TrainConfig) -> TrainResult:
    """Run a language-model training described by ``config`` (what ``ds train`` does)."""
    if config.parallel.mode == "parameter_server":
        from deepseek.train.parameter_server import train_parameter_server  # it imports this module

        return train_parameter_server(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return train_lm_distributed(config)
    return _train_lm(config, ParallelPlan())


def train_lm_distributed(config: TrainConfig) -> TrainResult:
    """``train_lm`` on this rank of a torchrun job: process group, the plan, this rank's rows, clean teardown."""
    env = init_distributed(timeout_s=config.parallel.timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart not in ("", "0"):
        config.checkpoint.resume = True  # a restarted job continues from its last checkpoint
        if env.is_main:
            print(f"torchrun restart {restart}: resuming from the newest checkpoint in {config.run_dir}",
                  file=sys.stderr, flush=True)
    with distributed_plan(config, env) as plan:
        return _train_lm(config, plan)


@contextlib.contextmanager
def distributed_plan(config: TrainConfig, env=None) -> Iterator[ParallelPlan]:
    """This rank's :class:`ParallelPlan` of a torchrun job (process group up, the data prepared by rank 0 before the
    others go on), with collective timeouts named per rank; the process group goes down on exit. ``ds train`` and
    ``ds profile train --nproc N`` both run inside it."""
    env = env or init_distributed(timeout_s=config.parallel.timeout_s)
    config.parallel.degrees(env.world_size)  # a layout that does not fit fails before any work
    try:
        with rank_errors(config.parallel.timeout_s):
            plan = build_plan(config.parallel, env, resolve_device(config.device))
            if env.is_main:
                ensure_prepared(config.data, config.model.vocab_size, progress=config.progress)
            barrier()  # the other ranks wait here until rank 0 has prepared the data
            yield plan
    finally:
        destroy()


def _train_lm(config: TrainConfig, plan: ParallelPlan) -> TrainResult:
    """The run itself; ``plan`` picks this rank's rows and applies the layout."""
    trainer = build_trainer(config, plan)
    try:
        return trainer.fit()
    finally:
        plan.close()  # DDP reducers and pipeline stages go before the process group
        trainer.parallel_model = trainer.step_fn = None


def build_trainer(config: TrainConfig, plan: Optional[ParallelPlan] = None) -> Trainer:
    """The :class:`Trainer` ``ds train`` runs for ``config``: data prepared, model built, loader, evaluation and
    final save wired (``ds profile train`` steps the same one)."""
    plan = plan or ParallelPlan()
    if plan.rank == 0:  # under torchrun rank 0 prepared the data already (train_lm_distributed)
        ensure_prepared(config.data, config.model.vocab_size, progress=config.progress)
    paths = [p for p, _ in data_paths(config.data).values()]
    tokenizer = TokenDataset(paths[0], "train").tokenizer()
    model = build_model(config, tokenizer)
    loader = make_loader(config, rank=plan.data_rank, world_size=plan.data_parallel_size)
    eval_seq_len = config.data.schedule()[-1][1]
    max_batches = config.data.eval_batches or None

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(m, paths, batch_size=config.micro_batch, seq_len=eval_seq_len, max_batches=max_batches)

    def save_model(m: torch.nn.Module, path: Path) -> None:
        save(m, tokenizer, path, generation={"max_new_tokens": 128, "temperature": 0.8, "top_p": 0.95})

    return Trainer(model, config, batches=loader, loss_fn=lm_loss, eval_fn=eval_fn, tokenizer=tokenizer,
                   save_model=save_model, parallel=plan, work_per_step=tokens_per_step(config),
                   trial_loss_fn=lm_loss)
