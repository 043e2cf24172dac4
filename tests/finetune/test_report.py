"""`ds finetune report RUN_DIR`: a PNG of loss terms, rewards and KL from metrics.jsonl."""

import json
from pathlib import Path

import pytest

from deepseek.config import ConfigError
from deepseek.finetune.report import PANELS, plot_finetune_report, series

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"step": s, "loss": 1.0 / s, "loss/sft": 2.0 / s, "loss/rl": -0.1, "loss/total": 1.0 / s,
                "rl/rewards/parses": 0.1 * s, "rl/kl": 0.01 * s, "dpo/rewards/accuracy": 0.5, "lr": 1e-3,
                "skipped": False} for s in range(1, 5)]
    records.append({"step": 4, "val_sft/loss": 0.3})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_each_panel_picks_its_figures(tmp_path):
    write_metrics(tmp_path)
    from deepseek.train.metrics import read_metrics
    records = read_metrics(tmp_path)
    picked = {title: set(series(records, wanted)) for title, _, wanted in PANELS}
    assert picked["losses"] == {"loss", "loss/sft", "loss/rl", "loss/total", "val_sft/loss"}
    assert picked["rewards"] == {"rl/rewards/parses", "dpo/rewards/accuracy"}
    assert picked["KL to the reference"] == {"rl/kl"}
    assert series(records, lambda key: key == "rl/kl")["rl/kl"] == [(s, 0.01 * s) for s in range(1, 5)]


def test_the_report_is_a_png(tmp_path):
    write_metrics(tmp_path / "run")
    out = plot_finetune_report(tmp_path / "run")
    assert out == tmp_path / "run" / "report.png" and out.read_bytes().startswith(PNG)


def test_a_run_dir_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plot_finetune_report(tmp_path)


def test_the_cli_writes_the_png_where_asked(tmp_path, ds_main):
    write_metrics(tmp_path / "run")
    result = ds_main("finetune", "report", tmp_path / "run", "--out", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").read_bytes().startswith(PNG)
