"""examples/digits_cnn.py: the Trainer on a plain nn.Module (a CNN on scikit-learn's digits), with exact resume."""

import shutil

import pytest
import torch

pytest.importorskip("sklearn")


def test_batches_resume_where_they_left_off(digits_example):
    ex = digits_example
    images, labels = torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50)
    batches = ex.EpochBatches(images, labels, batch_size=16, seed=3)
    seen = [next(batches)[1] for _ in range(5)]  # 3 batches per epoch: crosses into epoch 1
    state = batches.state_dict()
    assert state["epoch"] == 1
    rest = [next(batches)[1] for _ in range(4)]
    restored = ex.EpochBatches(images, labels, batch_size=16, seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(a, next(restored)[1]) for a in rest)
    first_epoch = torch.cat(seen[:3])
    assert len(set(first_epoch.tolist())) == 48  # a permutation, the last partial batch dropped
    assert not torch.equal(torch.cat(seen[:3]), torch.cat([seen[3], seen[4], rest[0]]))  # reshuffled


def test_digits_cnn_trains_checkpoints_and_resumes_exactly(tmp_path, digits_example):
    ex = digits_example
    run_dir = tmp_path / "digits"
    common = [f"run_dir={run_dir}", "progress=false", "tensorboard=false", "checkpoint.every=40"]

    first = ex.main(common + ["max_steps=80"])
    assert first["step"] == 80 and first["resumed_from"] is None
    assert first["accuracy"] >= 0.9  # ~0.97-0.98 for seeds 0-4 at 80 steps
    assert first["final_eval"]["val_accuracy"] == pytest.approx(first["accuracy"])
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000040", "step-00000080"]
    weights = run_dir / "model" / "model.safetensors"
    assert weights.is_file()

    # The saved weights (BatchNorm statistics included) reproduce the reported accuracy in a fresh model.
    from safetensors.torch import load_file

    model = ex.DigitsCNN()
    model.load_state_dict(load_file(str(weights)))
    _, _, x_test, y_test = ex.load_digits_split()
    assert int(ex.confusion_matrix(model, x_test, y_test).trace()) == round(first["accuracy"] * len(y_test))

    # Lose the last checkpoint and resume from step 40: model, optimizer, schedule and the data position come
    # back, so the second half replays the uninterrupted run exactly.
    shutil.rmtree(checkpoints / "step-00000080")
    again = ex.main(common + ["max_steps=80", "checkpoint.resume=true"])
    assert again["resumed_from"] == 40 and again["step"] == 80
    assert again["loss"] == first["loss"]
    assert again["confusion_matrix"] == first["confusion_matrix"]
    assert again["final_eval"] == first["final_eval"]

    # Continue the finished run to more steps.
    longer = ex.main(common + ["max_steps=120", "checkpoint.resume=true"])
    assert longer["resumed_from"] == 80 and longer["step"] == 120
    assert longer["accuracy"] >= 0.9
    assert (checkpoints / "step-00000120").is_dir()
    from deepseek.train.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(10, 121, 10))  # one run's records, none repeated by the resumes
