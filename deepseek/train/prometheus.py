"""Training metrics for Prometheus: rank 0 mirrors each ``metrics.jsonl`` record as ``ds_train_*`` gauges.

    exporter = training_exporter("127.0.0.1", 9400)   # TrainConfig(metrics_port=9400) does this on rank 0
    exporter.update({"step": 10, "loss": 2.31, "tokens_per_s": 5120.0, "lr": 3e-4, "grad_norm": 0.9})
    # curl 127.0.0.1:9400/metrics  ->  ds_train_loss 2.31, ds_train_step 10, ...
    stop_training_exporter(9400)

The gauges live in a registry of their own (no process or Python collectors, nothing of the serving metrics)
and a family appears only once a record carried its field: a run that logs no MFU exports no ``ds_train_mfu``
rather than a misleading 0. The HTTP server outlives the run that started it (a Job's last values stay
scrapable until the process exits); one server per port is shared by the runs of one process.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterable, Optional

from deepseek.errors import UserFacingError

# metrics.jsonl field -> (gauge, help). Dashboards (deploy/grafana/deepseek-training.json) read these names.
TRAIN_GAUGES: dict[str, tuple[str, str]] = {
    "step": ("ds_train_step", "Optimizer steps done."),
    "loss": ("ds_train_loss", "Training loss of the last logged step (mean over micro-batches and ranks)."),
    "aux_loss": ("ds_train_aux_loss", "MoE load-balancing auxiliary loss of the last logged step."),
    "tokens_per_s": ("ds_train_tokens_per_second", "Tokens per second over the last logging window (all ranks)."),
    "samples_per_s": ("ds_train_samples_per_second", "Samples per second over the last logging window (all ranks)."),
    "mfu": ("ds_train_mfu", "Model FLOPs utilisation (0-1), when the trainer logs it."),
    "grad_norm": ("ds_train_grad_norm", "Gradient norm before clipping."),
    "clip_threshold": ("ds_train_clip_threshold", "Gradient clipping threshold in force."),
    "lr": ("ds_train_learning_rate", "Learning rate of the step."),
    "expert_load_max_over_mean": ("ds_train_expert_load_max_over_mean", "Most loaded expert's token share over the "
                                  "mean share, worst MoE layer (1 = balanced)."),
    "seq_len": ("ds_train_sequence_length", "Tokens per row (the curriculum's current length)."),
    "val_loss": ("ds_train_val_loss", "Validation loss of the last evaluation."),
    "val_bits_per_byte": ("ds_train_val_bits_per_byte", "Validation bits per byte of the last evaluation."),
}


class TrainingMetricsExporter:
    """The last value of every known record field, rendered as gauges when scraped."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        self.registry.register(self)
        self.server: Any = None
        self.thread: Optional[threading.Thread] = None

    def update(self, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record (unknown, non-numeric and non-finite fields are left out)."""
        values = {key: float(value) for key, value in record.items()
                  if key in TRAIN_GAUGES and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)}
        with self._lock:
            self._values.update(values)

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            values = dict(self._values)
        for key, (name, help_text) in TRAIN_GAUGES.items():
            if key in values:
                yield GaugeMetricFamily(name, help_text, value=values[key])

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_EXPORTERS: dict[int, TrainingMetricsExporter] = {}
_EXPORTERS_LOCK = threading.Lock()


def training_exporter(host: str, port: int) -> TrainingMetricsExporter:
    """The exporter serving ``http://host:port/metrics``, started on first use (one per port per process)."""
    try:
        from prometheus_client import start_http_server
    except ImportError:
        raise UserFacingError("metrics_port needs prometheus-client: pip install 'deepseek-framework[serve]'") \
            from None
    with _EXPORTERS_LOCK:
        exporter = _EXPORTERS.get(port)
        if exporter is not None:
            return exporter
        exporter = TrainingMetricsExporter()
        try:
            exporter.server, exporter.thread = start_http_server(port, addr=host, registry=exporter.registry)
        except OSError as exc:
            raise UserFacingError(f"metrics_port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") \
                from None
        _EXPORTERS[port] = exporter
        return exporter


def stop_training_exporter(port: int) -> None:
    """Close the exporter on ``port`` (if any) and free the port."""
    with _EXPORTERS_LOCK:
        exporter = _EXPORTERS.pop(port, None)
    if exporter is not None and exporter.server is not None:
        exporter.server.shutdown()
        exporter.server.server_close()
