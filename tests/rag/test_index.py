"""The index directory: what a build writes, incremental updates by file hash, FAISS choice by size, model mismatch
and damaged files as one-line errors, and `ds rag index` end to end. MiniLM is loaded once for the module."""

import json
import os
import re
import sys

import faiss
import numpy as np
import pytest

from deepseek.cli.main import main
from deepseek.config import ConfigError
from deepseek.errors import UserFacingError
from deepseek.rag.embed import Embedder
from deepseek.rag.index import (CorruptIndexError, IndexMismatchError, KnowledgeIndex, bm25_tokens, build_index,
                                choose_faiss)
from tests.rag.pdf_fixtures import pdf_bytes

GUIDE = """# Passwords

To reset a forgotten password open the login page, choose "Forgot password" and follow the reset link that
we send to the email address of your account within a few minutes.

# Invoices

Invoices are generated on the first day of each month and emailed as PDF attachments.
"""

CODE = '''"""Geometry helpers."""

import math


def circle_area(radius):
    """Area of a circle with the given radius."""
    return math.pi * radius ** 2


class Vector:
    """A two-dimensional vector with a length."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def length(self):
        return math.hypot(self.x, self.y)
'''


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load(precision="fp32")  # vectors read back are compared with fresh ones at 1e-5


def write_corpus(root):
    """A folder with every supported type plus a binary file and a corrupt PDF."""
    (root / "code").mkdir(parents=True)
    (root / "guide.md").write_text(GUIDE)
    (root / "code" / "geometry.py").write_text(CODE)
    (root / "notes.txt").write_text("The office is closed on public holidays.\nParking is behind the building.\n")
    (root / "page.html").write_text("<html><body><nav>menu</nav><h1>Shipping</h1><p>Orders ship within two "
                                    "business days.</p></body></html>")
    (root / "report.pdf").write_bytes(pdf_bytes(["Revenue grew twelve percent this quarter.", "Costs were flat."]))
    (root / "broken.pdf").write_bytes(pdf_bytes(["lost"])[:150])
    (root / "faq.jsonl").write_text(json.dumps({"text": "Support answers chats from nine to five.", "team": "help"})
                                    + "\n")
    (root / "logo.bin").write_bytes(bytes(range(256)))
    return root


def records(index_dir):
    return [json.loads(line) for line in (index_dir / "chunks.jsonl").read_text().splitlines()]


def by_source(index_dir):
    found = {}
    for record in records(index_dir):
        found.setdefault(os.path.basename(record["source"]), []).append(record)
    return found


