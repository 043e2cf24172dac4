"""``ds bench serve``: a served model's throughput and latency under load, next to its raw in-process speed.

    ds bench serve --model clf --model-repository models/ --concurrency 1,16,64 --json bench.json
    ds bench serve --model clf --url http://127.0.0.1:8080 --rate 100 --rate 200
    ds bench serve --openai --model lm --model-repository models/ --concurrency 1,16 --max-tokens 128
    ds bench serve --openai --model lm --model-repository models/ --concurrency 16 --adapters a,b,c,d

With ``--model-repository`` the model is first timed in-process (its backend loaded directly, batch 1 and
4/16/64 up to ``max_batch_size``), then ``ds serve`` is started on a free port, loaded and stopped again;
with ``--url`` only the load runs, against a server that is already up. The load comes from
:mod:`deepseek.bench.loadgen` (raw keep-alive HTTP/1.1, cheap enough not to starve a 2-core server).

``--openai`` loads a language model instead: N concurrent streaming ``/v1/completions`` clients
(:mod:`deepseek.bench.streamload`), prompts cut from the standard library's source, a fixed output length;
it reports requests/s, output tokens/s, TTFT, TPOT, ITL and E2E percentiles, and each load's tokens/s and TTFT
p99 over the single-stream run. ``--adapters a,b,c,d`` spreads the streams round-robin over the model's LoRA
adapters (``lm:a``, ``lm:b``, ...; the OpenAI ``model`` field picks one) and reports each adapter and the total.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import typer

RAW_BATCH_SIZES = (1, 4, 16, 64)
N_BODIES = 256  # distinct request bodies, rotated


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: load a server and compare with raw speed.")
    bench_app.command("serve")(serve_command)
    app.add_typer(bench_app, name="bench")


def _split_numbers(values: list[str], kind, what: str) -> list:
    out = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                number = kind(part)
            except ValueError:
                raise typer.BadParameter(f"{what}: {part!r} is not a number") from None
            if number <= 0:
                raise typer.BadParameter(f"{what} must be positive, got {part}")
            out.append(number)
    return out


def parse_shapes(values: list[str]) -> dict[str, list[int]]:
    """``["ids=64", "x=4,8"]`` -> ``{"ids": [64], "x": [4, 8]}``: sizes of each input's -1 dims."""
    shapes = {}
    for value in values:
        name, sep, dims = value.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--shape {value!r}: expected NAME=SIZE[,SIZE...]")
        shapes[name] = _split_numbers([dims], int, f"--shape {name}")
    return shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> tuple[int, object]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body) if body else None
    except ValueError:
        return response.status, body.decode(errors="replace")


def _post(url: str, body: bytes) -> tuple[int, str]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=60)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


# -- raw in-process speed ------------------------------------------------------------------------------------

def random_inputs(metadata: dict, batch: Optional[int], shapes: dict, int_high: int, seed: int = 0) -> dict:
    """Random input tensors for a model's ``metadata``: ``batch`` rows (None: the model has no batch dim)."""
    import torch

    from deepseek.serve.config import DATATYPE_TO_TORCH
    from deepseek.bench.loadgen import fill_shape

    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for spec in metadata["inputs"]:
        shape = fill_shape(spec["shape"], shapes.get(spec["name"], ()))
        if batch is not None:
            shape[0] = batch
        dtype = DATATYPE_TO_TORCH[spec["datatype"]]
        if dtype is None:
            raise ValueError(f"input {spec['name']!r}: cannot make random {spec['datatype']} data")
        if dtype.is_floating_point:
            inputs[spec["name"]] = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
        elif dtype == torch.bool:
            inputs[spec["name"]] = torch.rand(shape, generator=gen) < 0.5
        else:
            inputs[spec["name"]] = torch.randint(0, int_high, shape, generator=gen).to(dtype)
    return inputs


