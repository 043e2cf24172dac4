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
    precision: str = typer.Option("auto", help="auto (bf16 only where this CPU runs it faster), fp32 or bf16."),
) -> None:
    """Loss, perplexity and bits per byte of a model on prepared data."""
    import deepseek as ds
    from deepseek.hardware import autocast, resolve_precision
    from deepseek.train.lm import evaluate_lm

    model, _ = ds.load(model_dir)
    model.eval()
    seq_len = min(seq_len, model.config.max_seq_len)
    choice = resolve_precision(precision)
    typer.echo(f"precision: {choice.precision} ({choice.reason})", err=True)
    with autocast(choice):
        results = evaluate_lm(model, [str(p) for p in data], batch_size=batch_size, seq_len=seq_len,
                              max_batches=max_batches, split=split)
    if not results:
        raise ValueError(f"the {split} split of {', '.join(map(str, data))} has fewer than {seq_len + 1} tokens")
    for key, value in results.items():
        typer.echo(f"{key.removeprefix('val_')}: {value:.4f}")


def info_command(
    model_dir: Optional[Path] = typer.Argument(None, help="A model directory."),
    hardware: bool = typer.Option(False, "--hardware", help="Show what this machine runs fast and the precisions "
                                                            "`auto` picks here."),
) -> None:
    """Parameters, active parameters per token and the config of a model directory; --hardware: this machine."""
    from rich.console import Console

    if model_dir is None and not hardware:
        raise typer.BadParameter("give a model directory, or --hardware")
    console = Console()
    if hardware:
        console.print(hardware_table())
    if model_dir is not None:
        console.print(model_table(model_dir))


def hardware_table():
    """What this machine does fast (flags, measured products) and what ``precision: auto`` picks for each job."""
    from rich.table import Table

    from deepseek.hardware import (bf16_products_fast, choose_precision, hardware_profile, int8_products_fast)

    profile = hardware_profile()
    table = Table(title="this machine", show_header=False)
    table.add_row("CPU", profile.name)
    table.add_row("architecture", f"{profile.machine}, torch capability {profile.capability}, "
                                  f"{profile.threads} torch threads")
    table.add_row("flags of note", ", ".join(sorted(profile.flags)) or "none")
    for kind, label in (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8 (_int_mm)")):
        if kind in profile.measured:
            speedup = profile.speedup(kind)
            table.add_row(f"{label} products", f"{profile.measured[kind]:.1f} GFLOP/s"
                          + (f" ({speedup:.2g}x fp32)" if kind != "fp32" else "") + " at 64x256x512")
    if "fp32_decode" in profile.measured:
        table.add_row("one-row products", f"fp32 {profile.measured['fp32_decode']:.1f}, bf16 "
                      f"{profile.measured.get('bf16_decode', float('nan')):.1f} GFLOP/s at 1x256x1024")
    table.add_row("bf16 fast", f"{bf16_products_fast(profile)} (decoding: {bf16_products_fast(profile, 'decode')})")
    table.add_row("int8 products fast", str(int8_products_fast(profile)))
    for workload, jobs in (("train", "training, eval"), ("decode", "generation, serving")):
        choice = choose_precision("auto", profile, workload)
        table.add_row(f"precision auto: {jobs}", f"{choice.precision} ({choice.reason.removeprefix('auto: ')})")
    if torch_cuda_available():
        cuda = hardware_profile("cuda")
        choice = choose_precision("auto", cuda)
        table.add_row("GPU", f"{cuda.name} ({cuda.capability}); precision auto: {choice.precision}")
    return table


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def model_table(model_dir: Path):
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
    return table
