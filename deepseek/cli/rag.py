"""``ds rag``: a knowledge base over documents — index them (FAISS + BM25), query them, answer from them with
citations, measure the retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

rag_app = typer.Typer(no_args_is_help=True, help="Knowledge base: index documents, retrieve, answer with citations.")

PREVIEW_CHARS = 160


def register(app: typer.Typer) -> None:
    app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def index_command(
    sources: list[str] = typer.Argument(..., help="Files, folders (recursive) and glob patterns ('docs/**/*.md'): "
                                                  ".txt .md .rst .py .html .pdf .jsonl; others are listed as skipped."),
    out: Path = typer.Option(..., "--out", help="The index folder: created, or updated in place (only changed files "
                                                "are embedded again; files no longer among SOURCES are removed)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=3, help="Chunk size in the embedding model's "
                                             "tokens, specials included (default: the model's limit, 256 for "
                                             "MiniLM)."),
    overlap: Optional[int] = typer.Option(None, "--overlap", min=0, help="Tokens shared by neighbouring chunks of "
                                                                         "a section (default 32)."),
    embedding: Optional[str] = typer.Option(None, "--embedding", help="all-MiniLM-L6-v2 (the packaged model, the "
                                            "default) or a local sentence-transformers directory; an existing "
                                            "index keeps its own."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Chunks per embedding batch."),
    precision: str = typer.Option("auto", "--precision", help="Of the embedding model: auto (bf16 where this CPU "
                                  "runs it faster, measured; else fp32), fp32 or bf16."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Index documents (or update an index): chunk by the embedding model's tokens, embed, store FAISS + BM25."""
    from deepseek.rag.extra import require_rag_extra
    from deepseek.rag.index import build_index

    require_rag_extra()
    summary = build_index(sources, out, embedder=embedding, max_tokens=max_tokens, overlap_tokens=overlap,
                          batch_size=batch_size, progress=not quiet, precision=precision)
    print_index_summary(summary)


def print_index_summary(summary: dict) -> None:
    """A table of what an indexing run did, then the skipped files grouped by reason."""
    from collections import defaultdict

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ds rag index → {summary['out']}", title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("detail")
    table.add_row("files indexed", f"{len(summary['indexed']):,}", "new or changed: chunked and embedded")
    table.add_row("files unchanged", f"{len(summary['unchanged']):,}", "same bytes: chunks and vectors kept")
    table.add_row("files removed", f"{len(summary['removed']):,}", _first(summary["removed"]))
    table.add_row("skipped", f"{len(summary['skipped']):,}", "see below" if summary["skipped"] else "")
    table.add_row("chunks", f"{summary['chunks']:,}",
                  f"{summary['new_chunks']:,} new: {summary['embedded']:,} embedded, {summary['reused']:,} vectors "
                  "reused")
    table.add_row("vectors", summary["faiss"]["factory"], summary["faiss"]["reason"])
    table.add_row("seconds", f"{summary['seconds']:.1f}", "")
    console = Console(width=120)
    console.print(table)
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path, reason in summary["skipped"]:
        by_reason[reason].append(path)
    for reason, paths in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3:,} more" if len(paths) > 3 else "")
        console.print(f"skipped {len(paths):,} ({reason}): {shown}", highlight=False, soft_wrap=True)


def _first(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n:,} more" if len(paths) > n else "")


def _preview(text: str, width: int = PREVIEW_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _open_retriever(index: Path, mode: str, paths: Optional[list[str]], types: Optional[list[str]], fusion: str):
    from deepseek.rag.extra import require_rag_extra
    from deepseek.rag.retrieve import Retriever, check_options, open_for_queries

    check_options(mode, types, fusion)
    require_rag_extra()
    return Retriever(open_for_queries(index), mode, paths=paths, types=types, fusion=fusion)


_MODE_HELP = "hybrid (dense + BM25 fused), dense (embeddings) or bm25 (keywords)."
_FUSION_HELP = ("How hybrid fuses the two rankings: convex (0.7 dense + 0.3 BM25, min-max normalised scores) or rrf "
                "(reciprocal rank fusion, k = 60).")
_PATH_HELP = "Only chunks whose source matches this glob (repeatable; `*` crosses folders, e.g. 'docs/*.md')."
_TYPE_HELP = "Only chunks of this file type: py, md, rst, txt, html, pdf, jsonl (repeatable)."


@rag_app.command("query")
def query_command(
    index: Path = typer.Argument(..., help="An index directory (from `ds rag index`)."),
    question: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="How many chunks to return."),
    mode: str = typer.Option("hybrid", help=_MODE_HELP),
    fusion: str = typer.Option("convex", help=_FUSION_HELP),
    path: Optional[list[str]] = typer.Option(None, "--path", help=_PATH_HELP),
    type_: Optional[list[str]] = typer.Option(None, "--type", help=_TYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON (with their full text)."),
) -> None:
    """The chunks of INDEX that best match QUESTION, ranked, with their sources."""
    hits = _open_retriever(index, mode, path, type_, fusion).search(question, k)
    if as_json:
        typer.echo(json.dumps({"query": question, "mode": mode, "hits": [h.to_dict() for h in hits]}, indent=2,
                              ensure_ascii=False))
        return
    if not hits:
        typer.echo("no chunk matches" + (" the filters" if path or type_ else ""))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{mode}: {question}", show_lines=True)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source", overflow="fold")  # a path is worth its lines; the preview is cut instead
    table.add_column("text", ratio=1)
    for hit in hits:
        title = f"\n{hit.chunk.title}" if hit.chunk.title else ""
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.location + title, _preview(hit.chunk.text))
    Console().print(table)


