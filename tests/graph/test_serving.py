"""The served top-k module: the same ranking as the metrics', training items excluded, int8 round trip,
unknown users refused before queueing."""

import pytest
import torch
from safetensors.torch import load_file

from deepseek.graph.metrics import top_k_items
from deepseek.graph.serving import TopKRecommender, quantize_rows, save_recommender


def _tables(dim: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, dim, generator=g), torch.randn(11, dim, generator=g)


def test_top_k_matches_the_metrics_ranking_with_training_items_excluded(tmp_path):
    users, items = _tables()
    seen = [[0, 3], [], [1, 2, 4, 5], [10], [], [7], [0, 1, 2]]
    file = save_recommender(tmp_path, users, items, seen, k=4)
    module = TopKRecommender()  # what the torch backend's no-argument factory builds, then fills
    module.load_state_dict(load_file(str(file)), strict=True)
    ids, scores = module(torch.tensor([[2], [0], [6]]))
    expected = top_k_items(users @ items.T, 4, exclude=seen)[[2, 0, 6]]
    assert torch.equal(ids, expected)
    assert torch.allclose(scores, (users[[2, 0, 6], None, :] * items[expected]).sum(-1))
    for row, u in enumerate([2, 0, 6]):
        assert not set(ids[row].tolist()) & set(seen[u])


def test_int8_embeddings_are_a_quarter_of_the_bytes_and_rank_alike(tmp_path):
    users, items = _tables(dim=32)
    q, scale = quantize_rows(items)
    assert q.dtype == torch.int8 and torch.allclose(q.float() * scale, items, atol=scale.max().item())
    fp32 = save_recommender(tmp_path / "fp32", users, items, [[]] * 7, k=3)
    int8 = save_recommender(tmp_path / "int8", users, items, [[]] * 7, k=3, quantize=True)
    module = TopKRecommender()
    module.load_state_dict(load_file(str(int8)))
    ids, _ = module(torch.arange(7)[:, None])
    assert (ids == top_k_items(users @ items.T, 3)).float().mean() > 0.8

    def embedding_bytes(file):
        return sum(t.nbytes for name, t in load_file(str(file)).items() if name.startswith(("user_emb", "item_emb")))

    assert embedding_bytes(int8) <= 0.3 * embedding_bytes(fp32)  # 32 int8 + one fp32 scale per row vs 32 fp32


def test_check_inputs_names_the_valid_range():
    users, items = _tables()
    module = TopKRecommender(users, items)
    module.check_inputs({"user_id": torch.tensor([[0], [6]])})
    with pytest.raises(ValueError, match=r"unknown user id 7: this model knows user ids 0\.\.6"):
        module.check_inputs({"user_id": torch.tensor([[1], [7]])})
    with pytest.raises(ValueError, match="unknown user id -1"):
        module.check_inputs({"user_id": torch.tensor([[-1]])})
