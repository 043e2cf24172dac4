"""metrics_port: a real tiny training run serves its metrics.jsonl records as ds_train_* gauges on /metrics."""

import socket

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from deepseek.config import ConfigError  # noqa: E402
from deepseek.errors import UserFacingError  # noqa: E402
from deepseek.train.config import load_train_config  # noqa: E402
from deepseek.train.lm import train_lm  # noqa: E402
from deepseek.train.metrics import read_metrics  # noqa: E402
from deepseek.train.prometheus import (TRAIN_GAUGES, TrainingMetricsExporter, stop_training_exporter,  # noqa: E402
                                       training_exporter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_two_step_run_exports_its_last_records_as_gauges(tmp_path, lm_data):
    port = free_port()
    cfg = load_train_config(None, [f"run_dir={tmp_path}", f"data.path={lm_data}", "max_steps=2", "batch_size=4",
                                   "precision=fp32", "log_every=1", "eval_every=0", "data.seq_len=32",
                                   "data.eval_batches=1", "progress=false", "tensorboard=false",
                                   "checkpoint.every=0", "checkpoint.save_final=false", f"metrics_port={port}"])
    try:
        train_lm(cfg)
        scraped = scrape(port)  # the server outlives the run: a finished Job's last values stay scrapable
    finally:
        stop_training_exporter(port)
    records = read_metrics(tmp_path)
    last_train = [r for r in records if "loss" in r][-1]
    final_eval = [r for r in records if "val_loss" in r][-1]
    assert last_train["step"] == 2
    expected = {TRAIN_GAUGES[key][0]: float(value) for record in (last_train, final_eval)
                for key, value in record.items() if key in TRAIN_GAUGES}
    for name in ("ds_train_loss", "ds_train_tokens_per_second", "ds_train_grad_norm", "ds_train_learning_rate",
                 "ds_train_step", "ds_train_expert_load_max_over_mean", "ds_train_val_loss"):
        assert name in expected, name
    assert {name: scraped[name] for name in expected} == expected
    # only what the records carry: no MFU is logged by the trainer, so none is exported (no misleading 0), and
    # nothing of the serving registry or the process collector leaks in
    assert "ds_train_mfu" not in scraped
    assert not [name for name in scraped if not name.startswith("ds_train_")]


def test_non_numeric_and_non_finite_fields_are_left_out():
    exporter = TrainingMetricsExporter()
    exporter.update({"step": 3, "loss": float("nan"), "skipped": True, "clipped": False, "lr": 1e-3, "note": "x"})
    exporter.update({"mfu": 0.25})
    text = exporter.render().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {"ds_train_step": 3.0, "ds_train_learning_rate": 1e-3, "ds_train_mfu": 0.25}


def test_a_busy_port_and_a_bad_port_are_one_line_errors(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserFacingError, match=f"metrics_port {port}: cannot listen on 127.0.0.1:{port}"):
            training_exporter("127.0.0.1", port)
    with pytest.raises(ConfigError, match="metrics_port must be 0"):
        load_train_config(None, [f"run_dir={tmp_path}", "metrics_port=70000"])
