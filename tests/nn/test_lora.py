"""LoRA building blocks (deepseek.nn.lora): each fast path against a merged-weight or per-expert-loop reference."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepseek as ds
from deepseek.nn.dispatch import GATHERED, HOST_GROUPED, LOOP, SORTED, LocalDispatch
from deepseek.nn.experts import GroupedExperts
from deepseek.nn.lora import (LoRAConfig, LoRAExperts, LoRALinear, apply_lora, disable_adapters, lora_state_dict,
                              merge_lora)

TARGETS = ["attn.*", "shared.*", "experts"]


def randomize_b(model: nn.Module, std: float = 0.1) -> None:
    """B starts at zero (the adapted model equals its base); tests need adapters that do something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "_B" in name:
                p.normal_(std=std)


def tiny_model() -> ds.MoETransformer:
    torch.manual_seed(0)
    return ds.MoETransformer(dataclasses.replace(ds.preset("tiny"), n_shared_experts=1, shared_ffn_dim=64)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))


def test_lora_linear_equals_linear_with_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = LoRALinear(base, LoRAConfig(r=4, alpha=16))
    randomize_b(layer)
    x = torch.randn(5, 7, 32)
    expected = F.linear(x, base.weight + 4.0 * layer.lora_B @ layer.lora_A, base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.merged_weight(), base.bias), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_a_is_kaiming_uniform_and_b_zero():
    layer = LoRALinear(nn.Linear(100, 8), LoRAConfig(r=16))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(100) and layer.lora_A.std() > 0.03
    assert torch.count_nonzero(layer.lora_B) == 0


def test_scaling_and_rslora():
    assert LoRAConfig(r=16).scaling == 1.0  # alpha defaults to r
    assert LoRAConfig(r=16, alpha=8).scaling == 0.5
    assert LoRAConfig(r=16, alpha=8, rslora=True).scaling == 2.0  # alpha / sqrt(r)
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8, bias=False), LoRAConfig(r=16, alpha=8, rslora=True))
    randomize_b(layer)
    x = torch.randn(3, 8)
    low = x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 2.0 * low, rtol=0, atol=1e-5)


def test_gradients_only_on_adapters():
    model = tiny_model().train()
    # The head is read as a weight by the fused loss (LoRALinear.weight: the effective weight), not called.
    summary = apply_lora(model, LoRAConfig(r=4, target_modules=TARGETS + ["lm_head"]))
    assert len(summary.modules) == 2 * (4 + 1 + 3) + 1  # per block: q k v o, routed experts, shared gate/up/down
    randomize_b(model)
    tokens = ids()
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    adapters = {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert summary.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def expert_setup(dropout: float = 0.0):
    torch.manual_seed(0)
    E, D, Fw, N, K = 4, 16, 8, 10, 2
    base = GroupedExperts(E, D, Fw)
    with torch.no_grad():
        base.gate_up.normal_(std=0.2)
        base.down.normal_(std=0.2)
    experts = LoRAExperts(base, LoRAConfig(r=4, alpha=8, dropout=dropout))
    randomize_b(experts)
    x = torch.randn(N, D)
    choices = torch.randint(0, E - 1, (N, K))  # expert E-1 gets no tokens
    choices[:, 1] = (choices[:, 0] + 1) % (E - 1)  # two distinct experts per token
    weights = torch.rand(N, K)
    return experts, x, weights, choices


def loop_reference(experts: LoRAExperts, x, weights, choices):
    """Per-expert merged weights, written out, each token through its experts one by one."""
    base, s, Fw = experts.base_layer, experts.scaling, experts.ffn_dim
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(choices.shape[1]):
            e = int(choices[n, k])
            gate_up = base.gate_up[e] + s * experts.lora_gate_up_B[e] @ experts.lora_gate_up_A[e]
            down = base.down[e] + s * experts.lora_down_B[e] @ experts.lora_down_A[e]
            h = gate_up @ x[n]
            out[n] += weights[n, k] * (down @ (F.silu(h[:Fw]) * h[Fw:]))
    return out


@pytest.mark.parametrize("dispatcher", [SORTED, LocalDispatch(), LOOP, HOST_GROUPED, GATHERED],
                         ids=["sorted", "local", "loop", "host_grouped", "gathered"])
def test_expert_lora_matches_per_expert_loop(dispatcher):
    experts, x, weights, choices = expert_setup()
    expected = loop_reference(experts, x, weights, choices)
    torch.testing.assert_close(dispatcher(x, weights, choices, experts), expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # LocalDispatch without gradients on few pairs: the host-grouped path
        torch.testing.assert_close(dispatcher(x, weights, choices, experts), expected, rtol=0, atol=1e-5)
    merged_gate_up, merged_down = experts.merged_weights()
    plain = GroupedExperts(experts.n_experts, x.shape[1], experts.ffn_dim)
    with torch.no_grad():
        plain.gate_up.copy_(merged_gate_up)
        plain.down.copy_(merged_down)
    torch.testing.assert_close(plain.forward_reference(x, weights, choices), expected, rtol=0, atol=1e-5)


def test_expert_lora_grouped_gradients_match_loop():
    experts, x, weights, choices = expert_setup()
    grads = []
    for dispatcher in (SORTED, LOOP):
        experts.zero_grad()
        (dispatcher(x, weights, choices, experts) ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in experts.named_parameters() if p.requires_grad})
    assert set(grads[0]) == {"lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"}
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5)
        assert torch.count_nonzero(grads[0][name][-1]) == 0  # the expert without tokens


