"""Compression of the served classifier: QAT -> static int8 (the pt2e path of deepseek.compress), and ONNX export.

1. post-training static int8 (16 calibration batches), for comparison;
2. QAT: ``prepare_static_int8_qat`` (fake-quantized weights and activations, BatchNorm folded as the int8 model
   will have it), fine-tuned with the same Trainer and augmentation at a tenth of the learning rate, then
   ``convert_static_int8_qat`` -> the inductor-compiled int8 model, saved (``int8/``, no pickle);
3. ``export_onnx`` of the float model (``onnx/model.onnx``, validated against eager by onnxruntime), served as
   ``digits``;
4. ``export_static_int8_onnx`` of the QAT int8 model (``onnx-int8/model.onnx``: a QDQ graph with int8 weights,
   validated against the int8 reference program), served as ``digits-int8``.
Reports test accuracy, bytes of the weights files and batch-1 latency of each form (the ONNX files' accuracy
and latency under onnxruntime, one thread).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deepseek.compress.static_int8 import (convert_static_int8_qat, prepare_static_int8_qat, quantize_static_int8,
                                           save_static_int8)
from deepseek.export import export_onnx, export_static_int8_onnx


def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(pixels).argmax(-1) == labels).float().mean())


def median_ms(model: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int = 100) -> float:
    """Median latency of ``model(x)`` (a module or any callable) over ``calls`` calls after 5 warm-up calls."""
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def onnx_accuracy_and_ms(path: Path, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Test accuracy and median batch-1 latency of an ONNX file under onnxruntime (one thread, as served)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor):
        return session.run(None, {name: x.numpy()})[0]

    predicted = torch.from_numpy(run(pixels)).argmax(-1)
    return float((predicted == labels).float().mean()), median_ms(run, pixels[:1])


def compress_served_model(run_dir: Path, model: nn.Module, t: dict[str, torch.Tensor], *, train_classifier,
                          qat_steps: int, augment, quiet: bool, seed: int) -> dict[str, Any]:
    """``train_classifier``: training.py's (the Trainer wiring), passed in by run.py."""
    from rich.console import Console

    out = Console()
    x_train, y_train, x_test, y_test = t["x_train"], t["y_train"], t["x_test"], t["y_test"]
    fp32_bytes = (run_dir / "models" / "ours-resnet" / "model.safetensors").stat().st_size
    results: dict[str, Any] = {"fp32": {"accuracy": accuracy(model, x_test, y_test), "weights_bytes": fp32_bytes}}

    calibration = list(x_train[:1024].split(64))
    ptq = quantize_static_int8(model, calibration, x_test[:1])
    results["ptq-int8"] = {"accuracy": accuracy(ptq, x_test, y_test)}
    out.print(f"post-training int8: accuracy {results['ptq-int8']['accuracy']:.4f}")

    torch.manual_seed(seed)
    qat = prepare_static_int8_qat(model, x_test[:1])
    # on the CPU whatever is installed: the int8 kernels are x86 oneDNN ones, and so is the QAT graph's quantizer
    overrides = ["device=cpu", "optimizer.lr=3e-4", "schedule.warmup_steps=10", "checkpoint.save_final=false"]
    if quiet:
        overrides += ["progress=false", "tensorboard=false"]
    train_classifier(qat, run_dir / "train" / "qat", (x_train, y_train), (x_test, y_test), steps=qat_steps,
                              augment=augment, save_model=lambda *_: None, overrides=overrides, seed=seed)
    int8 = convert_static_int8_qat(qat)
    folder = save_static_int8(int8, run_dir / "int8")
    int8_bytes = (folder / "model.safetensors").stat().st_size
    results["qat-int8"] = {"accuracy": accuracy(int8, x_test, y_test), "weights_bytes": int8_bytes,
                           "program_json_bytes": (folder / "program.json").stat().st_size,
                           "bytes_ratio": round(int8_bytes / fp32_bytes, 3), "qat_steps": qat_steps}
    one = x_test[:1]
    results["fp32"]["batch1_ms"] = round(median_ms(model.eval(), one), 3)
    results["qat-int8"]["batch1_ms"] = round(median_ms(int8, one), 3)
    out.print(f"QAT int8: accuracy {results['qat-int8']['accuracy']:.4f} (fp32 {results['fp32']['accuracy']:.4f}), "
              f"weights {int8_bytes:,} B = {results['qat-int8']['bytes_ratio']}x of {fp32_bytes:,} B -> {folder}")

    report = export_onnx(model, run_dir / "onnx" / "model.onnx", example_inputs=(x_test[:2],),
                         input_names=["pixel_values"], output_names=["logits"])
    onnx_accuracy, onnx_ms = onnx_accuracy_and_ms(report.path, x_test, y_test)
    results["onnx"] = {"file_bytes": report.file_bytes, "max_abs_diff": report.max_abs_diff,
                       "accuracy": onnx_accuracy, "batch1_ms": round(onnx_ms, 3)}
    out.print(f"ONNX: {report.path} ({report.file_bytes:,} B, max |onnx - eager| {report.max_abs_diff:.2e})")

    int8_report = export_static_int8_onnx(int8, run_dir / "onnx-int8" / "model.onnx", (x_test[:2],),
                                          input_names=["pixel_values"], output_names=["logits"])
    int8_accuracy, int8_ms = onnx_accuracy_and_ms(int8_report.path, x_test, y_test)
    results["onnx-int8"] = {"file_bytes": int8_report.file_bytes, "accuracy": int8_accuracy,
                            "batch1_ms": round(int8_ms, 3), "max_abs_diff": int8_report.max_abs_diff,
                            "clips_added": int8_report.static_int8["clips_added"],
                            "ratio_vs_fp32_safetensors": round(int8_report.file_bytes / fp32_bytes, 3),
                            "ratio_vs_fp32_onnx": round(int8_report.file_bytes / report.file_bytes, 3)}
    out.print(f"int8 ONNX: {int8_report.path} ({int8_report.file_bytes:,} B = "
              f"{results['onnx-int8']['ratio_vs_fp32_safetensors']}x of the fp32 weights, "
              f"{results['onnx-int8']['ratio_vs_fp32_onnx']}x of the fp32 ONNX), accuracy under onnxruntime "
              f"{int8_accuracy:.4f} (fp32 ONNX {onnx_accuracy:.4f}), max |onnx - int8 reference| "
              f"{int8_report.max_abs_diff:.2e}")
    return results
