"""ONNX export: parity with eager torch under onnxruntime, int8, the KV-cache graph, any nn.Module, the CLI,
clear errors, and the exported LM served by the real server's onnx backend."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deepseek as ds

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
from typer.testing import CliRunner  # noqa: E402

from deepseek.cli.main import app  # noqa: E402
from deepseek.errors import UserError  # noqa: E402
from deepseek.export import ExportError, export_onnx, serving_config  # noqa: E402
from deepseek.export.onnx import FP32_TOLERANCE  # noqa: E402
from deepseek.models.directory import ModelDirectoryError  # noqa: E402
from deepseek.nn import GroupedExperts  # noqa: E402
from deepseek.nn.dispatch import LOOP, SORTED  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1), (1, 7), (2, 16), (3, 33), (4, 5)]  # (batch, tokens): batch > 1 and odd lengths included
INT8_ARGMAX_AGREEMENT = 0.9  # measured 95-97% on the random tiny models; int8 flips near-ties of their flat logits
INT8_MAX_ABS_DIFF = 0.1  # vs the fp32 graph (measured 0.016-0.036); the tiny models' logits span about +-0.7
# Every exported LM here has 4 routed experts (top-2), not the tiny preset's 8: the export unrolls one branch per
# expert, and 4 take ~6.5 s instead of ~9.5 s (test_exportable_experts_match_reference covers up to 16 on that path).
TEST_EXPERTS = 4


def session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_ids(vocab: int, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def max_diff_vs_eager(path, model, shapes=SHAPES) -> float:
    sess, worst = session(path), 0.0
    for i, (b, t) in enumerate(shapes):
        ids = random_ids(model.config.vocab_size, b, t, seed=i)
        (logits,) = sess.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = model(ids)
        assert logits.shape == (b, t, model.config.vocab_size) and logits.dtype == np.float32
        worst = max(worst, float(np.abs(logits - expected.numpy()).max()))
    return worst


# -- the export path of the MoE layer ----------------------------------------------------------------------

@pytest.mark.parametrize("E, K", [(1, 1), (8, 2), (8, 8), (16, 3)])
def test_exportable_experts_match_reference(E, K):
    N, D, Fd = 11, 16, 24
    experts = GroupedExperts(E, D, Fd)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(N, D)
    idx = torch.rand(N, E).argsort(dim=-1)[:, :K]
    weights = torch.rand(N, K) + 0.1
    with torch.no_grad():
        exported = LOOP(x, weights, idx, experts)  # what GroupedExperts takes while exporting
        torch.testing.assert_close(exported, experts.forward_reference(x, weights, idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported, SORTED(x, weights, idx, experts), atol=1e-5, rtol=1e-5)


# -- language models ----------------------------------------------------------------------------------------

def sigmoid_with_bias(**overrides):
    model = ds.MoETransformer(ds.preset("tiny", router="sigmoid", n_routed_experts=TEST_EXPERTS, **overrides))
    with torch.no_grad():  # a balancing bias that really changes the choice of experts
        for router in model.routers():
            router.expert_bias.copy_(torch.randn(router.n_experts, generator=torch.Generator().manual_seed(3)) * 0.3)
    return model


# The softmax router (the tiny preset's default) is exported by the CLI test below, dense attention by the KV-cache
# test. One model holds everything else (an export costs seconds): the sigmoid router with a balancing bias, a dense
# first layer, a shared expert, tied embeddings and sparse attention (window 8 < the checked lengths: the sparse
# pattern really differs from causal attention).
LM_CONFIGS = {
    "sigmoid-bias-dense-shared-tied-sparse": lambda: sigmoid_with_bias(first_k_dense=1, n_shared_experts=1,
                                                                       tie_embeddings=True, attention="sparse",
                                                                       window=8, n_global_tokens=2),
}


@pytest.fixture(scope="module", params=list(LM_CONFIGS))
def exported_lm(request, tmp_path_factory):
    torch.manual_seed(0)
    model = LM_CONFIGS[request.param]().eval()
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    return model, path, export_onnx(model, path)


def test_lm_matches_eager_on_dynamic_shapes(exported_lm):
    model, path, report = exported_lm
    assert report.max_abs_diff <= FP32_TOLERANCE and len(report.validation) == 3
    assert max_diff_vs_eager(path, model) <= FP32_TOLERANCE
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("input_ids", "tensor(int64)", ["batch", "seq"])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["batch", "seq", model.config.vocab_size])
    meta = json.loads((path.parent / "export.json").read_text())
    assert meta["source"] == "MoETransformer" and meta["opset"] == report.opset >= 18 and meta["int8"] is False
    assert meta["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert meta["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "seq"}
    assert meta["validation"]["max_abs_diff"] == report.max_abs_diff
    assert not model.training  # the caller's mode is kept


def test_export_restores_training_mode_and_eager_still_runs(tmp_path):
    model = ds.MoETransformer(ds.preset("tiny", n_layers=1, n_routed_experts=TEST_EXPERTS)).train()
    export_onnx(model, tmp_path / "m.onnx", validate=False)
    assert model.training
    assert json.loads((tmp_path / "export.json").read_text())["validation"] is None
    model(random_ids(259, 2, 8)).sum().backward()  # the sparse training path is untouched


# -- KV cache -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_kv(tmp_path_factory):
    torch.manual_seed(0)
    model = sigmoid_with_bias().eval()
    path = tmp_path_factory.mktemp("kv") / "model.onnx"
    return model, path, export_onnx(model, path, kv_cache=True)


def test_kv_cache_graph_decodes_like_eager(exported_kv):
    model, path, report = exported_kv
    assert report.greedy_match is True and report.max_abs_diff <= FP32_TOLERANCE
    cfg = model.config
    sess = session(path)
    past_names = [i.name for i in sess.get_inputs()][1:]
    assert past_names == [f"past_key_values.{i}.{kv}" for i in range(cfg.n_layers) for kv in ("key", "value")]
    assert [o.name for o in sess.get_outputs()][1:] == [f"present.{i}.{kv}" for i in range(cfg.n_layers)
                                                        for kv in ("key", "value")]
    assert sess.get_inputs()[1].shape == ["batch", cfg.n_kv_heads, "past", cfg.head_dim]

    # Greedy decoding through the graph, prompt then one token per step, against eager decoding with the
    # model's own KVCache.
    prompt = random_ids(cfg.vocab_size, 3, 6, seed=5)
    empty = np.zeros((3, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    feed = {"input_ids": prompt.numpy(), **{n: empty for n in past_names}}
    onnx_tokens = []
    for _ in range(8):
        logits, *present = sess.run(None, feed)
        next_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        onnx_tokens.append(next_ids)
        feed = {"input_ids": next_ids, **dict(zip(past_names, present))}
    assert present[0].shape == (3, cfg.n_kv_heads, 6 + 7, cfg.head_dim)
    cache = ds.KVCache.for_model(model, batch_size=3, max_len=32)
    ids, eager_tokens = prompt, []
    with torch.no_grad():
        for _ in range(8):
            ids = model(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
            eager_tokens.append(ids)
    np.testing.assert_array_equal(np.concatenate(onnx_tokens, 1), torch.cat(eager_tokens, 1).numpy())


def test_kv_cache_graph_takes_a_prompt_in_chunks(exported_kv):
    model, path, _ = exported_kv
    cfg = model.config
    sess = session(path)
    ids = random_ids(cfg.vocab_size, 2, 11, seed=7)
    past_names = [i.name for i in sess.get_inputs()][1:]
    empty = np.zeros((2, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    first, *present = sess.run(None, {"input_ids": ids[:, :4].numpy(), **{n: empty for n in past_names}})
    second, *_ = sess.run(None, {"input_ids": ids[:, 4:].numpy(), **dict(zip(past_names, present))})
    with torch.no_grad():
        expected = model(ids).numpy()
    assert np.abs(np.concatenate([first, second], 1) - expected).max() <= FP32_TOLERANCE


# -- any nn.Module ------------------------------------------------------------------------------------------

def digits_cnn() -> nn.Module:
    spec = importlib.util.spec_from_file_location("digits_cnn_example", ROOT / "examples" / "digits_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.DigitsCNN()
    with torch.no_grad():  # trained-looking batch-norm statistics, so BN is not the identity
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_cnn_classifier_with_dynamic_batch(tmp_path):
    model = digits_cnn()
    report = export_onnx(model, tmp_path / "cnn.onnx", example_inputs=(torch.rand(1, 1, 8, 8),),
                         input_names=["image"], output_names=["logits"])
    assert report.max_abs_diff <= FP32_TOLERANCE and [r["shape"] for r in report.validation] == \
        ["batch 1", "batch 2", "batch 5"]
    sess = session(tmp_path / "cnn.onnx")
    assert sess.get_inputs()[0].name == "image" and sess.get_inputs()[0].shape == ["batch", 1, 8, 8]
    graph_model = onnx.load(str(tmp_path / "cnn.onnx"))  # the exporter's debugging metadata is stripped
    assert not graph_model.graph.value_info and not any(node.metadata_props for node in graph_model.graph.node)
    for batch in (1, 3, 7):
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        (logits,) = sess.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5, rtol=1e-5)
    config = serving_config(report)
    assert config["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8]}]
    assert config["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [10]}]


class ExportsSomethingElse(nn.Module):
    """A module whose exported graph computes something else than its eager forward."""

    def forward(self, x):
        return x * 2 + (1e-3 if torch.compiler.is_exporting() else 0.0)


def test_validation_rejects_a_graph_that_differs_from_eager(tmp_path):
    with pytest.raises(ExportError, match=r"differs from eager torch by 0\.001 at batch 1 \(tolerance 0\.0001\)"):
        export_onnx(ExportsSomethingElse(), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 3),))
    export_onnx(ExportsSomethingElse(), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 3),), validate=False)


# -- errors --------------------------------------------------------------------------------------------------

def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "m.onnx")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelDirectoryError, match="is not a directory"):
        export_onnx(tmp_path / "notes.txt", tmp_path / "m.onnx")
    with pytest.raises(ModelDirectoryError, match=r"config\.json is missing"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="pass example_inputs"):
        export_onnx(nn.Linear(3, 2), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(nn.Linear(3, 2), tmp_path / "m.pt", example_inputs=(torch.randn(2, 3),))
    with pytest.raises(ExportError, match="kv_cache=True needs a deepseek language model"):
        export_onnx(nn.Linear(3, 2), tmp_path / "m.onnx", kv_cache=True, example_inputs=(torch.randn(2, 3),))
    assert not (tmp_path / "m.onnx").exists()


def test_compressed_model_points_to_int8_export(tmp_path):
    from deepseek.compress.quantize import quantize

    model = quantize(ds.MoETransformer(ds.preset("tiny", n_layers=1)), "int8-dynamic")
    with pytest.raises(ExportError, match=r"compressed \(quantized\) model has no ONNX form.*--int8"):
        export_onnx(model, tmp_path / "m.onnx")


# -- CLI, int8 and serving -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """``ds export onnx DIR repo/lm/1/model.onnx --int8``: the tiny softmax LM, straight into a repository."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny", n_routed_experts=TEST_EXPERTS)).eval()
    ds.save(model, ds.byte_tokenizer(), root / "tiny")
    out = root / "repo" / "lm" / "1" / "model.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", str(root / "tiny"), str(out), "--int8"])
    return model, out, result


