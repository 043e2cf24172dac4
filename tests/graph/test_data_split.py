"""The generator is seeded and plants what its docs say; the per-user time split leaks nothing."""

import pytest
import torch

from deepseek.config import ConfigError
from deepseek.graph.data import GraphSpec, build_hetero_graph, generate_interactions
from deepseek.graph.split import time_split, train_popularity

SPEC = GraphSpec(n_users=120, n_items=60, n_categories=6, n_communities=3, mean_interactions=8.0, seed=3)


def test_generator_is_seeded_and_plants_communities():
    a, b = generate_interactions(SPEC), generate_interactions(SPEC)
    assert torch.equal(a.user, b.user) and torch.equal(a.item, b.item) and torch.equal(a.time, b.time)
    assert not torch.equal(a.item, generate_interactions(GraphSpec(**{**SPEC.__dict__, "seed": 4})).item)
    # no user repeats an item; each user's rows are in time order
    keys = a.user * a.n_items + a.item
    assert len(torch.unique(keys)) == len(keys)
    # affinity 0.8: most interactions fall in the user's community's categories (community k: categories % K == k)
    inside = (a.item_category[a.item] % SPEC.n_communities) == a.user_community[a.user]
    assert inside.float().mean() > 0.75


def test_spec_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="communities"):
        GraphSpec(n_categories=2, n_communities=3)
    with pytest.raises(ConfigError, match="affinity"):
        GraphSpec(affinity=1.5)


def test_time_split_holds_out_each_users_last_interactions_without_leakage():
    data = generate_interactions(SPEC)
    split = time_split(data, n_test=2)
    assert len(split.train_user) + len(split.test_user) == len(data)
    train_keys = set((split.train_user * data.n_items + split.train_item).tolist())
    test_keys = set((split.test_user * data.n_items + split.test_item).tolist())
    assert not train_keys & test_keys
    for u in range(data.n_users):
        train_t = split.train_time[split.train_user == u]
        test_t = split.test_time[split.test_user == u]
        n = int((data.user == u).sum())
        assert len(test_t) == min(2, n - 1) and len(train_t) >= 1
        if len(test_t):
            assert train_t.max() <= test_t.min()  # nothing of the user's future is in training
    # popularity comes from training rows only: the held-out rows do not move it
    assert torch.equal(train_popularity(split), torch.bincount(split.train_item, minlength=data.n_items).float())
    assert train_popularity(split).sum() == len(split.train_item)


def test_a_user_with_one_interaction_is_not_evaluated():
    data = generate_interactions(GraphSpec(n_users=30, n_items=20, n_categories=4, n_communities=2,
                                           mean_interactions=1.0, seed=0))
    split = time_split(data, n_test=2)
    assert all(items == [] for items in split.test_items)  # every user has exactly one interaction: all train
    assert len(split.train_user) == len(data)


def test_hetero_graph_has_both_directions_and_training_edges_only():
    data = generate_interactions(SPEC)
    split = time_split(data)
    graph = build_hetero_graph(data.n_users, data.n_items, data.n_categories, data.item_category,
                               split.train_user, split.train_item)
    assert set(graph.node_types) == {"user", "item", "category"}
    assert graph["user", "interacts", "item"].edge_index.shape[1] == len(split.train_user)
    assert graph["item", "rev_interacts", "user"].edge_index.shape[1] == len(split.train_user)
    assert graph["item", "in", "category"].edge_index.shape[1] == data.n_items
