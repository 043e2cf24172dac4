"""Quantized kernels by capability: every kernel path of every scheme computes the same model, and ``auto`` picks
them by a pure function of an injected hardware profile (docs/compression.md, Kernels)."""

import copy

import pytest
import torch

import deepseek as ds
from deepseek.compress.quantize import quantize
from deepseek.hardware import (HardwareProfile, hardware_profile, int8_products_exact, int8_products_exact_probe,
                               int8_products_fast)
from deepseek.nn.experts import GroupedExperts
from deepseek.nn.quantized import (KERNELS, SCHEMES, QuantizedExperts, QuantizedLinear, choose_kernel,
                                   kernel_choices, quantize_tokens_int8, quantized_kernel, set_quantized_kernel)

# The CPU classes our machines come as (docs/benchmarks.md), and what an AVX-512 machine looks like with oneDNN capped
# at AVX2 (flags still promise VNNI and bf16; the probes measure otherwise).
ZEN3_AVX2 = HardwareProfile("cpu", "AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2", "fma"}), 2,
                            {"fp32": 54.0, "bf16": 0.9, "int8": 1.4}, int8_exact=False)
ZEN5_AVX512 = HardwareProfile("cpu", "AMD EPYC 9B45", "x86_64", "AVX512",
                              frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2,
                              {"fp32": 180.0, "bf16": 410.0, "int8": 700.0}, int8_exact=True)
CAPPED_AT_AVX2 = HardwareProfile("cpu", "Xeon (ONEDNN_MAX_CPU_ISA=AVX2)", "x86_64", "AVX2",
                                 frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"}), 2,
                                 {"fp32": 200.0, "bf16": 2.1, "int8": 250.0}, int8_exact=False)
UNPROBED_ZEN3 = HardwareProfile("cpu", "AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2", "fma"}), 2)
H100 = HardwareProfile("cuda", "NVIDIA H100", "x86_64", "sm_90", cuda_bf16=True)

# Relative difference a path may have from the scheme's dequant path in one layer: int_mm multiplies the same
# integers (exact where int8 products do not saturate); 7-bit activations add their own rounding (about the
# 8-bit one again, in quadrature); the bf16 kernels round activations (and int4's scales) to bf16.
PATH_TOLERANCE = {"int_mm": 1e-6, "int_mm_7bit": 0.05, "int8pack_bf16": 0.015, "int4pack_bf16": 0.015,
                  "dequant": 0.0}
# Against fp32, and between paths through a whole model (roundings compound over layers), on random weights.
SCHEME_TOLERANCE = {"int8-dynamic": 0.05, "int8-weight": 0.03, "int4-weight": 0.2}
PATHS = [(scheme, kernel) for scheme in SCHEMES for kernel in KERNELS[scheme]]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def path_tolerance(kernel, scheme=None):
    """Layer tolerance (``scheme=None``) or whole-model tolerance of ``kernel`` against the dequant path."""
    if kernel == "int_mm" and not int8_products_exact(hardware_profile()):
        kernel = "int_mm_7bit"  # a forced int_mm runs with 7-bit activations here
    if scheme is not None and kernel not in ("int_mm", "dequant"):
        return SCHEME_TOLERANCE[scheme]
    return PATH_TOLERANCE[kernel]


# -- choosing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile, expected", [
    (ZEN3_AVX2, {"int8-dynamic": "dequant", "int8-weight": "dequant", "int4-weight": "dequant"}),
    (CAPPED_AT_AVX2, {"int8-dynamic": "dequant", "int8-weight": "dequant", "int4-weight": "dequant"}),
    (UNPROBED_ZEN3, {"int8-dynamic": "dequant", "int8-weight": "dequant", "int4-weight": "dequant"}),
    (ZEN5_AVX512, {"int8-dynamic": "int_mm", "int8-weight": "int8pack_bf16", "int4-weight": "int4pack_bf16"}),
    (H100, {"int8-dynamic": "dequant", "int8-weight": "dequant", "int4-weight": "dequant"}),
])
def test_auto_is_a_pure_function_of_the_profile(profile, expected):
    for scheme, kernel in expected.items():
        choice = choose_kernel(scheme, "auto", profile)
        assert (choice.kernel, choice.requested, choice.scheme) == (kernel, "auto", scheme)
        assert choice.dequantized == (kernel == "dequant")


