"""Precision is chosen by what the device does fast: a pure function of an injected hardware profile."""

import warnings

import pytest
import torch

from deepseek.hardware import (HardwareProfile, bf16_products_fast, choose_precision, hardware_profile,
                               int8_products_fast, warn_once)

# Profiles as the two CPU classes of our machines measured (docs/benchmarks.md), and two GPUs.
ZEN3_AVX2 = HardwareProfile("cpu", "AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2", "fma"}), 2,
                            {"fp32": 54.0, "bf16": 0.9, "int8": 1.4})
ZEN5_AVX512 = HardwareProfile("cpu", "AMD EPYC 9B45", "x86_64", "AVX512",
                              frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2,
                              {"fp32": 180.0, "bf16": 410.0, "int8": 700.0})
# Flags that promise bf16 while the products are slow (a VM masking the ISA, oneDNN limited to AVX2): measured wins.
PROMISED_BUT_SLOW = HardwareProfile("cpu", "Xeon (oneDNN capped at AVX2)", "x86_64", "AVX2",
                                    frozenset({"avx2", "avx512_bf16", "amx_bf16", "avx512_vnni"}), 2,
                                    {"fp32": 150.0, "bf16": 1.2, "int8": 40.0})
UNPROBED_ARM = HardwareProfile("cpu", "Neoverse-V1", "aarch64", "DEFAULT", frozenset({"asimd", "bf16", "i8mm"}), 4)
H100 = HardwareProfile("cuda", "NVIDIA H100", "x86_64", "sm_90", cuda_bf16=True)
T4 = HardwareProfile("cuda", "Tesla T4", "x86_64", "sm_75", cuda_bf16=False)


@pytest.mark.parametrize("profile, expected", [(ZEN3_AVX2, "fp32"), (ZEN5_AVX512, "bf16"), (PROMISED_BUT_SLOW, "fp32"),
                                               (UNPROBED_ARM, "bf16"), (H100, "bf16"), (T4, "fp16")])
def test_auto_picks_what_the_device_runs_fast(profile, expected):
    choice = choose_precision("auto", profile)
    assert choice.precision == expected and choice.warning is None
    assert choice.autocast_dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    assert choice.reason.startswith("auto: ")


def test_the_reason_names_the_evidence():
    assert "no native bf16" in choose_precision("auto", ZEN3_AVX2).reason
    assert "avx512_bf16" in choose_precision("auto", ZEN5_AVX512).reason
    assert "0.008x fp32 measured" in choose_precision("auto", PROMISED_BUT_SLOW).reason


def test_explicit_bf16_where_it_is_slow_runs_but_says_by_how_much():
    choice = choose_precision("bf16", ZEN3_AVX2)
    assert choice.precision == "bf16"
    assert "60x slower than fp32" in choice.warning and "precision=auto" in choice.warning
    assert choose_precision("bf16", ZEN5_AVX512).warning is None
    assert choose_precision("fp32", ZEN5_AVX512).precision == "fp32"


def test_fp16_on_a_cpu_is_refused_and_unknown_names_listed():
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        choose_precision("fp16", ZEN5_AVX512)
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        choose_precision("int8", ZEN5_AVX512)


def test_int8_products_need_vnni_and_a_measured_win():
    assert not int8_products_fast(ZEN3_AVX2)
    assert int8_products_fast(ZEN5_AVX512)
    assert not int8_products_fast(PROMISED_BUT_SLOW)  # flags say VNNI, the probe says 40 vs 150 GOP/s
    assert not bf16_products_fast(ZEN3_AVX2) and bf16_products_fast(ZEN5_AVX512)


def test_a_slow_precision_is_warned_about_once():
    message = choose_precision("bf16", ZEN3_AVX2).warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_once(message)
        warn_once(message)
    assert len(caught) == 1 and "slower than fp32" in str(caught[0].message)


def test_this_machine_is_profiled_once_per_process():
    profile = hardware_profile()
    assert profile is hardware_profile()  # cached
    assert profile.device_type == "cpu" and profile.capability == torch.backends.cpu.get_cpu_capability()
    assert {"fp32", "bf16"} <= profile.measured.keys() and all(v > 0 for v in profile.measured.values())
    assert choose_precision("auto", profile).precision in ("fp32", "bf16")
    assert profile.name in profile.summary()
