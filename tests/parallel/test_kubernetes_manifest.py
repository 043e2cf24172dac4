"""The Kubernetes example is a PyTorchJob whose command is a valid `python -m deepseek.train` run for its size."""

from pathlib import Path

import yaml

from deepseek.train.config import load_train_config

from .runs import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "pytorchjob.yaml"


def test_the_pytorchjob_runs_deepseek_train_with_a_layout_that_fits_its_ranks():
    job = yaml.safe_load(MANIFEST.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    command = container["command"]
    assert command[:3] == ["torchrun", "-m", "deepseek.train"]
    config = load_train_config(ROOT / command[3], command[4:])  # unknown keys or bad values would raise here
    ranks = worker["replicas"] * int(job["spec"]["nprocPerNode"])
    assert config.parallel.degrees(ranks)["dp_replicate"] == worker["replicas"]
    assert config.batch_size % config.parallel.data_parallel_size(ranks) == 0
    assert config.checkpoint.resume and Path(config.run_dir).is_absolute()  # restarts continue from shared storage