def test_cli_exports_validates_and_quantizes(cli_export):
    model, out, result = cli_export
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in ("max |ORT - eager|", "1x7", "2x16", "3x33", "eager ms", "ORT ms", "file:", "MiB",
                     "validated: max abs diff", "int8:", "argmax agreement"):
        assert expected in text
    meta = json.loads((out.parent / "export.json").read_text())
    assert meta["source"] == str((out.parents[3] / "tiny").resolve()) and meta["int8"] is True
    assert meta["validation"]["max_abs_diff"] <= FP32_TOLERANCE
    assert max_diff_vs_eager(out, model) <= FP32_TOLERANCE


def test_int8_graph_runs_and_agrees_on_argmax(cli_export):
    model, out, _ = cli_export
    int8 = out.with_name("model.int8.onnx")
    meta = json.loads((out.parent / "export.json").read_text())["int8_file"]
    assert meta["path"] == int8.name and meta["argmax_agreement"] >= INT8_ARGMAX_AGREEMENT
    assert int8.stat().st_size < 0.4 * out.stat().st_size
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    fp32_sess, int8_sess = session(out), session(int8)
    agree = total = 0
    for i, (b, t) in enumerate(SHAPES):
        feed = {"input_ids": random_ids(model.config.vocab_size, b, t, seed=10 + i).numpy()}
        a, q = fp32_sess.run(None, feed)[0], int8_sess.run(None, feed)[0]
        assert np.abs(a - q).max() <= INT8_MAX_ABS_DIFF
        agree += int((a.argmax(-1) == q.argmax(-1)).sum())
        total += b * t
    assert agree / total >= INT8_ARGMAX_AGREEMENT


