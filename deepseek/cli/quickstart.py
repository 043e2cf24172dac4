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
from dataclasses import dataclass
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


def versus_gzip(bits: float, gzip_bits: float) -> str:
    """``bits`` per byte said against gzip's, in words nobody can misread."""
    change = 1.0 - bits / gzip_bits
    if abs(change) < 0.005:
        return "same as gzip"
    return f"{change:.0%} fewer bits than gzip" if change > 0 else f"{-change:.0%} more bits than gzip (worse)"


@dataclass(frozen=True)
class QuickstartPlan:
    """What the quickstart trains on this machine, sized from its measured training speed."""

    overrides: list[str]
    expected_tokens: float
    expected_steps: int
    description: str


# configs/quickstart.yaml trains a narrower `small` (d_model 192): at every budget measured, from ~0.8M to ~5.5M
# tokens in 9 minutes, it beat the full-width preset, which sees fewer tokens in the same time (docs/benchmarks.md,
# "The quickstart on every CPU"). Where the machine would feed it this many tokens, the full width is used instead:
# a judgment (nothing that fast was measured), since wider models win once tokens stop being the limit.
WIDE_MODEL_MIN_TOKENS = 10e6
WIDE_MODEL = ["model.d_model=256", "model.ffn_dim=768", "model.moe_ffn_dim=256", "model.n_heads=8",
              "model.n_kv_heads=2"]
WIDE_MODEL_COST = 1.4  # the full width trains ~1.4x slower per token (measured: 8,461 vs 10,974 tok/s in bf16)
BATCH_ROWS = 16
# The sequence curriculum as shares of the expected tokens: short rows first (more, cheaper steps while the model
# learns local structure: 64-token rows reached 4.60 nats/token after 0.5M tokens where 128-token rows reached
# 4.70), then 128, then the 256-token context the held-out modules are scored with.
CURRICULUM = ((64, 0.4), (128, 0.3), (256, 0.3))
COST_PER_TOKEN = {64: 1.0, 128: 1.02, 256: 1.1}  # attention makes long rows dearer per token (measured: 1.0-1.1x)


