"""The design documents' names (deepseek.compat, docs/design-names.md) do what the real API they alias does.

The snippets themselves run in tests/test_docs.py (docs/design-names.md, including DeepseekServing answering a
request); these tests check each alias against the real function and its errors."""

import ast
import asyncio
import collections
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deepseek as ds
from deepseek import compat
from deepseek.compress.qat import is_qat
from deepseek.config import ConfigError
from deepseek.generate.params import SamplingParams
from deepseek.generate.sampling import Sampler
from deepseek.hardware import PrecisionChoice
from deepseek.serve import routing

PACKAGE = Path(__file__).resolve().parents[1] / "deepseek"
NAMESPACES = ("amp", "distill", "experiment", "prune", "quantization")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer()


# -- where the names live ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMESPACES)
def test_namespace_modules_only_re_export_compat(name):
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported == ["deepseek.compat"]
    assert not [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def test_lazy_attributes_reach_the_compat_names():
    assert ds.DynamicBatcher is compat.DynamicBatcher
    assert ds.amp.autocast is compat.autocast and ds.amp.GradScaler is compat.GradScaler
    assert ds.prune.l1_norm is compat.l1_norm and ds.quantization.prepare is compat.prepare
    assert ds.distill.TemperatureCrossEntropy is compat.TemperatureCrossEntropy
    assert ds.experiment.ABTest is routing.ABTest
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ds.nonexistent


# -- ds.DynamicBatcher --------------------------------------------------------------------------------

def test_dynamic_batcher_batches_requests_sent_together():
    model = torch.nn.Linear(6, 3).eval()
    requests = [torch.randn(1, 6) for _ in range(40)] + [torch.randn(3, 6)]
    with ds.DynamicBatcher(model, max_batch_size=16, timeout_ms=5) as batcher:
        outputs = batcher.infer_many(requests)
        assert batcher.stats.batches == 3 and sum(batcher.stats.batch_sizes.values()) == 3
        assert batcher.stats.rows == 43
        single = batcher.infer(requests[0])
    with torch.no_grad():
        for rows, out in zip(requests, outputs):
            torch.testing.assert_close(out, model(rows))
    torch.testing.assert_close(single, outputs[0])


def test_dynamic_batcher_async_submit_and_late_bind():
    batcher = ds.DynamicBatcher(max_batch_size=4, timeout_ms=1).bind(lambda x: x * 2)

    async def main():
        return await asyncio.gather(batcher.submit(torch.ones(1, 2)), batcher.submit(torch.zeros(2, 2)))

    try:
        twice_one, twice_zero = asyncio.run(main())
        with pytest.raises(ConfigError, match="before the first request"):
            batcher.bind(lambda x: x)
    finally:
        batcher.close()
    assert torch.equal(twice_one, torch.full((1, 2), 2.0)) and torch.equal(twice_zero, torch.zeros(2, 2))


def test_dynamic_batcher_errors_are_clear():
    with pytest.raises(ConfigError, match="no model"):
        ds.DynamicBatcher(max_batch_size=4).infer(torch.ones(1, 2))
    with pytest.raises(ValueError, match="max_batch_size"):
        ds.DynamicBatcher(lambda x: x, max_batch_size=0)
    with ds.DynamicBatcher(lambda x: x, max_batch_size=2, timeout_ms=1) as batcher:
        with pytest.raises(ConfigError, match="tensor of rows"):
            batcher.infer([[1.0, 2.0]])
        with pytest.raises(ValueError, match="maximum batch size is 2"):
            batcher.infer(torch.ones(3, 1))


# -- pipeline(..., do_sample, repetition_penalty) ------------------------------------------------------------

def test_pipeline_do_sample_follows_hugging_face(tiny):
    model, tokenizer = tiny
    pipe = ds.pipeline("text-generation", model, tokenizer, max_new_tokens=6, seed=3, repetition_penalty=1.3)
    greedy = pipe("abc", temperature=0.0)
    assert pipe("abc", do_sample=False, temperature=0.9) == greedy          # do_sample=False: greedy
    assert pipe("abc", do_sample=True) == pipe("abc", temperature=1.0)       # True: temperature 1.0 by default
    assert pipe("abc", do_sample=True, temperature=0.7) == pipe("abc", temperature=0.7)
    with pytest.raises(ConfigError, match="do_sample=True needs temperature > 0"):
        pipe("abc", do_sample=True, temperature=0)
    with pytest.raises(ConfigError, match="do_sample must be True or False"):
        ds.pipeline("text-generation", model, tokenizer, do_sample="yes")


def test_repetition_penalty_is_the_hugging_face_rule():
    # transformers' RepetitionPenaltyLogitsProcessor: score = where(score < 0, score * p, score / p) on the
    # tokens in input_ids (prompt and output alike); checked equal to it bit for bit outside the suite.
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    sampler = Sampler([SamplingParams(repetition_penalty=2.0)], vocab_size=5)
    sampler.observe(torch.tensor([[0, 1, 1]]))
    sampler.record_output(torch.tensor([3]))
    expected = torch.tensor([[2.0 / 2, -1.0 * 2, 0.5, -3.0 * 2, 4.0]])
    assert torch.equal(sampler.penalised_logits(logits), expected)


# -- model.gradient_checkpointing_enable() ----------------------------------------------------------------

def test_gradient_checkpointing_enable_sets_the_trainer_flag_and_keeps_gradients(tiny):
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(ids, targets=ids).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    try:
        plain = grads()
        model.gradient_checkpointing_enable({"use_reentrant": False})
        assert model.gradient_checkpointing
        for a, b in zip(plain, grads()):
            torch.testing.assert_close(a, b)
        model.gradient_checkpointing_disable()
        assert not model.gradient_checkpointing
        with pytest.raises(ConfigError, match="use_reentrant=False"):
            model.gradient_checkpointing_enable({"use_reentrant": True})
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


# -- ds.amp ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, enabled", [("fp32", False), ("bf16", True)])
def test_autocast_follows_the_hardware_choice(monkeypatch, precision, enabled):
    seen = []

    def choose(requested, device, workload="train"):
        seen.append((requested, torch.device(device).type))
        return PrecisionChoice(requested, precision, "test")

    monkeypatch.setattr(compat, "resolve_precision", choose)
    with ds.amp.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") is enabled
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert seen == [("auto", "cpu")]
    assert product.dtype == (torch.bfloat16 if enabled else torch.float32)


def test_autocast_explicit_dtype_and_errors():
    with ds.amp.autocast("cpu", dtype=torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with ds.amp.autocast(enabled=False):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        ds.amp.autocast("cpu", dtype=torch.float16)
    with pytest.raises(ConfigError, match="autocast dtype"):
        ds.amp.autocast("cpu", dtype=torch.int8)


def test_grad_scaler_is_a_pass_through_on_cpu():
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    before = net.weight.detach().clone()
    scaler = ds.amp.GradScaler("cpu")
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
    loss = net(torch.ones(2, 3)).sum()
    assert scaler.scale(loss) is loss
    scaler.scale(loss).backward()
    expected = before - 0.5 * net.weight.grad
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(net.weight.detach(), expected)


# -- deepseek.experiment.ABTest -----------------------------------------------------------------------------

def test_abtest_is_the_served_routing_policy():
    from deepseek.experiment import ABTest

    ab = ABTest(control_ratio=0.7, metrics=["click", "buy"], seed=0)
    again = routing.parse_policy(ab.describe())         # what config.yaml's routing: section / PUT .../routing hold
    assert isinstance(again, routing.ABTest) and again.describe() == ab.describe()
    router = routing.Router()
    router.set_policy("clf", ab)
    keys = [f"user{i}" for i in range(200)]
    variants = collections.Counter(router.route("clf", [1, 2], key).variant for key in keys)
    assert 0.6 < variants["control"] / len(keys) < 0.8
    assert ab.record_outcome("user0", "click") == ab.assign("user0")
    assert sum(v["metrics"]["click"]["conversions"] for v in ab.report()["variants"].values()) == 1
    with pytest.raises(ConfigError, match="control_ratio"):
        ABTest(control_ratio=1.5, metrics=["click"])


# -- ds.prune, ds.quantization, ds.distill ----------------------------------------------------------------------

def test_prune_l1_norm_structured_and_unstructured(tiny):
    model, _ = tiny
    smaller, report = ds.prune.l1_norm(model, amount=0.5)
    assert sum(p.numel() for p in smaller.parameters()) == report.parameters_after < report.parameters_before
    same, sparse = ds.prune.l1_norm(smaller, amount=0.3, structured=False)
    assert same is smaller and sparse.sparsity == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ConfigError, match="torch.nn.utils.prune"):
        ds.prune.l1_norm(torch.nn.Linear(4, 4), amount=0.5)


def test_quantization_prepare_and_convert_are_qat(tiny):
    model, _ = tiny
    student = ds.prune.l1_norm(model, amount=0.5)[0]    # a fresh model (the fixture stays float)
    prepared = ds.quantization.prepare(student, "int8-weight")
    assert prepared is student and is_qat(prepared)
    converted = ds.quantization.convert(prepared)
    assert not is_qat(converted)
    with pytest.raises(ConfigError, match="scheme name"):
        ds.quantization.prepare(model, object())
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        ds.quantization.prepare(ds.MoETransformer(ds.preset("tiny")), "fp8")


def test_temperature_cross_entropy_is_the_distillation_loss():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    t = 3.0
    p_teacher = F.softmax(teacher / t, dim=-1)
    soft_ce = -(p_teacher * F.log_softmax(student / t, dim=-1)).sum(-1)
    entropy = -(p_teacher * p_teacher.log()).sum(-1)
    expected = t**2 * (soft_ce - entropy).mean()       # T^2 * KL(teacher_T || student_T)
    loss = ds.distill.TemperatureCrossEntropy(temperature=t)
    torch.testing.assert_close(loss(student, teacher), expected)
    targets = torch.tensor([0, 1, 2, 3, 4])
    mixed = ds.distill.TemperatureCrossEntropy(temperature=t, alpha=0.25)(student, teacher, targets)
    torch.testing.assert_close(mixed, 0.25 * expected + 0.75 * F.cross_entropy(student, targets))
