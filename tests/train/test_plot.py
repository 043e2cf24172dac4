"""The loss-curve PNG is drawn from metrics.jsonl."""

import json

from deepseek.train.plot import plot_loss_curve


def test_plot_loss_curve_writes_a_png(tmp_path):
    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 21)] + [{"step": 10, "val_loss": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = plot_loss_curve(tmp_path)
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
