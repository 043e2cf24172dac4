"""Instruction, preference and prompt data from the Python standard library, offline and without a model.

Every top-level function of a standard-library module (read with ``ast``, never imported) that has a
docstring of reasonable length and a body of bounded size becomes

- two chats (OpenAI-style ``{"messages": [system, user, assistant]}``): *write the function this
  docstring describes* (the answer is the function's exact source without its docstring: the user turn
  already holds it) and *write the docstring of this function* (the answer is the cleaned docstring);
- one preference pair in TRL's conversational format ``{"prompt": [system, user], "chosen": [assistant],
  "rejected": [assistant]}``: the prompt is the docstring-to-function user turn, ``chosen`` the real
  function, ``rejected`` the same function after one AST mutation that changes what it does (a negated
  comparison, a flipped boolean, an integer off by one, ``return x`` made ``return None``, ``and``/``or``
  swapped), picked by an RNG seeded with ``seed`` and the function's name. Both sides are
  ``ast.unparse``-normalised so formatting and comments cannot tell them apart; only the mutation does.
  (Rejected sides that are a model's sample failing to parse are a later addition.)
- when its docstring holds doctest examples (``>>>``, at least one found by ``doctest.DocTestParser``),
  one prompt for GRPO: ``{"prompt": def line + docstring, "doctests", "entry_point", "module",
  "solution"}``. The doctests are parsed, not run: no sandbox to run them in exists yet, and many need
  their module's globals (``"module"`` says which) — a reward has to run them there.

Functions of one module are either all training data or all held out. The rule is the pre-training
split's (:func:`deepseek.data.prepare.is_validation_document` on the module's file path as the corpus
names it), at a larger fraction: a hash below 0.03 is below 0.1, so every module that ``ds quickstart``
held out of pre-training is held out here too. Output is deterministic for a given Python version and
standard-library path. Methods and decorated functions are left out: a method's body depends on class
state the prompt does not show, and a decorator changes what the docstring describes.
"""

from __future__ import annotations

import ast
import copy
import doctest
import functools
import inspect
import json
import platform
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from deepseek.atomic import write_atomically
from deepseek.data.errors import DataError
from deepseek.data.prepare import is_validation_document
from deepseek.data.sources import STDLIB_EXCLUDE, python_stdlib_dir, resolve_sources

SYSTEM_PROMPT = "You are an expert Python programmer."
EXCLUDE = (*STDLIB_EXCLUDE, "*/idlelib/*", "*/turtledemo/*")
"""``STDLIB_EXCLUDE`` (installed packages, test suites) plus the GUI demos and IDE."""
HELDOUT_FRACTION = 0.1
FILES = ("sft_train.jsonl", "sft_heldout.jsonl", "preference_train.jsonl", "preference_heldout.jsonl",
         "prompts_train.jsonl", "prompts_heldout.jsonl")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Function:
    """One documented top-level function: where it is, what it says, and its exact source.

    ``source`` is the ``def`` through the end of the body, as written (dedented); ``code`` the same without
    the docstring's lines; ``header`` the ``def`` line(s) through the docstring's last line.
    """

    module: str
    path: str
    name: str
    signature: str
    docstring: str
    source: str
    code: str
    header: str


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of ``path`` under ``root``: ``json/decoder.py`` → ``json.decoder``, ``json/__init__.py`` → ``json``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _signature(node: ast.FunctionDef) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{node.name}({ast.unparse(node.args)}){returns}"


def _docstring_node(node: ast.FunctionDef) -> Optional[ast.Expr]:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def functions_in_source(text: str, *, module: str, path: str = "", min_doc_chars: int = 40,
                        max_doc_chars: int = 2000, max_code_lines: int = 60) -> list[Function]:
    """The documented top-level functions of one module's source ``text`` that pass the size limits.

    Kept: undecorated ``def`` s whose docstring (cleaned) has ``min_doc_chars`` to ``max_doc_chars``
    characters and sits on lines of its own, with at least one statement after it other than ``pass``/``...``,
    whose code without the docstring has at most ``max_code_lines`` lines. Raises :class:`SyntaxError`
    for text that does not parse.
    """
    tree = ast.parse(text)
    lines = re.split(r"\r\n|\r|\n", text)  # ast's line ends; str.splitlines also splits at \f, found in the stdlib
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        doc_node = _docstring_node(node)
        if doc_node is None or len(node.body) < 2:
            continue
        rest = node.body[1:]
        if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                           and s.value.value is Ellipsis) for s in rest):
            continue
        docstring = inspect.cleandoc(doc_node.value.value)
        if not min_doc_chars <= len(docstring) <= max_doc_chars:
            continue
        # The docstring must own its lines, so dropping them leaves valid code with nothing else lost.
        start, end = node.lineno, node.end_lineno
        d_start, d_end = doc_node.lineno, doc_node.end_lineno
        if (d_start == start or rest[0].lineno <= d_end or lines[d_start - 1][:doc_node.col_offset].strip()
                or lines[d_end - 1][doc_node.end_col_offset:].strip()):
            continue
        dedented = lines[start - 1:end]  # top level: nothing to dedent
        source = "\n".join(dedented)
        code = "\n".join(dedented[:d_start - start] + dedented[d_end - start + 1:])
        header = "\n".join(dedented[:d_end - start + 1])
        if len(code.splitlines()) > max_code_lines:
            continue
        try:
            ast.parse(code)
        except SyntaxError:  # a line continuation into the docstring; rare, not worth repairing
            continue
        found.append(Function(module, path, node.name, _signature(node), docstring, source, code, header))
    return found


