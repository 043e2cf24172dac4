"""A profile's outputs: the terminal table (rich), ``summary.png`` (time breakdown + roofline) and ``profile.json``."""

from __future__ import annotations

import ast
import io
import math
from pathlib import Path
from typing import Optional

from deepseek.atomic import write_file_atomically, write_json_atomically
from deepseek.ops.breakdown import CATEGORIES

CATEGORY_LABELS = {"matmul": "matmuls (projections, experts, head)", "attention": "attention (SDPA, rotary)",
                   "moe_routing": "MoE routing (router, top-k)", "moe_dispatch_combine": "MoE dispatch + combine",
                   "loss_head": "loss / head (softmax, CE)", "optimizer": "optimizer (+ clipping, zero_grad)",
                   "data_loading": "data loading", "communication": "communication", "other": "other",
                   "prefill": "prefill", "decode": "decode"}
COLORS = {"matmul": "#4C72B0", "attention": "#DD8452", "moe_routing": "#55A868", "moe_dispatch_combine": "#8DC98F",
          "loss_head": "#C44E52", "optimizer": "#8172B3", "data_loading": "#937860", "communication": "#DA8BC3",
          "other": "#AAAAAA", "prefill": "#4C72B0", "decode": "#DD8452"}


LABELLED_POINTS = 5


