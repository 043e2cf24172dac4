"""The knowledge-base index on disk: chunks, their vectors in FAISS, a BM25 index, and what built them.

    summary = build_index(["docs/", "src/**/*.py"], "kb")     # or update kb in place: only changed files re-embedded
    index = KnowledgeIndex.open("kb")                        # the manifest's embedding model, loaded
    index.dense(["how do I reset a password?"], k=5)         # [[(chunk id, cosine), ...]]
    index.lexical(["reset password"], k=5)                   # [[(chunk id, BM25 score), ...]]

Layout of an index directory (``FORMAT`` 1):

- ``manifest.json``: embedding model (name, path, dimension, max_tokens, precision), chunker sizes, the FAISS index
  chosen and why, the BM25 tokenizer (``bm25.tokenizer``), counts, the next chunk id, the update time;
- ``chunks.jsonl``: one live chunk per line (``id`` = its FAISS id, text, source, type, span, span unit, title,
  sha256 of the text, metadata);
- ``files.json``: per indexed file, the sha256 of its bytes, its chunk ids and its skipped rows (incremental updates);
- ``vectors.faiss``: ``IDMap2,Flat`` inner product below ``FLAT_LIMIT`` chunks (exact; ids kept on removal), else
  ``IVF{nlist},Flat`` with nlist ≈ 4·√N trained on the vectors themselves (the FAISS guideline below 1M vectors)
  and a hashtable direct map, so vectors can be removed and read back by id;
- ``bm25/``: bm25s arrays and vocabulary (JSON and ``.npy``, no pickle), rebuilt on every update since bm25s cannot
  add or remove documents.

An update reads the old index, keeps unchanged files' chunks (same ids, same vectors), re-chunks changed files
(new ids; a chunk whose text hash is already known reuses its vector instead of being embedded again), drops deleted
files, and writes everything into a temporary sibling directory that is swapped in whole: the index on disk is
always the old one or the new one. The index mirrors the sources of the latest run: a file that is no longer among
them is removed.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from deepseek.atomic import write_atomically
from deepseek.config import ConfigError
from deepseek.errors import UserFacingError
from deepseek.rag.chunk import check_sizes, chunk_section
from deepseek.rag.extra import require_rag_extra
from deepseek.rag.ingest import Skipped, expand_sources, file_hash, read_sections
from deepseek.rag.lexical import DESCRIPTION, LEGACY_TOKENIZER, TOKENIZER, bm25_tokens

if TYPE_CHECKING:
    from deepseek.rag.embed import Embedder

FORMAT = 1
FLAT_LIMIT = 50_000
"""Below this many chunks the FAISS index is exact (flat inner product); at and above it, IVF."""
DEFAULT_OVERLAP = 32


class IndexMismatchError(UserFacingError):
    """An index opened or updated with an embedding model other than the one that built it."""


class CorruptIndexError(UserFacingError):
    """A file of an index directory that cannot be read; the message names it."""


class StaleIndexError(UserFacingError):
    """An index whose BM25 terms were made by another tokenizer than this version's: its queries would not match.
    ``ds rag index`` on it rebuilds the BM25 part (the vectors are kept)."""


@dataclass
class Chunk:
    """One indexed piece of a document. ``span`` is 1-based and inclusive, in ``span_unit`` s (lines, page, row)."""

    id: int
    text: str
    source: str
    type: str
    span: tuple[int, int]
    span_unit: str
    title: str
    hash: str
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, record: dict) -> "Chunk":
        return cls(**{**record, "span": tuple(record["span"])})


# --- the FAISS index ----------------------------------------------------------------------------------------------

def choose_faiss(n: int, *, flat_limit: int = FLAT_LIMIT) -> dict:
    """The FAISS index for ``n`` vectors and why: exact flat search while it is cheap, IVF beyond."""
    if n < flat_limit:
        return {"factory": "IDMap2,Flat", "kind": "flat",
                "reason": f"{n:,} chunks < {flat_limit:,}: exact inner-product search is fast enough"}
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # k-means wants >= 39 training points per centroid
    nprobe = max(1, min(nlist, round(math.sqrt(nlist))))
    return {"factory": f"IVF{nlist},Flat", "kind": "ivf", "nlist": nlist, "nprobe": nprobe,
            "reason": f"{n:,} chunks >= {flat_limit:,}: IVF with nlist = 4*sqrt(N) trained on the vectors, "
                      f"nprobe = sqrt(nlist)"}


def new_faiss_index(plan: dict, dimension: int, training: np.ndarray):
    """An empty index for ``plan`` (IVF trained on ``training``) that takes ``add_with_ids`` and ``remove_ids``."""
    import faiss

    if plan["kind"] == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
    index = faiss.index_factory(dimension, plan["factory"], faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(training, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) and removal by arbitrary ids
    index.nprobe = plan["nprobe"]
    return index


def _same_structure(old: dict | None, new: dict) -> bool:
    """Can the old index take the new chunks as it is? Flat always; IVF while its nlist stays within 2x of ideal."""
    if old is None or old["kind"] != new["kind"]:
        return False
    return new["kind"] == "flat" or 0.5 <= old["nlist"] / new["nlist"] <= 2


# --- reading an index ---------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptIndexError(f"{path}: missing ({what} of the index)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptIndexError(f"{path}: corrupt {what} ({exc})") from None


def read_manifest(path: str | Path) -> dict:
    """The manifest of the index at ``path``; a one-line error when it is not an index or cannot be read."""
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise UserFacingError(f"{path}: not a ds rag index (no manifest.json)")
    manifest = _read_json(path / "manifest.json", "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "embedding" not in manifest:
        raise CorruptIndexError(f"{path / 'manifest.json'}: not a format-{FORMAT} ds rag manifest")
    return manifest


def read_chunks(path: Path) -> dict[int, Chunk]:
    chunks = {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    chunk = Chunk.from_json(json.loads(line))
                except (json.JSONDecodeError, TypeError, KeyError) as exc:
                    raise CorruptIndexError(f"{path}:{number}: corrupt chunk record ({exc})") from None
                chunks[chunk.id] = chunk
    except FileNotFoundError:
        raise CorruptIndexError(f"{path}: missing (the chunks of the index)") from None
    return chunks


def read_faiss(path: Path):
    import faiss

    if not path.is_file():
        raise CorruptIndexError(f"{path}: missing (the vectors of the index)")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        detail = re.sub(r"^Error in .*? at \S+:\d+: ", "", detail)  # FAISS's C++ location is no help to a user
        raise CorruptIndexError(f"{path}: corrupt FAISS index ({detail[:160]})") from None


def check_embedder(manifest: dict, embedder: "Embedder", where: str | Path) -> None:
    """Raise IndexMismatchError when ``embedder`` is not the model that built the index at ``where``."""
    built = manifest["embedding"]
    if built["name"] != embedder.name or int(built["dimension"]) != embedder.dimension:
        raise IndexMismatchError(
            f"{where} was built with embedding model {built['name']} ({built['dimension']} dimensions), not "
            f"{embedder.name} ({embedder.dimension} dimensions): use the same model, or index into a new directory")


def check_tokenizer(manifest: dict, where: str | Path) -> None:
    """Raise StaleIndexError when the index at ``where`` holds BM25 terms of another tokenizer than ``TOKENIZER``."""
    built = manifest.get("bm25", {}).get("tokenizer", LEGACY_TOKENIZER)
    if built != TOKENIZER:
        raise StaleIndexError(
            f"{where}: its BM25 index was built with tokenizer {built}, this version queries with {TOKENIZER}: "
            f"run `ds rag index SOURCES --out {where}` again to rebuild it (unchanged files keep their vectors)")


class KnowledgeIndex:
    """An index directory opened for search: ``chunks`` by id, dense search through FAISS, lexical through BM25."""

    def __init__(self, path: Path, manifest: dict, embedder: "Embedder", chunks: dict[int, Chunk], vectors,
                 bm25, bm25_ids: list[int]):
        self.path = path
        self.manifest = manifest
        self.embedder = embedder
        self.chunks = chunks
        self.vectors = vectors
        self._bm25 = bm25
        self._bm25_ids = np.asarray(bm25_ids, dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path, *, embedder: "Embedder | None" = None) -> "KnowledgeIndex":
        """Load an index; ``embedder`` defaults to the manifest's model. A different model -> IndexMismatchError;
        a damaged file -> CorruptIndexError naming it."""
        require_rag_extra()
        import bm25s

        from deepseek.rag.embed import Embedder

        path = Path(path)
        manifest = read_manifest(path)
        if embedder is None:
            embedder = Embedder.load(manifest["embedding"]["name"])
        check_embedder(manifest, embedder, path)
        check_tokenizer(manifest, path)
        chunks = read_chunks(path / "chunks.jsonl")
        vectors = read_faiss(path / "vectors.faiss")
        if vectors.ntotal != len(chunks):
            raise CorruptIndexError(f"{path / 'vectors.faiss'}: holds {vectors.ntotal} vectors but chunks.jsonl "
                                    f"{len(chunks)} chunks")
        if "nprobe" in manifest["faiss"]:
            vectors.nprobe = int(manifest["faiss"]["nprobe"])
        bm25_ids = _read_json(path / "bm25" / "chunk_ids.json", "BM25 id list")
        bm25 = None
        if bm25_ids:
            try:
                bm25 = bm25s.BM25.load(str(path / "bm25"), mmap=False)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                raise CorruptIndexError(f"{path / 'bm25'}: corrupt BM25 index ({exc})") from None
        return cls(path, manifest, embedder, chunks, vectors, bm25, bm25_ids)

    def dense(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """For each query, up to ``k`` (chunk id, cosine) pairs, best first."""
        if not queries:
            return []
        if min(k, self.vectors.ntotal) <= 0:
            return [[] for _ in queries]
        return self.dense_by_vectors(self.embedder.encode(list(queries)), k)

    def dense_by_vectors(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """:meth:`dense` for queries already embedded by this index's model (float32 ``[n, dimension]``, unit
        rows): ``ds serve`` embeds the queries of concurrent requests in one batch, then searches per request."""
        k = min(k, self.vectors.ntotal)
        if k <= 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.vectors.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def lexical(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """For each query, up to ``k`` (chunk id, BM25 score) pairs, best first; documents scoring 0 are left out."""
        if self._bm25 is None or k <= 0:
            return [[] for _ in queries]
        vocabulary = self._bm25.vocab_dict
        results = []
        for terms in bm25_tokens(queries):
            terms = [t for t in terms if t in vocabulary]
            if not terms:
                results.append([])
                continue
            docs, scores = self._bm25.retrieve([terms], k=min(k, len(self._bm25_ids)), show_progress=False)
            results.append([(int(self._bm25_ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0])
        return results

    def __len__(self) -> int:
        return len(self.chunks)


# --- building and updating ----------------------------------------------------------------------------------------

@dataclass
class _Previous:
    """What an existing index holds (empty for a new one)."""

    manifest: dict | None = None
    chunks: dict[int, Chunk] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    vectors: object = None


def _read_previous(out: Path) -> _Previous:
    if not out.exists():
        return _Previous()
    if not out.is_dir():
        raise UserFacingError(f"{out}: exists and is not a folder")
    if not (out / "manifest.json").exists():
        if any(out.iterdir()):
            raise UserFacingError(f"{out}: a folder that is not a ds rag index (no manifest.json); name a new or "
                                  "empty folder")
        return _Previous()
    manifest = read_manifest(out)
    previous = _Previous(manifest, read_chunks(out / "chunks.jsonl"), _read_json(out / "files.json", "file list"),
                         read_faiss(out / "vectors.faiss"))
    listed = {i for entry in previous.files.values() for i in entry["chunk_ids"]}
    if listed != set(previous.chunks):
        raise CorruptIndexError(f"{out / 'files.json'}: its chunk ids do not match chunks.jsonl")
    if previous.vectors.ntotal != len(previous.chunks):
        raise CorruptIndexError(f"{out / 'vectors.faiss'}: holds {previous.vectors.ntotal} vectors but chunks.jsonl "
                                f"{len(previous.chunks)} chunks")
    return previous


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=True)


def build_index(sources: Sequence[str | Path], out: str | Path, *, embedder: "Embedder | str | None" = None,
                max_tokens: int | None = None, overlap_tokens: int | None = None, batch_size: int = 64,
                flat_limit: int = FLAT_LIMIT, progress: bool = True, precision: str = "auto") -> dict:
    """Index ``sources`` (files, folders, globs) into the directory ``out``, or update the index there.

    ``embedder``: an :class:`Embedder`, a model name or path, or None (the existing index's model, else
    all-MiniLM-L6-v2), loaded at ``precision`` (``auto``: what this device runs fastest). ``max_tokens``
    (default: the model's, specials included) and ``overlap_tokens`` (default 32, or the existing index's) size the
    chunks; changing them re-chunks every file. Returns a summary: ``indexed``, ``unchanged``, ``removed`` (paths),
    ``skipped`` ((path, reason) pairs), ``chunks`` (live), ``embedded`` and ``reused`` (vectors computed vs taken from
    the old index), ``faiss`` (the choice and why), ``seconds``.
    """
    require_rag_extra()
    from deepseek.rag.embed import Embedder

    began = time.perf_counter()
    out = Path(out)
    previous = _read_previous(out)
    files = expand_sources(sources)  # a bad source or a damaged index fails before the model loads
    inside = out.resolve()
    files = [f for f in files if not Path(f).is_relative_to(inside)]  # `ds rag index . --out kb` skips kb itself
    if embedder is None or isinstance(embedder, str):
        name = embedder if embedder is not None else (previous.manifest["embedding"]["name"] if previous.manifest
                                                      else None)
        embedder = Embedder.load(name, precision=precision)
    if previous.manifest is not None:
        check_embedder(previous.manifest, embedder, out)
    old_chunker = previous.manifest["chunker"] if previous.manifest else {}
    chunker = {"max_tokens": int(max_tokens or old_chunker.get("max_tokens") or embedder.max_tokens),
               "overlap_tokens": int(overlap_tokens if overlap_tokens is not None
                                     else old_chunker.get("overlap_tokens", DEFAULT_OVERLAP))}
    if chunker["max_tokens"] > embedder.max_tokens:
        raise ConfigError(f"max_tokens {chunker['max_tokens']} is more than the embedding model reads "
                          f"({embedder.max_tokens}): longer chunks would be truncated")
    specials = embedder.count_tokens([""])[0]
    check_sizes(chunker["max_tokens"], chunker["overlap_tokens"], specials)
    rechunk_all = bool(old_chunker) and old_chunker != chunker

    next_id = int(previous.manifest.get("next_id", 0)) if previous.manifest else 0
    kept_files: dict[str, dict] = {}
    new_chunks: list[Chunk] = []
    indexed, unchanged, skipped = [], [], []
    with _progress_bar(progress) as bar:
        task = bar.add_task("reading", total=len(files))
        for path in files:
            bar.advance(task)
            try:
                digest = file_hash(path)
            except OSError as exc:
                skipped.append(Skipped(path, f"unreadable: {exc.strerror or exc}"))
                continue
            before = previous.files.get(path)
            if before is not None and before["hash"] == digest and not rechunk_all:
                kept_files[path] = before
                unchanged.append(path)
                skipped.extend(Skipped(*row) for row in before.get("skipped", []))
                continue
            sections, file_skips = read_sections(path)
            skipped.extend(file_skips)
            pieces = [(section, piece) for section in sections
                      for piece in chunk_section(section, embedder, max_tokens=chunker["max_tokens"],
                                                 overlap_tokens=chunker["overlap_tokens"], specials=specials)]
            if not pieces:
                if not file_skips:
                    skipped.append(Skipped(path, "no text"))
                continue
            ids = list(range(next_id, next_id + len(pieces)))
            next_id += len(pieces)
            new_chunks += [Chunk(i, piece.text, path, section.type, piece.span, section.span_unit, section.title,
                                 piece.hash, section.metadata) for i, (section, piece) in zip(ids, pieces)]
            kept_files[path] = {"hash": digest, "chunk_ids": ids,
                                "skipped": [[s.path, s.reason] for s in file_skips if s.path != path]}
            indexed.append(path)

    kept_ids = {i for path in unchanged for i in kept_files[path]["chunk_ids"]}
    removed_ids = [i for i in previous.chunks if i not in kept_ids]
    removed = sorted(set(previous.files) - set(unchanged) - set(indexed))
    removed = [p for p in removed if p not in files] + [p for p in removed if p in files]  # gone, then now skipped

    vectors, embedded, reused = _new_vectors(new_chunks, previous, embedder, batch_size, progress)
    chunks = {i: previous.chunks[i] for i in sorted(kept_ids)} | {c.id: c for c in new_chunks}
    plan = choose_faiss(len(chunks), flat_limit=flat_limit)
    faiss_index, plan = _updated_faiss(previous, plan, embedder.dimension, removed_ids, kept_ids, new_chunks,
                                       vectors)

    manifest = {
        "format": FORMAT,
        "embedding": {"name": embedder.name, "path": getattr(embedder, "path", None),
                      "dimension": embedder.dimension, "max_tokens": embedder.max_tokens,
                      "precision": embedder.precision},
        "chunker": chunker,
        "faiss": plan,
        "bm25": {"tokenizer": TOKENIZER, "tokens": DESCRIPTION, "method": "lucene"},
        "counts": {"files": len(kept_files), "chunks": len(chunks), "skipped": len(skipped)},
        "next_id": next_id,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomically(out, lambda tmp: _write_index(tmp, manifest, chunks, kept_files, faiss_index))
    return {"out": str(out), "indexed": indexed, "unchanged": unchanged, "removed": removed,
            "skipped": [(s.path, s.reason) for s in skipped], "chunks": len(chunks), "new_chunks": len(new_chunks),
            "embedded": embedded, "reused": reused, "faiss": plan, "seconds": time.perf_counter() - began}


def _new_vectors(new_chunks: list[Chunk], previous: _Previous, embedder: "Embedder", batch_size: int,
                 progress: bool) -> tuple[np.ndarray, int, int]:
    """Vectors of ``new_chunks`` (rows in order): texts the old index already embedded are read back from it,
    repeated texts are embedded once. Returns (vectors, texts embedded, vectors reused)."""
    vectors = np.empty((len(new_chunks), embedder.dimension), dtype=np.float32)
    known = {c.hash: c.id for c in previous.chunks.values()}
    rows_by_hash: dict[str, list[int]] = {}
    for row, chunk in enumerate(new_chunks):
        rows_by_hash.setdefault(chunk.hash, []).append(row)
    reuse = [(h, known[h]) for h in rows_by_hash if h in known]
    if reuse:
        old = previous.vectors.reconstruct_batch(np.array([i for _, i in reuse], dtype=np.int64))
        for (h, _), vector in zip(reuse, old):
            vectors[rows_by_hash[h]] = vector
    to_embed = [h for h in rows_by_hash if h not in known]
    if to_embed:
        texts = [new_chunks[rows_by_hash[h][0]].text for h in to_embed]
        for h, vector in zip(to_embed, embedder.encode(texts, batch_size=batch_size, progress=progress)):
            vectors[rows_by_hash[h]] = vector
    reused = sum(len(rows_by_hash[h]) for h, _ in reuse)
    return vectors, len(to_embed), reused


def _updated_faiss(previous: _Previous, plan: dict, dimension: int, removed_ids: list[int], kept_ids: set[int],
                   new_chunks: list[Chunk], vectors: np.ndarray):
    """(index, plan): the old FAISS index with removals and additions applied (an IVF keeps its trained lists and
    its plan), or a new one for ``plan`` when the size calls for another kind or list count."""
    new_ids = np.array([c.id for c in new_chunks], dtype=np.int64)
    old_plan = previous.manifest["faiss"] if previous.manifest else None
    if _same_structure(old_plan, plan):
        index = previous.vectors
        if removed_ids:
            index.remove_ids(np.array(removed_ids, dtype=np.int64))
        if len(new_ids):
            index.add_with_ids(vectors, new_ids)
        return index, (plan if plan["kind"] == "flat" else old_plan)
    kept = np.array(sorted(kept_ids), dtype=np.int64)
    kept_vectors = (previous.vectors.reconstruct_batch(kept) if len(kept)
                    else np.empty((0, dimension), dtype=np.float32))
    all_vectors = np.concatenate([kept_vectors, vectors]) if len(kept) else vectors
    index = new_faiss_index(plan, dimension, all_vectors)
    if len(all_vectors):
        index.add_with_ids(np.ascontiguousarray(all_vectors, dtype=np.float32), np.concatenate([kept, new_ids]))
    return index, plan


def _write_index(tmp: Path, manifest: dict, chunks: dict[int, Chunk], files: dict[str, dict], vectors) -> None:
    import bm25s
    import faiss

    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
        for chunk in chunks.values():
            f.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
    (tmp / "files.json").write_text(json.dumps(files, indent=1) + "\n")
    faiss.write_index(vectors, str(tmp / "vectors.faiss"))
    (tmp / "bm25").mkdir()
    ids = list(chunks)
    if ids:
        bm25 = bm25s.BM25(method="lucene")
        bm25.index(bm25_tokens([chunks[i].text for i in ids]), show_progress=False)
        bm25.save(str(tmp / "bm25"))
    (tmp / "bm25" / "chunk_ids.json").write_text(json.dumps(ids) + "\n")