def stdlib_functions(root: Optional[str | Path] = None, *, modules: Optional[Sequence[str]] = None,
                     exclude: Sequence[str] = EXCLUDE, **limits) -> list[Function]:
    """The documented functions of every ``.py`` module under ``root`` (default: this Python's standard library).

    ``modules`` restricts it to those dotted names and their submodules (``["json", "textwrap"]``); a name
    that matches no file raises :class:`DataError`. Files that are not UTF-8 or do not parse are skipped.
    ``limits`` go to :func:`functions_in_source`. Ordered by path.
    """
    root = Path(root) if root is not None else python_stdlib_dir()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    files = [f for f in resolve_sources([str(root)], exclude=exclude) if f.endswith(".py")]
    named = [(module_name(Path(f), root), f) for f in files]
    if modules is not None:
        if isinstance(modules, str):
            raise DataError(f"modules must be a list of module names, not the string {modules!r}")
        wanted = set(modules)
        named = [(m, f) for m, f in named if m in wanted or any(m.startswith(w + ".") for w in wanted)]
        missing = sorted(w for w in wanted if not any(m == w or m.startswith(w + ".") for m, _ in named))
        if missing:
            raise DataError(f"no module under {root} named {', '.join(missing)}")
    functions = []
    for module, path in named:
        stat = Path(path).stat()
        functions += _file_functions(path, stat.st_mtime_ns, stat.st_size, module, tuple(sorted(limits.items())))
    return functions


@functools.lru_cache(maxsize=4096)
def _file_functions(path: str, mtime_ns: int, size: int, module: str, limits: tuple) -> tuple[Function, ...]:
    # Parsing the whole standard library takes seconds; data preparation, `ds eval --task stdlib-doctests` and
    # GRPO's prompts each walk it, so one process parses a file once (keyed by its mtime and size: an edited file
    # is parsed again). Function is frozen, so sharing the results is safe.
    try:
        text = Path(path).read_text(encoding="utf-8")
        return tuple(functions_in_source(text, module=module, path=path, **dict(limits)))
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return ()


def _system() -> dict:
    return {"role": "system", "content": SYSTEM_PROMPT}


def write_function_prompt(fn: Function) -> str:
    """The user turn asking for ``fn`` from its docstring."""
    return f"Write a Python function `{fn.signature}` that does the following:\n\n{fn.docstring}"


def write_docstring_prompt(fn: Function) -> str:
    """The user turn asking for ``fn`` 's docstring from its code."""
    return f"Write the docstring of this Python function:\n\n```python\n{fn.code}\n```"


def function_chats(functions: Iterable[Function]) -> list[dict]:
    """Two chats per function: docstring → function (without docstring), and function → docstring."""
    chats = []
    for fn in functions:
        chats.append({"messages": [_system(), {"role": "user", "content": write_function_prompt(fn)},
                                   {"role": "assistant", "content": f"```python\n{fn.code}\n```"}]})
        chats.append({"messages": [_system(), {"role": "user", "content": write_docstring_prompt(fn)},
                                   {"role": "assistant", "content": fn.docstring}]})
    return chats


_NEGATED = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def _sites(body: list[ast.stmt]) -> list[tuple[str, ast.AST, int]]:
    """(kind, node, index) of every place a mutation can go, in a fixed walk order."""
    sites = []
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Compare):
                sites += [("compare", node, i) for i in range(len(node.ops))]
            elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
                sites.append(("bool", node, 0))
            elif isinstance(node, ast.Constant) and type(node.value) is int:
                sites.append(("int", node, 0))
            elif isinstance(node, ast.Return) and node.value is not None and not (
                    isinstance(node.value, ast.Constant) and node.value.value is None):
                sites.append(("return", node, 0))
            elif isinstance(node, ast.BoolOp):
                sites.append(("boolop", node, 0))
    return sites


def _apply(kind: str, node: ast.AST, index: int) -> None:
    if kind == "compare":
        node.ops[index] = _NEGATED[type(node.ops[index])]()
    elif kind == "bool":
        node.value = not node.value
    elif kind == "int":
        node.value += 1
    elif kind == "return":
        node.value = ast.Constant(None)
    else:
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()


def _without_docstring(source: str) -> ast.FunctionDef:
    body = ast.parse(source).body
    if len(body) != 1 or not isinstance(body[0], ast.FunctionDef):
        raise DataError(f"expected the source of one function, got {[type(n).__name__ for n in body]}")
    node = body[0]
    if _docstring_node(node) is not None and len(node.body) > 1:
        node.body = node.body[1:]
    return node