def _si(value: Optional[float], unit: str = "", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".strip()


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_tables(result: dict):
    """The rich tables of a profile: the summary figures, then the breakdown (train) and expert load."""
    from rich.table import Table

    machine, peaks = result["machine"], result["peaks"]
    ranks = f", rank 0 of {result['world_size']} processes" if result.get("world_size", 1) > 1 else ""
    head = Table(title=f"ds profile {result['kind']} — {machine['cpu_model']} ({machine['capability']}, "
                       f"{machine['threads']} threads{ranks})", title_justify="left")
    head.add_column("")
    head.add_column("value", justify="right")
    head.add_column("what it is")
    precision = result["precision"]
    head.add_row("peak matmul", _si(peaks["matmul_flops"].get(precision), "FLOP/s"),
                 f"{precision} 2048² product, measured here")
    head.add_row("memory bandwidth", _si(peaks["memory_bandwidth_bytes_per_s"], "B/s"), "a + b stream, measured here")
    if result["kind"] == "train":
        head.add_row("tokens/s", _si(result["tokens_per_s"]), f"plain steps, median of {len(result['plain_step_seconds'])}")
        head.add_row("step time", f"{result['step_seconds'] * 1e3:.1f} ms", f"{result['tokens_per_step']} tokens")
        head.add_row("FLOPs/token", _si(result["flops_per_token"]),
                     f"6·N_active ({_si(result['n_active_params'])}) + 12·L·H·Dh·T attention")
        head.add_row("achieved", _si(result["achieved_flops_per_s"], "FLOP/s"), "FLOPs/token × tokens/s")
        head.add_row("MFU", _percent(result["mfu"]), f"of the {precision} peak (6·N only: {_percent(result['mfu_6n'])})")
        head.add_row("profiler overhead", _percent(result["overhead"]),
                     "median of profiled ÷ plain step − 1, paired cycles")
    else:
        head.add_row("prefill", f"{_si(result['prefill_tokens_per_s'])} tok/s",
                     f"{result['config']['batch']} × {result['config']['prompt_len']} prompt tokens")
        head.add_row("decode", f"{result['decode_seconds_per_token'] * 1e3:.2f} ms/step",
                     f"{_si(result['decode_tokens_per_s'])} tok/s over the batch")
        head.add_row("weight-streaming floor", f"{result['weight_streaming_floor_seconds'] * 1e3:.2f} ms/step",
                     "weight + KV bytes read per step ÷ bandwidth")
        head.add_row("MBU", _percent(result["mbu"]), "floor ÷ decode step time")
        head.add_row("profiler overhead", _percent(result["overhead"]), "the profiled generation ÷ plain median − 1")
        head.add_row("weights", _si(result["weight_bytes"], "B"),
                     f"{_si(result['decode_weight_bytes_per_step'], 'B')} read per decode step")
        head.add_row("KV cache", f"{_si(result['kv_cache_bytes_per_token'], 'B')}/token",
                     f"{_si(result['kv_cache_bytes'], 'B')} for the whole batch")
    memory = result["memory"]
    head.add_row("RSS peak / steady", f"{_si(memory['peak_rss_bytes'], 'B')} / {_si(memory['steady_rss_bytes'], 'B')}",
                 "resident set: high-water mark / median over the measured steps")
    if memory.get("cuda_reserved_bytes"):
        head.add_row("CUDA allocated / reserved", f"{_si(memory['cuda_allocated_bytes'], 'B')} / "
                     f"{_si(memory['cuda_reserved_bytes'], 'B')}", f"fragmentation {_percent(memory['cuda_fragmentation'])}")
    tables = [head]
    breakdown = result.get("breakdown") or {}
    if breakdown:
        total = sum(breakdown.values())
        table = Table(title="where the time goes", title_justify="left")
        table.add_column("category")
        table.add_column("ms", justify="right")
        table.add_column("share", justify="right")
        for name, seconds in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            table.add_row(CATEGORY_LABELS.get(name, name), f"{seconds * 1e3:.2f}",
                          _percent(seconds / total if total else 0.0))
        tables.append(table)
    if result.get("expert_load"):
        table = Table(title="expert load per MoE layer (measured steps)", title_justify="left")
        for column in ("layer", "CV", "max/mean", "tokens per expert"):
            table.add_column(column, justify="right" if column != "tokens per expert" else "left")
        for row in result["expert_load"]:
            counts = row["tokens_per_expert"]
            table.add_row(str(row["moe_layer"]), f"{row['cv']:.3f}", f"{row['max_over_mean']:.2f}",
                          " ".join(map(str, counts[:16])) + (" …" if len(counts) > 16 else ""))
        tables.append(table)
    return tables


def _short_op(name: str) -> str:
    name = name.replace("aten::", "")
    return "attention" if "scaled_dot_product" in name else name


def _short_shapes(shapes: str) -> str:
    """``[[4096, 256], [256, 256]]`` -> ``4096x256 @ 256x256``."""
    try:
        tensors = ast.literal_eval(shapes)
        return " @ ".join("x".join(map(str, t)) for t in tensors)
    except (ValueError, SyntaxError, TypeError):
        return shapes


def print_report(result: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    for table in render_tables(result):
        console.print(table)


# -- the picture ---------------------------------------------------------------------------------------

def summary_png(result: dict, path: Path) -> Path:
    """Time breakdown bar (left) and roofline (right): each big product's arithmetic intensity vs its achieved
    FLOP/s under the measured compute ceiling and bandwidth slope; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bar, roof) = plt.subplots(1, 2, figsize=(12, 5.4), dpi=110, gridspec_kw={"width_ratios": [1, 1.3]})
    parts = result.get("breakdown") or {}
    total = sum(parts.values()) or 1.0
    left = 0.0
    for name in [*CATEGORIES, "prefill", "decode"]:
        seconds = parts.get(name, 0.0)
        if seconds <= 0:
            continue
        bar.barh(0, seconds * 1e3, left=left * 1e3, color=COLORS.get(name), label=f"{CATEGORY_LABELS.get(name, name)} "
                 f"{100 * seconds / total:.0f}%")
        left += seconds
    bar.set_yticks([])
    bar.set_xlabel("ms per step" if result["kind"] == "train" else "ms (prefill + all decode steps)")
    bar.set_title("where the time goes")
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=7, frameon=False)

    peak = result["peaks"]["matmul_flops"].get(result["precision"]) or max(result["peaks"]["matmul_flops"].values())
    bandwidth = result["peaks"]["memory_bandwidth_bytes_per_s"]
    points = [p for p in result.get("top_ops", []) if p["flops"] > 0 and p["bytes"] > 0 and p["seconds"] > 0]
    intensities = [p["intensity_flops_per_byte"] for p in points] + [peak / bandwidth]
    lo, hi = min(intensities) / 4, max(intensities) * 4
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    roof.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black", linewidth=1.5,
              label=f"ceiling: {peak / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s (measured)")
    total_seconds = sum(p["seconds"] for p in points) or 1.0
    listed = []
    for rank, p in enumerate(sorted(points, key=lambda p: -p["seconds"])):
        xy = (p["intensity_flops_per_byte"], p["flops_per_s"])
        roof.scatter(*xy, s=20 + 400 * p["seconds"] / total_seconds, alpha=0.6)
        if rank < LABELLED_POINTS:  # numbered, listed under the plot: shape labels on the points overprint
            roof.annotate(str(rank + 1), xy, fontsize=7, xytext=(4, 2), textcoords="offset points")
            listed.append(f"{rank + 1}: {_short_op(p['op'])} {_short_shapes(p['shapes'])} ×{p['calls']}: "
                          f"{p['flops_per_s'] / 1e9:.0f} GFLOP/s, {100 * p['seconds'] / total_seconds:.0f}% of "
                          f"product time")
    roof.set_xscale("log")
    roof.set_yscale("log")
    roof.set_xlabel("arithmetic intensity (FLOP / byte)")
    roof.set_ylabel("achieved FLOP/s")
    roof.set_title(f"roofline ({result['precision']}; dot area = share of product time)")
    roof.grid(alpha=0.3, which="both")
    roof.legend(fontsize=7, loc="lower right")
    machine = result["machine"]
    fig.suptitle(f"ds profile {result['kind']}: {machine['cpu_model']} ({machine['capability']}, "
                 f"{machine['threads']} threads)", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # the bottom strip: the numbered points' list
    fig.text(0.5, 0.2, "\n".join(listed), fontsize=7, va="top", family="monospace")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_file_atomically(path, buffer.getvalue())


def write_profile_json(result: dict, path: Path) -> Path:
    return write_json_atomically(path, result)
