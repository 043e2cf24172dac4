"""The Python API of the knowledge base, as the design documents name it.

    from deepseek.rag import DeepSeekGenerator, DeepSeekRetriever, rag_query

    retriever = DeepSeekRetriever(index_path="kb", k=5, mode="hybrid")
    generator = DeepSeekGenerator(model_dir="runs/chat/model")                 # or llm_url=..., model=...
    result = rag_query("How do I decode JSON?", retriever=retriever, generator=generator)
    print(result.answer); [print(c.number, c.location) for c in result.citations]

    lc = retriever.as_langchain()          # a langchain_core BaseRetriever: lc.invoke("question") -> [Document]
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

from deepseek.errors import UserFacingError
from deepseek.rag.answer import LocalGenerator, OpenAIGenerator, RagAnswer, answer_question
from deepseek.rag.retrieve import Hit, Retriever, check_options, open_for_queries


class DeepSeekRetriever:
    """Opens the index at ``index_path`` once and retrieves ``k`` chunks per question in ``mode`` (hybrid, dense,
    bm25; ``fusion``: convex or rrf, see :mod:`deepseek.rag.retrieve`), optionally restricted to ``paths`` globs and
    file ``types``. The manifest's model embeds the questions at the precision of one-row work (:func:`~deepseek.rag.retrieve.open_for_queries`); ``embedder`` overrides it (the
    same model only: a different one is an ``IndexMismatchError``)."""

    def __init__(self, index_path: str | Path, k: int = 5, mode: str = "hybrid", *,
                 paths: Optional[Sequence[str]] = None, types: Optional[Sequence[str]] = None,
                 fusion: str = "convex", embedder=None):
        check_options(mode, types, fusion)
        self.index = open_for_queries(index_path, embedder=embedder)
        self.k = k
        self.retriever = Retriever(self.index, mode, paths=paths, types=types, fusion=fusion)

    @property
    def mode(self) -> str:
        return self.retriever.mode

    def retrieve(self, question: str, k: Optional[int] = None) -> list[Hit]:
        """The best chunks for ``question``, best first."""
        return self.retriever.search(question, k or self.k)

    __call__ = retrieve

    def as_langchain(self, k: Optional[int] = None):
        """This retriever as a LangChain ``BaseRetriever`` (needs ``langchain-core``)."""
        return langchain_retriever_class()(retriever=self, k=k or self.k)


class DeepSeekGenerator:
    """A language model that answers from sources: a model directory run by our generation engine (``model_dir``),
    or an OpenAI-compatible server (``llm_url`` plus its ``model`` name). Greedy by default."""

    def __init__(self, model_dir: str | Path | None = None, *, llm_url: Optional[str] = None,
                 model: Optional[str] = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: Optional[int] = None, api_key: Optional[str] = None):
        if (model_dir is None) == (llm_url is None):
            raise UserFacingError("give the generator either a model directory or an llm_url, not both or neither")
        if llm_url is not None:
            if not model:
                raise UserFacingError("an llm_url needs the model name the server knows it by (model=...)")
            self.backend = OpenAIGenerator(llm_url, model, api_key=api_key, max_new_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed)
        else:
            self.backend = LocalGenerator(model_dir, max_new_tokens=max_new_tokens, temperature=temperature,
                                          seed=seed)

    def fits(self, messages: list[dict]) -> bool:
        return self.backend.fits(messages)

    def complete(self, messages: list[dict]) -> str:
        return self.backend.complete(messages)


def rag_query(question: str, *, retriever: DeepSeekRetriever, generator: DeepSeekGenerator,
              k: Optional[int] = None) -> RagAnswer:
    """Retrieve for ``question``, answer from what was found; ``result.citations`` numbers the sources."""
    return answer_question(question, retriever.retrieve(question, k), generator)


@functools.cache
def langchain_retriever_class():
    """``DeepSeekLangChainRetriever``, built on first use so that LangChain is imported only by those who use it.

    Its documents carry the chunk's text as ``page_content`` and ``source``, ``span``, ``span_unit``, ``title``,
    ``type``, ``chunk_id``, ``score`` and ``rank`` (plus a JSONL row's own fields) as ``metadata``.
    """
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict

    class DeepSeekLangChainRetriever(BaseRetriever):
        """A :class:`DeepSeekRetriever` behind LangChain's retriever interface (``invoke``, ``batch``, chains)."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        retriever: DeepSeekRetriever
        k: int = 5

        def _get_relevant_documents(self, query: str, *,
                                    run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
            return [Document(page_content=hit.chunk.text, metadata=hit_metadata(hit))
                    for hit in self.retriever.retrieve(query, self.k)]

    return DeepSeekLangChainRetriever


def hit_metadata(hit: Hit) -> dict:
    """A hit's provenance as flat metadata (a JSONL row's fields first, so ours win on a name clash)."""
    chunk = hit.chunk
    return {**chunk.metadata, "source": chunk.source, "span": list(chunk.span), "span_unit": chunk.span_unit,
            "title": chunk.title, "type": chunk.type, "chunk_id": chunk.id, "score": hit.score, "rank": hit.rank}
