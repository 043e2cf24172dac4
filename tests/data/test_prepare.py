"""Prepared datasets: every document's tokens exactly once, a stable split, shards that read back, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepseek.data import (EOS, DataError, TokenDataset, byte_tokenizer, is_validation_document, iter_documents,
                           prepare, train_tokenizer)


def texts(n: int) -> list[str]:
    """``n`` documents of varied length, with indentation, unicode and one empty document."""
    out = [f"def f{i}(x):\n    return x * {i}  # {'é' * (i % 3)}\n" * (1 + i % 7) for i in range(n)]
    out[3] = ""
    return out


def read_docs(ds: TokenDataset) -> list[list[int]]:
    ends = ds.document_ends.tolist()
    return [ds.slice(a, b).tolist() for a, b in zip([0] + ends[:-1], ends)]


@pytest.fixture
def corpus(tmp_path, write_jsonl):
    """A JSON Lines file of 60 documents and a folder of 3 Python files."""
    write_jsonl(tmp_path / "docs.jsonl", texts(60))
    (tmp_path / "code").mkdir()
    for i in range(3):
        (tmp_path / "code" / f"m{i}.py").write_text(f"import os\n\n\nclass C{i}:\n    pass\n" * (i + 1))
    return [tmp_path / "docs.jsonl", tmp_path / "code"]


def test_every_document_once_with_eos(tmp_path, corpus, tokenizer):
    index = prepare(corpus, tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    eos = tokenizer.token_to_id(EOS)
    docs = [d for d in iter_documents(corpus) if d.text]
    expected = {"train": [], "val": []}
    for doc in docs:
        split = "val" if is_validation_document(doc.name, 0.3) else "train"
        expected[split].append((doc, tokenizer.encode(doc.text, add_special_tokens=False).ids + [eos]))
    assert expected["train"] and expected["val"]
    for split, items in expected.items():
        ds = TokenDataset(tmp_path / "out", split)
        assert read_docs(ds) == [ids for _, ids in items]  # in order: nothing lost, duplicated or reordered
        assert ds.slice(0, len(ds)).tolist() == [t for _, ids in items for t in ids]
        assert ds.num_documents == len(items) == index["splits"][split]["documents"]
        assert ds.num_bytes == sum(len(doc.text.encode()) for doc, _ in items)
        assert ds.vocab_size == 400 and ds.eos_id == eos and ds.dtype == np.uint16
    assert index == json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["format"] == "deepseek-tokens" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["sources"] == [str(s) for s in corpus] and index["val_fraction"] == 0.3
    assert TokenDataset(tmp_path / "out").tokenizer().to_str() == tokenizer.to_str()


def test_split_is_deterministic_and_respects_the_fraction(tmp_path, corpus, tokenizer):
    a = prepare(corpus, tokenizer, tmp_path / "a", val_fraction=0.3, progress=False)
    b = prepare(corpus, tokenizer, tmp_path / "b", val_fraction=0.3, progress=False, batch_bytes=100)
    assert a["splits"] == b["splits"]  # batching does not change anything either
    for split in ("train", "val"):
        for file in ["documents.npy"] + [s["file"].split("/")[1] for s in a["splits"][split]["shards"]]:
            assert (tmp_path / "a" / split / file).read_bytes() == (tmp_path / "b" / split / file).read_bytes()
    # The rule is a pure function of the name, pinned here so that it cannot drift between versions:
    # blake2b("doc0"), "doc1", "doc2" as fractions of 2**64 are 0.828, 0.518, 0.373.
    pinned = [False, False, True, True, True, False, False, False]
    assert [is_validation_document(f"doc{i}", 0.5) for i in range(8)] == pinned
    assert is_validation_document("doc1", 0.52) and not is_validation_document("doc1", 0.51)
    share = np.mean([is_validation_document(f"corpus/file_{i}.py", 0.05) for i in range(20_000)])
    assert 0.04 < share < 0.06
    assert not any(is_validation_document(f"f{i}", 0.0) for i in range(1000))


def test_val_names_overrides_the_hash(tmp_path, corpus, tokenizer):
    index = prepare(corpus, tokenizer, tmp_path / "out", progress=False, val_names=lambda name: name.endswith(".py"))
    assert index["splits"]["val"]["documents"] == 3 and index["splits"]["train"]["documents"] == 59


def test_small_shards_read_back_identical(tmp_path, corpus, tokenizer):
    prepare(corpus, tokenizer, tmp_path / "one", val_fraction=0.0, progress=False)
    index = prepare(corpus, tokenizer, tmp_path / "many", val_fraction=0.0, shard_tokens=100, progress=False)
    one, many = TokenDataset(tmp_path / "one"), TokenDataset(tmp_path / "many")
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 5 and [s["file"] for s in shards[:2]] == ["train/00000.bin", "train/00001.bin"]
    assert np.array_equal(one.slice(0, len(one)), many.slice(0, len(many)))
    rng = np.random.default_rng(0)
    for _ in range(200):  # random ranges, most of them across shard boundaries
        a, b = sorted(rng.integers(0, len(one) + 1, size=2))
        assert np.array_equal(one.slice(a, b), many.slice(a, b))
    # Shards hold whole documents: every boundary is a document end; only a lone long document exceeds 100.
    ends, bounds = set(many.document_ends.tolist()), np.cumsum([s["tokens"] for s in shards])
    assert set(bounds.tolist()) <= ends
    docs_per_shard = np.diff(np.searchsorted(many.document_ends, np.concatenate([[0], bounds]), side="right"))
    assert all(s["tokens"] <= 100 or n == 1 for s, n in zip(shards, docs_per_shard))
    assert sum(s["tokens"] for s in shards) == len(many)


def test_special_token_text_in_documents_stays_text(tmp_path, write_jsonl, tokenizer):
    text = "a line that mentions <|eos|> and <|user|>"
    write_jsonl(tmp_path / "d.jsonl", [text])
    prepare([tmp_path / "d.jsonl"], tokenizer, tmp_path / "out", val_fraction=0.0, progress=False)
    ds = TokenDataset(tmp_path / "out")
    ids = ds.slice(0, len(ds)).tolist()
    assert ids.count(tokenizer.token_to_id(EOS)) == 1 and ids[-1] == tokenizer.token_to_id(EOS)
    assert tokenizer.decode(ids[:-1]) == text


def test_large_vocabulary_uses_uint32(tmp_path, write_jsonl):
    tok = byte_tokenizer()
    tok.add_tokens([f"extra{i}" for i in range(70_000)])
    write_jsonl(tmp_path / "d.jsonl", ["hello"])
    index = prepare([tmp_path / "d.jsonl"], tok, tmp_path / "out", val_fraction=0.0, progress=False)
    ds = TokenDataset(tmp_path / "out")
    assert index["dtype"] == "uint32" and ds.slice(0, 6).tolist() == [104, 101, 108, 108, 111, 257]


def test_overwrite_is_atomic_replacement(tmp_path, corpus, tokenizer):
    prepare(corpus, tokenizer, tmp_path / "out", shard_tokens=100, progress=False)
    prepare(corpus[1:], tokenizer, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["00000.bin", "documents.npy"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_tokenizer_without_eos_and_bad_arguments(tmp_path, corpus):
    no_eos = train_tokenizer(["abc"], vocab_size=300, special_tokens=["<|pad|>"])
    with pytest.raises(DataError, match="no <\\|eos\\|> token"):
        prepare(corpus, no_eos, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(corpus, byte_tokenizer(), tmp_path / "out", val_fraction=1.0, progress=False)
    with pytest.raises(DataError, match="no such file, directory or glob match"):
        prepare([tmp_path / "missing"], byte_tokenizer(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_given_as_a_path(tmp_path, corpus, tokenizer):
    tokenizer.save(str(tmp_path / "tok.json"))
    index = prepare(corpus, tmp_path / "tok.json", tmp_path / "out", progress=False)
    assert index["vocab_size"] == 400


@pytest.fixture
def dataset(tmp_path, corpus, tokenizer):
    prepare(corpus, tokenizer, tmp_path / "out", val_fraction=0.0, shard_tokens=200, progress=False)
    return tmp_path / "out"


def test_truncated_or_missing_shard_names_the_file(dataset):
    shard = dataset / "train" / "00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="train/00001.bin is corrupt or truncated"):
        TokenDataset(dataset)
    shard.unlink()
    with pytest.raises(DataError, match="train/00001.bin is missing \\(listed in .*index.json\\)"):
        TokenDataset(dataset)


def test_bad_index_names_the_file(dataset, tmp_path):
    with pytest.raises(DataError, match="has no split 'test' \\(it has: train, val\\)"):
        TokenDataset(dataset, "test")
    index = dataset / "index.json"
    index.write_text("{oops")
    with pytest.raises(DataError, match="index.json is corrupt: not valid JSON"):
        TokenDataset(dataset)
    index.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="index.json: not a 'deepseek-tokens' index"):
        TokenDataset(dataset)
    index.unlink()
    with pytest.raises(DataError, match="index.json is missing: .* is not a prepared dataset"):
        TokenDataset(dataset)
    with pytest.raises(DataError, match="index.json is missing"):
        TokenDataset(tmp_path / "nowhere")


def test_corrupt_document_ends(dataset):
    np.save(dataset / "train" / "documents.npy", np.array([1, 2], np.uint64))
    with pytest.raises(DataError, match="documents.npy is corrupt"):
        TokenDataset(dataset).document_ends
