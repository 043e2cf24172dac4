"""Generation tokens/s: ours (``ds.generate``) vs Hugging Face ``generate`` on the same weights.

Model: the `mixtral-tiny` preset (the anchor of shared/reference/cpu-baseline.md: d256, 4 layers,
8 experts top-2, vocab 8192), fp32, greedy. Prompt 32 tokens, 128 new tokens forced (no early stop),
batch 1 and batch 8. Ours (eager, and with ``compile=True``: a compiled decoding step over a static
cache) and HF run interleaved in the same process; the ratio is the median of the
per-round ratios. Target: ours >= 2x HF at both batch sizes. Also checks that both produce the same
greedy tokens (same weights, same arithmetic up to rounding).

    python benchmarks/bench_generate.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from common import (interleaved, machine_info, median, paired_ratio, print_machine, print_table, setup_path,
                    spread, write_results)

setup_path()

import deepseek as ds  # noqa: E402
from hf_anchor import hf_mixtral_from_ours  # noqa: E402

PROMPT, NEW = 32, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("mixtral-tiny")).eval()
    hf = hf_mixtral_from_ours(model).eval()
    # Prompts are given as ids; the tokenizer must cover the model's whole vocabulary, since the engine
    # never samples ids its tokenizer cannot decode (HF's generate has no such restriction).
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    prompts = torch.randint(0, model.config.vocab_size, (8, PROMPT))

    rows, results = [], {"machine": info, "prompt_tokens": PROMPT, "new_tokens": NEW, "cases": {}}
    for batch in (1, 8):
        ids = prompts[:batch]

        def ours():
            return ds.generate(model, tokenizer, ids.tolist(), max_new_tokens=NEW, ignore_eos=True)

        def ours_compiled():
            return ds.generate(model, tokenizer, ids.tolist(), max_new_tokens=NEW, ignore_eos=True, compile=True)

        def theirs():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                   min_new_tokens=NEW, do_sample=False, pad_token_id=0)

        ours_tokens = [o.token_ids for o in ours()]
        hf_tokens = theirs()[:, PROMPT:].tolist()
        agree = sum(a == b for x, y in zip(ours_tokens, hf_tokens) for a, b in zip(x, y)) / (batch * NEW)
        start = time.perf_counter()
        compiled_same = [o.token_ids for o in ours_compiled()] == ours_tokens  # first call compiles
        compile_s = time.perf_counter() - start

        times = interleaved({"ours": ours, "ours_compiled": ours_compiled, "hf": theirs}, rounds=args.rounds,
                            warmup=1)
        ratio = paired_ratio(times["hf"], times["ours"])  # >1: ours is faster
        ratio_c = paired_ratio(times["hf"], times["ours_compiled"])
        tps = {k: [batch * NEW / t for t in v] for k, v in times.items()}

        # Time to first token and per-step latency of ours, from the streaming engine.
        stamps = []
        start = time.perf_counter()
        for event in ds.generate_stream(model, tokenizer, ids.tolist(), max_new_tokens=NEW, ignore_eos=True):
            if event.index == 0:
                stamps.append(time.perf_counter() - start)
        ttft_ms = stamps[0] * 1e3
        step_ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3

        best = max(median(ratio), median(ratio_c))
        rows.append([f"b{batch}", spread(tps["ours"]), spread(tps["ours_compiled"]), spread(tps["hf"]),
                     f"{median(ratio):.2f}x", f"{median(ratio_c):.2f}x", f"{ttft_ms:.1f}", f"{step_ms:.2f}",
                     f"{agree:.1%}", f"{compile_s:.0f}", "met" if best >= 2 else "MISSED"])
        results["cases"][f"b{batch}"] = {"ours_tok_s": tps["ours"], "ours_compiled_tok_s": tps["ours_compiled"],
                                          "hf_tok_s": tps["hf"], "ratio": ratio, "ratio_compiled": ratio_c,
                                          "ttft_ms": ttft_ms, "step_ms": step_ms, "greedy_agreement": agree,
                                          "compiled_same_tokens": compiled_same, "compile_s": compile_s}

    print(f"\nGeneration, mixtral-tiny fp32, prompt {PROMPT} + {NEW} new tokens, greedy, "
          f"{args.threads} threads, {args.rounds} interleaved rounds")
    print_table(["batch", "ours tok/s", "ours compiled tok/s", "HF tok/s", "ours/HF", "compiled/HF",
                 "ours TTFT ms", "ours ms/step", "same tokens as HF", "compile s", "target 2x"], rows)
    write_results("generate", results)


if __name__ == "__main__":
    main()
