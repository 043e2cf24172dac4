"""What a compression cost and bought: the compressed model directory measured against its original.

Parameters, bytes on disk, CPU forward latency at batch 1 and 8 (``seq_len`` tokens per row), greedy decoding
tokens/s at batch 1, and validation perplexity on a prepared data directory. Both models are timed in
alternating rounds in the same process, so a busy machine slows both alike and the ratios hold.

    report = compare("runs/quickstart/model", "runs/int8", data="runs/quickstart/data")
    print_report(report); write_report(report, "runs/int8")     # compression-report.json + .png
"""

from __future__ import annotations

import json
import statistics
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


@dataclass
class CompressionReport:
    original: ModelMeasurement
    compressed: ModelMeasurement
    settings: dict[str, Any] = field(default_factory=dict)

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
                "ratios": {k: round(v, 4) for k, v in self.ratios().items()}, "settings": self.settings}


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


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
                                      loaded[name][0].num_parameters(), weight_bytes(path))
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
    settings = {"seq_len": seq_len, "rounds": rounds, "decode_tokens": decode_tokens, "eval_batches": eval_batches,
                "eval_seq_len": eval_seq_len, "data": str(data) if data else None, "threads": torch.get_num_threads()}
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
    return table


def print_report(report: CompressionReport) -> None:
    from rich.console import Console

    Console().print(report_table(report))


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
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(keys) + 1.5), dpi=120)
    ax.barh(labels, values, color=["tab:green" if b else "tab:red" for b in better])
    ax.axvline(1.0, color="black", linewidth=1)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("compressed / original")
    ax.set_title(f"{report.compressed.method} vs original")
    ax.set_xlim(0, max(values + [1.0]) * 1.25)
    fig.tight_layout()
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
