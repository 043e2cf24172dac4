"""``ds plan``: memory per device and the replicas/devices a serving or training target needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

GIB = 2**30


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)


@dataclass
class Target:
    """What TARGET names: the model config, and (a training config) its run's seq_len, batch and layout."""

    config: object  # ModelConfig
    source: str
    model_dir: Optional[Path] = None
    weights: str = "fp32"
    seq_len: Optional[int] = None
    tokens_per_step: Optional[int] = None
    parallel: object = None  # ParallelConfig of a training config
    checkpointing: bool = False  # its gradient_checkpointing


def resolve_target(target: str, overrides: list[str]) -> Target:
    """A model directory (config.json), a training config file (YAML/JSON, with key=value overrides) or a preset."""
    from deepseek.config import ConfigError
    from deepseek.models.config import PRESETS
    from deepseek.train.config import load_train_config

    path = Path(target)
    if path.is_dir():
        from deepseek.models.directory import load_config, read_quantization

        if overrides:
            raise ConfigError("key=value overrides apply to a training config or a preset, not to a model directory")
        quantization = read_quantization(path)
        return Target(load_config(path), f"model directory {path}", path,
                      quantization["scheme"] if quantization else "fp32")
    if path.is_file():
        run = load_train_config(path, overrides)
        return Target(run.model_config(), f"training config {path}", None, "fp32", run.data.max_seq_len,
                      run.batch_size * run.data.max_seq_len, run.parallel, run.gradient_checkpointing)
    if target in PRESETS:
        run = load_train_config(None, [f"model.preset={target}", *overrides])
        return Target(run.model_config(), f"preset {target}", seq_len=run.data.max_seq_len)
    raise ConfigError(f"{target}: not a model directory, a config file or a preset ({', '.join(PRESETS)})")


def plan_command(
    target: str = typer.Argument(..., help="A model directory, a training config (YAML) or a preset name."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of a training config or preset, "
                                                               "e.g. model.n_layers=8 data.seq_len=512."),
    serve_tokens_per_s: Optional[float] = typer.Option(None, "--serve-tokens-per-s", help="Serving target: "
                                                       "generated tokens/s over all replicas."),
    streams: int = typer.Option(8, "--streams", help="Sequences one replica runs at once (the server's "
                                                     "max_running)."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per sequence the KV cache holds "
                                                                  "(default: the model's max_seq_len, as ds serve)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Stored weights to plan serving with: fp32, bf16, "
                                          "fp16, int8-dynamic, int8-weight, int4-weight (default: the directory's)."),
    train_tokens_per_step: Optional[int] = typer.Option(None, "--train-tokens-per-step", help="Training target: "
                                                        "tokens per optimizer step (default with a training config: "
                                                        "batch_size x seq_len)."),
    layout: Optional[list[str]] = typer.Option(None, "--layout", help="ddp, fsdp, tp=N, ep=N, pp=N (repeat or "
                                               "comma-separate to combine; default: the config's parallel section, "
                                               "else ddp)."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Devices of the layout (fills ddp/fsdp without a "
                                                                  "degree)."),
    micro_batches: int = typer.Option(1, "--micro-batches", help="Micro-batches per step per data-parallel rank."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Training row length for the measured run "
                                                                  "(default: the config's, else 256)."),
    step_time: Optional[float] = typer.Option(None, "--step-time", help="Target seconds per training step: plan "
                                              "the devices that reach it."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="profile.json from `ds profile generate|train`: "
                                           "its measured tokens/s instead of a short run here."),
    device_memory: Optional[float] = typer.Option(None, "--device-memory", help="GiB per device (default: the "
                                                  "CUDA device's, else this machine's RAM)."),
    checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                 help="Plan training with the trainer's gradient_checkpointing "
                                                      "(default: the config's, else off)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the short measured runs "
                                          "(default: torch's; on a busy machine 1 measures more steadily)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of tables."),
) -> None:
    """Memory per device (weights, KV cache, activations, gradients, optimizer state per layout) and how many
    replicas/devices a target needs, from measured tokens/s."""
    from deepseek.config import ConfigError
    from deepseek.ops.measure import device_memory_bytes

    resolved = resolve_target(target, overrides or [])
    # A training config carries its own target (batch_size x seq_len) when no serving target is asked for.
    train_tokens = train_tokens_per_step
    if train_tokens is None and serve_tokens_per_s is None:
        train_tokens = resolved.tokens_per_step
    if serve_tokens_per_s is None and train_tokens is None:
        raise ConfigError("give a target: --serve-tokens-per-s T and/or --train-tokens-per-step T")
    memory = device_memory_bytes(device_memory)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    plans = []
    if serve_tokens_per_s is not None:
        plans.append(_serve_plan(resolved, serve_tokens_per_s, streams, context, weights, profile, memory))
    if train_tokens is not None:
        if checkpointing is not None:
            resolved.checkpointing = checkpointing
        plans.append(_train_plan(resolved, train_tokens, layout or [], devices,
                                 micro_batches, seq_len, step_time, profile, memory))
    if as_json:
        typer.echo(json.dumps({"target": resolved.source, "plans": [p.to_dict() for p in plans]}, indent=2))
        return
    for plan in plans:
        print_plan(plan, resolved.source)


