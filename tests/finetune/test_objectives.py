"""deepseek.finetune.objectives: every loss against a hand computation in plain Python math (issue 18, item 4)."""

import copy
import dataclasses
import math
import statistics

import pytest
import torch

import deepseek as ds
from deepseek.finetune import (MixedObjective, RewardModel, bradley_terry_loss, dpo_loss, grpo_advantages, grpo_loss,
                               reference_logprobs, sequence_logprobs)
from deepseek.nn.lora import LoRAConfig, apply_lora
from deepseek.nn.router import Router


def tiny_model(**overrides) -> ds.MoETransformer:
    torch.manual_seed(0)
    return ds.MoETransformer(dataclasses.replace(ds.preset("tiny"), n_layers=1, **overrides)).eval()


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# -- DPO ---------------------------------------------------------------------------------------------------------

PC, PR, RC, RR = [-5.0, -9.0, -3.0], [-7.0, -6.0, -4.5], [-6.0, -8.0, -3.5], [-6.5, -7.0, -4.0]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_loss_equals_a_hand_computation(eps):
    beta = 0.5
    logits = [beta * ((pc - pr) - (rc - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    expected = sum(-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z) for z in logits) / 3
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]

    loss, metrics = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)), beta=beta,
                             label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3)
    assert metrics["rewards/accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert metrics["rewards/margin"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3)


def test_dpo_loss_rejects_bad_hyperparameters():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


# -- log-probabilities and the reference ---------------------------------------------------------------------

def toy_batch():
    """Two right-padded sequences: prompt then completion; 0 is the padding id."""
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 0, 0], [11, 12, 200, 7, 64, 31, 250, 4]])
    completion = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, completion, attention


def test_sequence_logprobs_equals_a_manual_log_softmax_gather():
    model = tiny_model()
    ids, completion, attention = toy_batch()
    got = sequence_logprobs(model, ids, completion, attention)
    with torch.no_grad():
        logits = model(ids, attention_mask=attention).double()
    expected = [sum(logits[b, t - 1].log_softmax(-1)[ids[b, t]].item()
                    for t in range(1, ids.shape[1]) if completion[b, t]) for b in range(2)]
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # Padding does not count: the first sequence alone, unpadded, scores the same.
    alone = sequence_logprobs(model, ids[:1, :6], completion[:1, :6])
    assert alone.item() == pytest.approx(got[0].item(), rel=1e-5)


