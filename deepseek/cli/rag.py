"""``ds rag``: a knowledge base over documents — index them (FAISS + BM25), then search and answer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

rag_app = typer.Typer(no_args_is_help=True, help="Knowledge base: index documents, retrieve, answer with citations.")


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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Index documents (or update an index): chunk by the embedding model's tokens, embed, store FAISS + BM25."""
    from deepseek.rag.index import build_index

    summary = build_index(sources, out, embedder=embedding, max_tokens=max_tokens, overlap_tokens=overlap,
                          batch_size=batch_size, progress=not quiet)
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