def test_expert_lora_dropout_only_in_training():
    experts, x, weights, choices = expert_setup(dropout=0.5)
    experts.eval()
    torch.testing.assert_close(SORTED(x, weights, choices, experts), loop_reference(experts, x, weights, choices),
                               rtol=0, atol=1e-5)
    experts.train()
    assert not torch.allclose(SORTED(x, weights, choices, experts), loop_reference(experts, x, weights, choices))


def test_merge_lora_gives_the_adapted_logits():
    model = tiny_model()
    keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=TARGETS + ["lm_head"]))
    randomize_b(model)
    tokens = ids()
    with torch.no_grad():
        adapted = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def test_disable_adapters_is_the_base_model_exactly():
    model = tiny_model()
    tokens = ids()
    with torch.no_grad():
        base = model(tokens)
        apply_lora(model, LoRAConfig(r=4, target_modules=TARGETS))
        torch.testing.assert_close(model(tokens), base, rtol=0, atol=1e-6)  # B = 0: starts at the base
        randomize_b(model)
        assert not torch.allclose(model(tokens), base, atol=1e-3)
        with disable_adapters(model):
            assert torch.equal(model(tokens), base)
        assert not torch.allclose(model(tokens), base, atol=1e-3)


def test_lora_state_dict_holds_only_adapters():
    model = tiny_model()
    summary = apply_lora(model, LoRAConfig(r=4, target_modules=["q", "experts"]))
    state = lora_state_dict(model)
    assert "blocks.0.attn.q.lora_A" in state and "blocks.1.ffn.experts.lora_down_B" in state
    assert all(".lora_" in key for key in state)
    assert sum(t.numel() for t in state.values()) == summary.trainable_parameters
    assert set(state) <= set(model.state_dict())


def test_pattern_matching_nothing_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'attn\.query'.*adaptable modules: blocks\.0\.attn\.q"):
        apply_lora(model, LoRAConfig(target_modules=["attn.q", "attn.query"]))
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(ValueError, match="matches no"):
        apply_lora(model, LoRAConfig(target_modules=["attn_norm"]))  # a norm is not adaptable


def test_applying_twice_is_an_error():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2))


@pytest.mark.parametrize("field, value", [("r", 0), ("r", 2.5), ("alpha", -1.0), ("dropout", 1.0),
                                          ("rslora", "yes"), ("target_modules", "attn.q"), ("target_modules", [])])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
        LoRAConfig(**{field: value})


def test_config_from_dict():
    assert LoRAConfig.from_dict({"r": 8, "target_modules": ["q"]}) == LoRAConfig(r=8, target_modules=("q",))
    with pytest.raises(ValueError, match="unknown LoRAConfig key.*rank.*valid keys: r, alpha"):
        LoRAConfig.from_dict({"rank": 8})
