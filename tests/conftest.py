"""Shared test setup: every test starts from the same seed, on one CPU thread."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Test tensors are tiny: a second intra-op thread buys nothing, and on a shared 2-core machine
# spinning OpenMP workers slow tiny ops down by orders of magnitude when another process is busy.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with torch.compile / inductor (several seconds)")


@pytest.fixture(autouse=True)
def _seed():
    """Seed torch for every test so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits_example():
    """examples/digits_cnn.py as a module (the CNN, its data split and its Trainer wiring); needs scikit-learn."""
    pytest.importorskip("sklearn")
    name = "digits_cnn_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "examples"
                                                      / "digits_cnn.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A prepared directory of stdlib json/ + email/ sources with a validation split (byte tokenizer); read-only."""
    from deepseek.data import byte_tokenizer, prepare, python_stdlib_dir

    out = tmp_path_factory.mktemp("lm-data") / "json-email"
    stdlib = python_stdlib_dir()
    prepare([str(stdlib / "json"), str(stdlib / "email" / "*.py")], byte_tokenizer(), out, val_fraction=0.15,
            progress=False)
    return out


@pytest.fixture
def few_row_arrangement(monkeypatch):
    """``few_row_arrangement(name)``: few-row products (decoding) take arrangement ``name`` wherever it is a
    candidate (else ``linear``) instead of the one timed fastest, so tests can check every arrangement."""
    from deepseek.nn import few_rows

    def force(name: str) -> None:
        monkeypatch.setattr(few_rows, "_chosen", {})
        monkeypatch.setattr(few_rows, "_fastest", lambda x, w, w_t, names: name if name in names else "linear")

    return force


@pytest.fixture
def ds_main(monkeypatch, capsys):
    """``ds <args>`` through the console script's entry point (``deepseek.cli.main.main``: its one-line error
    handling and exit codes) in this process: a ``subprocess.CompletedProcess`` without the interpreter's
    two-second start-up, for error paths and short commands (a merge, a report, a few steps of compression).
    ``ds train`` runs (killed, resumed, under torchrun), ``--debug`` tracebacks, signals and servers keep a real
    subprocess. The thread count a command sets is put back."""
    import subprocess

    from deepseek.cli import main as cli

    def run(*args) -> subprocess.CompletedProcess:
        argv = ["ds", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
        capsys.readouterr()  # what the test printed before is not this command's output
        threads = torch.get_num_threads()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            cli._debug = False
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    return run
