"""What a compression cost and bought: the compressed model directory measured against its original.

Parameters, bytes on disk, CPU forward latency at batch 1 and 8 (``seq_len`` tokens per row), greedy decoding
tokens/s at batch 1, and validation perplexity on a prepared data directory. Both models are timed in
alternating rounds in the same process, so a busy machine slows both alike and the ratios hold.

A quantized model's speed depends on the kernels this CPU runs it with (:mod:`deepseek.nn.quantized`): the int8
and bf16 kernels where they are fast, a dequantized fp32 product elsewhere (an AVX2-only CPU). The report names
the kernels and, wherever the compressed model is slower than the original, says so and why
(:meth:`CompressionReport.notes`): a slower "compressed" model is never shown without that note.

    report = compare("runs/quickstart/model", "runs/int8", data="runs/quickstart/data")
    print_report(report); write_report(report, "runs/int8")     # compression-report.json + .png
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from deepseek.models.directory import load, read_extra

# metric -> (label, unit, lower is better)
METRICS = {
    "parameters": ("parameters", "", True),
    "bytes": ("bytes on disk", "MB", True),
    "latency_b1_ms": ("latency, batch 1", "ms", True),
    "latency_b8_ms": ("latency, batch 8", "ms", True),
    "decode_tokens_per_s": ("decoding, batch 1", "tok/s", False),
    "val_ppl": ("validation perplexity", "", True),
}


@dataclass
class ModelMeasurement:
    path: str
    method: str
    parameters: int
    bytes: int
    latency_b1_ms: Optional[float] = None
    latency_b8_ms: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    val_ppl: Optional[float] = None
    val_loss: Optional[float] = None
    kernels: list[dict[str, str]] = field(default_factory=list)  # distinct kernel choices of its quantized modules


# speed metrics: key -> True when lower is better
SPEED = {"latency_b1_ms": True, "latency_b8_ms": True, "decode_tokens_per_s": False}


@dataclass
class CompressionReport:
    original: ModelMeasurement
    compressed: ModelMeasurement
    settings: dict[str, Any] = field(default_factory=dict)

    def slower(self) -> dict[str, float]:
        """``{speed metric: how many times slower}`` where the compressed model is slower than the original."""
        out = {}
        for key, lower_is_better in SPEED.items():
            a, b = getattr(self.original, key), getattr(self.compressed, key)
            if a and b:
                factor = b / a if lower_is_better else a / b
                if factor > 1.0:
                    out[key] = factor
        return out

    def notes(self) -> list[str]:
        """Where the compressed model is slower than the original on any speed metric: one line saying by how much
        on which, and why (the kernels' reason); empty when it is not slower anywhere."""
        slower = self.slower()
        if not slower:
            return []
        kernels = self.compressed.kernels
        dequantized = sorted({k["reason"].removeprefix("auto: ") for k in kernels if k["kernel"] == "dequant"})
        if dequantized:
            why = "; ".join(dequantized)
        elif kernels:
            names = ", ".join(sorted({k["kernel"] for k in kernels}))
            why = (f"its kernels ({names}) ran slower than the original's fp32 products here, although chosen as "
                   f"the fast ones ({kernels[0]['reason'].removeprefix('auto: ')}); what it saves is memory")
        else:
            why = f"{self.compressed.method} keeps fp32 kernels; the difference is the model itself or timing noise"
        by = ", ".join(f"{METRICS[key][0]} {factor:.2f}x" for key, factor in slower.items())
        return [f"the compressed model is slower than the original here ({by}): {why}"]

    def ratios(self) -> dict[str, float]:
        """compressed / original for every metric both have."""
        out = {}
        for key in METRICS:
            a, b = getattr(self.original, key), getattr(self.compressed, key)
            if a and b is not None:
                out[key] = b / a
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"original": asdict(self.original), "compressed": asdict(self.compressed),
                "ratios": {k: round(v, 4) for k, v in self.ratios().items()}, "notes": self.notes(),
                "settings": self.settings}


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def kernel_summary(model: torch.nn.Module) -> list[dict[str, str]]:
    """The distinct kernel choices (scheme, requested, kernel, reason) a quantized model runs with here."""
    from deepseek.nn.quantized import is_quantized, kernel_choices

    if not is_quantized(model):
        return []
    distinct = {}
    for choice in kernel_choices(model).values():
        distinct.setdefault((choice.scheme, choice.kernel, choice.reason), choice.to_dict())
    return list(distinct.values())


def describe_kernels(measurement: ModelMeasurement) -> str:
    """``int_mm`` / ``dequant`` ... for a table cell; ``fp32`` for a model without quantized modules."""
    return ", ".join(sorted({k["kernel"] for k in measurement.kernels})) or "fp32"


def describe_method(path: str | Path) -> str:
    record = read_extra(path, "compression.json")
    return str(record.get("method", "compressed")) if isinstance(record, dict) else "original"


@torch.inference_mode()
def _forward_ms(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids)
    return (time.perf_counter() - start) * 1e3


