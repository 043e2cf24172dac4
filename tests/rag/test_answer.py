"""Answers with citations: prompts from retrieved chunks, fitted to the model's context, answered by a tiny model
directory through our engine and through a real OpenAI-compatible server (ds serve), from the CLI and the API."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import deepseek as ds
from deepseek.cli.main import app
from deepseek.data.tokenizer import train_tokenizer
from deepseek.errors import UserFacingError
from deepseek.rag import DeepSeekGenerator, DeepSeekRetriever, rag_query
from deepseek.rag.answer import (GenerationError, LocalGenerator, OpenAIGenerator, answer_question, build_messages,
                                 cited_numbers, fit_sources, source_block)
from deepseek.rag.retrieve import Retriever

QUESTION = "How do I check whether a word is a palindrome?"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random model directory whose tokenizer has the chat template's role tokens, as a model repository
    entry too (``repo/chat/1``) for ``ds serve``."""
    repo = tmp_path_factory.mktemp("rag-llm")
    tokenizer = train_tokenizer(["def is_palindrome(word):\n    return word == word[::-1]\n" * 20,
                                 "Answer the question using the sources [1] [2].\n" * 20], vocab_size=320)
    torch.manual_seed(0)
    config = ds.preset("tiny", vocab_size=tokenizer.get_vocab_size())
    ds.save(ds.MoETransformer(config).eval(), tokenizer, repo / "chat" / "1")
    (repo / "chat" / "config.yaml").write_text(yaml.safe_dump(
        {"backend": "deepseek", "generation": {"max_running": 2, "max_batched_tokens": 64, "max_queue": 8}}))
    return repo, repo / "chat" / "1"


def test_cited_numbers_and_messages():
    assert cited_numbers("It is [2], see also [1, 3] and [x].") == {1, 2, 3}
    system, user = build_messages("why?", ["[1] a.py:1-2\ncode"])
    assert system["role"] == "system" and "[1]" in system["content"]
    assert user["content"] == "Sources:\n\n[1] a.py:1-2\ncode\n\nQuestion: why?"


def test_sources_are_numbered_with_their_locations(opened_index, chat_model):
    hits = Retriever(opened_index).search(QUESTION, 3)
    generator = LocalGenerator(chat_model[1], max_new_tokens=8)
    messages, used = fit_sources(QUESTION, hits, generator)
    assert used == 3
    user = messages[1]["content"]
    for n, hit in enumerate(hits, start=1):
        assert f"[{n}] {hit.location} ({hit.chunk.title})\n{hit.chunk.text.strip()}" in user
    assert user.index("[1]") < user.index("[2]") < user.index("[3]") < user.index(f"Question: {QUESTION}")
    rendered = generator.render(messages)
    assert rendered.startswith("<|system|>") and rendered.endswith("<|assistant|>")  # the serving chat template


def test_sources_are_fitted_to_the_context(opened_index, chat_model):
    hits = Retriever(opened_index).search(QUESTION, 5)
    generator = LocalGenerator(chat_model[1], max_new_tokens=8)
    tokens = lambda messages: len(generator.pipe.tokenizer.encode(generator.render(messages)).ids)  # noqa: E731
    whole = tokens(build_messages(QUESTION, [f"[{n}] {h.location}\n{h.chunk.text}" for n, h in enumerate(hits, 1)]))
    generator.max_prompt_tokens = whole // 2  # as if the model's context were shorter: trailing sources go
    messages, used = fit_sources(QUESTION, hits, generator)
    assert 0 < used < len(hits) and tokens(messages) <= generator.max_prompt_tokens
    assert f"[{used}]" in messages[1]["content"] and f"[{used + 1}]" not in messages[1]["content"]
    first = hits[0].chunk.text.strip()
    # Room for the first source's header and a few words of it only: its text is cut.
    generator.max_prompt_tokens = tokens(build_messages(QUESTION, [source_block(1, hits[0], first[:12] + " …")]))
    messages, used = fit_sources(QUESTION, hits, generator)
    assert used == 1 and tokens(messages) <= generator.max_prompt_tokens
    content = messages[1]["content"]
    assert f"\n{first[:12]}" in content and " …\n\nQuestion:" in content and first not in content
    generator.max_prompt_tokens = 5
    with pytest.raises(GenerationError, match="does not fit"):
        fit_sources(QUESTION, hits, generator)


