"""Reciprocal rank fusion against a hand-computed ranking, locations and path filters."""

import json

import pytest

from deepseek.rag.retrieve import (RetrievalError, Retriever, chunk_location, convex_fusion, path_matches,
                                   reciprocal_rank_fusion)


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


# -- on a real index of the mini corpus (tests/rag/conftest.py) ------------------------------------------------------

def ids(hits):
    return [h.chunk.id for h in hits]


def test_dense_and_bm25_modes_are_the_index_rankings(opened_index):
    query = "encrypt a message by shifting letters"
    dense = Retriever(opened_index, "dense").search(query, k=3)
    expected = opened_index.dense([query], 3)[0]
    assert ids(dense) == [i for i, _ in expected]
    assert [h.score for h in dense] == pytest.approx([s for _, s in expected])
    assert [h.rank for h in dense] == [1, 2, 3]
    bm25 = Retriever(opened_index, "bm25").search(query, k=3)
    assert ids(bm25) == [i for i, _ in opened_index.lexical([query], 3)[0]]


def test_convex_fusion_matches_a_hand_computed_ranking():
    dense = [(1, 0.9), (2, 0.7), (3, 0.5)]  # min-max: 1 -> 1, 2 -> 0.5, 3 -> 0
    bm25 = [(3, 12.0), (4, 8.0), (2, 4.0)]  # min-max: 3 -> 1, 4 -> 0.5, 2 -> 0
    fused = convex_fusion(dense, bm25, bm25_weight=0.3)
    # 1: 0.7; 2: 0.35 + 0 = 0.35; 3: 0 + 0.3 = 0.3; 4: 0 + 0.15 = 0.15
    assert [i for i, _ in fused] == [1, 2, 3, 4]
    assert [s for _, s in fused] == pytest.approx([0.7, 0.35, 0.3, 0.15])
    # BM25 weighted more than dense turns the order of 2 and 3 around
    assert [i for i, _ in convex_fusion(dense, bm25, bm25_weight=0.6)] == [3, 1, 4, 2]


def test_convex_fusion_edge_cases():
    assert convex_fusion([], []) == []
    assert convex_fusion([(5, 0.4)], []) == [(5, pytest.approx(0.7))]  # one score alone normalises to 1
    assert [i for i, _ in convex_fusion([(1, 0.5), (2, 0.5)], [])] == [1, 2]  # a tie keeps the dense order
    dense = [(1, 0.9), (2, 0.1)]
    assert [i for i, _ in convex_fusion(dense, [(2, 3.0)], bm25_weight=0.0)] == [1, 2]
    assert convex_fusion(dense, [], bm25_weight=1.0)[0][1] == 0.0
    with pytest.raises(RetrievalError, match="BM25 weight"):
        convex_fusion([(1, 1.0)], [], bm25_weight=1.5)


def test_hybrid_is_the_convex_fusion_of_the_top_4k_of_each(opened_index):
    query = "backups written every night"
    k = 3
    dense = opened_index.dense([query], 4 * k)[0]
    bm25 = opened_index.lexical([query], 4 * k)[0]
    expected = convex_fusion(dense, bm25)[:k]
    hits = Retriever(opened_index, "hybrid").search(query, k)
    assert ids(hits) == [i for i, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected])
    assert hits[0].chunk.source.endswith("guide.md") and hits[0].chunk.title == "Backups"


def test_hybrid_rrf_is_the_rrf_of_the_top_4k_of_each(opened_index):
    query = "backups written every night"
    k = 3
    dense = [i for i, _ in opened_index.dense([query], 4 * k)[0]]
    bm25 = [i for i, _ in opened_index.lexical([query], 4 * k)[0]]
    expected = reciprocal_rank_fusion([dense, bm25])[:k]
    hits = Retriever(opened_index, "hybrid", fusion="rrf").search(query, k)
    assert ids(hits) == [i for i, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected])
    assert hits[0].chunk.source.endswith("guide.md") and hits[0].chunk.title == "Backups"


def test_search_many_equals_one_query_at_a_time(opened_index):
    retriever = Retriever(opened_index, "hybrid")
    queries = ["area of a circle", "palindrome check", "budget meeting"]
    assert [ids(hits) for hits in retriever.search_many(queries, 4)] == [ids(retriever.search(q, 4)) for q in queries]


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_queries_embedded_elsewhere_give_the_same_hits(opened_index, mode):
    # ds serve embeds the queries of many requests in one batch, then searches each request with its vectors
    retriever = Retriever(opened_index, mode, types=["py"])
    queries = ["area of a circle", "palindrome check"]
    vectors = opened_index.embedder.encode(queries)
    by_vectors = retriever.search_many(queries, 3, query_vectors=vectors)
    assert [[(h.chunk.id, h.rank) for h in hits] for hits in by_vectors] == \
        [[(h.chunk.id, h.rank) for h in retriever.search(q, 3)] for q in queries]
    with pytest.raises(ValueError, match="1 query vectors for 2 queries"):
        retriever.search_many(queries, 3, query_vectors=vectors[:1])


