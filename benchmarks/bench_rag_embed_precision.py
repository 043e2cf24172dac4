"""Embedding throughput of MiniLM (all-MiniLM-L6-v2) by precision — fp32, bf16 (autocast), ``int8`` (every
nn.Linear as int8 weights per output row times int8 activations per token, ``torch._int_mm``, the rounding and the
rescaling each one ``torch.compile``d pass; :class:`PerTokenInt8Linear`), ``ao-dynamic`` (``torch.ao``'s deprecated
``quantize_dynamic``: per-channel weights, one activation scale per batch, fbgemm) ``torchao-int8`` (torchao's
int8 dynamic-activation int8-weight, eager) and ``fp32-compiled`` (the fp32 transformer under ``torch.compile``,
dynamic shapes; named with --precisions) — interleaved in one process, plus how close each one's vectors are to
fp32's. The int8 variants are experiments (docs/rag.md "Speed": none reached the 1.6x at fp32's recall that
``ds rag`` would need to ship one); ``Embedder`` itself runs fp32 or bf16.

    python benchmarks/bench_rag_embed_precision.py --lengths 128 250 --batch 32 --rounds 5
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/bench_rag_embed_precision.py     # the AVX2 class, emulated on a newer CPU

Texts are windows of the standard library's source, exactly ``length`` word pieces each (with [CLS]/[SEP]), so
every batch is full width and texts/s compares like with like. Each round times one ``encode_ids`` of ``--texts``
rows per precision, the order rotated each round; reported: median texts/s per precision and the median of the
per-round time ratios fp32 / precision (> 1: faster than fp32). Quality: cosine to fp32's vectors (min, mean) on
``--quality-texts`` stdlib chunks of mixed lengths.
"""

from __future__ import annotations

import argparse
import copy
import warnings

from common import interleaved, machine_info, median, paired_ratio, print_machine, print_table, setup_path
from common import write_results

setup_path()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deepseek.data import python_stdlib_dir  # noqa: E402
from deepseek.rag.embed import Embedder  # noqa: E402


def stdlib_text(max_chars: int = 2_000_000) -> str:
    parts, size = [], 0
    for path in sorted(python_stdlib_dir().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)


def windows(embedder: Embedder, text: str, length: int, count: int, offset: int = 0) -> list[list[int]]:
    """``count`` id rows of exactly ``length`` word pieces: [CLS] + consecutive pieces of ``text`` + [SEP]."""
    pieces = embedder.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    cls, sep = embedder.tokenizer.cls_token_id, embedder.tokenizer.sep_token_id
    body = length - 2
    rows = [[cls] + pieces[offset + i * body: offset + (i + 1) * body] + [sep] for i in range(count)]
    assert all(len(r) == length for r in rows), "corpus too small for these windows"
    return rows