def mutate(source: str, seed: int | str = 0) -> Optional[str]:
    """``source`` (one function) with one behaviour-changing AST mutation, ``ast.unparse``-normalised, or None.

    The site and kind are picked by ``random.Random(seed)`` among every comparison, bool constant, int
    constant, ``return <value>`` and ``and``/``or`` of the body (docstring dropped), so the same seed gives
    the same mutation. The result parses and its ``ast.dump`` differs from the original's; None when the
    body has no site.
    """
    original = _without_docstring(source)
    sites = _sites(original.body)
    if not sites:
        return None
    mutated = copy.deepcopy(original)
    pick = random.Random(seed).randrange(len(sites))
    kind, node, index = _sites(mutated.body)[pick]  # the copy walks in the same order as the original
    _apply(kind, node, index)
    text = ast.unparse(mutated)
    if ast.dump(ast.parse(text)) == ast.dump(ast.parse(ast.unparse(original))):
        raise AssertionError(f"mutation {kind} left the function unchanged")  # cannot happen: each kind changes a node
    return text


def preference_pairs(functions: Iterable[Function], seed: int = 0) -> list[dict]:
    """One TRL conversational preference pair per function that has a mutation site (see :func:`mutate`)."""
    pairs = []
    for fn in functions:
        rejected = mutate(fn.source, seed=f"{seed}:{fn.module}:{fn.name}")
        if rejected is None:
            continue
        chosen = ast.unparse(_without_docstring(fn.source))
        prompt = [_system(), {"role": "user", "content": write_function_prompt(fn)}]
        pairs.append({"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": f"```python\n{chosen}\n```"}],
                      "rejected": [{"role": "assistant", "content": f"```python\n{rejected}\n```"}]})
    return pairs


def _example_text(example: doctest.Example) -> str:
    lines = example.source.rstrip("\n").split("\n")
    shown = [">>> " + lines[0], *("... " + line for line in lines[1:])]
    return "\n".join(shown) + "\n" + example.want


def doctest_prompts(functions: Iterable[Function]) -> list[dict]:
    """GRPO prompts from functions whose docstring has at least one doctest example (parsed, not run)."""
    parser = doctest.DocTestParser()
    prompts = []
    for fn in functions:
        if ">>>" not in fn.docstring:
            continue
        try:
            examples = parser.get_examples(fn.docstring, name=f"{fn.module}.{fn.name}")
        except ValueError:  # malformed example (bad indentation, missing blank after prompt)
            continue
        if not examples:
            continue
        prompts.append({"prompt": fn.header + "\n", "doctests": "".join(_example_text(e) for e in examples),
                        "entry_point": fn.name, "module": fn.module, "solution": fn.source,
                        "instruction": write_function_prompt(fn)})
    return prompts


def is_heldout(fn: Function, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether ``fn`` 's module is held out: the pre-training split's hash of its file path, below ``fraction``."""
    return is_validation_document(fn.path or fn.module, fraction)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_examples(out_dir: str | Path, *, seed: int = 0, root: Optional[str | Path] = None,
                   modules: Optional[Sequence[str]] = None, heldout_fraction: float = HELDOUT_FRACTION,
                   **limits) -> dict:
    """Write the chat, preference and prompt sets, split by module, into ``out_dir`` (atomically); return the manifest.

    Files: ``FILES`` (JSON Lines) and ``manifest.json`` (counts per file, modules per split, settings).
    ``root``/``modules``/``limits`` pick the functions (see :func:`stdlib_functions`).
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    functions = stdlib_functions(root, modules=modules, **limits)
    if not functions:
        raise DataError(f"no documented function found under {root or python_stdlib_dir()}"
                        + (f" in modules {list(modules)}" if modules else ""))
    split = {"train": [f for f in functions if not is_heldout(f, heldout_fraction)],
             "heldout": [f for f in functions if is_heldout(f, heldout_fraction)]}
    sets = {}
    for name, fns in split.items():
        sets[f"sft_{name}.jsonl"] = function_chats(fns)
        sets[f"preference_{name}.jsonl"] = preference_pairs(fns, seed=seed)
        sets[f"prompts_{name}.jsonl"] = doctest_prompts(fns)
    manifest = {
        "format": "deepseek-instructions", "version": 1, "seed": seed, "heldout_fraction": heldout_fraction,
        "root": str(Path(root) if root is not None else python_stdlib_dir()),
        "python": platform.python_version(),
        "functions": {name: len(fns) for name, fns in split.items()},
        "counts": {file: len(sets[file]) for file in FILES},
        "modules": {name: sorted({f.module for f in fns}) for name, fns in split.items()},
    }

    def write_into(tmp: Path) -> None:
        for file in FILES:
            _write_jsonl(tmp / file, sets[file])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    write_atomically(out_dir, write_into)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m deepseek.data.instructions OUT [--seed N]``: the same as ``ds finetune prepare-examples``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_examples(args.out, seed=args.seed)
    print(json.dumps(manifest["counts"], indent=2))


if __name__ == "__main__":
    main()
