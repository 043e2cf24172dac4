"""Reciprocal rank fusion against a hand-computed ranking, locations and path filters."""

import pytest

from deepseek.rag.retrieve import RetrievalError, path_matches, reciprocal_rank_fusion


def test_rrf_matches_a_hand_computed_ranking():
    dense = [1, 2, 3, 4]  # chunk ids, best first
    bm25 = [3, 1, 5]
    fused = reciprocal_rank_fusion([dense, bm25], k=60)
    expected = [(1, 1 / 61 + 1 / 62),  # ranks 1 and 2
                (3, 1 / 63 + 1 / 61),  # ranks 3 and 1
                (2, 1 / 62), (5, 1 / 63), (4, 1 / 64)]
    assert [i for i, _ in fused] == [i for i, _ in expected]
    assert [s for _, s in fused] == pytest.approx([s for _, s in expected])


def test_rrf_ties_go_to_the_id_met_first_rank_by_rank():
    assert [i for i, _ in reciprocal_rank_fusion([[1, 2], [2, 1]])] == [1, 2]
    assert [i for i, _ in reciprocal_rank_fusion([[7], [8]])] == [7, 8]
    assert reciprocal_rank_fusion([[], []]) == []
    with pytest.raises(RetrievalError):
        reciprocal_rank_fusion([[1]], k=-1)


def test_rrf_k_controls_how_much_the_top_ranks_weigh():
    # With a small k rank 1 dominates: a chunk first in one list beats one second in both.
    assert reciprocal_rank_fusion([[1, 2], [3, 2]], k=0)[0][0] == 1
    assert reciprocal_rank_fusion([[1, 2], [3, 2]], k=60)[0][0] == 2


@pytest.mark.parametrize("pattern, expected", [
    ("*.py", True), ("decoder.py", True), ("*.md", False),
    ("json/*.py", True), ("lib/*.py", True), ("json/*.md", False), ("son/*.py", False),
    ("/usr/lib/*", True), ("/opt/*", False),
])
def test_path_globs(pattern, expected):
    assert path_matches("/usr/lib/json/decoder.py", pattern) is expected