def plan_for_speed(tokens_per_s: float, minutes: float) -> QuickstartPlan:
    """The run that fits ``minutes`` of training at ``tokens_per_s`` (measured at 128-token rows).

    The time budget (schedule.fit_time_limit) then sets the exact step count from the real step times; this plan
    sizes what the budget cannot: the model, where the sequence curriculum switches, and how often to evaluate
    and checkpoint.
    """
    seconds = minutes * 60 * 0.92  # evaluations, checkpoints and the final save take the rest
    tokens = tokens_per_s * seconds
    wide = tokens / WIDE_MODEL_COST >= WIDE_MODEL_MIN_TOKENS
    if wide:
        tokens /= WIDE_MODEL_COST
    stages, step = [], 0
    for seq_len, share in CURRICULUM:
        stages.append([step, seq_len])
        step += max(int(tokens * share / COST_PER_TOKEN[seq_len] / (BATCH_ROWS * seq_len)), 10)
    steps = step
    every = max(steps // 3, 10)
    curriculum = ", ".join(f"[{a}, {b}]" for a, b in stages)
    overrides = [f"batch_size={BATCH_ROWS}", f"max_steps={2 * steps}", f"data.curriculum=[{curriculum}]",
                 f"eval_every={every}", f"checkpoint.every={every}",
                 f"schedule.warmup_steps={min(30, max(steps // 40, 5))}"]
    if wide:
        overrides += WIDE_MODEL
    model = "the full-width small preset (d_model 256)" if wide else "the quickstart model (d_model 192)"
    rows = ", then ".join(f"{b}-token rows from step {a}" for a, b in stages)
    description = (f"{tokens_per_s:,.0f} tok/s here -> about {tokens / 1e6:.1f}M tokens in {minutes:g} min: "
                   f"{model}; {rows}; the time budget sets the exact step count (about {steps})")
    return QuickstartPlan(overrides, tokens, steps, description)


def choose_training_precision(cfg, console) -> tuple[str, float]:
    """Measure a real training step of the quickstart model in fp32 and, where this CPU has native bf16 that the
    product probe found fast, in bf16; return the faster precision and its tokens/s at 128-token rows."""
    from deepseek.hardware import bf16_products_fast, choose_precision, hardware_profile
    from deepseek.train.calibrate import measure_training_speed

    profile = hardware_profile()
    model_config = cfg.model_config()
    candidates = ["fp32", "bf16"] if bf16_products_fast(profile) else ["fp32"]
    if cfg.precision != "auto":
        candidates = [cfg.precision]
    speeds = {}
    for name in candidates:
        choice = choose_precision(name, profile)
        speeds[name] = measure_training_speed(model_config, choice, batch_size=BATCH_ROWS, seq_len=128).tokens_per_s
    best = max(speeds, key=speeds.get)
    if len(speeds) > 1 and speeds[best] < 1.1 * speeds["fp32"]:  # bf16 must clearly win to be worth its rounding
        best = "fp32"
    measured = ", ".join(f"{k} {v:,.0f} tok/s" for k, v in speeds.items())
    why = (f"measured a training step of this model: {measured}" if len(speeds) > 1 else
           f"{choose_precision(cfg.precision, profile).reason}; measured {measured}")
    console.print(f"precision: [bold]{best}[/bold] ({why})", highlight=False)
    return best, speeds[best]


def quickstart_command(
    run_dir: Path = typer.Option(Path("runs/quickstart"), help="Where the data, checkpoints and model go."),
    serve: bool = typer.Option(True, help="End by serving the model (--no-serve stops after the samples)."),
    http_port: int = typer.Option(8080, help="HTTP port of the final `ds serve` step."),
    grpc_port: int = typer.Option(8081, help="gRPC port of the final `ds serve` step."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of configs/quickstart.yaml."),
) -> None:
    """Train a small MoE code model on the Python standard library and show what it writes."""
    from rich.console import Console
    from rich.table import Table

    import deepseek as ds
    from deepseek.data import TokenDataset, iter_documents, python_stdlib_dir
    from deepseek.data.prepare import is_validation_document
    from deepseek.hardware import autocast, choose_precision, hardware_profile
    from deepseek.train.lm import data_paths, ensure_prepared, evaluate_lm, expand_source, train_lm
    from deepseek.train.plot import plot_loss_curve
    from deepseek.config import save_file
    from deepseek.train.config import load_train_config

    console = Console()
    started = time.perf_counter()
    base = [f"run_dir={run_dir}", f"data.path={run_dir / 'data'}"]
    user = list(overrides or [])
    cfg = load_train_config(find_config("quickstart.yaml"), base + user)

    console.rule("[bold]0. This machine")
    console.print(hardware_profile().summary(), highlight=False)

    console.rule("[bold]1. Corpus, tokenizer and shards")
    console.print(f"the standard library of this Python: {python_stdlib_dir()}")
    # A second quickstart reuses the prepared shards (delete run_dir/data to rebuild them).
    ensure_prepared(cfg.data, cfg.model_config().vocab_size, progress=cfg.progress)
    data_dir = data_paths(cfg.data)["default"][0]
    for split in ("train", "val"):
        d = TokenDataset(data_dir, split)
        console.print(f"{split}: {d.num_documents:,} modules, {d.num_bytes / 1e6:.1f} MB, {d.num_tokens:,} tokens "
                      f"({d.num_bytes / max(d.num_tokens, 1):.2f} bytes/token)")

    console.rule("[bold]2. Size the run to this machine")
    precision, tokens_per_s = choose_training_precision(cfg, console)
    plan = plan_for_speed(tokens_per_s, cfg.time_limit_minutes or 9.0)
    console.print(plan.description if not any(o.startswith("model.") for o in user) else
                  plan.description.split(": ")[0] + ": the model your overrides set", highlight=False)
    # What the user set explicitly wins: the plan leaves those keys (and, if any model key is set, the model) alone.
    cfg = load_train_config(find_config("quickstart.yaml"),
                            base + user_first(plan.overrides + [f"precision={precision}"], user) + user)

    console.rule("[bold]3. Train the MoE model")
    save_file(cfg, Path(cfg.run_dir) / "config.yaml")  # what `ds train` needs to resume or extend this run
    result = train_lm(cfg)
    console.print(f"{result.step} steps in {result.elapsed_s / 60:.1f} min"
                  + (" (stopped by the time limit)" if result.stopped_early else ""))
    console.print(f"loss curve: {plot_loss_curve(cfg.run_dir, title='quickstart: small MoE on the stdlib')}")

    console.rule("[bold]4. Held-out modules: the model against gzip and lzma")
    model_dir = Path(cfg.run_dir) / "model"
    model, tokenizer = ds.load(model_dir)
    model.eval()
    with autocast(choose_precision(precision, hardware_profile())):
        scores = evaluate_lm(model, [data_dir], batch_size=16, seq_len=cfg.data.schedule()[-1][1])
    sources = [expand_source(s) for s in cfg.data.prepare_from]
    held_out = [doc.text for doc in iter_documents(sources, exclude=cfg.data.exclude)
                if is_validation_document(doc.name, cfg.data.val_fraction)]
    table = Table("method", "bits per byte (lower is better)", "against gzip -9")
    rows = {"ours (MoE LM)": scores.get("val_bits_per_byte", float("nan")), **compressor_bits_per_byte(held_out)}
    for name, bpb in rows.items():
        table.add_row(name, f"{bpb:.3f}", "-" if name == "gzip -9" else versus_gzip(bpb, rows["gzip -9"]))
    console.print(table)
    console.print(f"validation loss {scores['val_loss']:.3f} nats/token, perplexity {scores['val_ppl']:.1f} "
                  f"on {sum(len(t) for t in held_out) / 1e3:.0f} kB of modules it never trained on")

    console.rule("[bold]5. Completions")
    model, tokenizer = ds.load(model_dir, dtype=resolve_decode_dtype())
    model.eval()
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
                  f"  ds info --hardware                                     # what this machine runs fast\n"
                  f"  ds train {Path(cfg.run_dir) / 'config.yaml'} --resume max_steps={2 * result.step} "
                  f"time_limit_minutes=0   # train it longer",
                  highlight=False, markup=False)
    console.print(f"  ds serve {model_dir} --http-port 8080                 # KServe v2 over HTTP and gRPC",
                  highlight=False, markup=False, soft_wrap=True)
    if serve:
        serve_model(console, model_dir, http_port, grpc_port)


def user_first(planned: list[str], user: list[str]) -> list[str]:
    """``planned`` overrides without the keys the user set (and without model keys when the user set any)."""
    keys = {o.split("=", 1)[0].strip() for o in user}
    user_model = any(k.startswith("model.") for k in keys)
    return [o for o in planned if (key := o.split("=", 1)[0]) not in keys and not (user_model and key.startswith("model."))]


def resolve_decode_dtype():
    """The dtype generation runs fastest in on this CPU (fp32 on every CPU measured so far)."""
    from deepseek.hardware import resolve_precision

    return resolve_precision("auto", workload="decode").autocast_dtype


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
