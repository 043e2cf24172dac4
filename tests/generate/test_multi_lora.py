"""Multi-LoRA serving: one continuous batch mixing rows of different adapters gives each row what its adapter gives
alone (greedy, fp32), and the gathered per-row product equals the per-row reference and LoRALinear."""

from __future__ import annotations

import pytest
import torch

import deepseek as ds
from deepseek.generate.continuous import ContinuousBatchingEngine
from deepseek.generate.params import SamplingParams
from deepseek.models.adapters import (
    AdapterError,
    load_adapter,
    load_adapters,
)
from deepseek.nn.lora import LoRAConfig, LoRALinear
from deepseek.nn.multi_lora import MultiLoRALinear, adapter_names, row_adapters
from tests.models.mixtral_shaped import base_model as mixtral_shaped_model
from tests.models.random_adapter import save_random_adapter

VOCAB = 300
ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")


def base_model() -> ds.MoETransformer:
    return mixtral_shaped_model(max_seq_len=128)


def make_adapter(folder, lora: LoRAConfig, seed: int):
    return save_random_adapter(base_model(), folder, lora, seed, 0.3)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(root / "alpha", LoRAConfig(r=4, alpha=8, target_modules=ATTENTION), 1),
        "beta": make_adapter(root / "beta", LoRAConfig(r=2, alpha=3, rslora=True,
                                                       target_modules=("blocks.1.attn.q", "blocks.0.attn.v")), 2),
    }


def test_gathered_product_equals_reference_and_lora_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    layer = MultiLoRALinear(base, ["a", "b"], rank=4)
    singles = []
    for k, (r, alpha) in enumerate([(4, 8), (2, 5)]):
        single = LoRALinear(base, LoRAConfig(r=r, alpha=alpha))
        with torch.no_grad():
            single.lora_B.normal_()
        layer.set_adapter(k, single.lora_A, single.lora_B, single.scaling)
        singles.append(single)
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # no row adapters set: the base exactly
        layer.row_ids = torch.tensor([1, -1, 0, 1])
        fast, slow = layer(x), layer.reference(x)
        torch.testing.assert_close(fast, slow)
        torch.testing.assert_close(layer.gathered(x), slow)
        assert torch.equal(fast[1], base(x)[1])  # a base row: the batched base product exactly
        for b, k in enumerate([1, -1, 0, 1]):
            if k >= 0:
                torch.testing.assert_close(fast[b], singles[k](x[b]))
        # Tokens flattened row-major [B·T, I], as an MoE layer hands them to its shared expert: the same rows.
        flat = x.reshape(-1, 16)
        torch.testing.assert_close(layer(flat), fast.reshape(-1, 12))
        torch.testing.assert_close(layer.reference(flat), slow.reshape(-1, 12))
        with pytest.raises(ValueError, match="row adapters set for 4 rows, input has 7"):
            layer(torch.randn(7, 16))


def test_stacked_product_in_bf16_and_with_a_shared_row_mask():
    """lora_B is a writable [K, O, R] view of the [O, K, R] buffer the forward multiplies; the row mask that
    row_adapters computes once for all layers gives what each layer computes alone; bf16 stays close."""
    torch.manual_seed(1)
    base = torch.nn.Linear(16, 12, bias=True)
    layer = MultiLoRALinear(base, ["a", "b", "c"], rank=4)
    for k in range(3):
        layer.set_adapter(k, torch.randn(4 - k, 16), torch.randn(12, 4 - k), 0.5 + k)
    assert layer.lora_B.shape == (3, 12, 4) and torch.equal(layer.lora_B[2, :, 2:], torch.zeros(12, 2))
    assert torch.equal(layer.lora_B_OKR[:, 1], layer.lora_B[1])
    model = torch.nn.Sequential(layer)
    x, ids = torch.randn(5, 3, 16), torch.tensor([2, -1, 0, 1, 2])
    with torch.no_grad():
        layer.row_ids = ids
        alone = layer(x)
        torch.testing.assert_close(alone, layer.reference(x))
        with row_adapters(model, ids):
            assert layer.row_onehot_BK is not None
            assert torch.equal(layer(x), alone)
        assert layer.row_ids is None and layer.row_onehot_BK is None
        layer.to(torch.bfloat16)
        layer.row_ids = ids
        torch.testing.assert_close(layer(x.bfloat16()).float(), alone, rtol=0.05, atol=0.1)


def test_mixed_batch_equals_each_adapter_alone(adapters):
    tok = ds.byte_tokenizer()
    assert tok.get_vocab_size() <= VOCAB
    model = base_model()
    assert load_adapters(model, adapters) == ["alpha", "beta"]
    assert adapter_names(model) == ("alpha", "beta")
    assert isinstance(model.blocks[0].attn.q, MultiLoRALinear)

    prompts = ["def add(a, b):", "hello world, this is", "x = 1\ny = ", "import torch", "the quick brown fox",
               "class Foo:", "a"]
    choices = ["alpha", None, "beta", "alpha", "beta", None, "alpha"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    alone = {}
    for name in ("alpha", "beta", None):
        single = base_model()
        if name is not None:
            load_adapter(single, adapters[name])
        alone[name] = [out.token_ids for out in ds.generate(single, tok, prompts, params)]
    # The adapters change the output (else this test would prove nothing).
    assert alone["alpha"] != alone[None] and alone["beta"] != alone[None] and alone["alpha"] != alone["beta"]

    engine = ContinuousBatchingEngine(model, tok, max_running=4, max_batched_tokens=16, prefill_chunk=5)
    with engine:
        requests = [engine.submit(p, params, adapter=a) for p, a in zip(prompts, choices)]
        for r in requests:
            assert r.done.wait(60)
    for i, (r, name) in enumerate(zip(requests, choices)):
        assert r.finish_reason == "length"
        assert r.token_ids == alone[name][i], (i, name)


def test_unknown_adapter_and_refused_targets(adapters, tmp_path):
    tok = ds.byte_tokenizer()
    model = base_model()
    engine = ContinuousBatchingEngine(model, tok, max_running=2, max_batched_tokens=16)
    with pytest.raises(ValueError, match="unknown adapter 'alpha'"):
        engine.submit("hi", adapter="alpha")
    experts = make_adapter(tmp_path / "experts", LoRAConfig(r=2, target_modules=("experts",)), 3)
    with pytest.raises(AdapterError, match="not the head or routed experts, are served per row"):
        load_adapters(model, {"alpha": adapters["alpha"], "experts": experts})
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())  # left as it was
    with pytest.raises(AdapterError, match="no adapters"):
        load_adapters(model, {})


def test_row_adapters_reset_after_the_block(adapters):
    model = base_model()
    load_adapters(model, adapters)
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        base = model(x)
        with row_adapters(model, torch.tensor([-1, -1])):
            assert torch.equal(model(x), base)
        with row_adapters(model, torch.tensor([0, 1])):
            mixed = model(x)
        assert torch.equal(model(x), base)
    assert not torch.allclose(mixed, base)
