"""Retrieval metrics against hand-computed values, question files, and the offline question set generator."""

import json
import math

import pytest

from deepseek.data.errors import DataError
from deepseek.rag.evaluate import QuestionSetError, Selector, load_questions, query_metrics
from deepseek.rag.evalset import docstring_summary, first_sentence, topic_question, write_evalset


def test_metrics_on_a_hand_example():
    # Ranked chunks 7 3 9 4 5; relevant: chunk 3, the function split over chunks 4 and 8, and chunk 11 (missed).
    m = query_metrics([7, 3, 9, 4, 5], [frozenset({3}), frozenset({4, 8}), frozenset({11})], k=5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx(1 / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # found at ranks 2 and 4
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # three found at ranks 1, 2, 3
    assert m["ndcg"] == pytest.approx(dcg / ideal)
    assert m["ndcg"] == pytest.approx(0.49819, abs=1e-5)


def test_one_relevant_item_gives_the_textbook_values():
    for rank in range(1, 6):
        ranked = [100 + i for i in range(5)]
        ranked[rank - 1] = 1
        m = query_metrics(ranked, [frozenset({1})], k=5)
        assert m == pytest.approx({"recall": 1.0, "mrr": 1 / rank, "ndcg": 1 / math.log2(rank + 1)})


def test_a_selector_found_twice_counts_once_and_k_cuts():
    assert query_metrics([1, 2], [frozenset({1, 2})], k=2) == pytest.approx({"recall": 1, "mrr": 1, "ndcg": 1})
    assert query_metrics([5, 6, 3], [frozenset({3})], k=2) == {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}


def test_question_file_selectors_resolve_against_its_folder(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"query": "q", "relevant": [{"source": "docs/a.md", "title": "Intro"},
                                                          {"source": "/abs/b.py", "span": [3, 9]}]}) + "\n\n")
    (question,) = load_questions(qa)
    assert question.relevant == [Selector(str(tmp_path / "docs" / "a.md"), "Intro", None),
                                 Selector("/abs/b.py", None, (3, 9))]


@pytest.mark.parametrize("line, message", [
    ("{not json", "qa.jsonl:1: not JSON"),
    ('{"relevant": [{"source": "a"}]}', "non-empty string 'query'"),
    ('{"query": "q", "relevant": []}', "non-empty list of chunk selectors"),
    ('{"query": "q", "relevant": [{"title": "x"}]}', "string 'source'"),
    ('{"query": "q", "relevant": [{"source": "a", "span": [5, 2]}]}', "start <= end"),
])
def test_bad_question_lines_are_one_line_errors(tmp_path, line, message):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(line + "\n")
    with pytest.raises(QuestionSetError, match="qa.jsonl" if message.startswith("qa") else message) as info:
        load_questions(qa)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_summaries_and_first_sentences():
    assert docstring_summary("Return the sum of\n    two numbers.  More text.\n\nDetails.") == "Return the sum of two numbers."
    assert first_sentence("Assert statements are a way\nto insert assertions:\n\n   x") == \
        "Assert statements are a way to insert assertions:"
    assert first_sentence("no end mark here") == "no end mark here"


def test_topic_question_skips_grammar_and_headings_and_removes_the_sentence():
    text = ("Title\n*****\n\n   grammar ::= rule\n\nSub\n===\n\n"
            "Statements are executed in order. They may raise.\nAnything else.\n\nLast paragraph.")
    query, document = topic_question(text)
    assert query == "Statements are executed in order."
    assert "executed in order" not in document
    assert document.startswith("Title\n*****\n\n   grammar ::= rule") and "They may raise. Anything else." in document
    assert document.endswith("Last paragraph.")


MODULE = '''"""A module."""


def add(a, b):
    """Return the sum of two numbers given as arguments.

    More words so that the docstring is long enough.
    """
    return a + b


def scale(values, factor):
    """Multiply every value of a list by the same factor."""
    return [v * factor for v in values]


def copy(x):
    """Return the sum of two numbers given as arguments."""
    return x
'''


