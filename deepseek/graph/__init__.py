"""Recommendation on a heterogeneous user-item-category graph with PyTorch Geometric: meta-path attention models
trained with BPR, evaluated by recall@k and nDCG@k. Layer: beside ``models`` — may import nn, data, config,
hardware, errors, atomic."""
