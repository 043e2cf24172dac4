"""Running `ds train` as one process and under torchrun, and reading what the runs wrote: shared by the
tests of every parallelism (each compares N processes to one process on the same global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def overrides(run_dir, data_dir, *extra) -> list[str]:
    """A 10-step fp32 run of the tiny model. micro_batch_size=4: two micro-batches per step; a sigmoid router:
    its aux-loss-free bias update needs the global expert load, summed over the ranks."""
    return [f"run_dir={run_dir}", f"data.path={data_dir}", "max_steps=10", "batch_size=8", "micro_batch_size=4",
            "precision=fp32", "device=cpu", "log_every=1", "eval_every=0", "data.seq_len=64", "data.eval_batches=1",
            "progress=false", "tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=2",
            "checkpoint.every=5", "model.router=sigmoid", "model.bias_update_speed=0.01", *map(str, extra)]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cmd(cmd, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT, env=run_env(),
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_single(run_dir, data_dir, *extra) -> Path:
    """The 1-process reference, in this process (one thread, as each torchrun worker has)."""
    from deepseek.train.lm import train_lm
    from deepseek.train.config import load_train_config

    torch.set_num_threads(1)
    train_lm(load_train_config(None, overrides(run_dir, data_dir, *extra)))
    return Path(run_dir)


def train_torchrun(nproc: int, config_file, run_dir, data_dir, *extra, max_restarts: int = 0) -> Path:
    """The same run on ``nproc`` processes under plain ``torchrun --standalone``."""
    from deepseek.parallel.launch import torchrun_command

    run_cmd(torchrun_command(nproc, ["train", str(config_file), *overrides(run_dir, data_dir, *extra)],
                             max_restarts=max_restarts))
    return Path(run_dir)


def losses(run_dir, steps: int = 10) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # each step once: only rank 0 logged
    return [r["loss"] for r in train]


def files(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*"))


def assert_same_model(dir_a, dir_b, atol: float = 1e-5) -> None:
    """The final model directories hold the same weights (to ``atol``)."""
    import deepseek as ds

    a, _ = ds.load(Path(dir_a))
    b, _ = ds.load(Path(dir_b))
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_b:
        torch.testing.assert_close(state_a[key], state_b[key], atol=atol, rtol=0, msg=key)


# What each rank holds after the plan of ``parallel.*`` is applied to the run's model, exactly as training applies
# it (build_plan + wrap): every parameter's local shape and DTensor placements, written to DIR/<layout>/rank{r}.json.
# One torchrun job builds every layout of TWO_RANK_LAYOUTS in turn (a launch costs ~4 s before any work).
LAYOUT_SCRIPT = """
import json, sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from deepseek.models import MoETransformer
from deepseek.parallel import build_plan, destroy, init_distributed
from deepseek.train.config import load_train_config

out_dir, layouts = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
env = init_distributed(timeout_s=120)
try:
    for name, extra in layouts.items():
        config = load_train_config(None, ["device=cpu", *extra])
        torch.manual_seed(0)
        model = MoETransformer(config.model_config())
        plan = build_plan(config.parallel, env, torch.device("cpu"))
        wrapped = plan.wrap(model)
        parameters = {}
        for param_name, p in model.named_parameters():
            dtensor = isinstance(p, DTensor)
            parameters[param_name] = {"shape": list((p.to_local() if dtensor else p).shape),
                                      "placements": [str(x) for x in p.placements] if dtensor else None}
        layout = {"rank": env.rank, "layout": plan.describe(), "parameters": parameters}
        (out_dir / name).mkdir(exist_ok=True)
        (out_dir / name / f"rank{env.rank}.json").write_text(json.dumps(layout))
        plan.close()
        del wrapped, model, plan
finally:
    destroy()
"""

# The 2-rank layouts the tests inspect: the model.* and parallel.* overrides of each.
FULL_MODEL = ("model.first_k_dense=1", "model.n_shared_experts=1", "model.shared_ffn_dim=64", "optimizer.eps=1e-6")
TWO_RANK_LAYOUTS = {"tp": (*FULL_MODEL, "parallel.tp=2"), "ep": ("parallel.ep=2",),
                    "pp": ("parallel.pp=2", "parallel.pp_schedule=GPipe")}


def rank_layouts(out_dir, layouts: dict[str, tuple[str, ...]], nproc: int = 2) -> dict[str, list[dict]]:
    """Each rank's parameters (local shape, placements) under each layout's overrides: ``{name: [rank 0, ...]}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    script, spec = out_dir / "layout.py", out_dir / "layouts.json"
    script.write_text(LAYOUT_SCRIPT)
    spec.write_text(json.dumps({name: list(extra) for name, extra in layouts.items()}))
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, out_dir,
             spec])
    return {name: [json.loads((out_dir / name / f"rank{r}.json").read_text()) for r in range(nproc)]
            for name in layouts}


def full_shapes(*extra) -> dict[str, list[int]]:
    """Every parameter's shape in the one-process model of the run (``model.*`` overrides in ``extra``)."""
    from deepseek.models import MoETransformer
    from deepseek.train.config import load_train_config

    model = MoETransformer(load_train_config(None, [e for e in extra if e.startswith("model.")]).model_config())
    return {name: list(p.shape) for name, p in model.named_parameters()}