def test_the_reason_says_why_a_compressed_model_runs_in_fp32():
    assert choose_kernel("int8-dynamic", "auto", ZEN3_AVX2).reason == (
        "auto: int8 products not fast on this CPU (no VNNI): dequantized fp32 path")
    assert "16-bit pair sums saturate" in choose_kernel("int8-dynamic", "auto", CAPPED_AT_AVX2).reason
    assert "bf16 products not fast on this CPU (no native bf16)" in choose_kernel("int4-weight", "auto",
                                                                                   ZEN3_AVX2).reason
    assert "0.011x fp32 measured" in choose_kernel("int8-weight", "auto", CAPPED_AT_AVX2).reason
    assert "avx512_vnni" in choose_kernel("int8-dynamic", "auto", ZEN5_AVX512).reason


def test_int8_products_must_be_exact_to_be_fast():
    fast_but_saturating = HardwareProfile("cpu", "x", "x86_64", "AVX2", frozenset({"avx2", "avx512_vnni"}), 2,
                                          {"fp32": 100.0, "int8": 400.0}, int8_exact=False)
    assert not int8_products_exact(fast_but_saturating) and not int8_products_fast(fast_but_saturating)
    assert int8_products_fast(ZEN5_AVX512) and not int8_products_exact(UNPROBED_ZEN3)
    assert isinstance(int8_products_exact_probe(), bool)
    assert hardware_profile().int8_exact == int8_products_exact_probe()


def test_a_forced_int_mm_where_int8_sums_saturate_runs_with_7_bit_activations():
    assert choose_kernel("int8-dynamic", "int_mm", ZEN5_AVX512).kernel == "int_mm"
    choice = choose_kernel("int8-dynamic", "int_mm", CAPPED_AT_AVX2)
    assert choice.kernel == "int_mm_7bit" and "7-bit" in choice.reason
    assert choose_kernel("int8-weight", "dequant", ZEN5_AVX512).kernel == "dequant"


def test_unknown_kernels_are_refused_with_the_valid_ones_and_nothing_changes():
    with pytest.raises(ValueError, match="'int_mm' for int4-weight; valid kernels: auto, int4pack_bf16, dequant"):
        choose_kernel("int4-weight", "int_mm", ZEN5_AVX512)
    model = quantize(ds.MoETransformer(ds.preset("tiny")), "int8-weight")
    set_quantized_kernel(model, "dequant")
    with pytest.raises(ValueError, match="valid kernels: auto, int8pack_bf16, dequant"):
        set_quantized_kernel(model, "int4pack")
    assert {c.kernel for c in kernel_choices(model).values()} == {"dequant"}
    with pytest.raises(ValueError, match="no quantized modules"):
        set_quantized_kernel(ds.MoETransformer(ds.preset("tiny")), "dequant")


def test_forcing_is_scoped_resolved_from_an_injected_profile_and_never_saved(tmp_path):
    model = quantize(ds.MoETransformer(ds.preset("tiny")), "int8-dynamic")
    keys = set(model.state_dict())
    with quantized_kernel(model, "auto", profile=ZEN3_AVX2):
        choices = kernel_choices(model)
        assert {c.kernel for c in choices.values()} == {"dequant"}
        # one choice per weight outside the experts, one per experts module (for all its weights)
        assert any(isinstance(model.get_submodule(name), QuantizedExperts) for name in choices)
        assert not any(".gate_up." in name or ".down." in name for name in choices)
        with quantized_kernel(model, "int_mm_7bit"):
            assert {c.kernel for c in kernel_choices(model).values()} == {"int_mm_7bit"}
        assert {c.kernel for c in kernel_choices(model).values()} == {"dequant"}
    assert set(model.state_dict()) == keys
    expected = "int_mm" if int8_products_fast(hardware_profile()) else "dequant"
    assert {c.kernel for c in kernel_choices(model).values()} == {expected}


def test_auto_on_an_avx2_cpu_never_calls_the_int8_or_bf16_kernels(monkeypatch):
    from deepseek.nn import quantized

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel that is slow (or saturates) on AVX2 ran")

    ids = torch.randint(0, 259, (2, 40))
    for scheme in SCHEMES:
        model = quantize(ds.MoETransformer(ds.preset("tiny")), scheme)
        set_quantized_kernel(model, "auto", profile=ZEN3_AVX2)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "_int_mm", refuse)
            patch.setattr(quantized, "int8_weight_matmul", refuse)
            patch.setattr(quantized.Int4Kernel, "matmul", refuse)
            with torch.no_grad():
                model(ids)
                model(ids[:1, :1])  # one token: the experts' decoding path