@rag_app.command("ask")
def ask_command(
    index: Path = typer.Argument(..., help="An index directory (from `ds rag index`)."),
    question: str = typer.Argument(..., help="The question to answer from the indexed documents."),
    model: Optional[Path] = typer.Option(None, "--model", help="A model directory to answer with (our engine)."),
    llm_url: Optional[str] = typer.Option(None, "--llm-url", help="An OpenAI-compatible API to answer with, e.g. "
                                                                  "http://127.0.0.1:8080/v1 (`ds serve`)."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="The model name at --llm-url."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="How many chunks to give the model as sources."),
    mode: str = typer.Option("hybrid", help=_MODE_HELP),
    fusion: str = typer.Option("convex", help=_FUSION_HELP),
    path: Optional[list[str]] = typer.Option(None, "--path", help=_PATH_HELP),
    type_: Optional[list[str]] = typer.Option(None, "--type", help=_TYPE_HELP),
    max_new_tokens: int = typer.Option(256, min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy (default); higher = more random."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, citations and hits as JSON."),
) -> None:
    """Answer QUESTION from the chunks of INDEX, then list the numbered sources (* = cited in the answer)."""
    from deepseek.config import ConfigError
    from deepseek.rag.answer import answer_question
    from deepseek.rag.api import DeepSeekGenerator

    if (model is None) == (llm_url is None):
        raise ConfigError("answer with either --model DIR or --llm-url URL --llm-model NAME")
    if llm_url is not None and not llm_model:
        raise ConfigError("--llm-url needs --llm-model, the name the server knows the model by")
    hits = _open_retriever(index, mode, path, type_, fusion).search(question, k)
    generator = DeepSeekGenerator(model, llm_url=llm_url, model=llm_model, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed)
    result = answer_question(question, hits, generator)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(result.answer or "(the model gave no answer)")
    typer.echo()
    typer.echo("Sources:" if result.citations else "Sources: none found")
    for citation in result.citations:
        title = f" ({citation.title})" if citation.title else ""
        typer.echo(f"{'*' if citation.cited else ' '}[{citation.number}] {citation.location}{title}")


@rag_app.command("eval")
def eval_command(
    index: Path = typer.Argument(..., help="An index directory built from the question set's corpus."),
    questions: Path = typer.Argument(..., help="Questions as JSONL: {\"query\", \"relevant\": [{\"source\", "
                                               "\"title\" | \"span\"}]} (see `ds rag make-evalset`)."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="Cut-off of recall@k, MRR@k and nDCG@k."),
    fusion: str = typer.Option("convex", help=_FUSION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Recall@k, MRR@k and nDCG@k of dense, BM25 and hybrid retrieval over a question set."""
    from deepseek.rag.evaluate import evaluate, load_questions
    from deepseek.rag.extra import require_rag_extra
    from deepseek.rag.index import KnowledgeIndex

    from deepseek.rag.retrieve import check_options

    check_options("hybrid", fusion=fusion)
    require_rag_extra()
    report = evaluate(KnowledgeIndex.open(index), load_questions(questions), k, fusion=fusion)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{questions.name}: {report['questions']} questions, k = {k}")
    for column in ("mode", f"recall@{k}", f"MRR@{k}", f"nDCG@{k}", "ms/query"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in report["modes"].items():
        table.add_row(mode, f"{row[f'recall@{k}']:.3f}", f"{row[f'mrr@{k}']:.3f}", f"{row[f'ndcg@{k}']:.3f}",
                      f"{row['ms_per_query']:.1f}")
    Console().print(table)
    if report["unmatched"]:
        typer.echo(f"{report['unmatched']} questions left out: none of their relevant chunks is in the index")


@rag_app.command("make-evalset")
def make_evalset_command(
    out: Path = typer.Argument(..., help="Output folder: corpus/ (to index), code.jsonl, prose.jsonl, manifest.json."),
    limit: int = typer.Option(200, min=1, help="Questions per set at most (sampled with --seed)."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    module: Optional[list[str]] = typer.Option(None, "--module", help="Only this stdlib module and its submodules "
                                                                      "as code corpus (repeatable; default: all)."),
) -> None:
    """Offline retrieval question sets: docstring -> code over the standard library (docstrings removed from the
    indexed copy) and prose over the reference-manual topics of pydoc_data."""
    from deepseek.rag.evalset import write_evalset

    manifest = write_evalset(out, limit=limit, seed=seed, modules=module or None)
    for name, count in manifest["questions"].items():
        typer.echo(f"{name}: {count:,} questions")
    for name, count in manifest["corpus"].items():
        typer.echo(f"{name}: {count:,} files")
    typer.echo(f"wrote {out}; index it with `ds rag index {out}/corpus --out INDEX`, then "
               f"`ds rag eval INDEX {out}/code.jsonl`")
