"""The Python examples in the README and docs run as written (each file's blocks in order, one namespace)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/model.md", "docs/generation.md", "docs/interop.md", "docs/data.md", "docs/training.md", "docs/serving.md", "docs/compression.md", "docs/export.md", "docs/compression-pruning.md", "docs/compression-distill.md", "docs/hardware.md", "docs/finetuning.md", "docs/rag.md", "docs/operations.md", "docs/design-names.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_doc_examples_run(doc, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{doc}", "exec"), namespace)
