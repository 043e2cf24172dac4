"""Recommendation on a heterogeneous user-item-category graph with PyTorch Geometric: meta-path attention models
trained with BPR, evaluated by recall@k and nDCG@k. Layer: beside ``models`` — may import nn, data, config,
hardware, errors, atomic."""

from deepseek.graph.data import GraphSpec, Interactions, build_hetero_graph, generate_interactions
from deepseek.graph.metrics import ndcg_at_k, recall_at_k, recall_curve, top_k_items
from deepseek.graph.models import HGTRecommender, MatrixFactorization
from deepseek.graph.serving import TopKRecommender, save_recommender, write_model_repository
from deepseek.graph.split import TimeSplit, time_split, train_popularity
from deepseek.graph.train import BPRBatches, BPRLoss, NegativeSampler, bpr_loss

__all__ = ["GraphSpec", "Interactions", "build_hetero_graph", "generate_interactions", "ndcg_at_k", "recall_at_k",
           "recall_curve", "top_k_items", "HGTRecommender", "MatrixFactorization", "TopKRecommender",
           "save_recommender", "write_model_repository", "TimeSplit", "time_split", "train_popularity",
           "BPRBatches", "BPRLoss", "NegativeSampler", "bpr_loss"]