def test_cli_missing_directory_is_a_user_error(tmp_path):
    """A UserError is what `ds` (deepseek.cli.main.main) prints as one line without a traceback."""
    result = CliRunner().invoke(app, ["export", "onnx", str(tmp_path / "nope"), str(tmp_path / "m.onnx")])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError) and "nope does not exist" in str(result.exception)


def test_served_by_the_onnx_backend(cli_export):
    """The exported LM as ``model.onnx`` of a repository version, served over KServe v2 HTTP."""
    httpx = pytest.importorskip("httpx")
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("uvicorn")
    import yaml

    from deepseek.serve.manager import ModelManager
    from deepseek.serve.repository import ModelRepository
    from serve.gated_model import running_server  # tests/serve: the real uvicorn server in a thread

    model, out, _ = cli_export
    repo = out.parents[2]
    config = {"backend": "onnx", "max_batch_size": 8, "parameters": {"threads": 1},
              "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1]}],
              "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, model.config.vocab_size]}]}
    assert {k: v for k, v in config.items() if k != "parameters"} == serving_config(out.parent / "export.json")
    (repo / "lm" / "config.yaml").write_text(yaml.safe_dump(config))
    ids = random_ids(model.config.vocab_size, 2, 9, seed=21)
    with torch.no_grad():
        expected = model(ids).numpy()

    with running_server(ModelManager(ModelRepository(repo))) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [2, 9], "data": ids.tolist()}]}
            r = http.post("/v2/models/lm/infer", json=body)
            assert r.status_code == 200, r.text
            logits = r.json()["outputs"][0]
            assert logits["name"] == "logits" and logits["shape"] == [2, 9, model.config.vocab_size]
            np.testing.assert_allclose(np.array(logits["data"], np.float32).reshape(expected.shape), expected,
                                       atol=1e-4, rtol=0)
            assert http.get("/v2/models/lm").json()["platform"] == "onnxruntime_onnx"
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        try:
            one = ids[:1, :5].numpy()
            inp = httpclient.InferInput("input_ids", list(one.shape), "INT64")
            inp.set_data_from_numpy(one, binary_data=True)
            result = client.infer("lm", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
            with torch.no_grad():
                np.testing.assert_allclose(result.as_numpy("logits"), model(ids[:1, :5]).numpy(), atol=1e-4, rtol=0)
        finally:
            client.close()
