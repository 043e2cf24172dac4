"""The package's imports point one way (docs/ARCHITECTURE's rules): every ``import`` in deepseek/, module-level or
inside a function, goes to its own layer or one below. Read with ``ast``, nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepseek"

# Top to bottom; a module may import its own part (its subpackage or top-level module) and the layers below, never a
# peer of its own layer or anything above. ``deepseek`` is the package's __init__: the public API (``import deepseek
# as ds``), which re-exports generate/models/nn/data and serves ``ds.serve`` lazily.
LAYERS = [
    ["cli"],  # the `ds` command: imports anything, imported by nothing
    # the public API, with the namespaces that re-export the design documents' names (ds.amp, ds.prune, ...)
    ["deepseek", "amp", "distill", "experiment", "prune", "quantization"],
    ["compat"],  # the seed programs' and design documents' names (docs/design-names.md)
    ["serve", "bench"],  # repository, backends, protocols; the load clients (client tools, never the server)
    # compress fine-tunes through the trainer; finetune: SFT/DPO/reward/GRPO runs; rag: the knowledge base;
    # ops: ds profile / ds logs / ds plan
    ["compress", "export", "finetune", "rag", "ops"],
    # sandboxed code execution, pass@k and the code rewards (sampling through generate): below finetune, whose GRPO
    # scores completions with them; it imports only generate, data and itself
    ["evaluation"],
    ["train"],  # the loop (owns a plan), one forward/backward, configs, plain checkpoints, parameter server
    ["generate", "parallel"],  # sampling engines; parallel plans (never train)
    ["models", "vision", "graph"],  # the model, presets, model directory, HF interop; image processor + classifiers;
                                    # heterogeneous-graph recommendation (issue 21)
    ["data", "nn"],  # tokenizers, shards, loader; building blocks
    ["config", "hardware", "compile", "checkpoint_folder"],  # leaves: dataclass configs, device probe, ds.jit,
                                                              # the checkpoint folder shared by plain and sharded
    ["atomic", "errors"],  # atomic file writes (config saves through it); the shared exceptions
]
LEVEL = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}

# Known upward imports outside this change's ownership, each to be removed (issue 17): (importing module, imported).
ALLOWED: set[tuple[str, str]] = set()  # (importing module, imported) pairs known to point upward: none


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The layer entry of a dotted module name: its subpackage or top-level module, or ``deepseek`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "deepseek"


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every deepseek import in the file, at any depth (functions included)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from deepseek import train` imports the subpackage; `from deepseek import save` the public API
            found += [(node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
                      for alias in node.names]
    return [(line, name) for line, name in found if name == "deepseek" or name.startswith("deepseek.")]


def all_imports() -> list[tuple[str, int, str]]:
    return [(module_name(path), line, target) for path in sorted(PACKAGE.rglob("*.py"))
            for line, target in imports(path)]


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert parts - set(LEVEL) == set(), "place new subpackages/modules in LAYERS"


def test_no_upward_or_sideways_import():
    wrong = []
    for module, line, target in all_imports():
        here, there = part_of(module), part_of(target)
        if here != there and LEVEL[there] <= LEVEL[here] and (module, target) not in ALLOWED:
            wrong.append(f"{module}:{line} imports {target} ({here} may not import {there})")
    assert wrong == []


def test_parallel_never_imports_train_and_data_never_imports_models():
    for module, line, target in all_imports():
        assert not (part_of(module) == "parallel" and part_of(target) == "train"), f"{module}:{line} -> {target}"
        assert not (part_of(module) == "data" and part_of(target) == "models"), f"{module}:{line} -> {target}"


def test_every_allowed_exception_is_still_needed():
    assert ALLOWED <= {(module, target) for module, _, target in all_imports()}


def test_the_walk_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative one are both found."""
    package = tmp_path / "deepseek"
    (package / "parallel").mkdir(parents=True)
    (package / "train").mkdir()
    for folder in (package, package / "parallel", package / "train"):
        (folder / "__init__.py").write_text("")
    (package / "train" / "step.py").write_text("")
    source = package / "parallel" / "plan.py"
    source.write_text("def f():\n    from deepseek.train import step\n\nfrom ..train import step as s\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    assert sorted(imports(source)) == [(2, "deepseek.train.step"), (4, "deepseek.train.step")]
