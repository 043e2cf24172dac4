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
    data: list[Path] = typer.Option([], "--data", help="A directory from `ds prepare` (repeatable)."),
    split: str = typer.Option("val", help="Which split to score."),
    seq_len: int = typer.Option(256, help="Context length of each scored window."),
    batch_size: int = typer.Option(8, help="Windows per forward."),
    max_batches: Optional[int] = typer.Option(None, help="Score at most this many batches (default: all)."),
    precision: str = typer.Option("auto", help="auto (bf16 only where this CPU runs it faster), fp32 or bf16."),
    task: Optional[str] = typer.Option(None, help="A code task instead of --data: humaneval or stdlib-doctests "
                                                  "(samples run in a sandboxed subprocess, never here)."),
    n: int = typer.Option(10, "--n", help="--task: samples per problem."),
    k: list[int] = typer.Option([1, 10], "--k", help="--task: pass@k for this k (repeatable; k <= n)."),
    limit: Optional[int] = typer.Option(None, help="--task: only the first N problems."),
    temperature: float = typer.Option(0.8, help="--task: sampling temperature (0: greedy)."),
    max_new_tokens: int = typer.Option(512, help="--task: most tokens per completion."),
    timeout: float = typer.Option(3.0, help="--task: seconds each completion may run."),
    out: Optional[Path] = typer.Option(None, help="--task: write the report (pass@k, per problem, samples) as JSON."),
    prompt_style: str = typer.Option("completion", help="--task: completion (continue the def + docstring) or chat "
                                                        "(ask in a user turn with the chat template, as SFT data "
                                                        "and serving do; the reply's code block is the answer)."),
    adapter: Optional[Path] = typer.Option(None, help="--task: a LoRA adapter directory (`ds finetune run` "
                                                      "output) applied to the model first."),
    heldout_fraction: Optional[float] = typer.Option(None, help="--task stdlib-doctests: the module split the "
                                                                "examples were prepared with (default 0.1)."),
) -> None:
    """Loss, perplexity and bits per byte of a model on prepared data; with --task, pass@k on code problems."""
    import deepseek as ds

    if task is not None:
        return code_eval(model_dir, task, n=n, ks=k, limit=limit, temperature=temperature,
                         max_new_tokens=max_new_tokens, timeout_s=timeout, out=out, prompt_style=prompt_style,
                         adapter=adapter, heldout_fraction=heldout_fraction)
    if not data:
        raise typer.BadParameter("give --data (a directory from `ds prepare`) or --task")
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


def code_eval(model_dir: Path, task: str, *, n: int, ks: list[int], limit: Optional[int], temperature: float,
              max_new_tokens: int, timeout_s: float, out: Optional[Path], prompt_style: str = "completion",
              adapter: Optional[Path] = None, heldout_fraction: Optional[float] = None) -> None:
    """``ds eval MODEL --task ...``: sample, check in the sandbox, print pass@k, write the JSON report."""
    from rich.console import Console
    from rich.table import Table

    import deepseek as ds
    from deepseek.atomic import write_json_atomically
    from deepseek.evaluation.codegen import PROMPT_STYLES, TASKS, evaluate_model

    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; choose one of {', '.join(TASKS)}", param_hint="--task")
    if prompt_style not in PROMPT_STYLES:
        raise typer.BadParameter(f"unknown prompt style {prompt_style!r}; choose one of {', '.join(PROMPT_STYLES)}",
                                 param_hint="--prompt-style")
    if heldout_fraction is not None and not 0 < heldout_fraction < 1:
        raise typer.BadParameter(f"must be in (0, 1), got {heldout_fraction}", param_hint="--heldout-fraction")
    if n < 1 or any(k < 1 or k > n for k in ks):
        raise typer.BadParameter(f"need 1 <= k <= n, got n={n}, k={ks}", param_hint="--k")
    model, tokenizer = ds.load(model_dir)
    if adapter is not None:
        from deepseek.models.adapters import load_adapter

        load_adapter(model, adapter)
    model.eval()
    report = evaluate_model(model, tokenizer, task, n=n, ks=ks, limit=limit, temperature=temperature,
                            max_new_tokens=max_new_tokens, timeout_s=timeout_s, prompt_style=prompt_style,
                            heldout_fraction=heldout_fraction)
    table = Table(title=f"{task} ({prompt_style} prompts{', adapter ' + str(adapter) if adapter else ''}): "
                        f"{len(report.per_problem)} problems, n={n}, temperature {temperature}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, value in report.pass_at_k.items():
        table.add_row(f"pass@{k}", f"{value:.4f}")
    table.add_row("problems solved (any sample)", str(sum(p["correct"] > 0 for p in report.per_problem.values())))
    table.add_row("samples that parse", f"{report.parse_rate:.4f}")
    table.add_row("... and give the function a body", f"{report.function_rate:.4f}")
    Console().print(table)
    if out is not None:
        write_json_atomically(out, report.to_dict())
        typer.echo(f"report: {out}", err=True)


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
