"""Multi-LoRA serving: 16 streams spread over 4 LoRA adapters against 16 streams on the base model alone, one
``ds serve``, same prompts and output length (issue 18's target: the mix reaches >= 0.8x the base's tokens/s).

Model: the quickstart's sizes (``small`` preset family: d_model 192, 4 layers, 6 heads / 2 KV heads, 8 routed
experts of width 192, top 2, vocabulary 4096) made Mixtral-shaped (softmax router, no shared expert, every layer
MoE) so that its adapters are PEFT adapter directories; a BPE tokenizer of 4096 tokens learned from a few standard
library modules. RANDOM weights (seed 0) and 4 RANDOM adapters (r=16, alpha=32, on attn q/k/v/o of every layer):
the speed does not depend on what the weights say, and ``ignore_eos`` fixes every request's length.

One server holds two model names with the same base weights: ``plain`` (no adapters: the base model alone) and
``lm`` (the 4 adapters, served per row through :class:`~deepseek.nn.multi_lora.MultiLoRALinear`). Each round runs,
in a rotating order, three closed-loop loads of ``--streams`` streaming ``/v1/completions`` clients
(:mod:`deepseek.bench.streamload`: 128-token stdlib prompts, 128 output tokens, greedy):

  base        ``plain``: the base model alone (the reference of the target)
  mix         ``lm:a0`` .. ``lm:a3``: the streams round-robin over the adapters (what ``ds bench serve --openai
              --adapters a0,a1,a2,a3`` runs)
  base+lora   ``lm`` without an adapter: base rows of a model that has adapters loaded (the engine skips the
              low-rank products when no row of the batch uses an adapter)

It prints each round's output tokens/s, the medians, and mix / base per round (PASS/MISS against 0.8).

    python benchmarks/bench_multi_lora_serving.py                      # 3 rounds x 3 loads x (5 + 20) s: ~4 min
    python benchmarks/bench_multi_lora_serving.py --tiny               # a smoke run: tiny sizes, 1 round, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import complete, machine_info, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
import deepseek as ds  # noqa: E402
from deepseek.bench import loadgen, streamload  # noqa: E402
from deepseek.cli.bench import free_port  # noqa: E402
from deepseek.data.sources import python_stdlib_dir  # noqa: E402
from deepseek.data.tokenizer import train_tokenizer  # noqa: E402
from deepseek.models.adapters import save_adapter  # noqa: E402
from deepseek.nn.lora import LoRAConfig, apply_lora  # noqa: E402

TARGET = 0.8
ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")
QUICKSTART_MIXTRAL = dict(d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, moe_ffn_dim=192, n_routed_experts=8,
                          top_k=2, router="softmax", n_shared_experts=0, first_k_dense=0, tie_embeddings=False)
TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, moe_ffn_dim=32, n_routed_experts=4, top_k=2,
            router="softmax", n_shared_experts=0, first_k_dense=0, tie_embeddings=False)


def tokenizer_from_stdlib(vocab_size: int):
    files = sorted(python_stdlib_dir().glob("*.py"))[:40]  # a few modules: enough merges, a few seconds
    return train_tokenizer((f.read_text(encoding="utf-8", errors="replace") for f in files), vocab_size=vocab_size)


def build_repository(root: Path, sizes: dict, vocab_size: int, n_adapters: int, rank: int, streams: int) -> Path:
    """``root/plain`` (the base alone) and ``root/lm`` (the same weights with ``n_adapters`` random adapters)."""
    tokenizer = tokenizer_from_stdlib(vocab_size)
    config = ds.preset("small", vocab_size=tokenizer.get_vocab_size(), max_seq_len=512, **sizes)
    torch.manual_seed(0)
    model = ds.MoETransformer(config).eval()
    generation = {"max_running": streams, "max_batched_tokens": 512, "prefill_chunk": 256}
    adapters = {}
    for i in range(n_adapters):
        adapted = ds.MoETransformer(config).eval()
        adapted.load_state_dict(model.state_dict())
        apply_lora(adapted, LoRAConfig(r=rank, alpha=2 * rank, target_modules=ATTENTION))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:  # PEFT initialises B to zero: random B makes each adapter change the output
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        save_adapter(adapted, root / "lm" / f"a{i}")
        adapters[f"a{i}"] = f"a{i}"
    for name, extra in (("plain", {}), ("lm", {"adapters": adapters})):
        ds.save(model, tokenizer, root / name / "1")
        (root / name / "config.yaml").write_text(yaml.safe_dump({"backend": "deepseek", "generation": generation,
                                                                 **extra}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny model, 4 streams over 2 adapters, "
                                                            "1 round of 0.5 + 2 s, 16-token prompts and outputs")
    args = parser.parse_args()
    sizes, vocab = QUICKSTART_MIXTRAL, 4096
    if args.tiny:
        sizes, vocab = TINY, 512
        args.streams, args.adapters, args.rank, args.rounds = 4, 2, 4, 1
        args.warmup, args.duration, args.prompt_tokens, args.max_tokens = 0.5, 2.0, 16, 16
    if args.streams < args.adapters:
        parser.error("--streams must be >= --adapters (one stream per adapter at least)")
    info = machine_info()
    print_machine(info)
    print(f"# model: {'tiny' if args.tiny else 'quickstart-sized, Mixtral-shaped'} {sizes}, RANDOM weights; "
          f"{args.adapters} RANDOM adapters r={args.rank} on {', '.join(ATTENTION)}")

    with tempfile.TemporaryDirectory(prefix="bench-multi-lora-serving-") as tmp_name:
        tmp = Path(tmp_name)
        repo = build_repository(tmp / "repo", sizes, vocab, args.adapters, args.rank, args.streams)
        tokenizer = ds.load(repo / "plain" / "1")[1]
        prompts = streamload.stdlib_prompts(tokenizer, 256, args.prompt_tokens)
        names = [f"lm:a{i}" for i in range(args.adapters)]
        loads = {"base": streamload.completion_bodies("plain", prompts, args.max_tokens),
                 "mix": {n: streamload.completion_bodies(n, prompts, args.max_tokens) for n in names},
                 "base+lora": streamload.completion_bodies("lm", prompts, args.max_tokens)}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = loadgen.start_server([sys.executable, "-m", "deepseek.cli.main", "serve", "--model-repository",
                                       str(repo), "--http-port", str(port), "--no-grpc"],
                                      f"{url}/v2/health/ready", log_path=tmp / "server.log", timeout_s=300)
        try:
            texts = {n: complete(url, n, prompts[0], max_tokens=16) for n in ["plain", "lm", *names]}
            results: dict[str, list] = {name: [] for name in loads}
            for r in range(args.rounds):
                order = list(loads)[r % len(loads):] + list(loads)[:r % len(loads)]  # rotate: no load always first
                for name in order:
                    print(f"round {r + 1}/{args.rounds}: {name}, {args.streams} streams, {args.warmup:g} s warm-up + "
                          f"{args.duration:g} s ...", flush=True)
                    results[name].append(streamload.run_stream_load(
                        url, loads[name], concurrency=args.streams, warmup_s=args.warmup, duration_s=args.duration,
                        server_pid=server.pid, label=name))
        finally:
            loadgen.stop_server(server, grace_s=60)

    rows = [[name, i + 1, f"{res.output_tokens_per_s:.0f}", f"{res.ttft_p50_ms:.0f}", f"{res.tpot_p50_ms:.1f}",
             f"{res.tpot_p99_ms:.1f}", res.error_count, f"{res.server_cpu_cores:.2f}"]
            for name, rounds in results.items() for i, res in enumerate(rounds)]
    print_table(["load", "round", "out tok/s", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "errors", "server CPU"],
                rows)
    tokens = {name: [res.output_tokens_per_s for res in rounds] for name, rounds in results.items()}
    ratios = [m / b for m, b in zip(tokens["mix"], tokens["base"])]
    same_server = [m / b for m, b in zip(tokens["mix"], tokens["base+lora"])]
    per_adapter = {n: statistics.median(res.by_group[n].output_tokens_per_s for res in results["mix"]) for n in names}
    ratio = statistics.median(ratios)
    errors = sum(res.error_count for rounds in results.values() for res in rounds)
    distinct = len({texts[n] for n in ["plain", *names]}) == 1 + len(names) and texts["plain"] == texts["lm"]
    print()
    for name, values in tokens.items():
        print(f"{name}: median {statistics.median(values):.0f} output tokens/s over {len(values)} round(s)")
    print("mix per adapter (median tok/s): " + ", ".join(f"{n} {v:.0f}" for n, v in per_adapter.items()))
    print(f"{'PASS' if ratio >= TARGET else 'MISS'}  {args.streams} streams over {args.adapters} adapters / "
          f"{args.streams} streams on the base alone: {ratio:.2f}x (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= {TARGET})")
    print(f"mix / base rows of the adapter-serving model: {statistics.median(same_server):.2f}x; errors: {errors}; "
          f"greedy texts: base = lm without adapter and every adapter differs: {distinct}")
    write_results("bench_multi_lora_serving_tiny" if args.tiny else "bench_multi_lora_serving", {
        "machine": info, "sizes": sizes, "random_weights": True, "adapters": args.adapters, "rank": args.rank,
        "streams": args.streams, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "warmup_s": args.warmup, "duration_s": args.duration, "rounds": args.rounds,
        "results": {name: [res.to_dict() for res in rounds] for name, rounds in results.items()},
        "mix_over_base": ratios, "mix_over_base_median": ratio, "mix_over_base_lora_rows": same_server,
        "per_adapter_tokens_per_s": per_adapter, "errors": errors, "texts_as_expected": distinct,
        "target": {"value": ratio, "pass": ratio >= TARGET}})


if __name__ == "__main__":
    main()
