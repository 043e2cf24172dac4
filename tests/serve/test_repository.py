"""Model repository: config.yaml parsing, version policies, scanning (broken models included), polling."""

import shutil
import textwrap

import pytest
import torch

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.serve.batching import DynamicBatcher
from deepseek.serve.config import (DynamicBatchingConfig, ServingConfig, TensorSpec, VersionPolicy, load_serving_config,
                                   parse_serving_config, torch_dtype)
from deepseek.serve.repository import ModelRepository, RepositoryWatcher

EXAMPLE = """\
backend: onnx            # file 1/model.onnx
max_batch_size: 64
inputs:  [{name: x, datatype: FP32, shape: [32]}]
outputs: [{name: y, datatype: FP32, shape: [10]}]
dynamic_batching: {max_queue_delay_ms: 5, max_queue_size: 1024}
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    ds.save(ds.MoETransformer(ds.preset("tiny")), ds.byte_tokenizer(), path)
    return path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def onnx_model(repo, name, versions, extra=""):
    write(repo / name / "config.yaml", EXAMPLE + extra)
    for v in versions:
        write(repo / name / str(v) / "model.onnx", "")


# -- config ----------------------------------------------------------------------------------------

def test_example_config_parses(tmp_path):
    config = load_serving_config(write(tmp_path / "config.yaml", EXAMPLE))
    assert config.backend == "onnx" and config.max_batch_size == 64 and config.instances == 1
    assert config.inputs == [TensorSpec("x", "FP32", [32])]
    assert config.outputs[0].name == "y" and config.outputs[0].dtype == torch.float32
    assert config.dynamic_batching == DynamicBatchingConfig(max_queue_delay_ms=5.0, max_queue_size=1024)
    assert config.version_policy == VersionPolicy() and config.version_policy.kind == "latest"
    # The batching section maps straight onto the DynamicBatcher.
    DynamicBatcher(lambda inputs: inputs, **config.batcher_kwargs())
    assert config.batcher_kwargs()["timeout_ms"] == 5.0


def test_deepseek_backend_needs_nothing_else():
    assert parse_serving_config({"backend": "deepseek"}) == ServingConfig(backend="deepseek")


def test_unknown_key_lists_valid_keys(tmp_path):
    file = write(tmp_path / "config.yaml", EXAMPLE + "max_batchsize: 3\n")
    with pytest.raises(ConfigError, match="max_batchsize") as info:
        load_serving_config(file)
    assert str(file) in str(info.value) and "valid keys: backend, max_batch_size" in str(info.value)
    with pytest.raises(ConfigError, match=r"dynamic_batching\.delay.*valid keys: max_queue_delay_ms"):
        parse_serving_config({"backend": "deepseek", "max_batch_size": 4, "dynamic_batching": {"delay": 1}})


@pytest.mark.parametrize("data, message", [
    ({"backend": "tensorflow"}, "not one of 'deepseek', 'torch', 'onnx'"),
    ({}, "missing key backend"),
    ({"backend": "onnx"}, "needs inputs and outputs"),
    ({"backend": "deepseek", "inputs": [{"name": "x", "datatype": "FLOAT32", "shape": [3]}]}, "FLOAT32.*FP32"),
    ({"backend": "deepseek", "inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 3]}]}, r"invalid dims \[0\]"),
    ({"backend": "deepseek", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "invalid dims"),
    ({"backend": "deepseek", "inputs": [{"name": "x", "datatype": "FP32", "shape": "3"}]}, "expected a list"),
    ({"backend": "deepseek", "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}] * 2}, "duplicate names x"),
    ({"backend": "deepseek", "max_batch_size": -1}, "max_batch_size must be >= 0"),
    ({"backend": "deepseek", "instances": 0}, "instances must be >= 1"),
    ({"backend": "deepseek", "dynamic_batching": {}}, "needs max_batch_size >= 1"),
    ({"backend": "deepseek", "max_batch_size": 8, "dynamic_batching": {"preferred_batch_sizes": [4, 16]}},
     r"\[16\] exceed max_batch_size 8"),
    ({"backend": "deepseek", "version_policy": {"latest": 2, "all": True}}, "exactly one of"),
    ({"backend": "deepseek", "version_policy": {"latest": 0}}, "latest must be >= 1"),
])
def test_invalid_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_serving_config(data)


def test_dynamic_dims_and_datatypes():
    spec = TensorSpec("tokens", "INT64", [-1], pad_value=0)
    assert spec.shape == [-1] and spec.dtype == torch.int64
    assert torch_dtype("BF16") == torch.bfloat16 and torch_dtype("BYTES") is None
    with pytest.raises(ConfigError, match="not one of"):
        torch_dtype("fp32")
    config = parse_serving_config({"backend": "torch", "max_batch_size": 4, "dynamic_batching": {},
                                   "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1], "pad_value": 0}],
                                   "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 256]}]})
    assert config.batcher_kwargs()["pad_values"] == {"tokens": 0.0}


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serving_config(write(tmp_path / "a.yaml", "backend: [onnx\n"))
    with pytest.raises(ConfigError, match="missing key backend"):
        load_serving_config(write(tmp_path / "b.yaml", ""))
    with pytest.raises(ConfigError, match="cannot read"):
        load_serving_config(tmp_path / "none.yaml")


def test_version_policies():
    assert VersionPolicy().select([5, 1, 2]) == [5]
    assert VersionPolicy(latest=2).select([1, 2, 5]) == [2, 5]
    assert VersionPolicy(latest=9).select([1, 2]) == [1, 2]
    assert VersionPolicy(all=True).select([2, 1]) == [1, 2]
    # A specific version not on disk is dropped, not an error (the model is unavailable only if none is left).
    assert VersionPolicy(specific=[1, 3]).select([1, 2]) == [1]
    assert VersionPolicy(specific=[3]).select([1, 2]) == []
    assert VersionPolicy().select([]) == []


# -- repository ------------------------------------------------------------------------------------

def test_scan(tmp_path, tiny_model_dir):
    onnx_model(tmp_path, "mlp", [1, 2, 5], "version_policy: {latest: 2}\n")
    shutil.copytree(tiny_model_dir, tmp_path / "lm" / "1")  # no config.yaml: implicit backend deepseek
    (tmp_path / "lm" / "3").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "mlp" / "latest").mkdir()  # not numeric
    (tmp_path / "mlp" / "07").mkdir()  # not canonical
    (tmp_path / "mlp" / ".9").mkdir()  # hidden
    (tmp_path / "mlp" / "9").write_text("")  # a file, not a folder
    (tmp_path / ".cache" / "1").mkdir(parents=True)  # hidden model folder
    (tmp_path / "README.md").write_text("")

    repo = ModelRepository(tmp_path)
    entries = repo.scan()
    assert list(entries) == ["lm", "mlp"]
    mlp, lm = entries["mlp"], entries["lm"]
    assert mlp.error is None and mlp.config.backend == "onnx"
    assert mlp.versions == [1, 2, 5] and mlp.selected == [2, 5]
    assert lm.error is None and lm.config == ServingConfig(backend="deepseek") and lm.config_hash is None
    assert lm.versions == [1, 3] and lm.selected == [3]
    assert repo.version_path("lm", 3) == tmp_path / "lm" / "3"
    assert ds.load(repo.version_path("lm", 1))[0].config == ds.preset("tiny")
    for name, version in (("../etc", 1), ("a/b", 1), ("lm", 0), ("lm", "1")):
        with pytest.raises(ValueError):
            repo.version_path(name, version)
    assert repo.index() == [{"name": "lm", "version": "3", "state": None, "reason": ""},
                            {"name": "mlp", "version": "2", "state": None, "reason": ""},
                            {"name": "mlp", "version": "5", "state": None, "reason": ""}]


def test_broken_models_are_reported_not_raised(tmp_path):
    onnx_model(tmp_path, "good", [1])
    write(tmp_path / "bad" / "config.yaml", "backend: onnx\nmax_batch_size: many\n")
    (tmp_path / "bad" / "1").mkdir()
    (tmp_path / "bad" / "2").mkdir()
    (tmp_path / "noconfig" / "1").mkdir(parents=True)  # not a model directory either
    onnx_model(tmp_path, "noversions", [])
    onnx_model(tmp_path, "pinned", [1, 2], "version_policy: {specific: [7]}\n")

    entries = ModelRepository(tmp_path).scan()
    assert entries["good"].error is None
    bad = entries["bad"]
    assert bad.config is None and bad.versions == [1, 2] and bad.selected == []
    assert "max_batch_size" in bad.error and str(tmp_path / "bad" / "config.yaml") in bad.error
    assert "config.yaml is missing" in entries["noconfig"].error
    assert "no version folders" in entries["noversions"].error
    assert "selects none" in entries["pinned"].error and entries["pinned"].versions == [1, 2]

    index = ModelRepository(tmp_path).index()
    bad_rows = [r for r in index if r["name"] == "bad"]
    assert [r["version"] for r in bad_rows] == ["1", "2"]
    assert all(r["state"] == "UNAVAILABLE" and "max_batch_size" in r["reason"] for r in bad_rows)
    assert [r for r in index if r["name"] == "noversions"] == [
        {"name": "noversions", "version": None, "state": "UNAVAILABLE", "reason": entries["noversions"].error}]
    assert {"name": "good", "version": "1", "state": None, "reason": ""} in index


def test_invalid_model_names_are_ignored_with_a_warning(tmp_path):
    onnx_model(tmp_path, "ok.v2_x-y", [1])
    onnx_model(tmp_path, "has space", [1])
    repo = ModelRepository(tmp_path)
    with pytest.warns(UserWarning, match="has space"):
        assert list(repo.scan()) == ["ok.v2_x-y"]


def test_watcher(tmp_path, tiny_model_dir):
    onnx_model(tmp_path, "mlp", [1, 2], "version_policy: {all: true}\n")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "1").symlink_to(tiny_model_dir, target_is_directory=True)
    watcher = RepositoryWatcher(tmp_path)

    first = watcher.poll()
    assert first.added == [("lm", 1), ("mlp", 1), ("mlp", 2)] and not first.removed and not first.changed_config
    assert not watcher.poll()

    (tmp_path / "mlp" / "3").mkdir()
    (tmp_path / "mlp" / "v4").mkdir()  # ignored
    (tmp_path / ".hidden" / "1").mkdir(parents=True)  # ignored
    changes = watcher.poll()
    assert changes.added == [("mlp", 3)] and not changes.removed and not changes.changed_config

    shutil.rmtree(tmp_path / "mlp" / "1")
    changes = watcher.poll()
    assert changes.removed == [("mlp", 1)] and not changes.added

    # Latest 1: version 3 stays, 2 goes; and the config itself changed.
    write(tmp_path / "mlp" / "config.yaml", EXAMPLE + "version_policy: {latest: 1}\n")
    changes = watcher.poll()
    assert changes.changed_config == ["mlp"] and changes.removed == [("mlp", 2)] and not changes.added

    write(tmp_path / "mlp" / "config.yaml", EXAMPLE + "instances: 2\n")  # same versions, new config
    changes = watcher.poll()
    assert changes.changed_config == ["mlp"] and not changes.added and not changes.removed

    write(tmp_path / "mlp" / "config.yaml", "backend: nope\n")  # broken: its versions go away
    changes = watcher.poll()
    assert changes.changed_config == ["mlp"] and changes.removed == [("mlp", 3)]
    assert watcher.entries["mlp"].error

    (tmp_path / "lm" / "1").unlink()
    shutil.rmtree(tmp_path / "lm")
    changes = watcher.poll()
    assert changes.removed == [("lm", 1)] and not changes.changed_config
