"""Pruning: magnitude sparsity reaches its target, structured pruning equals masking the same channels/heads in
the original, expert pruning is exact when the dropped experts were unused, and pruned models are ordinary
model directories (load, generate, serve)."""

import copy
import json
import re
from pathlib import Path

import httpx
import pytest
import torch

import deepseek as ds
from deepseek.compress.finetune import finetune, finetune_config, validation_perplexity
from deepseek.compress.prune import (PruneReport, gather_router_stats, kept_count, kept_heads_per_group,
                                     prunable_weights, prune_channels, prune_experts, prune_unstructured)
from deepseek.data import eval_batches
from deepseek.nn.mlp import SwiGLU
from deepseek.serve.manager import ModelManager
from deepseek.serve.repository import ModelRepository
from tests.serve.gated_model import running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tiny(trained_tiny):
    """The trained ``tiny`` model (softmax router, GQA 4/2, 2 MoE layers) and its tokenizer, fresh per test."""
    return ds.load(trained_tiny)


def mixed_model(**overrides) -> ds.MoETransformer:
    """A dense first layer, a gated shared expert, a sigmoid router, q bias and qk-norm: every path of pruning.

    Wide random init (std 0.1) so that outputs are far from zero and a 1e-5 comparison means something.
    """
    cfg = ds.preset("tiny", n_layers=3, first_k_dense=1, n_shared_experts=1, shared_expert_gate=True, n_heads=8,
                    n_kv_heads=2, router="sigmoid", attention_bias=True, qk_norm=True, init_std=0.1, **overrides)
    torch.manual_seed(1)
    model = ds.MoETransformer(cfg).eval()
    with torch.no_grad():  # biases and norm weights away from their zero/one init, so slicing them is tested
        for name, p in model.named_parameters():
            if name.endswith(("q.bias", "k.bias", "v.bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(batch=2, length=24, vocab=259, seed=3):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- unstructured -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_reaches_sparsity_keeps_working_and_zeros_survive_save_load(tmp_path, lm_data, tiny, scope):
    model, tok = tiny
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n in ("embed.weight", "lm_head.weight") or "router" in n or "norm" in n}
    before = validation_perplexity(model, lm_data, seq_len=64, max_batches=2)["val_loss"]
    report = prune_unstructured(model, 0.5, scope=scope)

    weights = prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert report.sparsity == pytest.approx(0.5, abs=0.01) and zeros / total == pytest.approx(report.sparsity)
    assert set(report.details["tensors"]) == set(weights)
    assert any(name.endswith("experts.gate_up") for name in weights)
    if scope == "layer":  # every tensor, and every expert's own matrix, at the target
        for name, w in weights.items():
            for matrix in (w if w.dim() == 3 else [w]):
                assert float((matrix == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    for name, p in model.named_parameters():
        if name in untouched:
            assert torch.equal(p, untouched[name]), f"{name} must not be pruned"
    assert report.parameters_before == report.parameters_after == model.num_parameters()
    assert report.details["nonzero_parameters"] == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    json.dumps(report.to_dict())

    after = validation_perplexity(model, lm_data, seq_len=64, max_batches=2)["val_loss"]
    assert after < before + 0.5  # 50% of the smallest weights cost little on a trained model
    assert ds.generate(model, tok, "def f(x):", max_new_tokens=8).completion_tokens == 8

    path = ds.save(model, tok, tmp_path / "sparse", compression=report.to_dict())
    loaded, _ = ds.load(path)
    for name, w in prunable_weights(loaded).items():
        assert torch.equal(w, weights[name])
    assert json.loads((path / "compression.json").read_text())["method"] == "unstructured"


def test_unstructured_zero_sparsity_changes_nothing_and_reports_existing_zeros():
    model = mixed_model()
    before = state_copy(model)
    report = prune_unstructured(model, 0.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert report.sparsity == 0.0 and "threshold" not in report.details
    prune_unstructured(model, 0.3, scope="layer")
    again = prune_unstructured(model, 0.2)  # already 30% sparse: nothing new, the report says 30%
    assert again.sparsity == pytest.approx(0.3, abs=0.01)


# -- structured: channels and heads -------------------------------------------------------------------

def matching_rows(old, new):
    """For each row of ``new``, its index in ``old`` (exactly one equal row each)."""
    equal = (old.unsqueeze(0) == new.unsqueeze(1)).all(-1)  # [new, old]
    assert (equal.sum(1) == 1).all(), "every kept row is one original row"
    return equal.float().argmax(1)


def masked_reference(model, pruned, kept_heads):
    """A copy of ``model`` with the channels and heads that ``pruned`` dropped set to zero (kept ones untouched).

    A dropped FFN channel contributes silu(0) * 0 = 0 once its gate and up rows are zero; a dropped head
    contributes nothing once its o columns are zero (its q rows are zeroed too). The kept channels are found
    by matching the pruned model's rows against the original's, independently of the pruning code.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, (block, small) in enumerate(zip(ref.blocks, pruned.blocks)):
            attn, Dh = block.attn, block.attn.head_dim
            if kept_heads:
                drop = sorted(set(range(attn.n_heads)) - set(kept_heads[i]))
                rows = torch.tensor([h * Dh + d for h in drop for d in range(Dh)], dtype=torch.long)
                attn.q.weight[rows] = 0
                attn.o.weight[:, rows] = 0
                kept_rows = torch.tensor([h * Dh + d for h in kept_heads[i] for d in range(Dh)])
                assert torch.equal(small.attn.q.weight, attn.q.weight[kept_rows])
            swiglus = [(block.ffn, small.ffn)] if isinstance(block.ffn, SwiGLU) else []
            if not swiglus and block.ffn.shared is not None:
                swiglus.append((block.ffn.shared, small.ffn.shared))
            for big, little in swiglus:
                keep = matching_rows(big.gate.weight, little.gate.weight)
                drop = torch.ones(big.gate.weight.shape[0], dtype=torch.bool)
                drop[keep] = False
                big.gate.weight[drop] = 0
                big.up.weight[drop] = 0
                assert torch.equal(little.up.weight, big.up.weight[keep])
                assert torch.equal(little.down.weight, big.down.weight[:, keep])
            if not isinstance(block.ffn, SwiGLU):
                ex, small_ex = block.ffn.experts, small.ffn.experts
                F_old, F_new = ex.ffn_dim, small_ex.ffn_dim
                for e in range(ex.n_experts):
                    keep = matching_rows(ex.gate_up[e, :F_old], small_ex.gate_up[e, :F_new])
                    drop = torch.ones(F_old, dtype=torch.bool)
                    drop[keep] = False
                    ex.gate_up[e, :F_old][drop] = 0
                    ex.gate_up[e, F_old:][drop] = 0
                    assert torch.equal(small_ex.gate_up[e, F_new:], ex.gate_up[e, F_old:][keep])
                    assert torch.equal(small_ex.down[e], ex.down[e][:, keep])
    return ref


@pytest.mark.parametrize("which", ["trained_tiny", "mixed"])
def test_prune_channels_equals_masking_the_same_channels_and_heads(which, tiny):
    model = tiny[0] if which == "trained_tiny" else mixed_model()
    cfg = model.config
    original = state_copy(model)
    pruned, report = prune_channels(model, 0.3)

    new = pruned.config
    assert isinstance(pruned, ds.MoETransformer) and pruned is not model
    assert new.moe_ffn_dim == kept_count(cfg.moe_ffn_dim, 0.3, 16) == 80
    group = cfg.n_heads // cfg.n_kv_heads
    assert new.n_heads == kept_heads_per_group(group, 0.3) * cfg.n_kv_heads and new.n_heads % new.n_kv_heads == 0
    assert new.n_heads < cfg.n_heads and new.head_dim == cfg.head_dim and new.n_kv_heads == cfg.n_kv_heads
    if which == "mixed":
        assert (new.n_heads, new.ffn_dim, new.shared_ffn_dim) == (6, 176, 80)
    assert report.parameters_after == pruned.num_parameters() < model.num_parameters() == report.parameters_before
    assert report.sparsity == pytest.approx(1 - report.parameters_after / report.parameters_before)
    assert report.details["after"]["moe_ffn_dim"] == 80
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()), "the original is untouched"
    assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()} for p in pruned.parameters())

    ref = masked_reference(model, pruned, report.details["kept_heads"])
    x = ids()
    with torch.no_grad():
        expected, got = ref(x), pruned(x)
    assert expected.abs().mean() > 0.05  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prune_channels_keeps_the_largest_l1_channels_and_heads():
    model = mixed_model()
    pruned, report = prune_channels(model, 0.5)
    ffn = model.blocks[0].ffn  # the dense layer
    importance = ffn.gate.weight.abs().sum(1) + ffn.up.weight.abs().sum(1) + ffn.down.weight.abs().sum(0)
    kept = matching_rows(ffn.gate.weight, pruned.blocks[0].ffn.gate.weight)
    dropped = torch.ones_like(importance, dtype=torch.bool)
    dropped[kept] = False
    assert importance[kept].min() > importance[dropped].max()
    attn, Dh = model.blocks[1].attn, model.blocks[1].attn.head_dim
    q, o = attn.q.weight.detach(), attn.o.weight.detach()
    head_l1 = [float(q[h * Dh:(h + 1) * Dh].abs().sum() + o[:, h * Dh:(h + 1) * Dh].abs().sum())
               for h in range(attn.n_heads)]
    kept_heads, group = report.details["kept_heads"][1], attn.n_heads // attn.n_kv_heads
    assert len(kept_heads) == 4 and [h // group for h in kept_heads] == [0, 0, 1, 1]  # 2 per kv group, in order
    for g in range(attn.n_kv_heads):
        members = range(g * group, (g + 1) * group)
        best = sorted(members, key=lambda h: -head_l1[h])[:2]
        assert sorted(best) == [h for h in kept_heads if h in members]


def test_kept_counts_round_and_options():
    assert kept_count(256, 0.3, 16) == 176 and kept_count(768, 0.3, 16) == 528
    assert kept_count(32, 0.95, 16) == 16  # at least round_to
    assert kept_count(10, 0.5, 16) == 10  # narrower than round_to: untouched
    assert kept_count(100, 0.3, 1) == 70
    assert [kept_heads_per_group(4, r) for r in (0.0, 0.3, 0.5, 0.9)] == [4, 3, 2, 1]
    assert kept_heads_per_group(1, 0.5) == 1  # plain multi-head attention: no head can go
    model = mixed_model()
    same, report = prune_channels(model, 0.0)
    assert same.config == model.config and report.parameters_after == report.parameters_before
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), atol=0, rtol=0)  # nothing dropped: the same computation
    no_heads, _ = prune_channels(model, 0.3, heads=False, round_to=8)
    assert no_heads.config.n_heads == 8 and no_heads.config.moe_ffn_dim == 88


def test_pruned_model_saves_loads_generates_and_serves(tmp_path, tiny):
    model, tok = tiny
    pruned, report = prune_channels(model, 0.3)
    root = tmp_path / "repo"
    path = ds.save(pruned, tok, root / "pruned" / "1", compression=report.to_dict())
    config = json.loads((path / "config.json").read_text())
    assert (config["n_heads"], config["head_dim"], config["moe_ffn_dim"]) == (2, 16, 80)  # head_dim explicit
    assert json.loads((path / "compression.json").read_text())["method"] == "channels"

    loaded, loaded_tok = ds.load(path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)
    out = ds.generate(loaded, loaded_tok, "def add(a, b):", max_new_tokens=10, ignore_eos=True)
    assert out.completion_tokens == 10

    # A real server (uvicorn + the OpenAI-compatible API) serves the pruned directory unchanged.
    with running_server(ModelManager(ModelRepository(root))) as base:
        reply = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": "pruned", "prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0,
                                 "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == out.text
        assert reply.json()["usage"]["completion_tokens"] == 10


def test_finetune_after_channel_pruning_lowers_validation_loss(tmp_path, lm_data, tiny):
    model, _ = tiny
    pruned, _ = prune_channels(model, 0.3)
    original = validation_perplexity(model, lm_data, seq_len=64, max_batches=2)["val_loss"]
    before = validation_perplexity(pruned, lm_data, seq_len=64, max_batches=2)["val_loss"]
    cfg = finetune_config(lm_data, tmp_path / "ft", steps=15, lr=2e-3, batch_size=8, seq_len=64, progress=False,
                          eval_batches=2)
    assert finetune(pruned, cfg).step == 15
    after = validation_perplexity(pruned, lm_data, seq_len=64, max_batches=2)["val_loss"]
    assert after < before and before > original


# -- experts ------------------------------------------------------------------------------------------

def test_gather_router_stats_counts_every_routed_pair(lm_data, tiny):
    model, _ = tiny
    model.train()
    batches = eval_batches(lm_data, split="train", batch_size=4, seq_len=32, max_batches=3)
    stats = gather_router_stats(model, batches)
    cfg = model.config
    assert stats.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    assert torch.all(stats.sum(1) == batches.num_targets * cfg.top_k)
    assert model.training, "the model's mode is restored"
    assert all(int(r.load_accum.sum()) == 0 for r in model.routers()), "no balancing state touched"
    tensors_only = gather_router_stats(model, [x for x, _ in batches])
    assert torch.equal(tensors_only, stats)


def test_prune_experts_drop_is_exact_when_the_dropped_experts_are_never_chosen():
    model = mixed_model()
    never = [1, 5]
    with torch.no_grad():
        for router in model.routers():  # a sigmoid score is in (0, 1): this bias keeps them from ever being chosen
            router.expert_bias[never] = -1e3
    x = ids(batch=3, length=32)
    stats = gather_router_stats(model, [x])
    assert stats.shape == (2, 8) and torch.all(stats[:, never] == 0)
    pruned, report = prune_experts(model, keep=6, stats=stats)
    assert pruned.config.n_routed_experts == 6 and model.config.n_routed_experts == 8
    assert report.details["kept_experts"] == [[0, 2, 3, 4, 6, 7]] * 2
    assert report.parameters_after == pruned.num_parameters() < report.parameters_before
    assert torch.equal(pruned.blocks[1].ffn.router.expert_bias, model.blocks[1].ffn.router.expert_bias[[0, 2, 3, 4, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_prune_experts_drop_on_the_trained_model_is_exact_on_its_calibration_input(tiny):
    model, _ = tiny  # softmax router: top-k weights renormalised over the kept ones are the same ratios
    x = ids(batch=1, length=3)  # 3 tokens x top-2: at most 6 of 8 experts used per layer
    stats = gather_router_stats(model, [x])
    pruned, report = prune_experts(model, keep=6, stats=stats, mode="drop")
    assert report.details["kept_usage_share"] == [1.0, 1.0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_prune_experts_merge_is_a_usage_weighted_average_into_the_most_similar_expert(lm_data, tiny):
    model, tok = tiny
    stats = gather_router_stats(model, eval_batches(lm_data, split="train", batch_size=4, seq_len=32, max_batches=2))
    merged, report = prune_experts(model, keep=5, stats=stats, mode="merge")
    dropped, _ = prune_experts(model, keep=5, stats=stats, mode="drop")
    assert merged.config.n_routed_experts == 5
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in dropped.state_dict().items()}
    old = model.blocks[0].ffn
    kept, into = report.details["kept_experts"][0], report.details["merged_into"][0]
    assert len(into) == 3 and set(into.values()) <= set(kept)
    similarity = torch.nn.functional.cosine_similarity(old.router.weight[:, None], old.router.weight[None], dim=-1)
    for d, k in into.items():
        assert k == kept[int(similarity[int(d), kept].argmax())]
    for slot, k in enumerate(kept):
        members = [k] + [int(d) for d, t in into.items() if t == k]
        w = stats[0, members] / stats[0, members].sum()
        expected = (old.experts.gate_up[members] * w.view(-1, 1, 1).float()).sum(0)
        torch.testing.assert_close(merged.blocks[0].ffn.experts.gate_up[slot], expected)
        assert torch.equal(merged.blocks[0].ffn.router.weight[slot], old.router.weight[k])
    assert torch.isfinite(merged(ids())).all()
    assert ds.generate(merged, tok, "import os", max_new_tokens=5, ignore_eos=True).completion_tokens == 5


# -- argument checks ---------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    model = mixed_model()
    stats = torch.ones(2, 8)
    with pytest.raises(TypeError, match="deepseek MoETransformer"):
        prune_unstructured(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(TypeError, match="unwrap"):
        prune_channels(_Wrapped(model), 0.3)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        prune_unstructured(model, 1.0)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_unstructured(model, 0.5, scope="tensor")
    for bad in (-0.1, 1.0, True, "0.3"):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
            prune_channels(model, bad)
    with pytest.raises(ValueError, match="round_to must be an integer >= 1"):
        prune_channels(model, 0.3, round_to=0)
    with pytest.raises(ValueError, match="heads must be True or False"):
        prune_channels(model, 0.3, heads="yes")
    for keep in (1, 8, 9, 2.5):
        with pytest.raises(ValueError, match=re.escape("keep must be an integer in [top_k, n_routed_experts) = [2, 8)")):
            prune_experts(model, keep=keep, stats=stats)
    with pytest.raises(ValueError, match=re.escape("stats must be a tensor [n_moe_layers, n_routed_experts] = [2, 8]")):
        prune_experts(model, keep=4, stats=torch.ones(3, 8))
    with pytest.raises(ValueError, match="non-negative"):
        prune_experts(model, keep=4, stats=-stats)
    with pytest.raises(ValueError, match="mode must be one of 'drop', 'merge'"):
        prune_experts(model, keep=4, stats=stats, mode="average")
    with pytest.raises(ValueError, match="batches yielded nothing"):
        gather_router_stats(model, [])
    dense = ds.MoETransformer(ds.preset("tiny", first_k_dense=2))
    with pytest.raises(ValueError, match="no MoE layers"):
        gather_router_stats(dense, [ids()])
    with pytest.raises(ValueError, match="no MoE layers"):
        prune_experts(dense, keep=4, stats=torch.ones(0, 8))


class _Wrapped(torch.nn.Module):
    """What torch.compile / DDP hand back: the model sits inside."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def test_report_to_dict_is_json_ready():
    report = PruneReport("channels", 10, 7, 0.3, {"after": {"n_heads": 2}})
    assert json.loads(json.dumps(report.to_dict())) == {"method": "channels", "parameters_before": 10,
                                                         "parameters_after": 7, "sparsity": 0.3,
                                                         "details": {"after": {"n_heads": 2}}}


# -- docs ----------------------------------------------------------------------------------------------

def test_docs_pruning_examples_run(tmp_path, monkeypatch):
    """docs/compression-pruning.md's python blocks run as written (in order, one namespace, like tests/test_docs.py)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "compression-pruning.md").read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/compression-pruning.md", "exec"), namespace)
