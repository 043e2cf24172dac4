"""``ds quickstart``: the main job. Corpus → tokenizer → shards → a trained MoE code model → samples.

On a fresh machine it builds a corpus from the running Python's standard library (held-out modules for
validation), trains a byte-level BPE, trains the ``small`` preset from ``configs/quickstart.yaml`` for at
most 10 minutes, reports validation perplexity and bits per byte next to gzip and lzma on the same held-out
bytes, prints completions of Python prompts, leaves the model in ``runs/quickstart/model`` and serves it
(KServe v2 over HTTP and gRPC, ``--no-serve`` to skip) until Ctrl-C.
"""

from __future__ import annotations

import gzip
import lzma
import time
from pathlib import Path
from typing import Optional

import typer

# No trailing newline: the BPE merges a newline with the indentation after it, so a prompt that ends in
# "\n" would stop mid-token, somewhere the model never saw a token boundary.
PROMPTS = (
    "def read_lines(path):",
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef list_files(directory):",
    "    for key, value in",
)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)


def find_config(name: str) -> Path:
    """``configs/<name>`` of the source checkout this package runs from (or of the working directory)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = root / "configs" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"configs/{name} not found next to the package or in {Path.cwd()}")


def compressor_bits_per_byte(texts: list[str]) -> dict[str, float]:
    data = "".join(texts).encode()
    return {"gzip -9": len(gzip.compress(data, 9)) * 8 / len(data),
            "lzma -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8 / len(data)}


def quickstart_command(
    run_dir: Path = typer.Option(Path("runs/quickstart"), help="Where the data, checkpoints and model go."),
    serve: bool = typer.Option(True, help="End by serving the model (--no-serve stops after the samples)."),
    http_port: int = typer.Option(8080, help="HTTP port of the final `ds serve` step."),
    grpc_port: int = typer.Option(8081, help="gRPC port of the final `ds serve` step."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of configs/quickstart.yaml."),
) -> None:
    """Train a small MoE code model on the Python standard library and show what it writes."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import deepseek as ds
    from deepseek.data import TokenDataset, iter_documents, python_stdlib_dir
    from deepseek.data.prepare import is_validation_document
    from deepseek.train.lm import data_paths, ensure_prepared, evaluate_lm, expand_source, train_lm
    from deepseek.train.plot import plot_loss_curve
    from deepseek.train.trainer_config import load_train_config

    console = Console()
    started = time.perf_counter()
    cfg = load_train_config(find_config("quickstart.yaml"),
                            [f"run_dir={run_dir}", f"data.path={run_dir / 'data'}", *(overrides or [])])

    console.rule("[bold]1. Corpus, tokenizer and shards")
    console.print(f"the standard library of this Python: {python_stdlib_dir()}")
    # A second quickstart reuses the prepared shards (delete run_dir/data to rebuild them).
    ensure_prepared(cfg.data, cfg.model_config().vocab_size, progress=cfg.progress)
    data_dir = data_paths(cfg.data)["default"][0]
    for split in ("train", "val"):
        d = TokenDataset(data_dir, split)
        console.print(f"{split}: {d.num_documents:,} modules, {d.num_bytes / 1e6:.1f} MB, {d.num_tokens:,} tokens "
                      f"({d.num_bytes / max(d.num_tokens, 1):.2f} bytes/token)")

    console.rule("[bold]2. Train the small MoE preset")
    result = train_lm(cfg)
    console.print(f"{result.step} steps in {result.elapsed_s / 60:.1f} min"
                  + (" (stopped by the time limit)" if result.stopped_early else ""))
    console.print(f"loss curve: {plot_loss_curve(cfg.run_dir, title='quickstart: small MoE on the stdlib')}")

    console.rule("[bold]3. Held-out modules: the model against gzip and lzma")
    model_dir = Path(cfg.run_dir) / "model"
    model, tokenizer = ds.load(model_dir)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = evaluate_lm(model, [data_dir], batch_size=16, seq_len=cfg.data.schedule()[-1][1])
    sources = [expand_source(s) for s in cfg.data.prepare_from]
    held_out = [doc.text for doc in iter_documents(sources, exclude=cfg.data.exclude)
                if is_validation_document(doc.name, cfg.data.val_fraction)]
    table = Table("method", "bits per byte", "× gzip")
    rows = {"ours (MoE LM)": scores.get("val_bits_per_byte", float("nan")), **compressor_bits_per_byte(held_out)}
    for name, bpb in rows.items():
        table.add_row(name, f"{bpb:.3f}", f"{rows['gzip -9'] / bpb:.2f}")
    console.print(table)
    console.print(f"validation loss {scores['val_loss']:.3f} nats/token, perplexity {scores['val_ppl']:.1f} "
                  f"on {sum(len(t) for t in held_out) / 1e3:.0f} kB of modules it never trained on")

    console.rule("[bold]4. Completions")
    for prompt in PROMPTS:
        out = ds.generate(model, tokenizer, prompt, max_new_tokens=80, temperature=0.7, top_p=0.95, seed=0)
        console.print(prompt, style="bold", end="", highlight=False, markup=False)
        console.print(out.text, highlight=False, markup=False)
        console.print("[dim]" + "-" * 60)

    console.rule("[bold]Next")
    total = time.perf_counter() - started
    console.print(f"quickstart took {total / 60:.1f} min. The model is in {model_dir}. Try:", highlight=False)
    console.print(f'  ds generate {model_dir} "def fibonacci(n):"\n'
                  f"  ds eval {model_dir} --data {data_dir}\n"
                  f"  ds info {model_dir}\n"
                  f"  ds train configs/quickstart.yaml --resume max_steps=1200   # train it longer",
                  highlight=False, markup=False)
    console.print(f"  ds serve {model_dir} --http-port 8080                 # KServe v2 over HTTP and gRPC",
                  highlight=False, markup=False, soft_wrap=True)
    if serve:
        serve_model(console, model_dir, http_port, grpc_port)


