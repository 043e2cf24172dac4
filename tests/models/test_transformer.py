"""The MoE transformer: shapes, causality, KV-cache decoding == full forward, padding, checkpointing, stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek.models import ModelConfig, MoETransformer, RouterStats
from deepseek.nn import KVCache, MoE, SwiGLU, few_rows
from deepseek.nn.few_rows import ARRANGEMENTS

V = 64
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, moe_ffn_dim=16,
            n_routed_experts=8, top_k=2, max_seq_len=64)


def make_model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # a sharper router than the 0.02 init, so routing really depends on the input
        for r in model.routers():
            r.weight.normal_(0.0, 0.3)
    return model


VARIANTS = {
    "dense": {},
    "sparse": dict(attention="sparse", window=4, n_global_tokens=2),
    "deepseek": dict(router="sigmoid", n_shared_experts=1, first_k_dense=1, qk_norm=True, tie_embeddings=True),
    "qwen": dict(n_shared_experts=1, shared_expert_gate=True, attention_bias=True, norm_topk_prob=False),
}


@torch.no_grad()
def decode(model: MoETransformer, ids: torch.Tensor, chunks: list[int], attention_mask=None) -> torch.Tensor:
    """Run ``ids`` through the model with a KV cache, ``chunks`` tokens at a time; returns all logits."""
    cache = KVCache.for_model(model, ids.shape[0], max_len=ids.shape[1] + 2)
    outs, start = [], 0
    for n in chunks:
        mask = None if attention_mask is None else attention_mask[:, start:start + n]
        outs.append(model(ids[:, start:start + n], cache=cache, attention_mask=mask))
        start += n
    assert start == ids.shape[1] and cache.pos == start
    return torch.cat(outs, dim=1)


# -- basics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_finite(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, V, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="batch, tokens"):
        model(ids[0])


def test_same_seed_same_model():
    ids = torch.randint(0, V, (2, 9))
    a, b = make_model(), make_model()
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        logits = model(ids)
        for t in (0, 6, 13):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % V
            out = model(changed)
            torch.testing.assert_close(out[:, :t], logits[:, :t], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(out[:, t], logits[:, t])


def test_batch_rows_are_independent():
    model = make_model()
    ids = torch.randint(0, V, (3, 8))
    with torch.no_grad():
        batched = model(ids)
        for b in range(3):
            torch.testing.assert_close(batched[b:b + 1], model(ids[b:b + 1]), atol=1e-5, rtol=1e-5)


def test_max_seq_len_overflow_is_a_clear_error():
    model = make_model(max_seq_len=16)
    model(torch.randint(0, V, (1, 16)))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.randint(0, V, (1, 17)))
    cache = KVCache.for_model(model, 1, max_len=32)
    model(torch.randint(0, V, (1, 16)), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.randint(0, V, (1, 1)), cache=cache)


def test_kv_cache_errors():
    model = make_model()
    cache = KVCache.for_model(model, 2, max_len=4)
    with pytest.raises(ValueError, match="2 sequences, input has 1"):
        model(torch.randint(0, V, (1, 3)), cache=cache)
    model(torch.randint(0, V, (2, 3)), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.randint(0, V, (2, 2)), cache=cache)


# -- KV cache: incremental decoding == full forward ------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_token_by_token_equals_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        full = model(ids)
    incremental = decode(model, ids, [5] + [1] * 10)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "sparse"])
@pytest.mark.parametrize("chunks", [[1] * 12, [3, 3, 3, 3], [7, 2, 3], [12]])
def test_chunked_prefill_equals_full_forward(variant, chunks):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(decode(model, ids, chunks), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "sparse", "deepseek"])
def test_left_padded_batch_equals_single_sequences(variant):
    model = make_model(**VARIANTS[variant])
    lengths = [11, 4, 7]
    T, steps = max(lengths), 4
    seqs = [torch.randint(0, V, (n + steps,)) for n in lengths]  # prompt + tokens decoded afterwards
    prompt = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        prompt[b, T - n:] = s[:n]
        mask[b, T - n:] = 1
    prompt[mask == 0] = 3  # padding id; anything works since it is masked

    with torch.no_grad():
        singles = [model(s[None]) for s in seqs]
        # Without a cache: the padded forward matches at every real position.
        padded = model(prompt, attention_mask=mask)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(padded[b, T - n:], singles[b][0, :n], atol=1e-5, rtol=1e-5)
        # With a cache: prefill the padded prompts, then decode the next tokens one at a time.
        cache = KVCache.for_model(model, len(lengths), max_len=T + steps)
        prefill = model(prompt, cache=cache, attention_mask=mask)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(prefill[b, T - n:], singles[b][0, :n], atol=1e-5, rtol=1e-5)
        for i in range(steps):
            step_ids = torch.stack([s[n + i] for s, n in zip(seqs, lengths)])[:, None]
            out = model(step_ids, cache=cache)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(out[b, 0], singles[b][0, n + i], atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.n_tokens, torch.tensor(lengths) + steps)


def test_cache_select_keeps_the_chosen_rows():
    model = make_model()
    ids = torch.randint(0, V, (3, 9))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 3, max_len=9)
        model(ids[:, :6], cache=cache)
        cache.select(torch.tensor([2, 0]))
        outs = [model(ids[[2, 0], t:t + 1], cache=cache) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full[[2, 0], 6:], atol=1e-5, rtol=1e-5)


def test_cache_dtype_follows_model():
    model = make_model().to(torch.bfloat16)
    cache = KVCache.for_model(model, 1, max_len=8)
    assert cache.k.dtype == torch.bfloat16 and cache.k.shape == (2, 1, 2, 8, 8)


# -- embeddings, layers, sizes ---------------------------------------------------------------------

def test_tied_and_untied_embeddings():
    untied, tied = make_model(), make_model(tie_embeddings=True)
    assert untied.lm_head is not None and tied.lm_head is None
    assert "lm_head.weight" in untied.state_dict() and "lm_head.weight" not in tied.state_dict()
    assert untied.num_parameters() - tied.num_parameters() == V * 32
    ids = torch.randint(0, V, (2, 6))
    logits = tied(ids)
    # The head of a tied model is the embedding matrix.
    with torch.no_grad():
        hidden = {}
        tied.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("x", o))
        tied(ids)
    torch.testing.assert_close(logits, hidden["x"] @ tied.embed.weight.T, atol=1e-5, rtol=1e-5)
    # ... and it receives gradient both as input table and as output head.
    tied.train()
    F.cross_entropy(tied(ids).flatten(0, 1), ids.flatten()).backward()
    only_input_rows = torch.zeros(V, dtype=torch.bool)
    only_input_rows[ids.flatten()] = True
    assert tied.embed.weight.grad[~only_input_rows].abs().sum() > 0  # rows reached only through the head


def test_first_k_dense_layers():
    model = make_model(n_layers=3, first_k_dense=2)
    assert isinstance(model.blocks[0].ffn, SwiGLU) and isinstance(model.blocks[1].ffn, SwiGLU)
    assert isinstance(model.blocks[2].ffn, MoE)
    assert len(model.routers()) == 1
    _, stats = model(torch.randint(0, V, (2, 5)), return_router_stats=True)
    assert stats.tokens_per_expert.shape == (1, 8)

    all_dense = make_model(first_k_dense=2)
    logits, stats = all_dense(torch.randint(0, V, (2, 5)), return_router_stats=True)
    assert logits.shape == (2, 5, V) and stats is None and all_dense.aux_loss() is None


def test_num_parameters():
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(embedding=False) == total - V * 32
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model.num_parameters(active=True) == total - expert_params + expert_params * 2 // 8


# -- routing statistics and the auxiliary loss -----------------------------------------------------

def test_router_stats_after_forward():
    model = make_model(n_layers=3, first_k_dense=1)
    assert model.router_stats() is None  # nothing routed yet
    ids = torch.randint(0, V, (2, 7))
    logits, stats = model(ids, return_router_stats=True)
    assert logits.shape == (2, 7, V) and isinstance(stats, RouterStats)
    assert stats.tokens_per_expert.shape == (2, 8)  # [n_moe_layers, E]
    assert torch.equal(stats.tokens_per_expert.sum(-1), torch.full((2,), 2.0 * 7 * 2))
    torch.testing.assert_close(stats.load_fraction.sum(-1), torch.ones(2))
    assert (stats.max_over_mean >= 1).all()
    assert stats.aux_loss is None  # eval mode, coef 0
    assert torch.equal(model.router_stats().tokens_per_expert, stats.tokens_per_expert)


def test_aux_loss_in_train_mode_only():
    model = make_model(aux_loss_coef=0.01, n_layers=3)
    ids = torch.randint(0, V, (2, 8))
    model.eval()
    model(ids)
    assert model.aux_loss() is None
    model.train()
    _, stats = model(ids, return_router_stats=True)
    aux = model.aux_loss()
    assert aux is not None and aux.requires_grad
    torch.testing.assert_close(aux, sum(r.aux_loss for r in model.routers()))
    torch.testing.assert_close(stats.aux_loss, aux)
    assert 0.03 * 0.99 <= aux.detach().item() <= 0.03 * 8  # three layers, each coef * (1..E)
    aux.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.routers())

    no_aux = make_model().train()
    no_aux(ids)
    assert no_aux.aux_loss() is None


@pytest.mark.parametrize("variant", ["dense", "sparse", "deepseek"])
def test_gradient_checkpointing_same_loss_and_grads(variant):
    ids = torch.randint(0, V, (2, 10))
    results = []
    for checkpointing in (False, True):
        model = make_model(aux_loss_coef=0.01, **VARIANTS[variant]).train()
        model.gradient_checkpointing = checkpointing
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + model.aux_loss()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loads = [r.load_accum.clone() for r in model.routers()]
        results.append((loss.detach(), grads, loads))
    (loss0, grads0, loads0), (loss1, grads1, loads1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(model.parameters()))
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(loads0, loads1):  # the recomputation in backward must not count tokens twice
        assert torch.equal(a, b) and a.sum() == 2 * 10 * 2


# -- reduced precision -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_bf16_weights_forward_close_to_fp32(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        model.to(torch.bfloat16)
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert all(r.weight.dtype == torch.bfloat16 for r in model.routers())
    err = (logits.float() - ref).norm() / ref.norm()
    assert err < 3e-2, err
    incremental = decode(model, ids, [6] + [1] * 6)
    assert ((incremental.float() - logits.float()).norm() / ref.norm()) < 3e-2


def test_bf16_autocast_forward_and_backward():
    model = make_model().train()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert ((logits.float() - ref).norm() / ref.norm()) < 3e-2
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# -- the decoding head: few-row products and the cached transposed copy ------------------------------------

def head_weight(model: MoETransformer) -> torch.Tensor:
    return model.embed.weight if model.lm_head is None else model.lm_head.weight


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (4, 1), (2, 3)])
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
def test_decoding_head_equals_linear(tied, batch, tokens, arrangement, few_row_arrangement):
    few_row_arrangement(arrangement)
    model = make_model(tie_embeddings=tied)
    x = torch.randn(batch, tokens, BASE["d_model"])
    with torch.no_grad():
        got = model._head(x)
    assert got.shape == (batch, tokens, V)
    torch.testing.assert_close(got, F.linear(x, head_weight(model)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_cached_transposed_head_follows_the_weight(tied, few_row_arrangement):
    """The [D, V] copy is rebuilt when the weight changes in place, is replaced, or gets new data."""
    few_row_arrangement("transposed_copy")
    model = make_model(tie_embeddings=tied)
    holder, name = (model.embed, "weight") if tied else (model.lm_head, "weight")
    x = torch.randn(1, 1, BASE["d_model"])
    gen = torch.Generator().manual_seed(1)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(model._head(x), F.linear(x, head_weight(model)), atol=1e-5, rtol=1e-5)

    check()
    assert set(few_rows.chosen_arrangements().values()) == {"transposed_copy"}
    copy_DV = model.__dict__["_head_DV_cache"][2]
    check()
    assert model.__dict__["_head_DV_cache"][2] is copy_DV  # kept while the weight is unchanged
    with torch.no_grad():
        getattr(holder, name).mul_(-2.0)  # in place
    check()
    setattr(holder, name, torch.nn.Parameter(torch.randn(V, BASE["d_model"], generator=gen)))  # replaced
    check()
    getattr(holder, name).data = torch.randn(V, BASE["d_model"], generator=gen)  # new data, same Parameter
    check()
    for _ in range(3):  # the old weight freed first, so that the new one may get its address (and version)
        setattr(holder, name, None)
        setattr(holder, name, torch.nn.Parameter(torch.randn(V, BASE["d_model"], generator=gen)))
        check()
