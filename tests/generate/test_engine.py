"""The generation engine against references: no-cache greedy decoding, per-prompt runs, stops, seeds."""

import pytest
import torch

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.generate import SamplingParams
from tests.generate.reference import full_forward_logits


def greedy_without_cache(model, ids, n):
    """Reference: re-run the whole sequence every step and take the argmax."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            out.append(token)
    return out


def test_greedy_equals_full_forward_reference(tiny):
    model, tok = tiny
    prompt = "def f(x):"
    out = ds.generate(model, tok, prompt, max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == greedy_without_cache(model, tok.encode(prompt).ids, 12)
    assert out.finish_reason == "length" and out.completion_tokens == 12
    assert out.prompt_tokens == len(prompt)


def test_batch_of_different_lengths_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = ["a", "import os\nimport sys", "class A:\n    pass", "xyz"]
    batched = ds.generate(model, tok, prompts, max_new_tokens=10, ignore_eos=True)
    for prompt, out in zip(prompts, batched):
        alone = ds.generate(model, tok, prompt, max_new_tokens=10, ignore_eos=True)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_sparse_attention_model_generates_like_reference():
    torch.manual_seed(1)
    model = ds.MoETransformer(ds.preset("tiny", attention="sparse", window=8, n_global_tokens=2)).eval()
    tok = ds.byte_tokenizer()
    prompts = ["0123456789abcdefghij", "short"]
    outs = ds.generate(model, tok, prompts, max_new_tokens=15, ignore_eos=True)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_without_cache(model, tok.encode(prompt).ids, 15)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    model, tok = tiny
    params = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, ignore_eos=True)
    a = ds.generate(model, tok, "hello", seed=7, **params)
    b = ds.generate(model, tok, "hello", seed=7, **params)
    c = ds.generate(model, tok, "hello", seed=8, **params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # The same seeded request inside a batch with other requests gives the same tokens.
    batch = ds.generate(model, tok, ["other prompt", "hello"],
                        [SamplingParams(seed=99, **params), SamplingParams(seed=7, **params)])
    assert batch[1].token_ids == a.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(tiny):
    model, tok = tiny
    greedy = ds.generate(model, tok, "abc", max_new_tokens=10, ignore_eos=True)
    k1 = ds.generate(model, tok, "abc", max_new_tokens=10, temperature=1.5, top_k=1, seed=0, ignore_eos=True)
    p0 = ds.generate(model, tok, "abc", max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0, ignore_eos=True)
    assert k1.token_ids == greedy.token_ids == p0.token_ids


def test_stop_string_cuts_text_and_finishes(tiny):
    model, tok = tiny
    full = ds.generate(model, tok, "def", max_new_tokens=40, ignore_eos=True)
    # Choose a stop string that occurs in the greedy output, away from the start.
    stop = next(full.text[i:i + 2] for i in range(4, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2])
    cut = ds.generate(model, tok, "def", max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_stop_token_ends_generation(tiny):
    model, tok = tiny
    full = ds.generate(model, tok, "xy", max_new_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = ds.generate(model, tok, "xy", max_new_tokens=20, stop_token_ids=[stop_id], ignore_eos=True)
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]


def test_stream_joins_to_generate_text(tiny):
    model, tok = tiny
    for stop in ([], ["\n"], ["zz", "q"]):
        params = dict(max_new_tokens=30, temperature=0.9, seed=3, stop=stop, ignore_eos=True)
        pieces = list(ds.stream(model, tok, "for i in", **params))
        assert "".join(pieces) == ds.generate(model, tok, "for i in", **params).text


def test_generate_stream_events_cover_every_prompt(tiny):
    model, tok = tiny
    events = list(ds.generate_stream(model, tok, ["a", "bb"], max_new_tokens=5, ignore_eos=True))
    finished = {e.index: e.finish_reason for e in events if e.finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert sum(e.token_id is not None for e in events) == 10


def test_repetition_penalty_changes_greedy_choice_away_from_repeats(tiny):
    model, tok = tiny
    plain = ds.generate(model, tok, "aaaa", max_new_tokens=30, ignore_eos=True)
    penalised = ds.generate(model, tok, "aaaa", max_new_tokens=30, repetition_penalty=5.0, ignore_eos=True)
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert penalised.token_ids != plain.token_ids


def test_max_seq_len_caps_new_tokens_and_rejects_full_prompts():
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny", max_seq_len=16)).eval()
    tok = ds.byte_tokenizer()
    out = ds.generate(model, tok, "0123456789", max_new_tokens=50, ignore_eos=True)
    assert out.completion_tokens == 6 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_seq_len"):
        ds.generate(model, tok, "x" * 16, max_new_tokens=5)


def test_invalid_sampling_parameters_are_rejected(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="top_p"):
        ds.generate(model, tok, "a", top_p=0.0)
    with pytest.raises(ConfigError, match="unknown key"):
        ds.generate(model, tok, "a", temprature=0.5)
    with pytest.raises(ValueError, match="token ids"):
        ds.generate(model, tok, [[1, 2, 10_000]])


def test_static_cache_decoding_equals_dynamic_cache(tiny):
    # The static cache (fixed shapes, for compiled steps) gives the same logits as the growing one.
    model, _ = tiny
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    dynamic = ds.KVCache.for_model(model, 2, 20)
    static = ds.KVCache.for_model(model, 2, 20, static=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cache=static, attention_mask=mask),
                                   model(ids, cache=dynamic, attention_mask=mask))
        token = torch.tensor([[3], [4]])
        for _ in range(4):
            a, b = model(token, cache=static), model(token, cache=dynamic)
            torch.testing.assert_close(a, b)
            token = a[:, -1].argmax(-1, keepdim=True)


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens():
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny")).eval()
    tok = ds.byte_tokenizer()
    prompts = ["def f(x):", "ab"]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True), SamplingParams(max_new_tokens=5, ignore_eos=True)]
    eager = ds.generate(model, tok, prompts, params)
    compiled = ds.generate(model, tok, prompts, params, compile=True)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert [o.finish_reason for o in compiled] == ["length", "length"]


def test_ids_the_tokenizer_cannot_decode_are_never_sampled():
    # A model whose vocabulary is padded past its tokenizer's (300 > 259 byte tokens).
    torch.manual_seed(0)
    model = ds.MoETransformer(ds.preset("tiny", vocab_size=300)).eval()
    with torch.no_grad():
        model.lm_head.weight[259:] += 1.0  # make the undecodable ids the most likely
    out = ds.generate(model, ds.byte_tokenizer(), "abc", max_new_tokens=20, temperature=1.0, seed=0, ignore_eos=True)
    assert out.completion_tokens == 20 and max(out.token_ids) < 259


def test_logprobs_equal_a_full_forward_in_a_padded_batch(tiny):
    model, tok = tiny
    prompts = ["a", "import os\n"]
    events = list(ds.generate_stream(model, tok, prompts, max_new_tokens=6, ignore_eos=True, logprobs=2,
                                     temperature=0.8, seed=3))
    for index, prompt in enumerate(prompts):
        mine = [e for e in events if e.index == index]
        ids = [e.token_id for e in mine]
        log_probs = full_forward_logits(model, tok.encode(prompt).ids, ids, tok.get_vocab_size()).log_softmax(-1)
        assert len(ids) == 6
        for i, event in enumerate(mine):
            assert event.logprob.token_id == ids[i]
            assert event.logprob.logprob == pytest.approx(float(log_probs[i, ids[i]]), abs=1e-4)
            assert [t for t, _ in event.logprob.top] == log_probs[i].topk(2).indices.tolist()
    assert all(e.logprob is None for e in ds.generate_stream(model, tok, ["a"], max_new_tokens=2))
