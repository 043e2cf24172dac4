"""The quickstart: a tour of what the framework does today, end to end, on CPU in under a minute.

Builds the `small` MoE preset, saves it as a model directory, loads it back, generates (streaming
and batched) with the shared engine, and shows how the router spread tokens over the experts.
(Training on the Python standard library arrives with the trainer; until then the weights are random,
so the samples are noise — the machinery is what is on show.)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import deepseek as ds

console = Console()


def main() -> None:
    torch.manual_seed(0)
    config = ds.preset("small", vocab_size=259)  # the byte tokenizer's vocabulary until a BPE is trained
    model = ds.MoETransformer(config).eval()
    console.rule("[bold]1. Build")
    console.print(f"preset 'small': {model.num_parameters() / 1e6:.2f}M parameters, "
                  f"{model.num_parameters(active=True) / 1e6:.2f}M active per token; "
                  f"{config.n_routed_experts} routed experts (top-{config.top_k}, {config.router} router) "
                  f"+ {config.n_shared_experts} shared, {config.first_k_dense} dense layer(s) first")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "small-moe"
        console.rule("[bold]2. Save and load the model directory")
        ds.save(model, ds.byte_tokenizer(), directory, generation={"max_new_tokens": 48, "temperature": 0.8})
        for file in sorted(directory.iterdir()):
            console.print(f"  {file.name:<20} {file.stat().st_size / 1e6:8.2f} MB")
        loaded, tokenizer = ds.load(directory)
        probe = torch.randint(0, config.vocab_size, (1, 16))
        same = torch.equal(model(probe), loaded(probe))
        console.print(f"reloaded model gives identical logits: {same}")

        console.rule("[bold]3. Generate (streaming)")
        pipe = ds.pipeline("text-generation", model=directory)
        prompt = "def fibonacci(n):"
        sys.stdout.write(prompt)
        start = time.perf_counter()
        pieces = 0
        for delta in pipe.stream(prompt, seed=0):
            sys.stdout.write(delta)
            sys.stdout.flush()
            pieces += 1
        console.print(f"\n[dim]{pieces} text pieces in {time.perf_counter() - start:.2f} s[/dim]")

        console.rule("[bold]4. Generate (a batch of prompts of different lengths)")
        prompts = ["import os", "class Stack:\n    def push(self, item):", "for i in range(10):"]
        start = time.perf_counter()
        outputs = ds.generate(loaded, tokenizer, prompts, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1)
        elapsed = time.perf_counter() - start
        for prompt, out in zip(prompts, outputs):
            console.print(f"[cyan]{prompt!r}[/cyan] -> {out.text!r} [dim]({out.finish_reason})[/dim]")
        tokens = sum(o.completion_tokens for o in outputs)
        console.print(f"[dim]{tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tokens/s[/dim]")

        console.rule("[bold]5. Router statistics of the last forward")
        _, stats = loaded(torch.tensor([tokenizer.encode(prompts[1]).ids]), return_router_stats=True)
        table = Table("MoE layer", *[f"e{i}" for i in range(config.n_routed_experts)], "max/mean")
        for layer, (row, imbalance) in enumerate(zip(stats.tokens_per_expert, stats.max_over_mean)):
            table.add_row(str(layer + config.first_k_dense), *[str(int(c)) for c in row], f"{imbalance:.2f}")
        console.print(table)
    console.rule("[bold green]done")
    console.print("Next: `make test`; the docs in docs/; `ds --help`.")


if __name__ == "__main__":
    main()
