"""Model backends of ``ds serve``: deepseek model directories, torch (export / TorchScript / entry point), onnx."""

import asyncio
import sys
import textwrap

import pytest
import torch

import deepseek as ds
from deepseek.serve.backends import Backend, BackendError, load_backend
from deepseek.serve.batching import DynamicBatcher
from deepseek.serve.config import DynamicBatchingConfig, ServingConfig, TensorSpec

LINEAR_SPECS = dict(inputs=[TensorSpec("x", "FP32", [32])], outputs=[TensorSpec("y", "FP32", [10])])


def linear_config(**kw) -> ServingConfig:
    return ServingConfig(backend=kw.pop("backend", "torch"), max_batch_size=8, **LINEAR_SPECS, **kw)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 10)).eval()


def version_dir(tmp_path, name="m", version=1):
    path = tmp_path / name / str(version)
    path.mkdir(parents=True)
    return path


# -- deepseek ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("repo") / "tiny" / "1"
    ds.save(ds.MoETransformer(ds.preset("tiny")), ds.byte_tokenizer(), path)
    return path


def test_deepseek_backend_matches_model(tiny_dir):
    backend = load_backend("tiny", 1, tiny_dir, ServingConfig(backend="deepseek", max_batch_size=8))
    assert isinstance(backend, Backend) and backend.tokenizer is not None
    ids = torch.randint(0, 256, (2, 7))
    with torch.inference_mode():
        out = backend.infer({"input_ids": ids})
        expected = backend.model(ids).float()
    assert set(out) == {"logits"} and out["logits"].dtype == torch.float32
    torch.testing.assert_close(out["logits"], expected)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        masked = backend.infer({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(masked["logits"], expected)

    vocab = backend.model.config.vocab_size
    meta = backend.metadata()
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "deepseek"
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, vocab]}]
    assert backend.input_spec("input_ids").pad_value == backend.tokenizer.token_to_id("<|pad|>")


