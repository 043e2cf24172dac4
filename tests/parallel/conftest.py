import pytest

from deepseek.data import byte_tokenizer, prepare, python_stdlib_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The json package of the standard library, byte tokens, 15% held out."""
    out = tmp_path_factory.mktemp("data") / "json"
    prepare([str(python_stdlib_dir() / "json")], byte_tokenizer(), out, val_fraction=0.15, progress=False)
    return out


@pytest.fixture(scope="session")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text("seed: 0\n")
    return path


@pytest.fixture(scope="session")
def two_rank_layouts(tmp_path_factory):
    """What each of 2 ranks holds under tensor, expert and pipeline parallelism (one torchrun job for the three)."""
    from .runs import TWO_RANK_LAYOUTS, rank_layouts

    return rank_layouts(tmp_path_factory.mktemp("layouts"), TWO_RANK_LAYOUTS)
