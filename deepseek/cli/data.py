"""``ds prepare`` and ``ds tokenizer train``: corpus in, tokenizer and token shards out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)
    app.add_typer(tokenizer_app, name="tokenizer")


def _sources(sources: list[str]) -> list[str]:
    from deepseek.train.lm import expand_source

    return [expand_source(s) for s in sources]


def prepare_command(
    sources: list[str] = typer.Argument(..., help="Files, directories or globs: .txt/.md/.py/… and .jsonl with a "
                                                 "`text` field; {stdlib} = this Python's standard library."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (index.json, tokenizer.json, shards)."),
    tokenizer: str = typer.Option("byte", help="'byte' or a tokenizer.json (see `ds tokenizer train`)."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out for validation (split by document)."),
    exclude: Optional[list[str]] = typer.Option(None, help="fnmatch pattern of paths to skip (repeatable)."),
    shard_tokens: int = typer.Option(16_777_216, help="Tokens per shard file."),
) -> None:
    """Tokenize a corpus (streaming, both cores) into binary shards split train/validation by document."""
    from deepseek.data import byte_tokenizer, load_tokenizer_file, prepare

    tok = byte_tokenizer() if tokenizer == "byte" else load_tokenizer_file(tokenizer)
    index = prepare(_sources(sources), tok, out, val_fraction=val_fraction, exclude=exclude or (),
                    shard_tokens=shard_tokens)
    for split, info in index["splits"].items():
        typer.echo(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {info['bytes']:,} bytes")
    typer.echo(f"wrote {out}")


@tokenizer_app.command("train")
def tokenizer_train_command(
    sources: list[str] = typer.Argument(..., help="Files, directories or globs to learn the merges from."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(4096, help="Vocabulary size including the special tokens."),
    exclude: Optional[list[str]] = typer.Option(None, help="fnmatch pattern of paths to skip (repeatable)."),
    min_frequency: int = typer.Option(2, help="Merges seen fewer times are not learned."),
) -> None:
    """Train a byte-level BPE tokenizer (with bos/eos/pad and chat-role special tokens)."""
    from deepseek.data import iter_documents, train_tokenizer

    texts = (doc.text for doc in iter_documents(_sources(sources), exclude=exclude or ()))
    tok = train_tokenizer(texts, vocab_size, min_frequency=min_frequency, show_progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    typer.echo(f"wrote {out} ({tok.get_vocab_size()} tokens)")
