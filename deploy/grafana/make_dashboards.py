"""Writes the Grafana dashboards deepseek-serving.json and deepseek-training.json (and, with --png PATH, a picture
of their panel layout). The JSON files are committed; tests/deploy/test_manifests.py checks they are what this
script writes and that every query names a metric the server or the trainer exports.

    python deploy/grafana/make_dashboards.py                       # rewrite the two JSON files
    python deploy/grafana/make_dashboards.py --png docs/images/dashboards.png

Queries follow the usual Prometheus/Grafana shapes: rate() over $__rate_interval, percentiles as
histogram_quantile over summed _bucket rates, means as rate(_sum) / rate(_count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", version=~"$version"'  # every serving family carries model and version labels
QUANTILES = (0.5, 0.9, 0.99)


def rate(metric: str, by: str = "", selector: str = SEL) -> str:
    grouped = f"sum by ({by}) " if by else "sum "
    return f"{grouped}(rate({metric}{{{selector}}}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "", selector: str = SEL) -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{{{selector}}}[$__rate_interval])))"


def mean(histogram: str, selector: str = SEL) -> str:
    return (f"sum(rate({histogram}_sum{{{selector}}}[$__rate_interval])) / "
            f"sum(rate({histogram}_count{{{selector}}}[$__rate_interval]))")


def percentiles(histogram: str) -> list[tuple[str, str]]:
    return [(quantile(q, histogram), f"p{q * 100:g}") for q in QUANTILES]


class Layout:
    """Panels placed left to right in rows of 24 grid units, each of ``width`` x 8, under collapsible rows."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x, self.y = 0, 0

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", width: int = 12,
              description: str = "", kind: str = "timeseries", max_value: Optional[float] = None) -> None:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + 8
        defaults: dict[str, Any] = {"unit": unit}
        if max_value is not None:
            defaults.update(min=0, max=max_value)
        self.panels.append({
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1,
            "datasource": DATASOURCE, "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                        for i, (expr, legend) in enumerate(targets)],
        })
        self.x += width


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1}


