"""examples/fraud: the generator, then a miniature run end to end (train -> score -> INT8 ONNX -> ds serve)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # the example package `fraud`

from fraud import training  # noqa: E402
from fraud.features import N_FEATURES, windows_tensor  # noqa: E402
from fraud.generate import generate  # noqa: E402
from fraud.metrics import pr_auc, summary  # noqa: E402
from fraud.model import FraudLSTM  # noqa: E402

DAYS = 60


@pytest.fixture(scope="module")
def mini():
    return training.load_dataset(generate(accounts=120, days=DAYS, seed=0), DAYS)


def test_generator_is_seeded_with_rare_bursty_fraud():
    a, b = generate(accounts=40, days=30, seed=1), generate(accounts=40, days=30, seed=1)
    assert np.array_equal(a.amount, b.amount) and np.array_equal(a.is_fraud, b.is_fraud)
    assert not np.array_equal(a.amount[:50], generate(accounts=40, days=30, seed=2).amount[:50])
    tx = generate(accounts=300, days=60, seed=0)
    assert 0.002 <= tx.is_fraud.mean() <= 0.012
    assert (np.diff(tx.time) >= 0).all()
    fraud_accounts = np.unique(tx.account[tx.is_fraud == 1])
    assert tx.is_fraud.sum() >= 2 * len(fraud_accounts)  # bursts: several fraudulent transactions per account


def test_miniature_run_beats_trivial_baseline_and_serves_int8(mini, tmp_path):
    import httpx

    import deepseek as ds
    from fraud.serving import add_to_repository, export_model, fraud_probabilities, infer_body, onnx_scores

    torch.manual_seed(0)
    model = FraudLSTM(N_FEATURES, hidden=16, layers=1)
    training.train_model(model, mini, tmp_path / "run", steps=40, batch_size=64, lr=1e-2,
                         overrides=("progress=false", "tensorboard=false"))
    y_val, s_val = training.predict(model, mini, "val")
    y_test, s_test = training.predict(model, mini, "test")
    positive_rate = y_test.mean()
    assert 0 < positive_rate < 0.05
    metrics = summary(y_val, s_val, y_test, s_test)
    assert metrics["test_pr_auc"] > 2 * positive_rate  # the trivial (constant-score) model's PR-AUC is the rate
    assert metrics["test_fpr_reached"] < 0.05

    exported = export_model(model, training.WINDOW, N_FEATURES, tmp_path / "onnx", int8=True, validate=False)
    int8_file = tmp_path / "onnx" / "model.int8.onnx"
    idx, _ = mini.windows("test")
    x_test = windows_tensor(mini.inputs_NF, idx)
    assert pr_auc(y_test, onnx_scores(int8_file, x_test)) > 2 * positive_rate  # INT8 still ranks fraud first
    repo = tmp_path / "repository"
    add_to_repository(repo, "fraud_student", int8_file, exported["report"])

    with ds.serve(str(repo), port=0, block=False) as server:
        url = f"{server.url}/v2/models/fraud_student/infer"
        answer = httpx.post(url, json=infer_body(x_test[:3]), timeout=30)
        assert answer.status_code == 200
        served = fraud_probabilities(answer.json())
        assert np.allclose(served, onnx_scores(int8_file, x_test[:3]), atol=1e-5)
        malformed = [
            {"inputs": [{"name": "transactions", "shape": [1, 3], "datatype": "FP32", "data": [0.0, 1.0, 2.0]}]},
            {"inputs": [{"name": "amounts", "shape": list(x_test[:1].shape), "datatype": "FP32",
                         "data": x_test[:1].reshape(-1).tolist()}]},
            {"inputs": [{"name": "transactions", "shape": list(x_test[:1].shape), "datatype": "FP32",
                         "data": ["x"] * x_test[:1].numel()}]},
        ]
        for body in malformed:
            bad = httpx.post(url, json=body, timeout=30)
            assert 400 <= bad.status_code < 500 and bad.json()["error"], body
        assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400


def test_a_step_run_too_early_is_a_one_line_error(tmp_path, capsys):
    from fraud import run

    with pytest.raises(SystemExit) as exit_info:
        run.main(["evaluate", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and "run.py prepare" in message and "\n" not in message
