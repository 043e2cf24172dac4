"""``ds compress``: a smaller, faster model directory from a trained one, and the report of what it cost.

    ds compress DIR --method int8-dynamic --out OUT
    ds compress DIR --method prune-channels --ratio 0.3 --data DATA --steps 200 --out OUT
    ds compress report DIR OUT --data DATA        # OUT measured against DIR: table + OUT/compression-report.{json,png}

The output is an ordinary model directory (with ``compression.json``): ``ds generate``, ``ds eval`` and
``ds serve`` use it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

METHODS = ("int8-dynamic", "int8-weight", "int4-weight", "qat", "prune-unstructured", "prune-channels",
           "prune-experts", "distill")
TRAINING_METHODS = ("qat", "distill")


def compress_command(
    model_dir: Path = typer.Argument(..., metavar="DIR", help="The model directory to compress "
                                                               "(or `report`, then DIR and OUT)."),
    second: Optional[Path] = typer.Argument(None, metavar="[ORIGINAL]", help="For `report`: the original directory."),
    third: Optional[Path] = typer.Argument(None, metavar="[COMPRESSED]", help="For `report`: the compressed one."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=f"One of: {', '.join(METHODS)}."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the compressed model directory."),
    data: Optional[Path] = typer.Option(None, "--data", help="A prepared data directory (`ds prepare`): fine-tuning, "
                                                             "calibration and the report's perplexity."),
    steps: int = typer.Option(0, "--steps", help="Fine-tuning steps after pruning; training steps for qat/distill."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate of the fine-tune."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows per fine-tuning step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per fine-tuning row."),
    precision: str = typer.Option("auto", "--precision", help="Fine-tuning precision: auto (bf16 only where this "
                                                              "device runs it faster), fp32 or bf16."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Fine-tune checkpoints and metrics "
                                                                   "(default: OUT's sibling OUT.run)."),
    resume: bool = typer.Option(False, "--resume", help="Resume an interrupted fine-tune from --run-dir."),
    scheme: str = typer.Option("int8-dynamic", "--scheme", help="qat: the scheme trained for and converted to "
                                                                "(int8-dynamic, int8-weight, int4-weight)."),
    group_size: int = typer.Option(32, "--group-size", help="int4: input columns per scale."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="prune-unstructured: fraction of weights set to zero."),
    scope: str = typer.Option("global", "--scope", help="prune-unstructured: global or layer."),
    ratio: float = typer.Option(0.3, "--ratio", help="prune-channels: fraction of FFN channels and heads removed."),
    heads: bool = typer.Option(True, "--heads/--no-heads", help="prune-channels: prune attention heads too."),
    keep: Optional[int] = typer.Option(None, "--keep", help="prune-experts: routed experts kept per layer."),
    mode: str = typer.Option("drop", "--mode", help="prune-experts: drop or merge the least-used experts."),
    calibration_batches: int = typer.Option(16, "--calibration-batches", help="prune-experts: batches of router "
                                                                              "statistics."),
    student_layers: Optional[int] = typer.Option(None, "--student-layers", help="distill: layers of the student "
                                                                                "(default: half the teacher's)."),
    student_experts: Optional[int] = typer.Option(None, "--student-experts", help="distill: routed experts of the "
                                                                                  "student (default: the teacher's)."),
    temperature: float = typer.Option(1.0, "--temperature", help="distill: softmax temperature T (1 measured best on our code models)."),
    alpha: float = typer.Option(0.7, "--alpha", help="distill: weight of the teacher's loss (1 - alpha on labels)."),
    report: bool = typer.Option(False, "--report", help="After compressing, measure OUT against DIR (needs --data)."),
    rounds: int = typer.Option(7, "--rounds", help="report: timing rounds per model."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="report: where the JSON and PNG go "
                                                                         "(default: the compressed directory)."),
) -> None:
    """Compress a model directory (quantize, QAT, prune, distill), or `ds compress report DIR OUT`."""
    if str(model_dir) == "report":
        _report(second, third, data, rounds, report_dir)
        return
    if second is not None:
        raise typer.BadParameter(f"unexpected argument {second}; give the output with --out", param_hint="--out")
    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}; methods: {', '.join(METHODS)}", param_hint="--method")
    if out is None:
        raise typer.BadParameter("where should the compressed model go?", param_hint="--out")
    if (method in TRAINING_METHODS or (method.startswith("prune") and steps) or method == "prune-experts") and data is None:
        raise typer.BadParameter(f"{method} needs a prepared data directory", param_hint="--data")
    if method in TRAINING_METHODS and steps < 1:
        raise typer.BadParameter(f"{method} trains: give --steps", param_hint="--steps")
    from deepseek.compress import pipeline

    training = dict(data=data, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, precision=precision,
                    run_dir=run_dir, resume=resume)
    options = {
        "qat": dict(scheme=scheme, group_size=group_size),
        "int4-weight": dict(group_size=group_size),
        "prune-unstructured": dict(sparsity=sparsity, scope=scope),
        "prune-channels": dict(ratio=ratio, heads=heads),
        "prune-experts": dict(keep=keep, mode=mode, calibration_batches=calibration_batches),
        "distill": dict(student_layers=student_layers, student_experts=student_experts, temperature=temperature,
                        alpha=alpha),
    }.get(method, {})
    written, summary = pipeline.compress(model_dir, out, method, training=training, **options)
    typer.echo(f"wrote {written} ({summary})")
    if report:
        if data is None:
            raise typer.BadParameter("--report measures perplexity: give --data", param_hint="--data")
        _report(model_dir, written, data, rounds, report_dir)


def _report(original: Optional[Path], compressed: Optional[Path], data: Optional[Path], rounds: int,
            report_dir: Optional[Path]) -> None:
    if original is None or compressed is None:
        raise typer.BadParameter("usage: ds compress report DIR OUT [--data DATA]", param_hint="DIR OUT")
    from deepseek.compress.report import compare, print_report, write_report

    result = compare(original, compressed, data=data, rounds=rounds)
    print_report(result)
    json_path, png_path = write_report(result, report_dir or compressed)
    typer.echo(f"wrote {json_path} and {png_path}")


def register(app: typer.Typer) -> None:
    """Add the ``compress`` command to the ``ds`` app."""
    app.command("compress", context_settings={"help_option_names": ["-h", "--help"]})(compress_command)
