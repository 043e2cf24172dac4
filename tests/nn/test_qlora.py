"""QLoRA (deepseek.nn.lora on deepseek.nn.quantized bases): adapters on int8/int4 models as ``ds compress`` makes them.

Each scheme on each of its kernel paths: B = 0 gives the quantized model's logits exactly, non-zero adapters add
exactly the hand-computed low-rank term to the base's own products, gradients reach the adapters only (through the
straight-through backward of the quantized products), a few Adam steps lower the loss, disable_adapters is the base.
"""

import pytest
import torch
import torch.nn.functional as F

import deepseek as ds
from deepseek.compress.quantize import quantize
from deepseek.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, disable_adapters, merge_lora
from deepseek.hardware import hardware_profile
from deepseek.nn.quantized import KERNELS, SCHEMES, QuantizedWeight, choose_kernel, quantized_kernel

TARGETS = ["attn.*", "experts"]  # a quantized model fuses q, k, v into attn.qkv
PATHS = [(scheme, kernel) for scheme in SCHEMES for kernel in KERNELS[scheme] if kernel != "int_mm_7bit"]


def quantized_model(scheme: str) -> ds.MoETransformer:
    torch.manual_seed(0)
    return quantize(ds.MoETransformer(ds.preset("tiny")), scheme)  # what `ds compress` does to the model


def adapted(scheme: str, std: float = 0.0) -> ds.MoETransformer:
    model = quantized_model(scheme)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    if std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name and "_B" in name:
                    p.normal_(std=std, generator=torch.Generator().manual_seed(len(name)))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("scheme,kernel", PATHS)
def test_zero_b_gives_the_quantized_logits_exactly(scheme, kernel):
    ids, _ = batch()
    base = quantized_model(scheme)
    model = adapted(scheme)
    with torch.no_grad(), quantized_kernel(base, kernel), quantized_kernel(model, kernel):
        expected, got = base(ids), model(ids)
    assert torch.equal(got, expected)
    n_experts = sum(isinstance(m, LoRAExperts) and m.quantized for m in model.modules())
    n_linears = sum(isinstance(m, LoRALinear) and m.quantized for m in model.modules())
    assert n_experts == 2 and n_linears == 4  # tiny: 2 blocks, each with attn.qkv, attn.o and routed experts


@pytest.mark.parametrize("scheme,kernel", PATHS)
def test_forward_is_the_base_products_plus_the_low_rank_term(scheme, kernel):
    """Every adapted module, inside a whole-model forward, against the base's products plus s*B(Ax) by hand."""
    ids, _ = batch()
    model = adapted(scheme, std=0.1)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out)))
             for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    with torch.no_grad(), quantized_kernel(model, kernel):
        model(ids)
        assert len(seen) == 6
        for module, args, out in seen:
            s = module.scaling
            if isinstance(module, LoRALinear):
                (x,) = args
                low = s * (x @ module.lora_A.T @ module.lora_B.T)
                assert low.abs().max() > 1e-3  # the adapter does something
                torch.testing.assert_close(out, module.base_layer(x) + low, rtol=0, atol=1e-4)
                continue
            x_ND, weights_NK, experts_NK = args
            base, ffn = module.base_layer, module.ffn_dim
            # what the model runs: a forced int_mm runs as int_mm_7bit where int8 products saturate (AVX2)
            run = choose_kernel(base.scheme, kernel, hardware_profile()).kernel
            expected = torch.zeros_like(x_ND)
            for n in range(x_ND.shape[0]):  # one token and one expert at a time
                for k in range(experts_NK.shape[1]):
                    e, row = int(experts_NK[n, k]), x_ND[n:n + 1]
                    gate_up = (base.gate_up[e].product(row, run)
                               + s * row @ module.lora_gate_up_A[e].T @ module.lora_gate_up_B[e].T)
                    hidden = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
                    y = base.down[e].product(hidden, run) + s * hidden @ module.lora_down_A[e].T @ module.lora_down_B[e].T
                    expected[n] += weights_NK[n, k] * y[0]
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("scheme,kernel", PATHS)
def test_only_adapters_get_gradients_finite_and_nonzero(scheme, kernel):
    ids, targets = batch()
    model = adapted(scheme, std=0.02)
    with quantized_kernel(model, kernel):
        model(ids, targets=targets).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    assert set(grads) == adapters  # every adapter (every expert gets tokens in this batch), nothing else
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, name
    # The first block's adapters only learn through the second block's quantized products: the straight-through
    # backward reaches them (int8-dynamic's rounding alone would give them zero gradient from the later layers).
    assert grads["blocks.0.attn.qkv.lora_A"].abs().max() > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_few_adam_steps_lower_the_loss(scheme):
    ids, targets = batch()
    model = adapted(scheme)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        assert model(ids, targets=targets).item() < losses[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disable_adapters_gives_the_quantized_logits_exactly(scheme):
    ids, _ = batch()
    base, model = quantized_model(scheme), adapted(scheme, std=0.1)
    with torch.no_grad():
        expected = base(ids)
        assert not torch.allclose(model(ids), expected, atol=1e-3)
        with disable_adapters(model):
            assert torch.equal(model(ids), expected)
        assert not torch.allclose(model(ids), expected, atol=1e-3)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_onto_a_quantized_base_is_refused_and_changes_nothing(scheme):
    ids, _ = batch()
    model = adapted(scheme, std=0.1)
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(model)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert sum(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules()) == 6


@pytest.mark.parametrize("scheme,kernel", PATHS)
def test_quantized_product_backward_is_straight_through(scheme, kernel):
    """Forward: the kernel's value bit for bit; backward: grad @ W_dequantized (exact for weight-only dequant)."""
    torch.manual_seed(0)
    weight = QuantizedWeight(scheme, 32, 64).set_weight(torch.randn(32, 64))
    x = torch.randn(5, 64, requires_grad=True)
    y = weight.product(x, kernel)
    with torch.no_grad():
        assert torch.equal(y, weight.product(x, kernel))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ weight.dequantize(), rtol=0, atol=1e-5)
    if kernel == "dequant" and scheme != "int8-dynamic":  # here it is the true gradient of the product
        x_ref = x.detach().requires_grad_(True)
        F.linear(x_ref, weight.dequantize()).backward(grad_out)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qlora_on_a_compressed_model_directory(tmp_path, scheme):
    """The base as `ds compress` writes it and `ds.load` rebuilds it: adapters start at its logits and train."""
    from deepseek.compress.quantize import compression_record, quantization_entry, save_compressed
    from deepseek.data.tokenizer import byte_tokenizer

    record = compression_record(scheme, quantization=quantization_entry(scheme))
    path = save_compressed(quantized_model(scheme), byte_tokenizer(), tmp_path / scheme, record)
    base, _ = ds.load(path)
    model, _ = ds.load(path)
    apply_lora(model, LoRAConfig(r=4, target_modules=TARGETS))
    ids, targets = batch()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    loss = model(ids, targets=targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