def textbox(name: str, label: str, value: str, description: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "textbox", "query": value, "description": description,
            "current": {"text": value, "value": value}, "hide": 0}


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict]) -> dict:
    return {"uid": uid, "title": title, "description": description, "tags": ["deepseek"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser", "graphTooltip": 1, "annotations": {"list": []},
            "templating": {"list": variables}, "panels": panels}


def serving_dashboard() -> dict:
    lay = Layout()
    lay.row("Traffic")
    lay.panel("Request rate by outcome", [(rate("ds_inference_requests_total", "outcome"), "{{outcome}}")], "reqps",
              description="Inference requests per second by outcome (success, invalid, rejected = queue full, "
                          "timeout, cancelled, unavailable, error).")
    lay.panel("Successful requests by version", [(rate("ds_inference_requests_total", "model, version",
                                                       SEL + ', outcome="success"'), "{{model}} v{{version}}")],
              "reqps", description="Per-version split: a canary next to the stable version.")
    lay.panel("Refused before a model", [(rate("ds_inference_refused_total", "status", ""), "{{status}}")], "reqps",
              description="Malformed requests, unknown models or versions, not ready, missing API key.")
    lay.panel("Requests held per pod", [
        ("sum by (pod) (ds_inference_queue_size{%s} + ds_inference_requests_running{%s})" % (SEL, SEL),
         "{{pod}}"),
        ("count(count by (pod) (ds_model_ready{%s}))" % SEL, "pods")],
        description="Queued + computing requests of the dynamic batcher per pod: what the HPA scales on "
                    "(deploy/kubernetes/hpa.yaml), and the number of pods serving.")
    lay.row("Latency")
    lay.panel("Request latency", percentiles("ds_inference_request_duration_seconds"), "s",
              description="Server-side, parsed to answered, successful requests.")
    lay.panel("Latency p99 by version", [(quantile(0.99, "ds_inference_request_duration_seconds", "model, version"),
                                          "{{model}} v{{version}}")], "s")
    lay.panel("Queue vs compute time (mean)", [(mean("ds_inference_queue_duration_seconds"), "queue"),
                                              (mean("ds_inference_compute_duration_seconds"), "compute"),
                                              (quantile(0.99, "ds_inference_queue_duration_seconds"), "queue p99")],
              "s", description="Where a request's time goes: waiting for a batch vs computing it.")
    lay.panel("Batch size (mean rows per batch)", [(mean("ds_inference_batch_size"), "mean rows")],
              description="rate(sum) / rate(count) of ds_inference_batch_size.")
    lay.panel("Queue and instances", [
        ("sum by (model, version) (ds_inference_queue_size{%s})" % SEL, "queued {{model}} v{{version}}"),
        ("sum by (model, version) (ds_inference_requests_running{%s})" % SEL, "running {{model}} v{{version}}"),
        ("sum(ds_instances_busy{%s}) / sum(ds_instances{%s})" % (SEL, SEL), "instances busy (fraction)")])
    lay.panel("Models ready", [("sum by (model, version) (ds_model_ready{%s})" % SEL, "{{model}} v{{version}}")],
              description="Pods on which each version is READY.")
    lay.row("Generation (language models)")
    lay.panel("Time to first token", percentiles("ds_generation_time_to_first_token_seconds"), "s", width=8)
    lay.panel("Inter-token latency", percentiles("ds_generation_inter_token_latency_seconds"), "s", width=8)
    lay.panel("End-to-end latency", percentiles("ds_generation_e2e_latency_seconds"), "s", width=8)
    lay.panel("Tokens per second", [(rate("ds_generation_prompt_tokens_total"), "prompt"),
                                    (rate("ds_generation_completion_tokens_total"), "completion")], "short",
              width=8)
    lay.panel("KV cache and sequences", [
        ("max by (model, version) (ds_generation_kv_cache_utilization{%s})" % SEL, "KV used {{model}} v{{version}}")],
        "percentunit", width=8, max_value=1,
        description="Fraction of the preallocated KV cache holding live tokens (worst pod).")
    lay.panel("Running and waiting sequences", [
        ("sum(ds_generation_running_sequences{%s})" % SEL, "running"),
        ("sum(ds_generation_waiting_sequences{%s})" % SEL, "waiting"),
        ("sum(ds_generation_max_running_sequences{%s})" % SEL, "slots")], width=8)
    lay.panel("Finish reasons", [(rate("ds_generation_requests_total", "finish_reason"), "{{finish_reason}}")],
              "reqps")
    lay.panel("Completion tokens by LoRA adapter", [(rate("ds_generation_adapter_completion_tokens_total",
                                                          "adapter"), "{{adapter}}")], "short",
              description="Multi-LoRA serving; '' is the base model.")
    lay.row("Embeddings and retrieval")
    lay.panel("Embeddings", [(rate("ds_embedding_requests_total"), "requests/s"),
                             (rate("ds_embedding_inputs_total"), "texts/s"),
                             (rate("ds_embedding_tokens_total"), "tokens/s")], "short", width=8)
    lay.panel("Retrieval requests by mode", [(rate("ds_retrieval_requests_total", "mode"), "{{mode}}"),
                                             (rate("ds_retrieval_queries_total"), "queries")], "reqps", width=8)
    lay.panel("Retrieval latency", [(quantile(0.5, "ds_retrieval_request_duration_seconds"), "p50"),
                                    (quantile(0.99, "ds_retrieval_request_duration_seconds"), "p99"),
                                    (quantile(0.99, "ds_retrieval_search_duration_seconds"), "search p99")], "s",
              width=8)
    variables = [datasource_variable(),
                 query_variable("model", "Model", "label_values(ds_model_ready, model)"),
                 query_variable("version", "Version", 'label_values(ds_model_ready{model=~"$model"}, version)')]
    return dashboard("deepseek-serving", "deepseek: serving",
                     "ds serve's Prometheus metrics (docs/serving.md, docs/operations.md#dashboards).",
                     lay.panels, variables)


def training_dashboard() -> dict:
    sel = 'job=~"$job"'
    lay = Layout()
    lay.row("Progress")
    lay.panel("Loss", [(f"ds_train_loss{{{sel}}}", "train {{pod}}"), (f"ds_train_val_loss{{{sel}}}", "validation"),
                       (f"ds_train_aux_loss{{{sel}}}", "MoE aux loss")])
    lay.panel("Tokens per second", [(f"ds_train_tokens_per_second{{{sel}}}", "{{pod}}")], "short",
              description="Over the last logging window, all data-parallel ranks together.")
    lay.panel("MFU", [(f"ds_train_mfu{{{sel}}}", "logged"),
                      (f"ds_train_tokens_per_second{{{sel}}} * $flops_per_token / $peak_flops", "from tokens/s")],
              "percentunit", max_value=1,
              description="'logged' appears when the trainer writes an mfu field; 'from tokens/s' is tokens/s x "
                          "the FLOPs per token (6 x active parameters) / the device peak in FLOP/s (the profiler "
                          "measures it, docs/operations.md): set both variables, 0 leaves the line at 0.")
    lay.panel("Step", [(f"ds_train_step{{{sel}}}", "step"),
                       (f"rate(ds_train_step{{{sel}}}[$__rate_interval])", "steps/s")])
    lay.row("Optimizer")
    lay.panel("Gradient norm", [(f"ds_train_grad_norm{{{sel}}}", "grad norm"),
                                (f"ds_train_clip_threshold{{{sel}}}", "clip threshold")], width=8)
    lay.panel("Learning rate", [(f"ds_train_learning_rate{{{sel}}}", "lr")], width=8)
    lay.panel("Sequence length", [(f"ds_train_sequence_length{{{sel}}}", "tokens per row")], width=8)
    lay.row("Mixture of experts")
    lay.panel("Expert load (most loaded / mean, worst layer)",
              [(f"ds_train_expert_load_max_over_mean{{{sel}}}", "max / mean")], width=24,
              description="1 = perfectly balanced; 2 = one expert gets twice its share. The trainer logs the "
                          "worst layer; the profiler reports every layer (docs/operations.md).")
    variables = [datasource_variable(),
                 query_variable("job", "Scrape job", "label_values(ds_train_step, job)"),
                 textbox("flops_per_token", "FLOPs per token", "0", "6 x active parameters (training)"),
                 textbox("peak_flops", "Peak FLOP/s", "1", "the device's measured peak (the profiler's report)")]
    return dashboard("deepseek-training", "deepseek: training",
                     "ds train's metrics_port gauges (docs/training.md, docs/operations.md#dashboards).",
                     lay.panels, variables)


DASHBOARDS = {"deepseek-serving.json": serving_dashboard, "deepseek-training.json": training_dashboard}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def draw_layout(path: Path) -> None:
    """A PNG of both dashboards' panel grids (title per panel, rows shaded), from their gridPos."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    boards = [build() for build in DASHBOARDS.values()]
    heights = [max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in b["panels"]) for b in boards]
    fig, axes = plt.subplots(1, len(boards), figsize=(16, 9), gridspec_kw={"width_ratios": [1] * len(boards)})
    for ax, board, height in zip(axes, boards, heights):
        for p in board["panels"]:
            g = p["gridPos"]
            row = p["type"] == "row"
            ax.add_patch(Rectangle((g["x"] + 0.15, g["y"] + 0.1), g["w"] - 0.3, g["h"] - 0.2,
                                   facecolor="#dde4ee" if row else "#f7f7f7", edgecolor="#555555", lw=0.8))
            ax.text(g["x"] + g["w"] / 2, g["y"] + (0.55 if row else 1.2), p["title"], ha="center", va="center",
                    fontsize=7 if not row else 8, weight="bold" if row else "normal", wrap=True)
            if not row:
                names = sorted({t["legendFormat"] for t in p["targets"]})
                ax.text(g["x"] + g["w"] / 2, g["y"] + 4.5, "\n".join(names[:4]), ha="center", va="center",
                        fontsize=5.5, color="#666666")
        ax.set_xlim(0, 24)
        ax.set_ylim(height, 0)
        ax.set_aspect("auto")
        ax.axis("off")
        ax.set_title(f"{board['title']}  (Grafana, {len([p for p in board['panels'] if p['type'] != 'row'])} "
                     f"panels)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, help="also draw the panel layout of both dashboards to this PNG")
    args = parser.parse_args()
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))
        print(f"wrote {HERE / name}")
    if args.png:
        draw_layout(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