def test_evalset_strips_the_docstrings_and_points_at_the_def_lines(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "ops.py").write_text(MODULE)
    manifest = write_evalset(tmp_path / "set", limit=5, seed=0, root=root)
    out = tmp_path / "set"
    code = [json.loads(line) for line in (out / "code.jsonl").read_text().splitlines()]
    # `add` and `copy` share a summary: ambiguous, both dropped; `scale` is asked.
    assert [row["function"] for row in code] == ["pkg.ops.scale"]
    (relevant,) = code[0]["relevant"]
    stripped = (out / relevant["source"]).read_text()
    assert "Multiply every value" not in stripped and "Return the sum of two numbers" in stripped
    assert stripped.splitlines()[relevant["span"][0] - 1] == "def scale(values, factor):"
    assert code[0]["query"] == "Multiply every value of a list by the same factor."
    prose = [json.loads(line) for line in (out / "prose.jsonl").read_text().splitlines()]
    assert len(prose) == 5 == manifest["questions"]["prose.jsonl"]
    for row in prose:
        document = (out / row["relevant"][0]["source"]).read_text()
        assert row["query"] not in " ".join(document.split())
    again = write_evalset(tmp_path / "again", limit=5, seed=0, root=root)
    assert again == manifest and (tmp_path / "again" / "prose.jsonl").read_text() == (out / "prose.jsonl").read_text()


def test_evalset_without_questions_is_an_error(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "empty.py").write_text("X = 1\n")
    with pytest.raises(DataError, match="no documented function"):
        write_evalset(tmp_path / "set", root=tmp_path / "lib")


# -- on a real index of the mini corpus (tests/rag/conftest.py) ------------------------------------------------------

def test_retrieval_quality_on_the_ten_function_set(opened_index, mini_index, tmp_path):
    from deepseek.rag.evaluate import evaluate
    from tests.rag.conftest import write_questions

    questions = load_questions(write_questions(tmp_path / "qa.jsonl", mini_index[1]))
    report = evaluate(opened_index, questions, k=5)
    assert report["questions"] == 10 and report["unmatched"] == 0
    assert set(report["modes"]) == {"dense", "bm25", "hybrid"}
    for mode, row in report["modes"].items():
        assert set(row) == {"recall@5", "mrr@5", "ndcg@5", "ms_per_query"}
        assert 0 <= row["mrr@5"] <= row["ndcg@5"] <= row["recall@5"] <= 1, mode  # one relevant chunk each
    # Paraphrases share few words with the code: embeddings find every function in the top 5, keywords do not.
    assert report["modes"]["dense"]["recall@5"] == 1.0
    assert report["modes"]["hybrid"]["recall@5"] >= report["modes"]["bm25"]["recall@5"]
    assert report["modes"]["dense"]["mrr@5"] >= 0.8


def test_questions_outside_the_index_are_counted_or_refused(opened_index, mini_index, tmp_path):
    from deepseek.rag.evaluate import evaluate

    corpus = mini_index[1]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"query": "circle area", "relevant": [{"source": str(corpus / "geometry.py"),
                                                                     "title": "circle_area"}]}) + "\n"
                  + json.dumps({"query": "x", "relevant": [{"source": "elsewhere.py"}]}) + "\n")
    report = evaluate(opened_index, load_questions(qa), k=3, modes=["dense"])
    assert report["questions"] == 1 and report["unmatched"] == 1 and set(report["modes"]) == {"dense"}
    qa.write_text(json.dumps({"query": "x", "relevant": [{"source": "elsewhere.py"}]}) + "\n")
    with pytest.raises(QuestionSetError, match="none of the 1 questions"):
        evaluate(opened_index, load_questions(qa), k=3)


def test_ds_rag_eval_reports_the_three_modes(mini_index, tmp_path):
    from typer.testing import CliRunner

    from deepseek.cli.main import app
    from tests.rag.conftest import write_questions

    qa = write_questions(tmp_path / "qa.jsonl", mini_index[1])
    result = CliRunner().invoke(app, ["rag", "eval", str(mini_index[0]), str(qa), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["k"] == 3 and set(report["modes"]["hybrid"]) >= {"recall@3", "mrr@3", "ndcg@3"}
    table = CliRunner().invoke(app, ["rag", "eval", str(mini_index[0]), str(qa)])
    assert table.exit_code == 0 and "recall@5" in table.output and "hybrid" in table.output
