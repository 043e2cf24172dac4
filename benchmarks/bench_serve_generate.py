"""Text-generation serving: ``ds serve`` (continuous batching) under N concurrent streams, and against Hugging Face
``generate`` called per request behind the same HTTP front. One run, one machine.

Models:
  small          the ``small`` preset, trained: ``runs/quickstart/model`` when it exists (``make quickstart``),
                 else ``--model-dir``, else a short training of configs/quickstart.yaml (``--train-steps``) into
                 a temporary folder. A trained model writes text: a random one emits byte-fallback tokens whose
                 text is held back until a character completes, which would hide tokens from TTFT and ITL.
  small-mixtral  the same sizes made Mixtral-shaped (softmax router, no shared expert, every layer MoE, untied
                 embeddings), random weights (seed 0), the same tokenizer: HF's Mixtral carries it exactly, so
                 ours and HF serve the same weights and write the same greedy tokens (checked below).

Load (``deepseek.bench.streamload``): streaming ``/v1/completions``, 128-token prompts cut from the standard
library's source, 128 output tokens (``ignore_eos``), greedy; closed loop with 1 and 16 streams; 5 s warm-up,
then a 20 s window (``--quick``: 2 s + 8 s). Servers run alone, one at a time, as subprocesses:
``ds serve --model-repository`` and ``hf_generate_server.py`` (the same server, its engine swapped for HF
``generate``, one request at a time).

Targets (PASS/MISS):
  small, 16 streams: output tokens/s >= 5 x one stream's; TTFT p99 <= 3 x one stream's TTFT p99
  small-mixtral, 16 streams: ours >= 1.5 x the output tokens/s of HF generate per request (same front)

    python benchmarks/bench_serve_generate.py            # ~4 minutes; benchmarks/results/bench_serve_generate.json
    python benchmarks/bench_serve_generate.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, complete, machine_info, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
import deepseek as ds  # noqa: E402
from deepseek.cli.bench import free_port  # noqa: E402
from deepseek.models.directory import load_tokenizer  # noqa: E402
from deepseek.bench import loadgen, streamload  # noqa: E402

HF_SERVER = Path(__file__).resolve().parent / "hf_generate_server.py"
QUICKSTART_MODEL = REPO_ROOT / "runs" / "quickstart" / "model"
PROMPT_TOKENS, MAX_TOKENS, N_PROMPTS = 128, 128, 256
STREAMS = (1, 16)


def trained_small(model_dir: Path | None, train_steps: int, tmp: Path) -> Path:
    if model_dir is not None:
        return model_dir
    if (QUICKSTART_MODEL / "config.json").is_file():
        return QUICKSTART_MODEL
    from deepseek.train.lm import ensure_prepared, train_lm
    from deepseek.train.config import load_train_config

    run = tmp / "train"
    print(f"no trained small model: training configs/quickstart.yaml for {train_steps} steps in {run} ...")
    cfg = load_train_config(REPO_ROOT / "configs" / "quickstart.yaml",
                            [f"run_dir={run}", f"data.path={run / 'data'}", f"max_steps={train_steps}",
                             "eval_every=100000", "checkpoint.every=100000"])
    ensure_prepared(cfg.data, cfg.model_config().vocab_size, progress=cfg.progress)
    train_lm(cfg)
    return run / "model"


def repository(root: Path, name: str, model_dir: Path) -> Path:
    (root / name).mkdir(parents=True)
    shutil.copytree(model_dir, root / name / "1")
    (root / name / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek", "generation": {
        "max_running": 16, "max_batched_tokens": 512, "prefill_chunk": 256}}))
    return root


def mixtral_twin(tokenizer_dir: Path, into: Path) -> Path:
    cfg = ds.preset("small", router="softmax", n_shared_experts=0, first_k_dense=0, tie_embeddings=False)
    torch.manual_seed(0)
    ds.save(ds.MoETransformer(cfg).eval(), load_tokenizer(tokenizer_dir), into)
    return into


def load_server(command: list[str], repo: Path, model: str, bodies: list[bytes], args, log: Path,
                probe: str) -> tuple[list, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = loadgen.start_server([*command, "--model-repository", str(repo), "--http-port", str(port), "--no-grpc"],
                                  f"{url}/v2/health/ready", log_path=log, timeout_s=300)
    try:
        text = complete(url, model, probe, max_tokens=48, timeout=120)
        results = []
        for streams in STREAMS:
            print(f"  {model}: {streams} streams, {args.warmup:g} s warm-up + {args.duration:g} s ...", flush=True)
            results.append(streamload.run_stream_load(url, bodies, concurrency=streams, warmup_s=args.warmup,
                                                      duration_s=args.duration, server_pid=server.pid))
        return results, text
    finally:
        loadgen.stop_server(server, grace_s=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s warm-up + 8 s windows")
    parser.add_argument("--model-dir", type=Path, help="a trained small-preset model directory")
    parser.add_argument("--train-steps", type=int, default=120, help="steps of the fallback training")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/bench_serve_generate.json)")
    args = parser.parse_args()
    args.warmup, args.duration = (2.0, 8.0) if args.quick else (5.0, 20.0)
    info = machine_info()
    print_machine(info)

    with tempfile.TemporaryDirectory(prefix="bench-serve-generate-") as tmp_name:
        tmp = Path(tmp_name)
        small_dir = trained_small(args.model_dir, args.train_steps, tmp)
        print(f"small: {small_dir}")
        tokenizer = load_tokenizer(small_dir)
        prompts = streamload.stdlib_prompts(tokenizer, N_PROMPTS, PROMPT_TOKENS)
        ds_serve = [sys.executable, "-m", "deepseek.cli.main", "serve"]
        hf_serve = [sys.executable, str(HF_SERVER)]
        runs, texts = {}, {}
        small_repo = repository(tmp / "repo-small", "small", small_dir)
        runs["ours small"], _ = load_server(ds_serve, small_repo, "small",
                                            streamload.completion_bodies("small", prompts, MAX_TOKENS), args,
                                            tmp / "ours-small.log", prompts[0])
        twin = mixtral_twin(small_dir, tmp / "twin")
        mix_repo = repository(tmp / "repo-mix", "small-mixtral", twin)
        mix_bodies = streamload.completion_bodies("small-mixtral", prompts, MAX_TOKENS)
        runs["ours small-mixtral"], texts["ours"] = load_server(ds_serve, mix_repo, "small-mixtral", mix_bodies,
                                                                args, tmp / "ours-mix.log", prompts[0])
        runs["HF generate small-mixtral"], texts["hf"] = load_server(hf_serve, mix_repo, "small-mixtral", mix_bodies,
                                                                     args, tmp / "hf-mix.log", prompts[0])

    rows = []
    for name, results in runs.items():
        for r in results:
            rows.append([name, r.concurrency, f"{r.request_throughput:.2f}", f"{r.output_tokens_per_s:.0f}",
                         f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p99_ms:.1f}", f"{r.tpot_p50_ms:.2f}",
                         f"{r.tpot_p99_ms:.2f}", f"{r.itl_p99_ms:.1f}", r.error_count,
                         f"{r.server_cpu_cores:.2f}"])
    print_table(["server", "streams", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                 "ITL p99", "errors", "server CPU"], rows)

    one, sixteen = runs["ours small"]
    ours16, hf16 = runs["ours small-mixtral"][1], runs["HF generate small-mixtral"][1]
    scaling = sixteen.output_tokens_per_s / one.output_tokens_per_s
    ttft_x = sixteen.ttft_p99_ms / one.ttft_p99_ms
    over_hf = ours16.output_tokens_per_s / hf16.output_tokens_per_s
    over_hf_1 = runs["ours small-mixtral"][0].output_tokens_per_s / runs["HF generate small-mixtral"][0].output_tokens_per_s
    same_text = texts["ours"] == texts["hf"]
    errors = sum(r.error_count for results in runs.values() for r in results)
    targets = [
        ("small: 16 streams >= 5x one stream's output tok/s", scaling, scaling >= 5.0),
        ("small: TTFT p99 at 16 streams <= 3x one stream's", ttft_x, ttft_x <= 3.0),
        ("small-mixtral, 16 streams: ours >= 1.5x HF generate per request", over_hf, over_hf >= 1.5),
    ]
    print()
    for what, value, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {what}: {value:.2f}x")
    print(f"one stream, small-mixtral: ours {over_hf_1:.2f}x HF; greedy texts of ours and HF "
          f"{'identical' if same_text else 'DIFFER'}; errors: {errors}")
    out = write_results("bench_serve_generate", {
        "machine": info, "prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS,
        "warmup_s": args.warmup, "duration_s": args.duration, "small_model": str(small_dir),
        "runs": {name: [r.to_dict() for r in results] for name, results in runs.items()},
        "small_16_over_1": scaling, "small_ttft_p99_16_over_1": ttft_x, "ours_over_hf_16": over_hf,
        "ours_over_hf_1": over_hf_1, "greedy_texts_identical": same_text,
        "targets": {what: {"value": value, "pass": ok} for what, value, ok in targets}})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, args.out)
        print(f"copied to {args.out}")


if __name__ == "__main__":
    main()
