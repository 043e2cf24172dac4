"""Recall@k / nDCG@k against a hand computation; BPR pieces: the loss, negatives, resumable batches."""

import math

import torch

from deepseek.graph.metrics import ndcg_at_k, recall_at_k, recall_curve, top_k_items
from deepseek.graph.train import BPRBatches, BPRLoss, NegativeSampler, bpr_loss


def test_top_k_excludes_training_items_and_breaks_ties_by_id():
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.1], [0.0, 0.0, 0.0, 0.0]])
    top = top_k_items(scores, 3, exclude=[[0], []])
    assert top.tolist() == [[1, 2, 3], [0, 1, 2]]


def test_recall_and_ndcg_match_a_hand_computation():
    top = torch.tensor([[3, 1, 4, 0], [2, 0, 1, 3], [0, 1, 2, 3]])
    relevant = [[1, 0], [3], []]  # the third user has nothing held out: not averaged
    # user 0: hits at ranks 2 and 4; user 1: the hit is at rank 4
    assert recall_at_k(top, relevant, 2) == (0.5 + 0.0) / 2
    assert recall_at_k(top, relevant, 4) == (1.0 + 1.0) / 2
    idcg0 = 1 + 1 / math.log2(3)
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(5)) / idcg0
    ndcg1 = (1 / math.log2(5)) / 1.0
    assert math.isclose(ndcg_at_k(top, relevant, 4), (ndcg0 + ndcg1) / 2)
    assert math.isclose(ndcg_at_k(top, relevant, 2), (1 / math.log2(3) / idcg0 + 0.0) / 2)
    assert recall_curve(top, relevant, 4) == [recall_at_k(top, relevant, k) for k in (1, 2, 3, 4)]


def test_bpr_loss_is_minus_log_sigmoid_of_the_margin():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert math.isclose(float(bpr_loss(pos, neg)), expected, rel_tol=1e-6)


def test_negatives_are_never_training_items():
    users = torch.tensor([0, 0, 0, 1])
    items = torch.tensor([0, 1, 2, 3])
    sampler = NegativeSampler(users, items, n_items=5)
    g = torch.Generator().manual_seed(0)
    queried = torch.tensor([0] * 200 + [1] * 200)
    negatives = sampler.sample(queried, g)
    assert set(negatives[:200].tolist()) <= {3, 4} and 3 not in negatives[200:].tolist()


def test_bpr_batches_resume_exactly():
    users, items = torch.arange(40) % 8, torch.arange(40) % 13
    a = BPRBatches(users, items, n_items=13, batch_size=16, seed=1)
    for _ in range(3):
        next(a)
    b = BPRBatches(users, items, n_items=13, batch_size=16, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        for x, y in zip(next(a), next(b)):
            assert torch.equal(x, y)


def test_bpr_loss_fn_lowers_on_a_step():
    class Tables(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.i = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(6, 8))

        def forward(self):
            return self.u, self.i

    model, loss_fn = Tables(), BPRLoss(l2=0.0)
    batch = (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]))
    before = loss_fn(model, batch)
    before.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert float(loss_fn(model, batch).detach()) < float(before.detach()) and "bpr" in loss_fn.last
