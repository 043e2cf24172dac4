"""Top-k recommendations from precomputed embeddings, as a module ``ds serve`` runs (torch backend, entry point).

    # <repo>/recommender/config.yaml is CONFIG_YAML below: the torch backend with this module's
    # TopKRecommender as entry point, user_id INT64 [1] in, item_ids INT64 [-1] and scores FP32 [-1] out

``save_recommender(path, user_emb, item_emb, train_items, k)`` writes ``model.safetensors``: the embeddings, the
users' training items (CSR: ``seen_offsets`` [n_users + 1], ``seen_items``), which are never recommended back,
and ``k``. The factory takes no arguments (the torch backend calls it so), so the module's tensors start empty and
take the saved shapes when the weights are loaded. A request's user ids are checked before they are queued
(:meth:`TopKRecommender.check_inputs`: an unknown id is a 400 naming the valid range), so one bad id never fails
the other requests of its batch.

Embeddings may be stored as int8 with one fp32 scale per row (``quantize=True``: ~¼ of the bytes); they are
dequantized once at load, so the int8 model is smaller on disk, not faster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

MODEL_NAME = "recommender"
CONFIG_YAML = """\
backend: torch
parameters: {entry_point: "deepseek.graph.serving:TopKRecommender", weights: model.safetensors}
max_batch_size: 64
inputs:  [{name: user_id, datatype: INT64, shape: [1]}]
outputs: [{name: item_ids, datatype: INT64, shape: [-1]}, {name: scores, datatype: FP32, shape: [-1]}]
dynamic_batching: {max_queue_delay_ms: 2}
"""
TENSORS = ("user_emb", "item_emb", "seen_offsets", "seen_items", "k")


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``table ≈ q * scale`` with ``scale = max|row| / 127``."""
    scale = table.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(table / scale).clamp(-127, 127).to(torch.int8), scale.float()


class TopKRecommender(nn.Module):
    """``forward(user_id [B, 1] int64) -> (item_ids [B, k] int64, scores [B, k] fp32)``: the ``k`` items with the
    highest dot product, the user's training items excluded, best first."""

    def __init__(self, user_emb: torch.Tensor | None = None, item_emb: torch.Tensor | None = None,
                 seen_offsets: torch.Tensor | None = None, seen_items: torch.Tensor | None = None, k: int = 10):
        super().__init__()
        self.register_buffer("user_emb", torch.empty(0, 0) if user_emb is None else user_emb.float())
        self.register_buffer("item_emb", torch.empty(0, 0) if item_emb is None else item_emb.float())
        self.register_buffer("seen_offsets", torch.zeros(1, dtype=torch.long) if seen_offsets is None
                             else seen_offsets.long())
        self.register_buffer("seen_items", torch.empty(0, dtype=torch.long) if seen_items is None
                             else seen_items.long())
        self.register_buffer("k", torch.tensor(k, dtype=torch.long))

    @property
    def n_users(self) -> int:
        return self.user_emb.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the no-argument factory's tensors are empty: take the saved shapes (and rebuild int8 tables)
        if prefix + "user_emb_int8" in state_dict:
            for name in ("user_emb", "item_emb"):
                q, scale = state_dict.pop(prefix + name + "_int8"), state_dict.pop(prefix + name + "_scale")
                state_dict[prefix + name] = q.float() * scale
        for name in TENSORS:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """ValueError (a 400 from the server) for user ids this model has no embedding for."""
        ids = inputs.get("user_id")
        if ids is None or ids.numel() == 0:
            return
        bad = ids[(ids < 0) | (ids >= self.n_users)]
        if bad.numel():
            raise ValueError(f"unknown user id {int(bad[0])}: this model knows user ids 0..{self.n_users - 1}")

    def forward(self, user_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        users = user_id.reshape(-1).long()
        scores = self.user_emb[users] @ self.item_emb.T  # [B, n_items]
        starts, ends = self.seen_offsets[users], self.seen_offsets[users + 1]
        counts = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), counts)
        # each row's seen items: positions starts[row] .. ends[row] - 1 in seen_items
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        scores[rows, self.seen_items[starts[rows] + within]] = float("-inf")
        top = torch.topk(scores, min(int(self.k), scores.shape[1]), dim=1)
        return top.indices, top.values


def seen_csr(train_items: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [n_users + 1], items) of per-user training items."""
    counts = torch.tensor([len(items) for items in train_items], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    items = torch.tensor([i for row in train_items for i in row], dtype=torch.long)
    return offsets, items


def save_recommender(path: str | Path, user_emb: torch.Tensor, item_emb: torch.Tensor,
                     train_items: Sequence[Sequence[int]], k: int = 10, quantize: bool = False) -> Path:
    """Write ``path``/model.safetensors for :class:`TopKRecommender` (``quantize``: int8 rows + fp32 scales)."""
    from safetensors.torch import save

    from deepseek.atomic import write_file_atomically

    offsets, items = seen_csr(train_items)
    tensors = {"seen_offsets": offsets, "seen_items": items, "k": torch.tensor(k, dtype=torch.long)}
    for name, table in (("user_emb", user_emb), ("item_emb", item_emb)):
        table = table.detach().float().cpu().contiguous()
        if quantize:
            tensors[name + "_int8"], tensors[name + "_scale"] = quantize_rows(table)
        else:
            tensors[name] = table
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = path / "model.safetensors"
    write_file_atomically(file, save({n: t.contiguous() for n, t in tensors.items()}))
    return file


def write_model_repository(root: str | Path, user_emb: torch.Tensor, item_emb: torch.Tensor,
                           train_items: Sequence[Sequence[int]], k: int = 10, quantize: bool = False,
                           name: str = MODEL_NAME) -> Path:
    """``root``/``name``/{config.yaml, 1/model.safetensors}: a model repository ``ds serve`` serves as is."""
    model_dir = Path(root) / name
    save_recommender(model_dir / "1", user_emb, item_emb, train_items, k=k, quantize=quantize)
    (model_dir / "config.yaml").write_text(CONFIG_YAML)
    return Path(root)
