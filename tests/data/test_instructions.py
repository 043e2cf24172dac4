"""Instruction, preference and prompt sets from Python sources (deepseek.data.instructions), on tiny fixed modules."""

from __future__ import annotations

import ast
import doctest
import json
from pathlib import Path

import pytest

from deepseek.data import DataError, is_validation_document
from deepseek.data.instructions import (FILES, MANIFEST, doctest_prompts, function_chats, functions_in_source,
                                        is_heldout, mutate, preference_pairs, stdlib_functions, write_examples)

SOURCE = '''"""A tiny module."""

import math


def clamp(x, low=0, high=10):
    """Clamp x into the closed interval from low to high, inclusive of both ends."""
    # the bounds are inclusive
    if x < low:
        return low
    if x > high:
        return high
    return x


def mean(values):
    """Return the arithmetic mean of a non-empty sequence of numbers.

    >>> mean([1, 2, 3])
    2.0
    >>> mean([4])
    4.0
    """
    return sum(values) / len(values)


def is_even(n: int) -> bool:
    """Tell whether the integer n is even, using the remainder of a division by two."""
    return n % 2 == 0 and True


def short(x):
    """Too short."""
    return x


@staticmethod
def decorated(x):
    """A decorated function is left out because its decorator changes what it does."""
    return x


def stub():
    """A stub whose body is only pass, which teaches nothing about writing code."""
    pass


class Box:
    def method(self):
        """Methods are left out: their bodies depend on class state the prompt does not show."""
        return self
'''


@pytest.fixture
def functions():
    return functions_in_source(SOURCE, module="tiny", path="tiny.py")


def test_functions_kept_and_their_parts(functions):
    assert [f.name for f in functions] == ["clamp", "mean", "is_even"]
    clamp = functions[0]
    assert clamp.signature == "clamp(x, low=0, high=10)"
    assert functions[2].signature == "is_even(n: int) -> bool"
    assert clamp.docstring == "Clamp x into the closed interval from low to high, inclusive of both ends."
    assert clamp.source.startswith("def clamp(") and '"""Clamp' in clamp.source
    assert '"""' not in clamp.code and "# the bounds are inclusive" in clamp.code  # exact source, comments kept
    ast.parse(clamp.code)
    assert functions[1].header.endswith('    """') and "return" not in functions[1].header


def test_chats_roles_and_contents(functions):
    chats = function_chats(functions)
    assert len(chats) == 2 * len(functions)
    for chat in chats:
        assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in chat["messages"])
    write_fn, write_doc = chats[0]["messages"], chats[1]["messages"]
    assert "`clamp(x, low=0, high=10)`" in write_fn[1]["content"]
    assert functions[0].docstring in write_fn[1]["content"]
    assert write_fn[2]["content"] == f"```python\n{functions[0].code}\n```"
    assert functions[0].code in write_doc[1]["content"] and '"""' not in write_doc[1]["content"]
    assert write_doc[2]["content"] == functions[0].docstring


def test_mutations_change_the_ast_parse_and_are_deterministic(functions):
    for fn in functions:
        original = ast.dump(ast.parse(ast.unparse(ast.parse(fn.code))))
        seen = set()
        for seed in range(20):
            mutated = mutate(fn.source, seed=seed)
            assert mutated is not None
            assert ast.dump(ast.parse(mutated)) != original  # parses, and differs
            assert mutate(fn.source, seed=seed) == mutated
            seen.add(mutated)
        assert len(seen) > 1 or fn.name == "mean"  # the seed picks among several sites (mean has one: its return)


def test_mutation_kinds():
    assert "x >= 1" in mutate("def f(x):\n    return x < 1\n", seed=0) or "x < 2" in mutate("def f(x):\n    return x < 1\n", seed=0)
    outs = {mutate("def f(a, b):\n    return a and b\n", seed=s) for s in range(10)}
    assert outs == {"def f(a, b):\n    return a or b", "def f(a, b):\n    return None"}
    assert mutate("def f():\n    return True\n", seed=0) in {"def f():\n    return False", "def f():\n    return None"}
    assert mutate("def f(x):\n    print(x)\n", seed=0) is None  # no site: no pair
    with pytest.raises(DataError, match="one function"):
        mutate("x = 1\n")


def test_preference_pairs(functions):
    pairs = preference_pairs(functions, seed=0)
    assert len(pairs) == 3
    for pair, fn in zip(pairs, functions):
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in pair["prompt"]] == ["system", "user"]
        assert fn.docstring in pair["prompt"][1]["content"]
        chosen, rejected = (pair[k][0]["content"].removeprefix("```python\n").removesuffix("\n```")
                            for k in ("chosen", "rejected"))
        assert ast.dump(ast.parse(chosen)) == ast.dump(ast.parse(fn.code))
        assert ast.dump(ast.parse(rejected)) != ast.dump(ast.parse(chosen))
        assert "#" not in chosen  # both sides unparse-normalised: only the mutation tells them apart
    assert preference_pairs(functions, seed=0) == pairs
    assert preference_pairs(functions, seed=1) != pairs


