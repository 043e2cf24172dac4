"""The compression report says which kernels a compressed model ran with, and never shows a slower one without why."""

import deepseek as ds
from deepseek.compress.quantize import quantize
from deepseek.compress.report import CompressionReport, ModelMeasurement, describe_kernels, kernel_summary
from deepseek.hardware import HardwareProfile
from deepseek.nn.quantized import set_quantized_kernel

ZEN3_AVX2 = HardwareProfile("cpu", "AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2", "fma"}), 2,
                            {"fp32": 54.0, "bf16": 0.9, "int8": 1.4}, int8_exact=False)
ZEN5_AVX512 = HardwareProfile("cpu", "AMD EPYC 9B45", "x86_64", "AVX512",
                              frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2,
                              {"fp32": 180.0, "bf16": 410.0, "int8": 700.0}, int8_exact=True)


def measured(method, kernels, b1, b8, decode):
    return ModelMeasurement("dir", method, 1000, 100, b1, b8, decode, kernels=kernels)


def kernels_on(profile, scheme="int8-dynamic"):
    model = quantize(ds.MoETransformer(ds.preset("tiny")), scheme)
    return kernel_summary(set_quantized_kernel(model, "auto", profile=profile))


def test_a_slower_dequantized_model_says_why():
    kernels = kernels_on(ZEN3_AVX2)
    assert [k["kernel"] for k in kernels] == ["dequant"]
    report = CompressionReport(measured("original", [], 10.0, 50.0, 100.0),
                               measured("int8-dynamic", kernels, 12.0, 49.0, 80.0))
    (note,) = report.notes()
    assert set(report.slower()) == {"latency_b1_ms", "decode_tokens_per_s"}
    assert note == ("the compressed model is slower than the original here (latency, batch 1 1.20x, decoding, "
                    "batch 1 1.25x): int8 products not fast on this CPU (no VNNI): dequantized fp32 path")
    assert report.to_dict()["notes"] == [note]
    assert describe_kernels(report.compressed) == "dequant" and describe_kernels(report.original) == "fp32"


def test_a_faster_model_has_no_notes_and_slow_fast_kernels_are_named():
    kernels = kernels_on(ZEN5_AVX512, "int8-weight")
    assert [k["kernel"] for k in kernels] == ["int8pack_bf16"]
    faster = CompressionReport(measured("original", [], 10.0, 50.0, 100.0),
                               measured("int8-weight", kernels, 9.0, 45.0, 120.0))
    assert faster.notes() == []
    slower = CompressionReport(measured("original", [], 10.0, 50.0, 100.0),
                               measured("int8-weight", kernels, 9.0, 60.0, 120.0))
    (note,) = slower.notes()
    assert "latency, batch 8" in note and "int8pack_bf16" in note and "slower than the original's fp32 products" in note
    pruned = CompressionReport(measured("original", [], 10.0, 50.0, 100.0),
                               measured("prune-channels", [], 11.0, 45.0, 120.0))
    assert "prune-channels keeps fp32 kernels" in pruned.notes()[0]
