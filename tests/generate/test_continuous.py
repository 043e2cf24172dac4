"""Continuous batching engine: outputs equal one-request-at-a-time generation, whatever joins or leaves."""

import copy
import threading

import pytest
import torch

import deepseek as ds
from deepseek.config import ConfigError
from deepseek.generate import SamplingParams
from deepseek.generate.continuous import ContinuousBatchingEngine, EngineStoppedError, QueueFullError
from tests.generate.reference import assert_follows_hand_sampling, full_forward_logits

PROMPTS = ["def f(x):", "import os\nimport sys\n", "a", "class Point:\n    def __init__(self, x, y):\n", "x = [",
           "for i in range(10):\n    ", "# comment", "return"]


def solo(model, tok, prompt, **params):
    return ds.generate(model, tok, prompt, **params)


@pytest.fixture()
def engine(tiny):
    model, tok = tiny
    # Small limits so that queueing, chunked prefill and slot reuse all happen.
    with ContinuousBatchingEngine(model, tok, max_running=3, max_batched_tokens=8, prefill_chunk=5) as eng:
        yield eng


def test_greedy_outputs_equal_single_request_outputs(tiny, engine):
    model, tok = tiny
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        alone = solo(model, tok, prompt, max_new_tokens=12, ignore_eos=True)
        assert out.token_ids == alone.token_ids, prompt
        assert out.text == alone.text
        assert out.finish_reason == "length" and out.prompt_tokens == alone.prompt_tokens
    assert engine.stats().running == 0 and engine.cache.used_tokens() == 0


def test_request_joining_mid_flight_changes_nobody(tiny, engine):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    late = []
    first_done = threading.Event()

    def on_first(event):
        # After the first request has 5 tokens, two more join while it is decoding.
        if event.completion_tokens == 5 and not late:
            late.extend(engine.submit(p, params) for p in PROMPTS[1:3])
        if event.finish_reason:
            first_done.set()

    first = engine.submit(PROMPTS[0], params, on_event=on_first)
    assert first.done.wait(60) and first_done.is_set()
    for request in late:
        assert request.done.wait(60)
    for request, prompt in zip([first, *late], PROMPTS[:3]):
        assert request.token_ids == solo(model, tok, prompt, max_new_tokens=20, ignore_eos=True).token_ids


def test_seeded_sampling_is_independent_of_the_batch(tiny, engine):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    batched = engine.generate(PROMPTS[:4], params)
    for prompt, out in zip(PROMPTS[:4], batched):
        assert out.token_ids == solo(model, tok, prompt, params=params).token_ids


def test_penalties_stops_and_logprobs(tiny, engine):
    model, tok = tiny
    plain = engine.generate(["aaaa"], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    penalised = engine.generate(["aaaa"], SamplingParams(max_new_tokens=16, ignore_eos=True, frequency_penalty=2.0,
                                                         presence_penalty=2.0))[0]
    assert penalised.token_ids != plain.token_ids
    # The same penalties through the one-batch engine give the same tokens.
    assert penalised.token_ids == solo(model, tok, "aaaa", max_new_tokens=16, ignore_eos=True, frequency_penalty=2.0,
                                       presence_penalty=2.0).token_ids

    events = []
    request = engine.submit("def f(x):", SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3),
                            on_event=events.append)
    assert request.done.wait(60)
    for event in events:
        lp = event.logprob
        assert lp is not None and lp.token_id == event.token_id and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == event.token_id  # greedy picks the most likely token
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5

    reference = solo(model, tok, "x = [", max_new_tokens=30, ignore_eos=True)
    stop = reference.text[4:6]
    out = engine.generate(["x = ["], SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == reference.text[: reference.text.index(stop)]


SAMPLED = {
    "temperature, top-p, OpenAI penalties": (
        SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=1.5,
                       seed=11, logprobs=4, ignore_eos=True),
        dict(temperature=1.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0)),
    "top-k, repetition penalty": (
        SamplingParams(max_new_tokens=12, temperature=1.3, top_k=40, repetition_penalty=1.5, seed=5, logprobs=2,
                       ignore_eos=True),
        dict(temperature=1.0, top_k=0, repetition_penalty=1.0)),
}