def test_doctest_prompts(functions):
    prompts = doctest_prompts(functions)
    assert len(prompts) == 1
    p = prompts[0]
    assert p["entry_point"] == "mean" and p["module"] == "tiny"
    assert p["prompt"].startswith("def mean(values):\n") and p["prompt"].rstrip().endswith('"""')
    assert len(doctest.DocTestParser().get_examples(p["doctests"])) == 2
    # the kept solution passes its own doctests (run here in-process on this fixed, harmless source)
    globs: dict = {}
    exec(p["solution"], globs)
    test = doctest.DocTestParser().get_doctest(p["doctests"], globs, "mean", None, 0)
    assert doctest.DocTestRunner().run(test).failed == 0


def write_package(root: Path, n: int) -> Path:
    root.mkdir(exist_ok=True)
    for i in range(n):
        (root / f"mod{i:02d}.py").write_text(SOURCE.replace("clamp", f"clamp{i}"), encoding="utf-8")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(SOURCE, encoding="utf-8")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text(SOURCE, encoding="utf-8")  # excluded like the corpus does
    (root / "broken.py").write_text("def f(:\n", encoding="utf-8")  # skipped
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_split_is_by_module_and_matches_the_pretraining_hash(tmp_path):
    fns = stdlib_functions(write_package(tmp_path, 20))
    modules = {f.module for f in fns}
    assert "pkg" in modules and not any("test" in m or "broken" in m for m in modules)
    held = {f.module for f in fns if is_heldout(f, 0.5)}
    train = {f.module for f in fns if not is_heldout(f, 0.5)}
    assert held and train and not held & train
    for f in fns:
        assert is_heldout(f, 0.5) == is_validation_document(f.path, 0.5)
        assert not is_heldout(f, 0.03) or is_heldout(f, 0.1)  # pre-training's held-out modules stay held out


def test_write_examples(tmp_path):
    root = write_package(tmp_path / "src", 20)
    manifest = write_examples(tmp_path / "out", root=root, heldout_fraction=0.5, seed=3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, MANIFEST])
    assert json.loads((out / MANIFEST).read_text()) == manifest
    for file in FILES:
        assert len(read_jsonl(out / file)) == manifest["counts"][file]
    assert manifest["functions"]["train"] + manifest["functions"]["heldout"] == 21 * 3
    assert manifest["counts"]["sft_train.jsonl"] == 2 * manifest["functions"]["train"]
    assert manifest["counts"]["prompts_heldout.jsonl"] == len(manifest["modules"]["heldout"])
    assert not set(manifest["modules"]["train"]) & set(manifest["modules"]["heldout"])
    assert {r["module"] for r in read_jsonl(out / "prompts_heldout.jsonl")} == set(manifest["modules"]["heldout"])
    first = {f: (out / f).read_bytes() for f in FILES}
    write_examples(out, root=root, heldout_fraction=0.5, seed=3)  # rewrite in place: same bytes
    assert {f: (out / f).read_bytes() for f in FILES} == first


def test_write_examples_module_allow_list(tmp_path):
    root = write_package(tmp_path / "src", 3)
    manifest = write_examples(tmp_path / "out", root=root, modules=["pkg", "mod01"], heldout_fraction=0.0)
    assert manifest["modules"] == {"train": ["mod01", "pkg"], "heldout": []}


def test_bad_inputs(tmp_path):
    root = write_package(tmp_path / "src", 1)
    with pytest.raises(DataError, match="no module .* named nosuch"):
        write_examples(tmp_path / "out", root=root, modules=["nosuch"])
    with pytest.raises(DataError, match="list of module names"):
        stdlib_functions(root, modules="pkg")
    with pytest.raises(DataError, match="not a directory"):
        stdlib_functions(tmp_path / "missing")
    with pytest.raises(DataError, match="heldout_fraction"):
        write_examples(tmp_path / "out", root=root, heldout_fraction=1.5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no documented function"):
        write_examples(tmp_path / "out", root=tmp_path / "empty")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SyntaxError):
        functions_in_source("def f(:\n", module="m")


def test_cli_prepare_examples(tmp_path):
    from typer.testing import CliRunner

    from deepseek.cli.main import app

    result = CliRunner().invoke(app, ["finetune", "prepare-examples", str(tmp_path / "out"), "--module", "textwrap"])
    assert result.exit_code == 0, result.output
    assert "sft_train.jsonl" in result.output or "sft_heldout.jsonl" in result.output
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["modules"]["train"] + manifest["modules"]["heldout"] == ["textwrap"]


def test_form_feed_keeps_lines_aligned():
    text = 'def f(x):\n    """A docstring that is long enough to be kept by the filter."""\n\x0c\n    return x < 1\n'
    (fn,) = functions_in_source(text, module="m")
    assert fn.code == "def f(x):\n\x0c\n    return x < 1" and fn.docstring.startswith("A docstring")
