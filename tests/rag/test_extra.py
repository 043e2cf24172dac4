"""A missing package of the rag extra is one line naming it, from the CLI and from the Python API."""

import sys

import pytest

from deepseek.rag.extra import MissingExtraError, require_rag_extra

MESSAGE = "ds rag needs the rag extra: pip install 'deepseek-framework[rag]' (missing: faiss)"


def test_require_rag_extra_names_the_missing_module(monkeypatch):
    require_rag_extra()  # all installed here: no error
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(MissingExtraError) as raised:
        require_rag_extra()
    assert str(raised.value) == MESSAGE
    require_rag_extra("bm25s")  # only what is asked for is checked
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(MissingExtraError, match=r"\(missing: faiss, bm25s\)$"):
        require_rag_extra()


def test_python_entry_points_check_the_extra(monkeypatch, tmp_path):
    from deepseek.rag import DeepSeekRetriever
    from deepseek.rag.embed import Embedder
    from deepseek.rag.index import KnowledgeIndex, build_index

    monkeypatch.setitem(sys.modules, "faiss", None)
    (tmp_path / "a.txt").write_text("some text\n")
    for call in (lambda: build_index([tmp_path / "a.txt"], tmp_path / "kb", progress=False),
                 lambda: KnowledgeIndex.open(tmp_path / "kb"),
                 lambda: DeepSeekRetriever(index_path=tmp_path / "kb")):
        with pytest.raises(MissingExtraError, match="missing: faiss"):
            call()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(MissingExtraError, match=r"missing: sentence_transformers\)$"):
        Embedder.load()


def test_cli_says_one_line(monkeypatch, capsys, tmp_path):
    from deepseek.cli.main import main

    monkeypatch.setitem(sys.modules, "faiss", None)
    for argv in (["rag", "index", str(tmp_path), "--out", str(tmp_path / "kb")],
                 ["rag", "query", str(tmp_path / "kb"), "a question"],
                 ["rag", "eval", str(tmp_path / "kb"), str(tmp_path / "qa.jsonl")]):
        monkeypatch.setattr(sys, "argv", ["ds", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        stderr = capsys.readouterr().err.strip()
        assert exited.value.code == 1 and stderr == f"error: {MESSAGE}", argv
