"""``ds export onnx``: a model directory as an ONNX graph, checked against eager torch with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer


def onnx_command(
    model_dir: Path = typer.Argument(..., metavar="DIR", help="the model directory to export"),
    out: Path = typer.Argument(..., metavar="OUT.onnx", help="the ONNX file to write (export.json goes next to it)"),
    kv_cache: bool = typer.Option(False, "--kv-cache", help="export the decoding step: past/present keys and "
                                                             "values per layer as inputs and outputs"),
    int8: bool = typer.Option(False, "--int8", help="also write the onnxruntime dynamic-int8 graph next to it "
                                                     "(model.onnx -> model.int8.onnx)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="compare onnxruntime with eager torch"),
) -> None:
    """Export a model directory to ONNX: input_ids [batch, seq] -> logits [batch, seq, vocab]."""
    # Imported here so that `ds --help` does not pay for torch and the exporter.
    from rich.console import Console
    from rich.table import Table

    from deepseek.export.onnx import FP32_TOLERANCE, export_onnx

    report = export_onnx(model_dir, out, kv_cache=kv_cache, quantize_int8=int8, validate=validate)
    console = Console()
    table = Table(title=f"{report.path} (opset {report.opset}{', KV cache' if kv_cache else ''})")
    for column in ("shape", "max |ORT - eager|", "eager ms", "ORT ms", "eager / ORT"):
        table.add_column(column, justify="left" if column == "shape" else "right")
    for row in report.validation:
        table.add_row(row["shape"], f"{row['max_abs_diff']:.2e}", f"{row['eager_ms']:.2f}", f"{row['ort_ms']:.2f}",
                      f"{row['eager_ms'] / row['ort_ms']:.2f}x")
    console.print(table)
    console.print(f"file: {report.file_bytes / 2**20:.2f} MiB")
    if report.validation:
        console.print(f"validated: max abs diff {report.max_abs_diff:.2e} <= {FP32_TOLERANCE:g}"
                      + ("; greedy decoding of 8 tokens equals eager" if report.greedy_match else ""))
    else:
        console.print("not validated (--no-validate)")
    if report.int8 is not None:
        q = report.int8
        line = f"int8: {q['path']} {q['file_bytes'] / 2**20:.2f} MiB"
        if q["max_abs_diff"] is not None:
            line += f", max |int8 - fp32| {q['max_abs_diff']:.3g}, argmax agreement {100 * q['argmax_agreement']:.1f}%"
        console.print(line)


def register(app: typer.Typer) -> None:
    """Add the ``export`` command group (``ds export onnx``) to the ``ds`` app."""
    export_app = typer.Typer(no_args_is_help=True, help="Export a model directory (ONNX).")
    export_app.command("onnx")(onnx_command)
    app.add_typer(export_app, name="export")
