"""Rewards for code completions, the built-in reward functions of GRPO (``ds finetune run`` with ``method: grpo``).

Each takes one prompt row (a dict: ``{"prompt": ...}``, or a doctest prompt of ``ds finetune prepare-examples``
with ``doctests``, ``entry_point`` and ``module``) and one completion, and returns a float:

- :func:`parses_reward`: 1.0 when the code parses as Python (``ast.parse``, in this process: parsing runs nothing).
  For a code prompt (a row with ``entry_point``) the code is prompt + completion, the function the model finished,
  and that function must have a body besides its docstring (the prompt alone parses); otherwise the completion
  alone.
- :func:`doctests_rewards`: 1.0 when the finished function passes its doctests, run only in the sandbox
  (:func:`deepseek.evaluation.sandbox.run_python` subprocesses, never in the trainer's process); 0.0 for a row
  without doctests. A policy under optimisation finds shortcuts, so exit status 0 is not enough: the program must
  also print a fresh random token after the checks, which a completion that exits early (``os._exit(0)`` inside
  the function) never reaches.
- :func:`length_reward`: ``1 - tokens / max_new_tokens`` (1 for an empty completion, 0 for one that used the whole
  budget): with a positive weight it favours short completions, with a negative weight long ones.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from deepseek.evaluation.codegen import doctest_problem, parses
from deepseek.evaluation.humaneval import program
from deepseek.evaluation.sandbox import run_python

BUILTIN_REWARDS = ("parses", "doctests", "length")


def is_code_prompt(row: dict) -> bool:
    """A prompt whose completion finishes a function (a doctest prompt): it has an ``entry_point``."""
    return bool(row.get("entry_point"))


def parses_reward(row: dict, completion: str) -> float:
    """1.0 when (prompt +) completion parses as Python, else 0.0 (see the module docstring).

    For a code prompt the finished function must also have a body: the prompt alone (a ``def`` line and its
    docstring) already parses, and a policy rewarded for parsing learns to stop at once (measured: GRPO on the
    quickstart model went from ~15 to ~2 tokens per completion in 30 steps). So the function ``entry_point`` must
    hold a statement besides its docstring.
    """
    if is_code_prompt(row):
        return float(parses(row, completion))
    return float(parses({"prompt": ""}, completion, needs_body=False))


def doctests_rewards(rows: Sequence[dict], completions: Sequence[str], *, timeout_s: float = 5.0,
                     memory_mb: int = 512, workers: int | None = None) -> list[float]:
    """1.0 for each completion whose function passes its row's doctests (each in its own sandboxed subprocess,
    ``workers`` at a time; default: the CPU count, at most 8), else 0.0; rows without doctests score 0.0."""

    def one(job: tuple[dict, str]) -> float:
        row, completion = job
        if not (is_code_prompt(row) and row.get("doctests") and row.get("module")):
            return 0.0
        problem = doctest_problem({"solution": "", **row})
        token = secrets.token_hex(16)
        result = run_python(f"{program(problem, completion)}\nprint({token!r})\n", timeout_s=timeout_s,
                            memory_mb=memory_mb)
        return float(result.status == "passed" and result.stdout.rstrip().endswith(token))

    jobs = list(zip(rows, completions))
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, jobs))


def length_reward(n_tokens: int, max_new_tokens: int) -> float:
    """``1 - n_tokens / max_new_tokens``: 1 for an empty completion, 0 for one that used the whole budget."""
    return 1.0 - min(n_tokens, max_new_tokens) / max_new_tokens
