"""Static int8 (torchao pt2e + inductor freezing) on the digits CNN: accuracy, bytes and latency vs fp32.

The CNN of examples/digits_cnn.py trained with the example's recipe (300 steps, seed 0, its Trainer wiring),
then :func:`deepseek.compress.static_int8.quantize_static_int8` with 16 calibration batches of 64 training
images. Reported:

  accuracy   fp32 eager vs int8 compiled, on the 360 held-out test images
  bytes      the fp32 state dict as safetensors vs the int8 folder's model.safetensors (and its program.json)
  latency    batch 1 and 64, timed interleaved (every case once per round, rotating order), medians of
             ``--inner`` back-to-back calls per measurement:
               fp32 eager      the trained nn.Module under torch.no_grad()
               fp32 compiled   torch.compile(dynamic=False) of it with inductor freezing, called like int8 below
               int8 compiled   the StaticInt8Model (freezing: oneDNN int8 conv/linear with prepacked weights)
               int8 reference  its uncompiled program (quantize/dequantize around fp32 ops), for information
             ratios are medians of per-round ratios against fp32 eager and fp32 compiled (> 1 = faster).

    python benchmarks/bench_digits_int8.py [--threads 1] [--rounds 30] [--inner 50]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, interleaved, machine_info, median, paired_ratio, print_machine,  # noqa: E402
                    print_table, setup_path, spread, write_results)

setup_path()
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from deepseek.compress.static_int8 import quantize_static_int8, save_static_int8  # noqa: E402


def load_example():
    spec = importlib.util.spec_from_file_location("digits_cnn_example", REPO_ROOT / "examples" / "digits_cnn.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train_digits(ex, run_dir: Path) -> torch.nn.Module:
    """The example's own run (300 steps, seed 0), its report silenced; the saved weights in a fresh model."""
    from safetensors.torch import load_file

    with contextlib.redirect_stdout(io.StringIO()):
        ex.main([f"run_dir={run_dir}", "progress=false", "tensorboard=false", f"threads={torch.get_num_threads()}"])
    model = ex.DigitsCNN()
    model.load_state_dict(load_file(str(run_dir / "model" / "model.safetensors")))
    return model.eval()


def frozen_compiled(model: torch.nn.Module):
    """fp32 compiled the way the int8 model is: dynamic=False, freezing on while dynamo traces, no_grad."""
    compiled = torch.compile(model, dynamic=False)
    config = torch._inductor.config

    def run(x):
        previous, config.freezing = config.freezing, True
        try:
            with torch.no_grad():
                return compiled(x)
        finally:
            config.freezing = previous
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared host)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=50, help="calls per measurement")
    parser.add_argument("--calibration-batches", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    ex = load_example()
    x_train, _, x_test, y_test = ex.load_digits_split()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = train_digits(ex, scratch / "digits")
        calibration = [x_train[i * 64:(i + 1) * 64] for i in range(args.calibration_batches)]
        qmodel = quantize_static_int8(model, calibration, x_test[:1])
        folder = save_static_int8(qmodel, scratch / "int8")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(scratch / "fp32.safetensors"))
        fp32_bytes = (scratch / "fp32.safetensors").stat().st_size
        int8_bytes = (folder / "model.safetensors").stat().st_size
        program_bytes = (folder / "program.json").stat().st_size

    with torch.no_grad():
        fp32_logits = model(x_test)
    int8_logits = qmodel(x_test)
    acc = {"fp32": (fp32_logits.argmax(-1) == y_test).float().mean().item(),
           "int8": (int8_logits.argmax(-1) == y_test).float().mean().item()}
    agreement = (fp32_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean().item()
    max_err = (fp32_logits - int8_logits).abs().max().item()
    print(f"\naccuracy on {len(y_test)} test images: fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f} "
          f"(predictions agree on {agreement:.4f}; max |logit diff| {max_err:.3f})")
    print(f"weights: fp32 {fp32_bytes:,} B, int8 {int8_bytes:,} B ({fp32_bytes / int8_bytes:.2f}x smaller); "
          f"program.json {program_bytes:,} B (the graph)")

    fp32_compiled = frozen_compiled(model)
    latency: dict[int, dict] = {}
    rows = []
    for batch in (1, 64):
        x = x_test[:batch].contiguous()
        cases = {
            "fp32 eager": lambda: model(x),
            "fp32 compiled": lambda: fp32_compiled(x),
            "int8 compiled": lambda: qmodel(x),
            "int8 reference": lambda: qmodel.program(x),
        }
        for fn in cases.values():  # compilation for this batch size happens here, outside the timing
            fn()
        with torch.no_grad():
            times = interleaved(cases, rounds=args.rounds, warmup=3, inner=args.inner)
        base, compiled_base = times["fp32 eager"], times["fp32 compiled"]
        latency[batch] = {name: {"ms": [t * 1e3 for t in ts], "vs_fp32_eager": median(paired_ratio(base, ts)),
                                 "vs_fp32_compiled": median(paired_ratio(compiled_base, ts))}
                          for name, ts in times.items()}
        for name, ts in times.items():
            rows.append([batch, name, spread([t * 1e3 for t in ts]), f"{median(paired_ratio(base, ts)):.2f}x",
                         f"{median(paired_ratio(compiled_base, ts)):.2f}x"])
    print(f"\nlatency, {args.threads} thread(s), ms per call: median (min-max) of {args.rounds} rounds x "
          f"{args.inner} calls; ratio = reference time / case time (> 1 is faster)\n")
    print_table(["batch", "case", "ms", "speed vs fp32 eager", "vs fp32 compiled"], rows)
    write_results("digits_int8", {"machine": info, "args": vars(args), "accuracy": acc, "agreement": agreement,
                                  "max_abs_logit_diff": max_err, "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                                  "program_json_bytes": program_bytes, "latency": latency})


if __name__ == "__main__":
    main()