def serve_model(console, model_dir: Path, http_port: int, grpc_port: int) -> None:
    """Step 5: serve the fresh model (playground, OpenAI API, KServe v2 over HTTP and gRPC) until Ctrl-C, with
    examples to paste."""
    import signal
    import sys

    import importlib.util

    from deepseek.serve.server import Server

    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "grpc", "tritonclient")):
        console.print("serving needs the serve extra: pip install -e '.[serve]', then run `ds serve` above")
        return
    console.rule("[bold]5. Serve it")
    server = Server(model_dir, port=http_port, grpc_port=grpc_port)
    server.check_ports()
    name = model_dir.resolve().name
    console.print(f"Playground: [bold]http://127.0.0.1:{http_port}/[/bold] (prompt, streamed tokens, live metrics)\n"
                  f"OpenAI-compatible API on http://127.0.0.1:{http_port}/v1, KServe v2 (Triton's protocol) on "
                  f"/v2 and gRPC 127.0.0.1:{grpc_port}; Prometheus metrics on /metrics. Ctrl-C drains and stops. "
                  f"Try:", highlight=False)
    console.print(f"""  curl -sN localhost:{http_port}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "prompt": "def read_lines(path):", "max_tokens": 48, "temperature": 0, "stream": true}}'
  curl -s localhost:{http_port}/metrics | grep ds_generation""", highlight=False, markup=False, soft_wrap=True)
    console.print(f"""  python - <<'PY'   # pip install openai
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:{http_port}/v1", api_key="none")
for chunk in client.completions.create(model="{name}", prompt="class Stack:", max_tokens=64, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
PY""", highlight=False, markup=False, soft_wrap=True)
    console.print(f"""  python - <<'PY'
import numpy as np, tritonclient.grpc as triton
from tokenizers import Tokenizer
tok = Tokenizer.from_file("{model_dir}/tokenizer.json")
ids = np.array([tok.encode("def read_lines(path):").ids], dtype=np.int64)
x = triton.InferInput("input_ids", list(ids.shape), "INT64"); x.set_data_from_numpy(ids)
logits = triton.InferenceServerClient("127.0.0.1:{grpc_port}").infer("{name}", [x]).as_numpy("logits")
print("next token:", repr(tok.decode([int(logits[0, -1].argmax())])))
PY""", highlight=False, markup=False, soft_wrap=True)  # pasted as is: no wrapping
    # uvicorn stops accepting on SIGINT/SIGTERM, drains, then re-raises the signal: an orderly stop, exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        if server.started:
            console.print("stopped; in-flight requests were drained")