def _serve_plan(resolved: Target, target_tps: float, streams: int, context: Optional[int], weights: Optional[str],
                profile: Optional[Path], memory):
    from deepseek.ops.memory_model import check_weight_format
    from deepseek.ops.plan import PlanError, plan_serving, read_profile

    cfg = resolved.config
    fmt = check_weight_format(weights or resolved.weights)
    context = context or cfg.max_seq_len
    if target_tps <= 0:
        raise PlanError(f"--serve-tokens-per-s must be positive, got {target_tps}")
    if streams < 1:
        raise PlanError(f"--streams must be positive, got {streams}")
    if profile is not None:
        tps, source = read_profile(profile, "generate")
    else:
        tps, source = _measure_decode(resolved, streams, fmt, memory[0])
    return plan_serving(cfg, fmt, streams=streams, context=context, target_tokens_per_s=target_tps, tokens_per_s=tps,
                        throughput_source=source, device_memory=memory)


def _measure_decode(resolved: Target, streams: int, fmt: str, device_bytes: int) -> tuple[float, str]:
    import torch

    from deepseek.ops.measure import measure_decode
    from deepseek.ops.memory_model import weight_bytes

    _refuse_if_too_big(weight_bytes(resolved.config), device_bytes, "generate")
    if resolved.model_dir is not None:
        from deepseek.models.directory import load

        model, tokenizer = load(resolved.model_dir)
        what = f"{resolved.weights} weights of {resolved.model_dir.name}"
    else:
        from deepseek.data.tokenizer import byte_tokenizer
        from deepseek.models.transformer import MoETransformer

        torch.manual_seed(0)
        model, tokenizer = MoETransformer(resolved.config).eval(), byte_tokenizer()
        what = "random fp32 weights"
    with _status(f"measuring decode: {streams} streams through deepseek.generate"):
        m = measure_decode(model, tokenizer, streams)
    note = "" if fmt in ("fp32", resolved.weights) else f"; planned weights are {fmt}"
    return m.decode_tokens_per_s, (f"measured here: {m.new_tokens - 1} decode steps x {streams} streams through "
                                   f"deepseek.generate ({what}, {torch.get_num_threads()} thread(s){note})")


def _train_plan(resolved: Target, tokens_per_step: int, layout_specs: list[str], devices: Optional[int],
                micro_batches: int, seq_len: Optional[int], step_time: Optional[float], profile: Optional[Path],
                memory):
    from deepseek.ops.layout import parse_layout
    from deepseek.ops.plan import PlanError, plan_training, read_profile

    cfg = resolved.config
    if tokens_per_step <= 0:
        raise PlanError(f"--train-tokens-per-step must be positive, got {tokens_per_step}")
    if not layout_specs and resolved.parallel is not None and devices is None:
        p = resolved.parallel  # the config's parallel section (dp_replicate=-1, "the rest", is 1 without --devices)
        layout = parse_layout([f"ddp={max(p.dp_replicate, 1)}", f"fsdp={p.dp_shard}", f"tp={p.tp}", f"ep={p.ep}",
                               f"pp={p.pp}"])
    else:
        layout = parse_layout(layout_specs, devices)
    if profile is not None:
        tps, source = read_profile(profile, "train")
    else:
        tps, source = _measure_train(cfg, tokens_per_step, layout, micro_batches, seq_len or resolved.seq_len or 256,
                                     memory[0], resolved.checkpointing)
    return plan_training(cfg, layout, tokens_per_step=tokens_per_step, tokens_per_s_per_device=tps,
                         throughput_source=source, device_memory=memory, micro_batches=micro_batches,
                         step_time_s=step_time, checkpointing=resolved.checkpointing)