def test_lora_disabled_reference_equals_the_base_model_exactly():
    model = tiny_model()
    ids, completion, attention = toy_batch()
    with torch.no_grad():
        base = sequence_logprobs(model, ids, completion, attention)
    apply_lora(model, LoRAConfig(r=4, target_modules=("attn.*", "experts")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "_B" in name:
                p.normal_(std=0.1)
    model.train()
    policy = sequence_logprobs(model, ids, completion, attention)
    assert not torch.allclose(policy, base)  # the adapters do something
    routers = [r for r in model.modules() if isinstance(r, Router)]
    loads = [r.load_accum.tolist() for r in routers]

    ref = reference_logprobs(model, ids, completion, attention)
    assert torch.equal(ref, base)
    assert not ref.requires_grad
    # The model is left as it was: training mode, expert-load counts untouched (the reference forward ran in
    # eval mode), adapters on.
    assert model.training and all(m.training for m in model.modules())
    assert [r.load_accum.tolist() for r in routers] == loads
    assert torch.equal(sequence_logprobs(model, ids, completion, attention), policy)


def test_reference_of_a_router_with_aux_loss_keeps_the_policy_aux_loss():
    model = tiny_model(aux_loss_coef=0.01)
    ids, completion, attention = toy_batch()
    apply_lora(model, LoRAConfig(r=4))
    model.train()
    sequence_logprobs(model, ids, completion, attention)
    before = model.aux_loss()
    reference_logprobs(model, ids, completion, attention)
    assert before is not None and model.aux_loss() is not None and torch.equal(model.aux_loss(), before)


def test_full_fine_tune_needs_an_explicit_frozen_reference():
    model = tiny_model()
    ids, completion, attention = toy_batch()
    with pytest.raises(ValueError, match="explicit frozen reference"):
        reference_logprobs(model, ids, completion, attention)
    with pytest.raises(ValueError, match="policy model itself"):
        reference_logprobs(model, ids, completion, attention, reference=model)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        model.embed.weight.add_(0.05)  # the policy has moved; the reference has not
    ref = reference_logprobs(model, ids, completion, attention, reference=frozen)
    with torch.no_grad():  # the reference runs without gradients in eval mode: compare in the same mode (AVX2
        # kernels differ in the last bit between the grad and no-grad paths)
        expected = sequence_logprobs(frozen.eval(), ids, completion, attention)
    assert torch.equal(ref, expected)


# -- reward model ------------------------------------------------------------------------------------------------

def test_bradley_terry_loss_equals_a_hand_computation():
    rc, rr = [1.5, -0.2, 0.3], [0.5, 0.4, 0.3]
    expected = -sum(logsigmoid(c - r) for c, r in zip(rc, rr)) / 3
    got = bradley_terry_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_reward_model_reads_the_last_non_padding_token():
    rm = RewardModel(tiny_model())
    ids, _, attention = toy_batch()
    with torch.no_grad():
        padded = rm(ids, attention)
        alone = rm(ids[:1, :6])
        left = rm(torch.cat([ids[:1, 6:], ids[:1, :6]], dim=1), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
    assert padded.shape == (2,)
    assert padded[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert left.item() == pytest.approx(alone.item(), abs=1e-5)


def test_reward_model_training_on_separable_pairs_raises_accuracy():
    torch.manual_seed(0)
    rm = RewardModel(tiny_model())
    prompts = torch.randint(3, 200, (8, 5), generator=torch.Generator().manual_seed(2))
    # Preferred answers end in 251, rejected ones in 250: at this seed the untrained model ranks them the other way.
    chosen = torch.cat([prompts, torch.full((8, 1), 251)], dim=1)
    rejected = torch.cat([prompts, torch.full((8, 1), 250)], dim=1)
    optimizer = torch.optim.Adam(rm.parameters(), lr=1e-2)

    def accuracy() -> float:
        with torch.no_grad():
            return (rm(chosen) > rm(rejected)).float().mean().item()

    before_acc = accuracy()
    with torch.no_grad():
        before_loss = bradley_terry_loss(rm(chosen), rm(rejected)).item()
    rm.train()
    for _ in range(15):
        loss = bradley_terry_loss(rm(chosen), rm(rejected))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rm.eval()
    with torch.no_grad():
        after_loss = bradley_terry_loss(rm(chosen), rm(rejected)).item()
    assert before_acc < 1.0
    assert accuracy() == 1.0
    assert after_loss < before_loss


# -- GRPO --------------------------------------------------------------------------------------------------------

def test_grpo_advantages_equal_a_hand_computation():
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0]  # two prompts, four samples each; the second all equal
    expected = []
    for group in (rewards[:4], rewards[4:]):
        mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: unbiased, as TRL's torch.std
        expected += [(r - mean) / (std + 1e-4) for r in group]
    got = grpo_advantages(torch.tensor(rewards), group_size=4)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        grpo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        grpo_advantages(torch.zeros(4), group_size=3)


def test_grpo_loss_equals_a_hand_computation():
    # Two sequences of 3 token slots; the second has 2 completion tokens. Ratios cover both clip edges.
    pi = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -9.0]]
    old = [[-1.5, -0.5, -1.9], [-0.1, -1.0, -9.0]]
    ref = [[-1.2, -0.7, -2.2], [-0.4, -1.1, -5.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [0.8, -1.3]
    beta, eps = 0.04, 0.2

    per_seq, kls, clipped, n = [], [], 0, 0
    for b in range(2):
        terms = []
        for t in range(3):
            if not mask[b][t]:
                continue
            ratio = math.exp(pi[b][t] - old[b][t])
            unclipped, clip = ratio * adv[b], min(max(ratio, 1 - eps), 1 + eps) * adv[b]
            kl = math.exp(ref[b][t] - pi[b][t]) - (ref[b][t] - pi[b][t]) - 1
            terms.append(-min(unclipped, clip) + beta * kl)
            kls.append(kl)
            clipped += clip < unclipped
            n += 1
        per_seq.append(sum(terms) / len(terms))
    expected = sum(per_seq) / 2

    pi_t = torch.tensor(pi, dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo_loss(pi_t, torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                              torch.tensor(adv, dtype=torch.float64), torch.tensor(mask), beta=beta, clip_eps=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(sum(kls) / n, rel=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(clipped / n)
    assert 0 < clipped < n  # the toy exercises both branches
    loss.backward()
    assert pi_t.grad[1, 2] == 0  # a masked token gets no gradient


def test_grpo_loss_one_update_per_batch_and_no_kl():
    # old = None: the ratio is 1, so the loss is -mean(A) (+ beta KL), and the gradient is A's policy gradient.
    pi = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    mask, adv = torch.ones(2, 2), torch.tensor([1.0, -3.0])
    loss, metrics = grpo_loss(pi, None, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(1.0)
    assert metrics["kl"].item() == 0 and metrics["clip_fraction"].item() == 0
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(pi, None, None, adv, mask)


# -- mixed objective ---------------------------------------------------------------------------------------------

def test_mixed_objective_sums_the_weighted_terms_and_logs_each():
    objective = MixedObjective({"sft": 0.7, "rl": 0.2, "dpo": 0.1})
    terms = {"sft": torch.tensor(2.0), "rl": torch.tensor(-0.5), "dpo": torch.tensor(0.6931)}
    total, logged = objective.combine(terms)
    assert total.item() == pytest.approx(0.7 * 2.0 + 0.2 * -0.5 + 0.1 * 0.6931)
    assert logged == pytest.approx({"sft": 2.0, "rl": -0.5, "dpo": 0.6931, "total": total.item()})

    only_sft = MixedObjective({"sft": 1.0, "dpo": 0.0})
    total, logged = only_sft.combine({"sft": torch.tensor(3.0), "dpo": torch.tensor(float("nan"))})
    assert total.item() == 3.0 and set(logged) == {"sft", "dpo", "total"}  # a zero-weight term is logged, not added
    assert only_sft.combine({"sft": torch.tensor(3.0)})[0].item() == 3.0


def test_mixed_objective_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown objective\\(s\\) ppo, sf; known: sft, rl, dpo"):
        MixedObjective({"sf": 1.0, "ppo": 1.0})
    with pytest.raises(ValueError, match="rl=-0.1 must be a non-negative finite number"):
        MixedObjective({"sft": 1.0, "rl": -0.1})
    with pytest.raises(ValueError, match="non-negative finite"):
        MixedObjective({"sft": float("inf")})
    with pytest.raises(ValueError, match="all zero"):
        MixedObjective({"sft": 0.0, "dpo": 0})
    with pytest.raises(ValueError, match="non-empty mapping"):
        MixedObjective({})
    objective = MixedObjective({"sft": 0.5, "dpo": 0.5})
    with pytest.raises(ValueError, match="dpo are weighted but no loss"):
        objective.combine({"sft": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="rl have no objective weight"):
        objective.combine({"sft": torch.tensor(1.0), "dpo": torch.tensor(1.0), "rl": torch.tensor(1.0)})