def test_deepseek_backend_rejects_bad_inputs(tiny_dir):
    backend = load_backend("tiny", 1, tiny_dir, ServingConfig(backend="deepseek", max_batch_size=8))
    with pytest.raises(ValueError, match="datatype must be INT64"):
        backend.validate_inputs({"input_ids": torch.zeros(1, 3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="unknown input.*tokens"):
        backend.validate_inputs({"tokens": torch.zeros(1, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="missing input.*input_ids"):
        backend.validate_inputs({"attention_mask": torch.ones(1, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="shape"):
        backend.validate_inputs({"input_ids": torch.zeros(3, dtype=torch.int64)})


def test_deepseek_backend_checks_declared_specs_and_files(tiny_dir, tmp_path):
    bad = ServingConfig(backend="deepseek", max_batch_size=8, inputs=[TensorSpec("tokens", "INT64", [-1])])
    with pytest.raises(BackendError, match="tokens"):
        load_backend("tiny", 1, tiny_dir, bad)
    empty = version_dir(tmp_path)
    with pytest.raises(BackendError, match="config.json"):
        load_backend("m", 1, empty, ServingConfig(backend="deepseek"))


def test_deepseek_backend_unbatched_metadata(tiny_dir):
    backend = load_backend("tiny", 1, tiny_dir, ServingConfig(backend="deepseek"))
    assert backend.metadata()["inputs"][0]["shape"] == [-1, -1]
    ids = torch.randint(0, 256, (1, 4))
    with torch.inference_mode():
        assert backend.infer({"input_ids": ids})["logits"].shape == (1, 4, backend.model.config.vocab_size)


# -- torch -------------------------------------------------------------------------------------------

def test_torch_export_program(tmp_path, linear):
    path = version_dir(tmp_path)
    x = torch.randn(3, 32)
    program = torch.export.export(linear, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(path / "model.pt2"))
    backend = load_backend("m", 1, path, linear_config())
    assert backend.platform == "pytorch_export"
    with torch.inference_mode():
        for rows in (1, 5):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(backend.infer({"x": x})["y"], linear(x))
    meta = backend.metadata()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    with pytest.raises(ValueError, match="shape"):
        backend.validate_inputs({"x": torch.randn(2, 31)})


def test_torchscript(tmp_path, linear):
    path = version_dir(tmp_path)
    torch.jit.script(linear).save(str(path / "model.pt"))
    backend = load_backend("m", 1, path, linear_config())
    assert backend.platform == "pytorch_torchscript"
    x = torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer({"x": x})["y"], linear(x))


def test_torch_entry_point_with_weights(tmp_path, linear, monkeypatch):
    from safetensors.torch import save_file

    code = tmp_path / "code"
    code.mkdir()
    (code / "served_linear_model.py").write_text(textwrap.dedent("""
        import torch

        class TwoHeads(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(32, 10))

            def forward(self, x):
                y = self.body(x)
                return {"y": y, "extra": y.sum(-1)}

        def build():
            return TwoHeads()
    """))
    monkeypatch.syspath_prepend(str(code))
    path = version_dir(tmp_path)
    save_file({f"body.{k}": v.contiguous() for k, v in linear.state_dict().items()}, str(path / "weights.safetensors"))
    config = linear_config(parameters={"entry_point": "served_linear_model:build", "weights": "weights.safetensors"})
    backend = load_backend("m", 1, path, config)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        out = backend.infer({"x": x})
    assert set(out) == {"y"}
    torch.testing.assert_close(out["y"], linear(x))

    bad = linear_config(parameters={"entry_point": "served_linear_model:nope"})
    with pytest.raises(BackendError, match="nope"):
        load_backend("m", 1, path, bad)
    escape = linear_config(parameters={"entry_point": "served_linear_model:build", "weights": "../../x.safetensors"})
    with pytest.raises(BackendError, match="inside the version folder"):
        load_backend("m", 1, path, escape)
    sys.modules.pop("served_linear_model", None)


def test_torch_entry_point_check_inputs_refuses_a_request_before_it_is_batched(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "served_checked_model.py").write_text(textwrap.dedent("""
        import torch

        class Checked(torch.nn.Module):
            def check_inputs(self, inputs):
                if bool((inputs["x"] < 0).any()):
                    raise ValueError("x must be non-negative")

            def forward(self, x):
                return x[:, :10]

        def build():
            return Checked()
    """))
    monkeypatch.syspath_prepend(str(code))
    backend = load_backend("m", 1, version_dir(tmp_path), linear_config(
        parameters={"entry_point": "served_checked_model:build"}))
    backend.validate_inputs({"x": torch.ones(2, 32)})
    with pytest.raises(ValueError, match="non-negative"):  # the front ends' 400, before the batcher
        backend.validate_inputs({"x": -torch.ones(2, 32)})
    with pytest.raises(ValueError, match="datatype"):  # the declared checks still run first
        backend.validate_inputs({"x": torch.ones(2, 32, dtype=torch.float64)})
    sys.modules.pop("served_checked_model", None)


@pytest.mark.parametrize("file", ["model.pt2", "model.pt"])
def test_torch_corrupt_file_is_named(tmp_path, file):
    path = version_dir(tmp_path)
    (path / file).write_bytes(b"not a model")
    with pytest.raises(BackendError, match=file.replace(".", r"\.")):
        load_backend("m", 1, path, linear_config())


def test_torch_missing_file_is_named(tmp_path):
    path = version_dir(tmp_path)
    with pytest.raises(BackendError, match=r"model\.pt2.*model\.pt"):
        load_backend("m", 1, path, linear_config())
    config = linear_config(parameters={"entry_point": "torch.nn:Identity", "weights": "w.safetensors"})
    with pytest.raises(BackendError, match=r"w\.safetensors is missing"):
        load_backend("m", 1, path, config)


# -- onnx --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 10)).eval()
    path = tmp_path_factory.mktemp("onnx") / "m" / "1"
    path.mkdir(parents=True)
    torch.onnx.export(model, (torch.randn(2, 32),), str(path / "model.onnx"), input_names=["x"], output_names=["y"],
                      dynamic_shapes={"input": {0: torch.export.Dim("batch")}}, dynamo=True)
    return path, model


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch.onnx exporter internals
def test_onnx_matches_eager(onnx_dir):
    path, model = onnx_dir
    backend = load_backend("m", 1, path, linear_config(backend="onnx", parameters={"threads": 1}))
    assert backend.platform == "onnxruntime_onnx"
    for rows in (1, 3, 8):
        x = torch.randn(rows, 32)
        out = backend.infer({"x": x})
        with torch.no_grad():
            torch.testing.assert_close(out["y"], model(x), atol=1e-5, rtol=1e-5)
    backend.close()


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch.onnx exporter internals
def test_onnx_errors_name_the_problem(onnx_dir, tmp_path):
    path, _ = onnx_dir
    wrong = ServingConfig(backend="onnx", max_batch_size=8, inputs=[TensorSpec("input", "FP32", [32])],
                          outputs=[TensorSpec("y", "FP32", [10])])
    with pytest.raises(BackendError, match=r"input.*its inputs are x"):
        load_backend("m", 1, path, wrong)
    empty = version_dir(tmp_path)
    with pytest.raises(BackendError, match=r"model\.onnx is missing"):
        load_backend("m", 1, empty, linear_config(backend="onnx"))
    (empty / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(BackendError, match=r"model\.onnx: cannot load"):
        load_backend("m", 1, empty, linear_config(backend="onnx"))


# -- behind the batcher ------------------------------------------------------------------------------

def test_torch_backend_behind_batcher(tmp_path, linear):
    path = version_dir(tmp_path)
    torch.jit.script(linear).save(str(path / "model.pt"))
    config = linear_config(dynamic_batching=DynamicBatchingConfig(max_queue_delay_ms=20))
    backend = load_backend("m", 1, path, config)
    xs = [torch.randn(n, 32) for n in (1, 2, 3, 1)]

    async def main():
        batcher = DynamicBatcher(backend.infer, **config.batcher_kwargs())
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in xs)), batcher.stats
        finally:
            await batcher.stop()

    outs, stats = asyncio.run(main())
    assert stats.batches < len(xs)  # the requests really were batched
    with torch.inference_mode():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out["y"], linear(x))


def test_deepseek_backend_behind_batcher_ragged(tiny_dir):
    config = ServingConfig(backend="deepseek", max_batch_size=8,
                           dynamic_batching=DynamicBatchingConfig(max_queue_delay_ms=20))
    backend = load_backend("tiny", 1, tiny_dir, config)
    ids = [torch.randint(0, 256, (1, n)) for n in (3, 6, 4)]

    async def main():
        batcher = DynamicBatcher(backend.infer, **backend.batcher_kwargs())
        try:
            return await asyncio.gather(*(batcher.submit({"input_ids": x}) for x in ids))
        finally:
            await batcher.stop()

    outs = asyncio.run(main())
    with torch.inference_mode():
        for x, out in zip(ids, outs):  # right padding + causal attention: the real positions are unchanged
            torch.testing.assert_close(out["logits"][:, :x.shape[1]], backend.model(x).float(), atol=1e-4, rtol=1e-4)