def quantize_tokens(x_MI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to int8 in -127..127 with its own scale: ``(q int8 [M, I], scale fp32 [M, 1])``."""
    scale = x_MI.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (x_MI / scale).round().to(torch.int8), scale


def scale_sums(y_MO, x_scale_M1, w_scale_O, bias_O):
    """int32 sums back to floats: times each token's and each weight row's scale, plus the bias."""
    y = y_MO.float() * x_scale_M1 * w_scale_O
    return y + bias_O if bias_O is not None else y


# One fused pass each (dynamic shapes: one graph for every batch and length). As separate eager passes they cost
# more than the int8 product itself (384-input products are cheap): int8 then ran 0.85x fp32.
quantize_tokens_fused = torch.compile(quantize_tokens, dynamic=True)
scale_sums_fused = torch.compile(scale_sums, dynamic=True)


class PerTokenInt8Linear(torch.nn.Module):
    """nn.Linear as int8 weights (one scale per output row) x int8 activations (one scale per token)."""

    def __init__(self, linear: torch.nn.Linear, fast_int8: bool):
        super().__init__()
        from deepseek.nn.quantized import quantize_int8_rows

        self.q, self.scale = quantize_int8_rows(linear.weight)
        self.bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.in_features, self.out_features, self.fast_int8 = linear.in_features, linear.out_features, fast_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_tokens_fused(x.reshape(-1, self.in_features).float())
        # Without VNNI/AMX _int_mm is many times slower than fp32: the same integer sums, exact in fp32, instead.
        sums = torch._int_mm(xq, self.q.t()) if self.fast_int8 else F.linear(xq.float(), self.q.float())
        return scale_sums_fused(sums, x_scale, self.scale, self.bias).view(*x.shape[:-1], self.out_features)


def per_token_int8_embedder(base: Embedder) -> Embedder:
    """A copy of ``base`` with every nn.Linear a :class:`PerTokenInt8Linear`."""
    from deepseek.hardware import hardware_profile, int8_products_fast

    fast = int8_products_fast(hardware_profile("cpu", measure=True))
    other = copy.copy(base)
    other.model = copy.deepcopy(base.model)
    for parent in list(other.model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, child_name, PerTokenInt8Linear(child, fast))
    other.precision = "int8" + ("" if fast else " (no VNNI/AMX: fp32 products of the integers)")
    return other


def compiled_embedder(base: Embedder) -> Embedder:
    """A copy of ``base`` whose transformer forward is ``torch.compile``d with dynamic shapes (fp32)."""
    other = copy.copy(base)
    other.model = copy.deepcopy(base.model)
    other.model[0].auto_model = torch.compile(other.model[0].auto_model, dynamic=True)
    other.precision = "fp32-compiled"
    return other


def torchao_embedder(base: Embedder) -> Embedder | None:
    """A copy of ``base`` with torchao's Int8DynamicActivationInt8WeightConfig on its Linear layers (None where
    torchao is missing or refuses)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    other = copy.copy(base)
    other.model = copy.deepcopy(base.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(other.model, Int8DynamicActivationInt8WeightConfig())
    other.precision = "torchao-int8"
    return other


def ao_dynamic_embedder(base: Embedder) -> Embedder:
    """A copy of ``base`` through ``torch.ao.quantization.quantize_dynamic`` (deprecated; fbgemm/x86 kernels)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    other = copy.copy(base)
    other.model = copy.deepcopy(base.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(other.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    other.precision = "ao-dynamic"
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 250])
    parser.add_argument("--batch", type=int, default=32, help="rows per forward")
    parser.add_argument("--texts", type=int, default=64, help="rows per timed encode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "ao-dynamic", "torchao-int8"])
    parser.add_argument("--quality-texts", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    base = Embedder.load(precision="fp32")
    print("# torch.backends.cpu.get_cpu_capability():", torch.backends.cpu.get_cpu_capability())
    embedders = {"fp32": base}
    for precision in args.precisions:
        if precision == "torchao-int8":
            made = torchao_embedder(base)
            if made is not None:
                embedders[precision] = made
        elif precision == "int8":
            embedders[precision] = per_token_int8_embedder(base)
        elif precision == "fp32-compiled":
            embedders[precision] = compiled_embedder(base)
        elif precision == "ao-dynamic":
            embedders[precision] = ao_dynamic_embedder(base)
        elif precision != "fp32":
            embedders[precision] = Embedder.load(precision=precision)
    text = stdlib_text()

    results = {"machine": info, "args": vars(args), "speed": [], "quality": {}}
    rows_out = []
    for length in args.lengths:
        ids = windows(base, text, length, args.texts)
        batch_tokens = args.batch * length  # exactly --batch rows per forward
        cases = {name: (lambda e=e: e.encode_ids(ids, batch_size=args.batch, batch_tokens=batch_tokens))
                 for name, e in embedders.items()}
        times = interleaved(cases, rounds=args.rounds, warmup=1)
        for name, ts in times.items():
            ratio = median(paired_ratio(times["fp32"], ts))
            rate = args.texts / median(ts)
            results["speed"].append({"length": length, "precision": name, "texts_per_s": rate,
                                     "speedup_vs_fp32": ratio, "seconds": ts})
            rows_out.append([length, args.batch, name, f"{rate:.1f}", f"{ratio:.2f}x"])
    print_table(["tokens", "batch", "precision", "texts/s (median)", "fp32 time / this (median)"], rows_out)

    # Quality: real chunk-like texts of mixed lengths (every 8th window of 20..256 pieces).
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, base.max_tokens + 1, size=args.quality_texts)
    pieces = base.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    cls, sep = base.tokenizer.cls_token_id, base.tokenizer.sep_token_id
    starts = rng.integers(0, len(pieces) - base.max_tokens, size=args.quality_texts)
    qids = [[cls] + pieces[s:s + n - 2] + [sep] for s, n in zip(starts, lengths)]
    reference = base.encode_ids(qids)
    quality_rows = []
    for name, e in embedders.items():
        if name == "fp32":
            continue
        cos = np.sum(e.encode_ids(qids) * reference, axis=1)
        results["quality"][name] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
        quality_rows.append([name, f"{cos.min():.5f}", f"{cos.mean():.5f}"])
    for name, e in embedders.items():
        print(f"# {name}: {e.precision}")
    print_table(["precision", "cosine to fp32, min", "mean"], quality_rows)
    print("results:", write_results("rag_embed_precision", results))


if __name__ == "__main__":
    main()
