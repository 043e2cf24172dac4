"""``ds eval`` and ``ds info``: how good a model directory is, and what is in it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("info")(info_command)


def eval_command(
    model_dir: Path = typer.Argument(..., help="A model directory."),
    data: list[Path] = typer.Option(..., "--data", help="A directory from `ds prepare` (repeatable)."),
    split: str = typer.Option("val", help="Which split to score."),
    seq_len: int = typer.Option(256, help="Context length of each scored window."),
    batch_size: int = typer.Option(8, help="Windows per forward."),
    max_batches: Optional[int] = typer.Option(None, help="Score at most this many batches (default: all)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16."),
) -> None:
    """Loss, perplexity and bits per byte of a model on prepared data."""
    import torch

    import deepseek as ds
    from deepseek.train.lm import evaluate_lm

    model, _ = ds.load(model_dir)
    model.eval()
    seq_len = min(seq_len, model.config.max_seq_len)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        results = evaluate_lm(model, [str(p) for p in data], batch_size=batch_size, seq_len=seq_len,
                              max_batches=max_batches, split=split)
    if not results:
        raise ValueError(f"the {split} split of {', '.join(map(str, data))} has fewer than {seq_len + 1} tokens")
    for key, value in results.items():
        typer.echo(f"{key.removeprefix('val_')}: {value:.4f}")


def info_command(model_dir: Path = typer.Argument(..., help="A model directory.")) -> None:
    """Parameters, active parameters per token and the config of a model directory."""
    from rich.console import Console
    from rich.table import Table

    import deepseek as ds
    from deepseek.models.directory import read_extra

    model, tokenizer = ds.load(model_dir)
    cfg = model.config
    table = Table(title=str(model_dir), show_header=False)
    table.add_row("parameters", f"{model.num_parameters():,}")
    table.add_row("active per token", f"{model.num_parameters(active=True):,} "
                                      f"({model.num_parameters(active=True, embedding=False):,} without embeddings)")
    table.add_row("tokenizer", f"{tokenizer.get_vocab_size():,} tokens")
    table.add_row("layers", f"{cfg.n_layers} ({cfg.first_k_dense} dense, {cfg.n_moe_layers} MoE)")
    table.add_row("experts", f"{cfg.n_routed_experts} routed (top {cfg.top_k}, {cfg.router} router) "
                             f"+ {cfg.n_shared_experts} shared")
    table.add_row("attention", f"{cfg.attention}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, d_model {cfg.d_model}")
    table.add_row("max_seq_len", str(cfg.max_seq_len))
    compression = read_extra(model_dir, "compression.json")
    if compression:
        table.add_row("compression", str(compression))
    Console().print(table)
