"""The ``embedding`` backend: a sentence-embedding model (:class:`deepseek.rag.embed.Embedder`) behind the batcher.

    # <repo>/minilm/config.yaml                 the version folder 1/ may be empty when parameters.model names one
    backend: embedding
    parameters: {model: all-MiniLM-L6-v2}      # the packaged model, or a sentence-transformers directory
                                               # (relative to this file's folder); default: the version folder
    # parameters.batch_tokens: padded tokens per forward (default 4096: 64 texts of 64 word pieces, 16 of 256)
    # max_batch_size: 64, dynamic_batching: {} are the defaults for this backend

Tensor API (derived; shapes shown with the batch dim)::

    input_ids       INT64 [-1, -1]   word-piece ids with [CLS]/[SEP] (:meth:`Embedder.token_ids`), right-padded
    attention_mask  INT64 [-1, -1]   optional; 1 = token, 0 = padding (padded with 0)
    embedding       FP32  [-1, dimension]   unit rows

``POST /v1/embeddings`` tokenizes each request's texts and queues the ids, so the dynamic batcher concatenates
concurrent requests into one call here; the rows are then un-padded and embedded sorted by token count, in
forwards of at most ``batch_tokens`` padded tokens (:meth:`Embedder.encode_ids`), so one long text does not make
every short one pay for its padding. The KServe
v2 infer route reaches the same tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from deepseek.hardware import PrecisionChoice
from deepseek.rag.embed import BATCH_TOKENS, DEFAULT_MODEL_ALIASES, Embedder
from deepseek.serve.backends.base import Backend, BackendError
from deepseek.serve.config import ServingConfig, TensorSpec

INPUT_IDS, ATTENTION_MASK, EMBEDDING = "input_ids", "attention_mask", "embedding"


class EmbedderBackend(Backend):
    """A loaded :class:`Embedder` behind the batcher: the derived tensors, their checks and the batched forward.
    :class:`EmbeddingBackend` loads the model its config names; the retrieval backend, its index's model."""

    platform = "sentence_transformers"

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig, embedder: Embedder,
                 batch_tokens: int):
        super().__init__(name, version, path, config)
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise BackendError(f"model {name!r}: parameters.batch_tokens must be a positive integer, got "
                               f"{batch_tokens!r}")
        self.batch_tokens = batch_tokens
        self.embedder = embedder
        self.precision = PrecisionChoice(config.precision, embedder.precision, embedder.precision_reason)
        if self.inputs or self.outputs:
            raise BackendError(f"model {name!r}: the tensors of a {config.backend} model are derived; remove "
                               f"inputs/outputs from its config.yaml")
        self.inputs = [TensorSpec(INPUT_IDS, "INT64", [-1], pad_value=embedder.pad_token_id),
                       TensorSpec(ATTENTION_MASK, "INT64", [-1], optional=True, pad_value=0)]
        self.outputs = [TensorSpec(EMBEDDING, "FP32", [embedder.dimension])]

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    def validate_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """The declared tensors (:meth:`Backend.validate_inputs`), and rows the model can embed: ids inside the
        vocabulary, 1..max_tokens tokens each. Checked per request, before it is queued: a bad row must not fail
        the other requests of its batch."""
        super().validate_inputs(inputs)
        ids, mask = inputs[INPUT_IDS], inputs.get(ATTENTION_MASK)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"input {ATTENTION_MASK!r}: shape {list(mask.shape)} differs from {INPUT_IDS!r}'s "
                             f"{list(ids.shape)}")
        vocab = len(self.embedder.tokenizer)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"input {INPUT_IDS!r}: token ids must lie in 0..{vocab - 1} (this model's vocabulary)")
        lengths = (mask != 0).sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > self.embedder.max_tokens):
            raise ValueError(f"every row needs 1..{self.embedder.max_tokens} tokens (max_tokens); got "
                             f"{int(lengths.min())}..{int(lengths.max())}")

    def _infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = inputs[INPUT_IDS]
        mask = inputs.get(ATTENTION_MASK)
        lengths = (mask != 0).sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        rows = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
        vectors = self.embedder.encode_ids(rows, batch_size=len(rows), batch_tokens=self.batch_tokens)
        return {EMBEDDING: torch.from_numpy(vectors)}

    def close(self) -> None:
        self.embedder = None


class EmbeddingBackend(EmbedderBackend):
    """``backend: embedding``: the sentence-transformers model ``parameters.model`` names (or the version folder)."""

    def __init__(self, name: str, version: int, path: Path, config: ServingConfig):
        params = config.parameters or {}
        unknown = sorted(set(params) - {"model", "batch_tokens"})
        if unknown:
            raise BackendError(f"model {name!r}: unknown parameters {', '.join(unknown)} of the embedding backend "
                               f"(model, batch_tokens)")
        model = params.get("model")
        if model is None:
            source = str(path)
        elif str(model) in DEFAULT_MODEL_ALIASES:
            source = str(model)
        else:
            source = str(Path(path).parent / str(model))  # relative to config.yaml's folder; absolute stays absolute
        try:
            embedder = Embedder.load(source, precision=config.precision)
        except Exception as exc:  # EmbeddingModelError, or a model sentence-transformers cannot read
            raise BackendError(f"model {name!r} version {version}: {exc}") from exc
        super().__init__(name, version, path, config, embedder, params.get("batch_tokens", BATCH_TOKENS))
