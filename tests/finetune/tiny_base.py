"""The tiny model directory the reward, GRPO and mixed run tests fine-tune: Mixtral-shaped (so LoRA adapters save in
PEFT's format), a 300-token tokenizer trained on the text the tests' data uses."""

import json
from pathlib import Path

import torch

import deepseek as ds
from deepseek.data.tokenizer import train_tokenizer
from deepseek.models.config import preset
from deepseek.models.transformer import MoETransformer

TEXT = "add 1 and 2 gives 3\ndef f(x): return x\nYou write Python. good bad\n"
SYSTEM = {"role": "system", "content": "You write Python."}


def make_base(folder: Path):
    """``(model directory, tokenizer)`` of a seeded tiny model written under ``folder``."""
    tokenizer = train_tokenizer([TEXT * 20], vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=300, router="softmax", n_shared_experts=0, first_k_dense=0,
                    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=False, qk_norm=False)
    ds.save(MoETransformer(config), tokenizer, folder / "base")
    return folder / "base", tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preference_pairs(numbers) -> list[dict]:
    """Toy pairs: the chosen answer is the sum, the rejected one is a fixed wrong line."""
    return [{"prompt": [SYSTEM, {"role": "user", "content": f"add {i} and {i + 1}"}],
             "chosen": [{"role": "assistant", "content": f"good {2 * i + 1}"}],
             "rejected": [{"role": "assistant", "content": "bad def f(x): return x"}]} for i in numbers]


def common_overrides(base, run_dir, *extra) -> list[str]:
    return [f"init={base}", f"run_dir={run_dir}", "seq_len=64", "precision=fp32", "device=cpu", "progress=false",
            "tensorboard=false", "log_every=1", "eval_every=0", "schedule.warmup_steps=0", "seed=0", *extra]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
