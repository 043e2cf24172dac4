"""``ds profile generate`` on a tiny model directory: prefill and decode measured, KV bytes by hand."""

import json

import pytest
import torch

import deepseek as ds
from deepseek.models.directory import save
from deepseek.ops.profile_generate import profile_generate, random_prompts

BATCH, PROMPT, NEW = 2, 8, 4


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("model")
    save(ds.MoETransformer(ds.preset("tiny")), ds.byte_tokenizer(), model_dir)
    out = tmp_path_factory.mktemp("profile")
    return profile_generate(model_dir, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW, rounds=1, precision="fp32",
                            out=out, peak_seconds=0.15), out


def test_prefill_and_decode_are_measured(profiled):
    result, out = profiled
    saved = json.loads((out / "profile.json").read_text())
    assert saved["kind"] == "generate"
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_seconds_per_token", "weight_bytes",
                "kv_cache_bytes_per_token", "weight_streaming_floor_seconds", "mbu", "peaks", "machine", "memory"):
        assert key in saved, key
    assert saved["prefill_tokens_per_s"] > 0 and saved["decode_tokens_per_s"] > 0
    assert saved["decode_tokens_per_s"] == pytest.approx(BATCH / saved["decode_seconds_per_token"])
    assert saved["breakdown"]["prefill"] > 0 and saved["breakdown"]["decode"] > 0
    bandwidth = saved["peaks"]["memory_bandwidth_bytes_per_s"]
    read = saved["decode_weight_bytes_per_step"] + BATCH * (PROMPT + NEW / 2) * saved["kv_cache_bytes_per_token"]
    assert saved["weight_streaming_floor_seconds"] == pytest.approx(read / bandwidth)
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"])


def test_kv_and_weight_bytes_are_the_hand_computation(profiled):
    result, _ = profiled
    # tiny: 2 layers x (K and V) x 2 kv heads x head_dim 16 x 4 bytes (fp32)
    assert result["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 == 512
    assert result["kv_cache_bytes"] == BATCH * (PROMPT + NEW) * 512
    model = ds.MoETransformer(ds.preset("tiny"))
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert result["weight_bytes"] == 4 * params + buffers


def test_prompts_avoid_special_tokens():
    tokenizer = ds.byte_tokenizer()
    special = {tokenizer.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")}
    prompts = random_prompts(tokenizer, 259, 3, 200)
    assert len(prompts) == 3 and all(len(p) == 200 for p in prompts)
    assert not special & {t for p in prompts for t in p}