def test_filters_apply_before_the_cut_to_k(opened_index):
    # The one text chunk ranks far below the geometry code for this query: unfiltered it is not in the top 1, yet
    # with --type txt it is the one hit (the candidate lists are deepened until a chunk passes).
    query = "rotate a point by an angle"
    assert Retriever(opened_index, "dense").search(query, 1)[0].chunk.type == "py"
    for mode in ("dense", "bm25", "hybrid"):
        hits = Retriever(opened_index, mode, types=["txt"]).search(query, 1)
        assert [h.chunk.type for h in hits] in ([], ["txt"])
    (hit,) = Retriever(opened_index, "dense", types=["txt"]).search(query, 1)
    assert hit.chunk.source.endswith("notes.txt") and hit.rank == 1
    text_only = Retriever(opened_index, "hybrid", paths=["text.py"]).search(query, 3)
    assert len(text_only) == 3 and all(h.chunk.source.endswith("text.py") for h in text_only)
    md_or_txt = Retriever(opened_index, "dense", types=["md", "txt"]).search(query, 10)
    assert {h.chunk.type for h in md_or_txt} == {"md", "txt"} and len(md_or_txt) == sum(
        c.type in ("md", "txt") for c in opened_index.chunks.values())
    assert Retriever(opened_index, "dense", paths=["nothing/*.py"]).search(query, 3) == []


def test_bad_requests_are_one_line_errors(opened_index):
    with pytest.raises(RetrievalError, match="unknown retrieval mode 'fuzzy'"):
        Retriever(opened_index, "fuzzy")
    with pytest.raises(RetrievalError, match="unknown file type docx"):
        Retriever(opened_index, types=["docx"])
    with pytest.raises(RetrievalError, match="k must be >= 1"):
        Retriever(opened_index).search("x", 0)
    with pytest.raises(RetrievalError, match="unknown fusion 'max'; choose one of convex, rrf"):
        Retriever(opened_index, fusion="max")
    with pytest.raises(RetrievalError, match="BM25 weight"):
        Retriever(opened_index, bm25_weight=-0.1)


def test_locations_name_lines_pages_and_rows(opened_index):
    from dataclasses import replace

    chunk = next(iter(opened_index.chunks.values()))
    assert chunk_location(replace(chunk, span=(3, 9), span_unit="lines")) == f"{chunk.source}:3-9"
    assert chunk_location(replace(chunk, span=(2, 2), span_unit="page")) == f"{chunk.source} p. 2"
    assert chunk_location(replace(chunk, span=(7, 7), span_unit="row")) == f"{chunk.source} row 7"


def test_ds_rag_query_prints_json_and_a_table(mini_index):
    from typer.testing import CliRunner

    from deepseek.cli.main import app

    index, corpus = mini_index
    result = CliRunner().invoke(app, ["rag", "query", str(index), "make a slug from a title", "-k", "2", "--json",
                                      "--type", "py", "--path", "*/text.py"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [h["rank"] for h in report["hits"]] == [1, 2] and report["hits"][0]["title"] == "slugify"
    assert report["hits"][0]["source"] == str((corpus / "text.py").resolve())
    table = CliRunner().invoke(app, ["rag", "query", str(index), "make a slug from a title", "-k", "2"])
    assert table.exit_code == 0 and "slugify" in table.stdout and "rank" in table.stdout


def test_a_bad_mode_is_a_usage_error_before_the_index_is_opened(tmp_path, ds_main):
    result = ds_main("rag", "query", tmp_path / "none", "q", "--mode", "fuzzy")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: unknown retrieval mode 'fuzzy'; choose one of hybrid, "
                                                      "dense, bm25")
    assert "Traceback" not in result.stderr


def test_a_filter_whose_chunks_rank_low_deepens_the_search(tmp_path, embedder):
    # Half the chunks are Markdown about the sky, half text about cooking; asked about cooking with --type md, the
    # first candidate depth (1 x 4 x 50/25 = 8) holds only cooking notes, so the search must go deeper.
    from deepseek.rag.index import KnowledgeIndex, build_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(25):
        (corpus / f"recipe{i}.txt").write_text(f"Recipe {i}: simmer the onions and garlic in butter for {i + 5} "
                                               "minutes, then add the tomatoes and season the sauce.\n")
        (corpus / f"sky{i}.md").write_text(f"# Star {i}\n\nThe star catalogue entry {i} lists its magnitude, its "
                                           "distance in light years and its position in the night sky.\n")
    build_index([str(corpus)], str(tmp_path / "index"), embedder=embedder, progress=False)
    index = KnowledgeIndex.open(tmp_path / "index", embedder=embedder)
    query = "how long should I cook the onions in butter?"
    everything = [cid for cid, _ in index.dense([query], len(index.chunks))[0]]
    assert all(index.chunks[cid].type == "txt" for cid in everything[:8])
    for k in (1, 3):
        hits = Retriever(index, "dense", types=["md"]).search(query, k)
        assert ids(hits) == [cid for cid in everything if index.chunks[cid].type == "md"][:k]


def test_questions_are_embedded_at_the_precision_of_one_row_work(mini_index, opened_index):
    from deepseek.hardware import resolve_precision
    from deepseek.rag.retrieve import open_for_queries

    index = open_for_queries(mini_index[0])
    assert index.embedder.precision == resolve_precision("auto", "cpu", workload="decode").precision
    assert index.embedder.name == opened_index.embedder.name and index.chunks.keys() == opened_index.chunks.keys()
    for query in ("area of a circle", "palindrome check", "when do backups run?"):
        ours, built = (Retriever(i, "dense").search(query, 1)[0] for i in (index, opened_index))
        assert ours.chunk.id == built.chunk.id and ours.score == pytest.approx(built.score, abs=2e-2)