def measure_raw(repository: Path, model: str, shapes: dict, int_high: int, seconds: float = 2.0) -> dict:
    """Samples/s of the model's backend called directly under ``torch.inference_mode``, per batch size."""
    import torch

    from deepseek.serve.backends import load_backend
    from deepseek.serve.repository import ModelRepository

    if not (repository / model).is_dir():
        raise FileNotFoundError(f"{repository / model} does not exist (no model {model!r} in the repository)")
    repo = ModelRepository(repository)
    entry = repo.scan_model(model)
    if entry.error is not None:
        raise ValueError(f"model {model!r}: {entry.error}")
    version = entry.selected[-1]
    backend = load_backend(model, version, repo.version_path(model, version), entry.config)
    metadata = backend.metadata()
    max_batch = entry.config.max_batch_size
    sizes = [b for b in RAW_BATCH_SIZES if b <= max_batch] if max_batch > 0 else [None]
    rows = []
    try:
        with torch.inference_mode():
            for batch in sizes:
                inputs = random_inputs(metadata, batch, shapes, int_high)
                for _ in range(2):  # warm-up: lazy init, allocator, TorchScript profiling runs
                    backend.infer(inputs)
                calls = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    t0 = time.perf_counter()
                    backend.infer(inputs)
                    calls.append(time.perf_counter() - t0)
                elapsed = time.perf_counter() - start
                calls.sort()
                rows.append({"batch": batch or 1, "samples_per_s": (batch or 1) * len(calls) / elapsed,
                             "ms_per_call": calls[len(calls) // 2] * 1e3})
    finally:
        backend.close()
    best = max(rows, key=lambda r: r["samples_per_s"])
    return {"version": version, "batches": rows, "best_batch": best["batch"],
            "best_samples_per_s": best["samples_per_s"], "batch1_samples_per_s": rows[0]["samples_per_s"],
            "gain_best_over_1": best["samples_per_s"] / rows[0]["samples_per_s"]}


def print_raw(raw: dict, model: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}: raw in-process (backend.infer, inference_mode)")
    for name in ("batch", "samples/s", "ms/call"):
        table.add_column(name, justify="right")
    for row in raw["batches"]:
        table.add_row(str(row["batch"]), f"{row['samples_per_s']:.1f}", f"{row['ms_per_call']:.3f}")
    Console().print(table)
    typer.echo(f"best batch {raw['best_batch']}: {raw['best_samples_per_s']:.1f} samples/s, "
               f"{raw['gain_best_over_1']:.2f}x batch 1")


# -- the server under test -----------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(url: Optional[str], model_repository: Optional[Path]):
    """``(url, pid)`` of the server to load: ``url`` as given (pid None), or ``ds serve --model-repository``
    started on a free port (its output in a temporary log) and stopped again on exit."""
    from deepseek.bench.loadgen import start_server, stop_server

    if url is not None:
        yield url.rstrip("/"), None
        return
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        typer.echo(f"starting ds serve --model-repository {model_repository} on {url} ...")
        server = start_server([sys.executable, "-m", "deepseek.cli.main", "serve", "--model-repository",
                               str(model_repository), "--http-port", str(port), "--no-grpc"],
                              f"{url}/v2/health/ready", log_path=Path(tmp) / "server.log")
        try:
            yield url, server.pid
        finally:
            stop_server(server, grace_s=30)


# -- the command ---------------------------------------------------------------------------------------------

def serve_command(
    model: str = typer.Option(..., "--model", help="The model to load (its name in the repository)."),
    url: Optional[str] = typer.Option(None, help="A running server, e.g. http://127.0.0.1:8080."),
    model_repository: Optional[Path] = typer.Option(
        None, help="Time the model in-process, then serve this repository with `ds serve` and load it."),
    concurrency: list[str] = typer.Option(
        [], metavar="N[,N...]",
        help="Closed loop: connections, comma-separated or repeated (default 1,16,64 unless --rate)."),
    rate: list[str] = typer.Option([], metavar="R[,R...]",
                                   help="Open loop: Poisson arrivals per second, comma-separated or repeated."),
    duration: float = typer.Option(20.0, help="Measurement window of each load, in seconds."),
    warmup: float = typer.Option(3.0, help="Seconds of load before each window, not counted."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here as JSON."),
    shape: list[str] = typer.Option([], metavar="NAME=SIZE[,SIZE...]",
                                    help="Sizes of an input's -1 dims past the batch dim (default 1)."),
    int_high: int = typer.Option(8000, help="Integer inputs are drawn in 0..INT_HIGH-1 (token ids)."),
    openai: bool = typer.Option(False, "--openai", help="Text generation: N concurrent streaming "
                                "/v1/completions clients; reports req/s, output tokens/s, TTFT and TPOT."),
    prompt_tokens: int = typer.Option(128, help="--openai: prompt length in tokens (cut from stdlib source)."),
    max_tokens: int = typer.Option(128, help="--openai: tokens generated per request (EOS ignored)."),
    adapters: Optional[str] = typer.Option(None, "--adapters", metavar="A[,A...]",
                                           help="--openai: spread the streams round-robin over these LoRA adapters "
                                                "of --model (MODEL:A, ...); results per adapter and in total."),
) -> None:
    """Load a served model (closed loop per --concurrency, open loop per --rate) and report req/s and latency.

    With --openai: streaming text generation (closed loop per --concurrency, default 1,16)."""
    from rich.console import Console

    from deepseek.bench.loadgen import build_kserve_bodies, format_table, run_load

    if url is None and model_repository is None:
        raise typer.BadParameter("give --url (a running server) or --model-repository (one to start)")
    if duration <= 0 or warmup < 0:
        raise typer.BadParameter("--duration must be > 0 and --warmup >= 0")
    if int_high < 1:
        raise typer.BadParameter("--int-high must be >= 1")
    concurrencies = _split_numbers(concurrency, int, "--concurrency")
    rates = _split_numbers(rate, float, "--rate")
    mix = [a.strip() for a in adapters.split(",")] if adapters is not None else []
    if mix and not openai:
        raise typer.BadParameter("--adapters needs --openai (text generation)")
    if any(not a for a in mix) or len(set(mix)) != len(mix):
        raise typer.BadParameter(f"--adapters: distinct, non-empty adapter names, comma-separated; got {adapters!r}")
    if openai:
        if rates:
            raise typer.BadParameter("--rate is not supported with --openai (closed loop only)")
        if prompt_tokens < 1 or max_tokens < 1:
            raise typer.BadParameter("--prompt-tokens and --max-tokens must be >= 1")
        if model_repository is not None and not model_repository.is_dir():
            raise FileNotFoundError(f"model repository {model_repository} is not a directory")
        loads = concurrencies or ([16] if mix else [1, 16])
        if any(c < len(mix) for c in loads):
            raise typer.BadParameter(f"--concurrency: each load needs at least one stream per adapter ({len(mix)})")
        bench_openai(model, url, model_repository, loads, duration=duration, warmup=warmup,
                     prompt_tokens=prompt_tokens, max_tokens=max_tokens, json_out=json_out, adapters=mix)
        return
    if not concurrencies and not rates:
        concurrencies = [1, 16, 64]
    shapes = parse_shapes(shape)
    if model_repository is not None and not model_repository.is_dir():
        raise FileNotFoundError(f"model repository {model_repository} is not a directory")

    raw = None
    if model_repository is not None:
        typer.echo(f"timing {model} in-process ...")
        raw = measure_raw(model_repository, model, shapes, int_high)
        print_raw(raw, model)

    with serving(url, model_repository) as (url, server_pid):
        try:
            status, metadata = _get_json(f"{url}/v2/models/{model}")
        except OSError as exc:
            raise ValueError(f"cannot reach {url}: {exc}") from None
        if status != 200:
            raise ValueError(f"{url}/v2/models/{model} answered {status}: {metadata}")
        bodies = build_kserve_bodies(metadata, N_BODIES, seed=0, shapes=shapes, int_high=int_high)
        path = f"/v2/models/{model}/infer"
        status, text = _post(url + path, bodies[0])  # fail fast, with the server's reason
        if status != 200:
            raise ValueError(f"the model refused a request ({status}): {text[:300]}")
        loads = [{"concurrency": c} for c in concurrencies] + [{"rate": r} for r in rates]
        results = []
        for load in loads:
            what = (f"{load['concurrency']} connections (closed loop)" if "concurrency" in load
                    else f"{load['rate']:g} req/s (open loop)")
            typer.echo(f"load: {what}, {warmup:g} s warm-up + {duration:g} s ...")
            results.append(run_load(url, path, bodies, warmup_s=warmup, duration_s=duration,
                                    server_pid=server_pid, marker=b'"outputs"', **load))

    Console().print(format_table(results, title=f"{model} served at {url}"))
    summary = {"model": model, "url": url, "raw": raw, "results": [r.to_dict() for r in results],
               "served_over_raw_best": None}
    if raw is not None and results:
        peak = max(results, key=lambda r: r.throughput)
        summary["served_over_raw_best"] = peak.throughput / raw["best_samples_per_s"]
        typer.echo(f"served peak {peak.throughput:.1f} req/s ({peak.load}) = "
                   f"{summary['served_over_raw_best']:.2f}x raw best batch "
                   f"({raw['best_samples_per_s']:.1f} samples/s at batch {raw['best_batch']})")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2))
        typer.echo(f"wrote {json_out}")


# -- --openai: streaming text generation -----------------------------------------------------------------------

def _repository_tokenizer(model_repository: Optional[Path], model: str):
    """The tokenizer of the version of ``model`` the repository would serve (None: no repository given)."""
    if model_repository is None:
        return None
    from deepseek.models.directory import load_tokenizer
    from deepseek.serve.repository import ModelRepository

    repo = ModelRepository(model_repository)
    entry = repo.scan_model(model)
    if entry.error is not None or not entry.selected:
        raise ValueError(f"model {model!r}: {entry.error or 'no version to serve'}")
    return load_tokenizer(repo.version_path(model, entry.selected[-1]))


def bench_openai(model: str, url: Optional[str], model_repository: Optional[Path], concurrencies: list[int], *,
                 duration: float, warmup: float, prompt_tokens: int, max_tokens: int,
                 json_out: Optional[Path], adapters: Sequence[str] = ()) -> dict:
    """Streams of ``POST /v1/completions`` per concurrency; a table, the scaling over one stream, JSON.
    ``adapters``: the streams go round-robin to ``model:adapter`` for each, with a row per adapter."""
    from rich.console import Console

    from deepseek.bench.streamload import (completion_bodies, format_stream_table, run_stream_load,
                                           scaling_summary, stdlib_prompts)

    prompts = stdlib_prompts(_repository_tokenizer(model_repository, model), N_BODIES, prompt_tokens)
    names = [f"{model}:{a}" for a in adapters] or [model]
    bodies = {name: completion_bodies(name, prompts, max_tokens) for name in names}
    results = []
    with serving(url, model_repository) as (url, server_pid):
        for name in names:  # fail fast, with the server's reason (e.g. an adapter it does not serve)
            status, answer = _get_json(f"{url}/v1/models/{name}")
            if status != 200:
                raise ValueError(f"{url}/v1/models/{name} answered {status}: {answer}")
        for c in concurrencies:
            typer.echo(f"load: {c} concurrent streams, {warmup:g} s warm-up + {duration:g} s ...")
            results.append(run_stream_load(url, bodies if adapters else bodies[model], concurrency=c,
                                           warmup_s=warmup, duration_s=duration, server_pid=server_pid,
                                           label="all adapters" if adapters else ""))
    rows = [row for r in results for row in (r, *r.by_group.values())]  # a mix: the total, then each adapter
    Console().print(format_stream_table(rows, title=f"{model} at {url}: {prompt_tokens} prompt tokens, "
                                                    f"{max_tokens} output tokens per request"))
    for r in results:
        for name, g in r.by_group.items():
            typer.echo(f"{r.concurrency} streams, {name}: {g.concurrency} of them, {g.output_tokens_per_s:.1f} output "
                       f"tokens/s of {r.output_tokens_per_s:.1f} in total")
    scaling = scaling_summary(results)
    for c, ratios in scaling.items():
        typer.echo(f"{c} streams: {ratios['tokens_per_s_x']:.2f}x the output tokens/s of one stream, "
                   f"TTFT p99 {ratios['ttft_p99_x']:.2f}x")
    summary = {"model": model, "adapters": list(adapters), "url": url, "prompt_tokens": prompt_tokens,
               "max_tokens": max_tokens,
               "results": [r.to_dict() for r in results], "scaling_over_one_stream": scaling}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2))
        typer.echo(f"wrote {json_out}")
    return summary