def _decode_tokens_per_s(model, tokenizer, prompt: str, tokens: int) -> float:
    from deepseek.generate import generate

    start = time.perf_counter()
    out = generate(model, tokenizer, prompt, max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    return len(out.token_ids) / (time.perf_counter() - start)


def compare(original: str | Path, compressed: str | Path, *, data: Optional[str | Path] = None, seq_len: int = 128,
            rounds: int = 7, decode_tokens: int = 64, eval_batches: int = 8, eval_seq_len: int = 256,
            prompt: str = "def read_lines(path):", progress: bool = True) -> CompressionReport:
    """Measure ``compressed`` against ``original`` (model directories); medians over ``rounds`` alternating rounds."""
    from deepseek.train.lm import evaluate_lm

    paths = {"original": Path(original), "compressed": Path(compressed)}
    loaded = {name: load(path) for name, path in paths.items()}
    results = {name: ModelMeasurement(str(path), "original" if name == "original" else describe_method(path),
                                      loaded[name][0].num_parameters(), weight_bytes(path),
                                      kernels=kernel_summary(loaded[name][0]))
               for name, path in paths.items()}
    vocab = min(m.config.vocab_size for m, _ in loaded.values())
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(0, vocab, (b, seq_len), generator=generator) for b in (1, 8)}
    samples: dict[str, dict[str, list[float]]] = {name: {"b1": [], "b8": [], "decode": []} for name in paths}
    for name, (model, tokenizer) in loaded.items():  # warm-up: first calls pay allocations and kernel packing
        _forward_ms(model, inputs[1])
        _decode_tokens_per_s(model, tokenizer, prompt, 4)

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("timing", total=rounds)
        for _ in range(rounds):
            for name, (model, tokenizer) in loaded.items():
                samples[name]["b1"].append(_forward_ms(model, inputs[1]))
                samples[name]["b8"].append(_forward_ms(model, inputs[8]))
                samples[name]["decode"].append(_decode_tokens_per_s(model, tokenizer, prompt, decode_tokens))
            bar.advance(task)
        if data is not None:
            task = bar.add_task("validation perplexity", total=len(paths))
            for name, (model, _) in loaded.items():
                scores = evaluate_lm(model, [str(data)], batch_size=8, seq_len=min(eval_seq_len, model.config.max_seq_len),
                                     max_batches=eval_batches)
                results[name].val_ppl, results[name].val_loss = scores.get("val_ppl"), scores.get("val_loss")
                bar.advance(task)
    for name, s in samples.items():
        results[name].latency_b1_ms = statistics.median(s["b1"])
        results[name].latency_b8_ms = statistics.median(s["b8"])
        results[name].decode_tokens_per_s = statistics.median(s["decode"])
    from deepseek.hardware import hardware_profile

    settings = {"seq_len": seq_len, "rounds": rounds, "decode_tokens": decode_tokens, "eval_batches": eval_batches,
                "eval_seq_len": eval_seq_len, "data": str(data) if data else None, "threads": torch.get_num_threads(),
                "cpu": hardware_profile().summary()}
    return CompressionReport(results["original"], results["compressed"], settings)


def _fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return f"{value:,.0f}"
    if key == "bytes":
        return f"{value / 1e6:.2f}"
    return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"


def report_table(report: CompressionReport):
    """A rich table: one row per metric, original / compressed / ratio."""
    from rich.table import Table

    table = Table(title=f"{report.compressed.method}: {report.compressed.path} vs {report.original.path}")
    for column in ("metric", "original", "compressed", "compressed / original"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    ratios = report.ratios()
    for key, (label, unit, _) in METRICS.items():
        a, b = getattr(report.original, key), getattr(report.compressed, key)
        if a is None and b is None:
            continue
        table.add_row(f"{label}" + (f" ({unit})" if unit else ""), _fmt(key, a), _fmt(key, b),
                      f"{ratios[key]:.3f}x" if key in ratios else "-")
    table.add_row("kernels on this CPU", describe_kernels(report.original), describe_kernels(report.compressed), "")
    return table


def print_report(report: CompressionReport) -> None:
    """The table, the kernels' reasons and, where the compressed model is slower, the notes saying why."""
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    console.print(report_table(report))
    for kernel in report.compressed.kernels:
        console.print(escape(f"kernel {kernel['kernel']} ({kernel['scheme']}): {kernel['reason']}"), highlight=False)
    for note in report.notes():
        console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)


def plot_report(report: CompressionReport, path: str | Path) -> Path:
    """A bar chart of compressed / original per metric (1.0 = unchanged), better/worse coloured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = report.ratios()
    keys = [k for k in METRICS if k in ratios]
    labels = [METRICS[k][0] for k in keys]
    values = [ratios[k] for k in keys]
    better = [(v <= 1.0) == METRICS[k][2] or abs(v - 1.0) < 0.005 for k, v in zip(keys, values)]
    notes = [textwrap.fill("note: " + note, 100) for note in report.notes()]
    note_lines = sum(note.count("\n") + 1 for note in notes)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(keys) + 1.5 + 0.16 * note_lines), dpi=120)
    ax.barh(labels, values, color=["tab:green" if b else "tab:red" for b in better])
    ax.axvline(1.0, color="black", linewidth=1)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("compressed / original")
    ax.set_title(f"{report.compressed.method} (kernels: {describe_kernels(report.compressed)}) vs original")
    ax.set_xlim(0, max(values + [1.0]) * 1.25)
    if notes:  # a slower compressed model is never shown without why
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.16 * note_lines / fig.get_figheight(), 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: CompressionReport, folder: str | Path, name: str = "compression-report") -> tuple[Path, Path]:
    """``folder/name.json`` and ``folder/name.png``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return json_path, plot_report(report, folder / f"{name}.png")