def test_ds_rag_ask_with_a_model_directory(mini_index, opened_index, chat_model):
    index, _ = mini_index
    result = CliRunner().invoke(app, ["rag", "ask", str(index), QUESTION, "--model", str(chat_model[1]), "-k", "2",
                                      "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    hits = Retriever(opened_index).search(QUESTION, 2)
    generator = LocalGenerator(chat_model[1], max_new_tokens=12)
    expected = answer_question(QUESTION, hits, generator)  # greedy: the same engine gives the same answer
    assert report["answer"] == expected.answer and report["answer"]  # a random model, but a seeded one: some text
    assert [c["number"] for c in report["citations"]] == [1, 2]
    assert [c["location"] for c in report["citations"]] == [h.location for h in hits]
    plain = CliRunner().invoke(app, ["rag", "ask", str(index), QUESTION, "--model", str(chat_model[1]), "-k", "2",
                                     "--max-new-tokens", "12"])
    assert plain.exit_code == 0, plain.output
    sources = plain.stdout.split("Sources:\n")[1].strip("\n").splitlines()
    assert [line[1:] for line in sources] == [f"[{n}] {h.location} ({h.chunk.title})" for n, h in enumerate(hits, 1)]


def test_ds_rag_ask_through_ds_serve_gives_the_engine_answer(mini_index, opened_index, chat_model):
    from deepseek.serve.manager import ModelManager
    from deepseek.serve.repository import ModelRepository
    from tests.serve.gated_model import running_server

    index, _ = mini_index
    local = answer_question(QUESTION, Retriever(opened_index).search(QUESTION, 2),
                            LocalGenerator(chat_model[1], max_new_tokens=12))
    with running_server(ModelManager(ModelRepository(chat_model[0]))) as base:
        result = CliRunner().invoke(app, ["rag", "ask", str(index), QUESTION, "--llm-url", base, "--llm-model", "chat",
                                          "-k", "2", "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["answer"] == local.answer and local.answer
    assert [c["location"] for c in report["citations"]] == [c.location for c in local.citations]


def test_python_api_and_the_langchain_retriever(mini_index, embedder, chat_model):
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    retriever = DeepSeekRetriever(index_path=mini_index[0], k=3, mode="hybrid", embedder=embedder)
    hits = retriever.retrieve(QUESTION)
    assert len(hits) == 3 and hits[0].chunk.title == "is_palindrome"
    result = rag_query(QUESTION, retriever=retriever,
                       generator=DeepSeekGenerator(model_dir=chat_model[1], max_new_tokens=8))
    assert [c.location for c in result.citations] == [h.location for h in hits]
    assert isinstance(result.answer, str) and result.to_dict()["citations"][0]["number"] == 1

    lc = retriever.as_langchain()
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke(QUESTION)
    assert all(isinstance(d, Document) for d in docs)
    assert [d.page_content for d in docs] == [h.chunk.text for h in hits]
    meta = docs[0].metadata
    assert meta["source"] == hits[0].chunk.source and meta["title"] == "is_palindrome" and meta["rank"] == 1
    assert meta["span"] == list(hits[0].chunk.span) and meta["type"] == "py"


def test_generator_arguments_and_an_unreachable_server(tmp_path):
    from tests.serve.gated_model import free_port

    with pytest.raises(UserFacingError, match="either a model directory or an llm_url"):
        DeepSeekGenerator()
    with pytest.raises(UserFacingError, match="needs the model name"):
        DeepSeekGenerator(llm_url="http://127.0.0.1:1")
    generator = OpenAIGenerator(f"http://127.0.0.1:{free_port()}", "chat", timeout_s=5)
    assert str(generator.client.base_url).rstrip("/").endswith("/v1")
    with pytest.raises(GenerationError, match="cannot reach the language model"):
        generator.complete(build_messages("q", []))


def test_ds_rag_ask_needs_one_language_model(mini_index):
    result = CliRunner().invoke(app, ["rag", "ask", str(mini_index[0]), QUESTION])
    assert result.exit_code != 0 and "--model DIR or --llm-url" in str(result.exception)


def test_the_model_directorys_stops_are_kept_with_the_chat_templates(tmp_path):
    tokenizer = ds.byte_tokenizer()  # no role tokens: the plain "User: ... Assistant:" template
    ds.save(ds.MoETransformer(ds.preset("tiny")), tokenizer, tmp_path / "m", generation={"stop": ["END"]})
    generator = LocalGenerator(tmp_path / "m", max_new_tokens=4)
    assert generator.options["stop"] == ["END", "\nUser:", "\nSystem:"]
    assert generator.render(build_messages("q", [])).endswith("\nAssistant:")