def _measure_train(cfg, tokens_per_step: int, layout, micro_batches: int, seq_len: int, device_bytes: int,
                   checkpointing: bool):
    import torch

    from deepseek.ops.measure import measure_train
    from deepseek.ops.memory_model import weight_bytes

    _refuse_if_too_big(4 * weight_bytes(cfg), device_bytes, "train")
    seq_len = min(seq_len, cfg.max_seq_len)
    micro_tokens = max(1, tokens_per_step // (layout.data_parallel * micro_batches))
    rows = max(1, min(4, micro_tokens // seq_len))  # a short run: a few rows are enough for tokens/s
    with _status(f"measuring 3 trainer steps of {rows} x {seq_len} tokens"):
        m = measure_train(cfg, rows, seq_len, steps=2, checkpointing=checkpointing)
    return m.tokens_per_s, (f"measured here: 2 trainer steps of {rows} x {seq_len} tokens, fp32"
                            f"{', checkpointed' if checkpointing else ''}, one device "
                            f"({torch.get_num_threads()} thread(s))")


def _status(text: str):
    """A spinner on stderr while a short measurement runs (stdout stays clean for --json)."""
    from rich.console import Console

    return Console(stderr=True).status(text)


def _refuse_if_too_big(needed: int, device_bytes: int, kind: str) -> None:
    from deepseek.ops.plan import PlanError

    if needed > device_bytes // 2:
        raise PlanError(f"the model is too big to measure here ({needed / GIB:.1f} GiB); pass "
                        f"--profile profile.json from `ds profile {kind}` on a device that holds it")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def print_plan(plan, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "serving: one replica" if plan.kind == "serve" else f"training: busiest device of {plan.details['layout']}"
    table = Table(title=f"ds plan — {source} — {title}", title_justify="left")
    table.add_column("memory term")
    table.add_column("bytes", justify="right")
    table.add_column("how")
    for term in plan.terms:
        table.add_row(term.name, format_bytes(term.bytes), term.how)
    table.add_row("total", format_bytes(plan.total_bytes),
                  f"{'fits' if plan.fits else 'DOES NOT FIT'} in {format_bytes(plan.device_memory_bytes)} "
                  f"({plan.device_memory_source})", style="bold")
    console = Console(width=140)
    console.print(table)
    tp = plan.throughput
    if plan.kind == "serve":
        console.print(f"replicas: {plan.devices} = ceil({plan.details['target_tokens_per_s']:,.0f} tokens/s / "
                      f"{tp['tokens_per_s_per_replica']:,.0f} tokens/s per replica at {plan.details['streams']} "
                      f"streams)\n  throughput {tp['source']}", highlight=False)
    else:
        d = plan.details
        line = f"devices: {plan.devices} ({d['layout']}); step time ~{d['step_time_s']:.2f} s at ideal scaling"
        if "target_step_time_s" in d:
            need = (f"ceil({d['tokens_per_step']:,} tokens / ({tp['tokens_per_s_per_device']:,.0f} tokens/s per "
                    f"device x {d['target_step_time_s']} s))")
            if d["devices_for_step_time"] > d["layout_devices"]:
                line = (f"devices: {plan.devices} = {need}; the memory above is for the layout's "
                        f"{d['layout_devices']}: re-plan with --devices {plan.devices}")
            else:
                line += f"\n  the step time alone needs {need} = {d['devices_for_step_time']}"
        console.print(f"{line}\n  throughput {tp['source']}", highlight=False)