@pytest.mark.parametrize("case", list(SAMPLED))
def test_logprobs_and_sampled_tokens_against_a_full_forward(tiny, engine, case):
    # Logprobs are the model's own distribution: log_softmax of a full forward (no cache) of the same sequence.
    # The sampled tokens are the ones drawn by hand from the distribution the parameters define, computed from
    # those raw logits; each parameter changes the outcome, so none can be ignored unnoticed.
    model, tok = tiny
    params, sensitive_to = SAMPLED[case]
    events = []
    neighbour = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=12, ignore_eos=True))  # shares the batch
    request = engine.submit("def f(x):", params, on_event=events.append)
    assert request.done.wait(60) and neighbour.done.wait(60)
    raw = full_forward_logits(model, request.prompt_ids, request.token_ids, tok.get_vocab_size())
    log_probs = raw.log_softmax(-1)
    assert len(events) == len(request.token_ids) == 12
    for i, event in enumerate(events):
        lp = event.logprob
        assert lp.token_id == event.token_id == request.token_ids[i]
        assert lp.logprob == pytest.approx(float(log_probs[i, lp.token_id]), abs=1e-4)
        values, ids = log_probs[i].topk(params.logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert_follows_hand_sampling(raw, request.prompt_ids, request.token_ids, params, sensitive_to)


def test_repetition_penalty_equals_the_one_batch_engine(tiny, engine):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=5.0)
    outs = engine.generate(["aaaa", "abcabc", "def f(x):"], params)
    for prompt, out in zip(["aaaa", "abcabc", "def f(x):"], outs):
        assert out.token_ids == solo(model, tok, prompt, params=params).token_ids
    plain = engine.generate(["aaaa"], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    assert outs[0].token_ids != plain.token_ids


def test_cancel_frees_the_slot(tiny, engine):
    started = threading.Event()
    request = engine.submit("def", SamplingParams(max_new_tokens=400, ignore_eos=True),
                            on_event=lambda event: started.set())
    assert started.wait(60)
    assert engine.stats().running == 1
    request.cancel()
    assert request.done.wait(60)
    assert request.finish_reason == "abort" and len(request.token_ids) < 400
    assert engine.stats().running == 0 and engine.cache.used_tokens() == 0


def test_deadline_and_full_queue(tiny):
    model, tok = tiny
    eng = ContinuousBatchingEngine(model, tok, max_running=2, max_batched_tokens=8, max_queue=2)
    expired = eng.submit("a", SamplingParams(max_new_tokens=4), timeout_s=0.0)
    eng.submit("b", SamplingParams(max_new_tokens=4))
    with pytest.raises(QueueFullError):
        eng.submit("c", SamplingParams(max_new_tokens=4))
    eng.start()
    assert expired.done.wait(60) and expired.finish_reason == "timeout" and expired.token_ids == []
    eng.stop()
    with pytest.raises(RuntimeError):
        eng.submit("d")


def failing_copy(model, fail: threading.Event):
    """A copy of ``model`` whose forward raises once ``fail`` is set (a fault injected into a real model)."""
    broken = copy.deepcopy(model)
    forward = broken.forward

    def forward_or_fail(*args, **kwargs):
        if fail.is_set():
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    broken.forward = forward_or_fail
    return broken


def test_a_failing_model_ends_every_request_and_refuses_new_ones(tiny):
    model, tok = tiny
    fail, events = threading.Event(), []
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    with ContinuousBatchingEngine(failing_copy(model, fail), tok, max_running=2, max_batched_tokens=8,
                                  prefill_chunk=5) as engine:
        requests = [engine.submit(p, params, on_event=events.append) for p in PROMPTS[:4]]  # 2 run, 2 wait
        fail.set()  # the next forward raises, with every request accepted and none able to finish first
        for request in requests:
            assert request.done.wait(60), "a request was left waiting after the engine failed"
        assert [r.finish_reason for r in requests] == ["error"] * 4
        last = {e.request_id: e for e in events if e.finish_reason}
        assert set(last) == {r.request_id for r in requests}
        assert all("injected fault" in e.error for e in last.values())
        with pytest.raises(EngineStoppedError, match="injected fault"):
            engine.submit("x")
        assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_generate_raises_when_the_engine_fails(tiny):
    model, tok = tiny
    fail = threading.Event()
    fail.set()
    with ContinuousBatchingEngine(failing_copy(model, fail), tok, max_running=2, max_batched_tokens=8) as engine:
        with pytest.raises(EngineStoppedError, match="injected fault"):
            engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=4))


def test_bad_requests_are_refused(tiny, engine):
    with pytest.raises(ValueError, match="no room"):
        engine.submit("x" * engine.max_len)
    with pytest.raises(ValueError):
        engine.submit([10 ** 6])
    with pytest.raises(ConfigError):
        engine.submit("a", {"frequency_penalty": 5})
    with pytest.raises(ValueError, match="max_batched_tokens"):
        ContinuousBatchingEngine(engine.model, engine.tokenizer, max_running=8, max_batched_tokens=8)


def test_sparse_attention_model(tiny):
    _, tok = tiny
    cfg = ds.preset("tiny")
    cfg.attention, cfg.window, cfg.n_global_tokens = "sparse", 8, 2
    torch.manual_seed(1)
    model = ds.MoETransformer(cfg).eval()
    with ContinuousBatchingEngine(model, tok, max_running=2, max_batched_tokens=6, prefill_chunk=4) as eng:
        outs = eng.generate(PROMPTS[:3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.token_ids == solo(model, tok, prompt, max_new_tokens=12, ignore_eos=True).token_ids