def test_build_writes_manifest_chunks_files_vectors_and_bm25(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "kb"
    summary = build_index([corpus], out, embedder=embedder, max_tokens=32, overlap_tokens=4, progress=False)

    assert sorted(os.path.basename(p) for p in summary["indexed"]) == [
        "faq.jsonl", "geometry.py", "guide.md", "notes.txt", "page.html", "report.pdf"]
    skipped = {os.path.basename(path): reason for path, reason in summary["skipped"]}
    assert set(skipped) == {"broken.pdf", "logo.bin"} and skipped["broken.pdf"].startswith("corrupt PDF")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["chunker"] == {"max_tokens": 32, "overlap_tokens": 4}
    assert manifest["embedding"]["name"] == embedder.name and manifest["embedding"]["dimension"] == 384
    assert manifest["faiss"]["kind"] == "flat" and "exact" in manifest["faiss"]["reason"]
    assert manifest["counts"] == {"files": 6, "chunks": summary["chunks"], "skipped": 2}

    chunks = by_source(out)
    assert {r["type"] for rs in chunks.values() for r in rs} == {"md", "py", "txt", "html", "pdf", "jsonl"}
    assert [r["title"] for r in chunks["guide.md"]] == ["Passwords", "Passwords", "Invoices"]  # 32 tokens cut one
    assert [(r["span"], r["span_unit"]) for r in chunks["report.pdf"]] == [([1, 1], "page"), ([2, 2], "page")]
    assert chunks["faq.jsonl"][0]["metadata"] == {"team": "help"} and chunks["faq.jsonl"][0]["span_unit"] == "row"
    area = [r for r in chunks["geometry.py"] if r["title"] == "circle_area"]
    assert area[0]["span"][0] == 6 and area[-1]["span"][1] == 8 and '"""Area of a circle' in area[0]["text"]
    assert all(embedder.count_tokens([r["text"]])[0] <= 32 for r in records(out))

    files = json.loads((out / "files.json").read_text())
    ids = sorted(i for entry in files.values() for i in entry["chunk_ids"])
    assert ids == sorted(r["id"] for r in records(out)) == list(range(summary["chunks"]))
    vectors = faiss.read_index(str(out / "vectors.faiss"))
    assert vectors.ntotal == len(ids) and sorted(faiss.vector_to_array(vectors.id_map)) == ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kb")]  # no temporary folder left behind

    index = KnowledgeIndex.open(out, embedder=embedder)
    [dense] = index.dense(["how do I reset my password"], k=3)
    assert index.chunks[dense[0][0]].title == "Passwords" and 0 < dense[0][1] <= 1 and len(dense) == 3
    [lexical] = index.lexical(["revenue quarter"], k=5)
    assert [index.chunks[i].source for i, _ in lexical] == [str(corpus / "report.pdf")]  # zero scores dropped
    assert index.lexical(["zzzz unknownword"], k=3) == [[]]


def test_identifiers_give_their_parts_to_bm25():
    assert bm25_tokens(["call get_user_id or getUserId on the HTTPServer"]) == [
        ["call", "get_user_id", "get", "user", "id", "getuserid", "get", "user", "id", "httpserver", "http", "server"]]


def test_update_reembeds_only_the_changed_file_and_removes_deleted_ones(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "kb"
    build_index([corpus], out, embedder=embedder, max_tokens=32, overlap_tokens=4, progress=False)
    before = by_source(out)

    (corpus / "guide.md").write_text(GUIDE.replace("first day", "last day"))  # the Invoices section changes
    (corpus / "notes.txt").unlink()
    summary = build_index([corpus], out, embedder=embedder, progress=False)  # sizes come from the manifest

    assert [os.path.basename(p) for p in summary["indexed"]] == ["guide.md"]
    assert [os.path.basename(p) for p in summary["removed"]] == ["notes.txt"]
    assert len(summary["unchanged"]) == 4 and {os.path.basename(p) for p, _ in summary["skipped"]} == {
        "broken.pdf", "logo.bin"}
    assert summary["embedded"] == 1 and summary["reused"] == 2  # the Passwords chunks' vectors are read back
    after = by_source(out)
    assert "notes.txt" not in after
    for name in ["geometry.py", "page.html", "report.pdf", "faq.jsonl"]:
        assert after[name] == before[name]  # same ids, same records
    old_ids = {r["id"] for r in before["guide.md"]}
    assert not old_ids & {r["id"] for r in after["guide.md"]}
    assert min(r["id"] for r in after["guide.md"]) > max(r["id"] for rs in before.values() for r in rs)
    assert "last day" in after["guide.md"][-1]["text"]

    index = KnowledgeIndex.open(out, embedder=embedder)
    assert index.vectors.ntotal == len(index.chunks) == sum(len(rs) for rs in after.values())
    live = set(index.chunks)
    [hits] = index.dense(["parking behind the building"], k=len(live))
    assert {i for i, _ in hits} == live  # the deleted file's vectors are gone from FAISS too
    passwords = [r for r in after["guide.md"] if r["title"] == "Passwords"]
    stored = index.vectors.reconstruct_batch(np.array([r["id"] for r in passwords], dtype=np.int64))
    np.testing.assert_allclose(stored, embedder.encode([r["text"] for r in passwords]), atol=1e-5)

    again = build_index([corpus], out, embedder=embedder, progress=False)
    assert again["indexed"] == [] and again["embedded"] == 0 and by_source(out) == after


def test_an_index_inside_its_own_sources_is_not_indexed(tmp_path, embedder):
    (tmp_path / "a.txt").write_text("alpha")
    for _ in range(2):
        summary = build_index([tmp_path], tmp_path / "kb", embedder=embedder, progress=False)
    assert summary["unchanged"] == [str(tmp_path / "a.txt")] and summary["skipped"] == [] and summary["chunks"] == 1


def test_changed_chunk_sizes_rechunk_every_file(tmp_path, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "guide.md").write_text(GUIDE)
    out = tmp_path / "kb"
    build_index([corpus], out, embedder=embedder, max_tokens=32, overlap_tokens=4, progress=False)
    summary = build_index([corpus], out, embedder=embedder, max_tokens=64, overlap_tokens=4, progress=False)
    assert len(summary["indexed"]) == 1 and summary["chunks"] == 2
    assert json.loads((out / "manifest.json").read_text())["chunker"]["max_tokens"] == 64


def test_faiss_choice_by_size_and_an_ivf_index_that_updates(tmp_path, embedder):
    assert choose_faiss(49_999)["factory"] == "IDMap2,Flat"
    large = choose_faiss(1_000_000)
    assert large == {**large, "kind": "ivf", "factory": "IVF4000,Flat", "nlist": 4000, "nprobe": 63}
    assert choose_faiss(100, flat_limit=50)["nlist"] == 2  # at least 39 training vectors per list

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(45):
        (corpus / f"note{i:02}.txt").write_text(f"Note {i}: the meeting about topic {i} moved to room {i + 100}.")
    out = tmp_path / "kb"
    summary = build_index([corpus], out, embedder=embedder, flat_limit=40, progress=False)
    assert summary["faiss"]["kind"] == "ivf" and summary["faiss"]["factory"] == "IVF1,Flat"
    (corpus / "note00.txt").unlink()
    (corpus / "note01.txt").write_text("Note 1: cancelled.")
    summary = build_index([corpus], out, embedder=embedder, flat_limit=40, progress=False)
    assert summary["embedded"] == 1 and summary["chunks"] == 44
    index = KnowledgeIndex.open(out, embedder=embedder)
    assert isinstance(index.vectors, faiss.IndexIVFFlat) and index.vectors.ntotal == 44
    [hits] = index.dense(["which note was cancelled"], k=1)
    assert index.chunks[hits[0][0]].text == "Note 1: cancelled."
    summary = build_index([corpus / "note01.txt", corpus / "note02.txt"], out, embedder=embedder, flat_limit=40,
                          progress=False)  # two chunks: back to an exact index, vectors read back from the IVF
    assert summary["faiss"]["kind"] == "flat" and summary["embedded"] == 0 and len(summary["removed"]) == 42
    assert KnowledgeIndex.open(out, embedder=embedder).vectors.ntotal == 2


def test_another_embedding_model_is_a_mismatch_error(tmp_path, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha")
    out = tmp_path / "kb"
    build_index([corpus], out, embedder=embedder, progress=False)
    other_dir = tmp_path / "my-model"
    other_dir.symlink_to(embedder.path, target_is_directory=True)  # another local model directory, by its path
    other = Embedder.load(str(other_dir), precision="fp32")
    with pytest.raises(IndexMismatchError, match=f"built with embedding model {embedder.name} .384 dimensions"
                                                 f"., not {other.name}"):
        KnowledgeIndex.open(out, embedder=other)
    with pytest.raises(IndexMismatchError):
        build_index([corpus], out, embedder=other, progress=False)


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, embedder):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta")
    out = tmp_path / "kb"
    build_index([corpus], out, embedder=embedder, progress=False)
    manifest, vectors = (out / "manifest.json").read_text(), (out / "vectors.faiss").read_bytes()

    (out / "vectors.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match=
                       r"vectors.faiss: corrupt FAISS index \(Index type .* not recognized\)$"):
        KnowledgeIndex.open(out, embedder=embedder)
    (out / "vectors.faiss").write_bytes(vectors)
    (out / "manifest.json").write_text(manifest[:40])
    with pytest.raises(CorruptIndexError, match=r"manifest.json: corrupt manifest"):
        KnowledgeIndex.open(out, embedder=embedder)
    with pytest.raises(CorruptIndexError, match=r"manifest.json"):
        build_index([corpus], out, embedder=embedder, progress=False)  # an update refuses too, touching nothing
    (out / "manifest.json").write_text(manifest)
    (out / "chunks.jsonl").write_text('{"id": 0, "text": "alpha beta"}\n')
    with pytest.raises(CorruptIndexError, match=r"chunks.jsonl:1: corrupt chunk record"):
        KnowledgeIndex.open(out, embedder=embedder)

    (out / "chunks.jsonl").write_text("")
    with pytest.raises(CorruptIndexError, match=r"files.json: its chunk ids do not match chunks.jsonl"):
        build_index([corpus], out, embedder=embedder, progress=False)
    with pytest.raises(ConfigError, match="more than the embedding model reads"):
        build_index([corpus], tmp_path / "new", embedder=embedder, max_tokens=300, progress=False)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(UserFacingError, match="not a ds rag index"):
        build_index([corpus], tmp_path / "notes", embedder=embedder, progress=False)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``ds ARGS`` through the console entry point, in this process (no second start-up): (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["ds", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exited:
        code = exited.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_indexes_a_folder_and_prints_the_table(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "kb"
    code, _, stderr = run_main(monkeypatch, capsys, "rag", "index", corpus, "--out", out, "--precision", "fp64")
    assert code != 0 and "valid values are auto, fp32, bf16" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, stderr = run_main(monkeypatch, capsys, "rag", "index", corpus, "--out", out, "--max-tokens", "48",
                                    "--overlap", "8", "--quiet", "--precision", "fp32")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["embedding"]["precision"] == "fp32"
    for row in ["files indexed", "files unchanged", "files removed", "skipped", "chunks", "IDMap2,Flat", "seconds"]:
        assert row in stdout
    assert "unsupported file type .bin" in stdout and "logo.bin" in stdout
    assert "broken.pdf" in stdout and "corrupt PDF" in stdout
    assert json.loads((out / "manifest.json").read_text())["chunker"] == {"max_tokens": 48, "overlap_tokens": 8}
    code, stdout, _ = run_main(monkeypatch, capsys, "rag", "index", corpus, "--out", out, "--quiet")
    assert code == 0 and re.search(r"files unchanged\s*│\s*6\b", stdout)

    (out / "manifest.json").write_text("{")
    code, _, stderr = run_main(monkeypatch, capsys, "rag", "index", corpus, "--out", out)
    assert code == 1 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert "manifest.json: corrupt manifest" in stderr
