"""A tiny model shaped like the quickstart's (the ``small`` preset shrunk): sigmoid router, a shared expert, a dense
first layer, tied embeddings — no Hugging Face Mixtral export, so its LoRA adapters are saved in our own format.
Shared by the adapter, fine-tuning and adapter-serving tests."""

from pathlib import Path

import torch

import deepseek as ds
from deepseek.data.tokenizer import train_tokenizer
from deepseek.models.config import preset

VOCAB = 300
TEXT = "add 1 and 2 gives 3\ndef f(x): return x\nclass Foo: pass\n"


def quickstart_shaped_model(seed: int = 0, max_seq_len: int = 256) -> ds.MoETransformer:
    """``small`` with d_model 64, 2 layers (one dense, one MoE of 8 experts + 1 shared), weights large enough that
    greedy text depends on them."""
    torch.manual_seed(seed)
    config = preset("small", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    moe_ffn_dim=32, max_seq_len=max_seq_len)
    model = ds.MoETransformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dtype.is_floating_point and "bias" not in name:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def quickstart_tokenizer():
    """A trained BPE tokenizer (role tokens, so the chat template is the quickstart's) of VOCAB tokens."""
    return train_tokenizer([TEXT * 20], vocab_size=VOCAB)


def save_quickstart_shaped(folder: Path, seed: int = 0) -> Path:
    """The model and tokenizer as a model directory at ``folder``."""
    return Path(ds.save(quickstart_shaped_model(seed), quickstart_tokenizer(), folder))