# -- computing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, kernel", PATHS)
def test_every_path_of_a_linear_agrees_with_the_dequantized_product(scheme, kernel):
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 3, 64)
    module = QuantizedLinear.from_linear(linear, scheme)
    with quantized_kernel(module, "dequant"):
        reference = module(x)
    with quantized_kernel(module, kernel):
        out = module(x)
    assert out.shape == (5, 3, 48)
    assert relative_error(out, reference) <= path_tolerance(kernel)
    assert relative_error(out, linear(x)) < SCHEME_TOLERANCE[scheme]


def test_int8_dynamic_dequant_path_multiplies_the_same_integers():
    """The fp32 path rounds activations as int_mm does and sums the same integer products: bit for bit equal
    to an int64 product of the integers (sums below 2**24 are exact in fp32)."""
    linear = torch.nn.Linear(256, 32, bias=False)
    module = QuantizedLinear.from_linear(linear, "int8-dynamic")
    x = torch.randn(6, 256)
    xq, sx = quantize_tokens_int8(x)
    exact = (xq.long() @ module.weight_q.q.long().t()).float() * sx * module.weight_q.scale
    with quantized_kernel(module, "dequant"):
        assert torch.equal(module(x), exact)


def test_7_bit_activations_keep_int_mm_exact():
    """int_mm_7bit: weights first, 7-bit activations second, so oneDNN's u8 x s8 pair sums stay below 2**15
    even without VNNI (2 * 255 * 63). Exact on every CPU, including under ONEDNN_MAX_CPU_ISA=AVX2."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 128), dtype=torch.int8, generator=gen)
    q[:, :8] = 127
    xq = torch.randint(-63, 64, (16, 128), dtype=torch.int8, generator=gen)
    xq[:, :8] = 63
    out = torch._int_mm(q, xq.t()).t()
    assert torch.equal(out.long(), xq.long() @ q.long().t())


@pytest.mark.parametrize("scheme, kernel", PATHS)
def test_every_path_of_the_experts_agrees_sorted_and_decoding(scheme, kernel):
    experts = GroupedExperts(8, 64, 32)
    torch.nn.init.normal_(experts.gate_up, std=0.1)
    torch.nn.init.normal_(experts.down, std=0.1)
    module = QuantizedExperts.from_experts(experts, scheme)
    x = torch.randn(40, 64)
    weights = torch.rand(40, 2)
    choices = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    choices[:, 0] = choices[:, 0] % 6  # experts 6 and 7 get fewer tokens; an expert with none is skipped
    choices[choices == 7] = 6

    def run():
        sorted_path = module(x, weights, choices)  # 80 pairs: the sorted dispatch
        few = module(x[:3], weights[:3], choices[:3])  # 6 pairs: grouped on the host
        one = torch.cat([module(x[i:i + 1], weights[i:i + 1], choices[i:i + 1]) for i in range(3)])  # one token
        return sorted_path, few, one

    with quantized_kernel(module, "dequant"):
        reference = run()
    with quantized_kernel(module, kernel):
        out = run()
    for got, want in zip(out, reference):
        assert relative_error(got, want) <= path_tolerance(kernel) + 1e-6
    torch.testing.assert_close(out[1], out[0][:3], atol=1e-5, rtol=0)  # decoding paths equal the sorted one
    torch.testing.assert_close(out[2], out[0][:3], atol=1e-5, rtol=0)
    assert relative_error(out[0], experts.forward_reference(x, weights, choices)) < SCHEME_TOLERANCE[scheme]


@pytest.fixture(scope="module")
def tiny_and_ids():
    torch.manual_seed(0)
    return ds.MoETransformer(ds.preset("tiny")).eval(), torch.randint(0, 259, (2, 40))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_path_of_a_whole_model_gives_the_same_logits(tiny_and_ids, scheme):
    model, ids = tiny_and_ids
    quantized = quantize(copy.deepcopy(model), scheme)

    def run():  # a 2 x 40 forward (sorted experts) and six one-token forwards (the decoding path)
        return quantized(ids), torch.cat([quantized(ids[:1, j:j + 1]) for j in range(6)])

    with torch.no_grad():
        fp32 = model(ids)
        with quantized_kernel(quantized, "dequant"):
            reference, reference_steps = run()
        for kernel in KERNELS[scheme]:
            with quantized_kernel(quantized, kernel):
                logits, steps = run()
            assert relative_error(logits, reference) <= max(path_tolerance(kernel, scheme), 1e-6), kernel
            assert relative_error(steps, reference_steps) <= max(path_tolerance(kernel, scheme), 1e-6), kernel
            assert relative_error(logits, fp32) < SCHEME_TOLERANCE[scheme], kernel
