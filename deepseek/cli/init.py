"""``ds init``: a new, randomly initialised model directory from a preset (plus field overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("init")(init_command)


def init_command(
    model_dir: Path = typer.Argument(..., help="Where to write the model directory."),
    preset: str = typer.Option("tiny", help="Model preset: tiny, small, mixtral-tiny, base, large."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides such as n_routed_experts=16."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Create a model directory with random weights and the byte-level tokenizer."""
    import torch

    import deepseek as ds
    from deepseek.config import apply_overrides

    config = apply_overrides(ds.preset(preset), overrides or [])
    tokenizer = ds.byte_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the byte tokenizer's 259 tokens")
    torch.manual_seed(seed)
    model = ds.MoETransformer(config)
    ds.save(model, tokenizer, model_dir)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    typer.echo(f"wrote {model_dir}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
