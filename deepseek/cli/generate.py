"""``ds generate``: complete prompts with a model directory, streaming to the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)


def generate_command(
    model_dir: Path = typer.Argument(..., help="A model directory (config.json, model.safetensors, tokenizer.json)."),
    prompts: list[str] = typer.Argument(..., help="One or more prompts; several are generated as one batch."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate at most (default 64)."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default); higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: Optional[float] = typer.Option(None, help="> 1 discourages repeating context tokens."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop string (repeatable); not included in the output."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
    stream: bool = typer.Option(True, help="Print tokens as they come (one prompt) instead of at the end."),
    precision: str = typer.Option("auto", help="auto (what decodes fastest on this device), fp32 or bf16."),
) -> None:
    """Generate text from a model directory, with the same engine as the server and ds.pipeline."""
    from deepseek.generate import pipeline

    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, stop=stop or None, seed=seed)
    options = {k: v for k, v in options.items() if v is not None}
    pipe = pipeline("text-generation", str(model_dir), precision=precision)
    if stream and len(prompts) == 1:
        typer.echo(prompts[0], nl=False)
        for delta in pipe.stream(prompts[0], **options):
            typer.echo(delta, nl=False)
        typer.echo()
        return
    for result in pipe(prompts, **options):
        typer.echo(result[0]["generated_text"])
        typer.echo("-" * 40)
