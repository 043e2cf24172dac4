"""ds.jit: compiled results equal eager ones; compiler failures fall back to eager, user errors propagate."""

from __future__ import annotations

import warnings

import pytest
import torch

import deepseek as ds


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()  # no compiled code or recompile counts carried into the next test


def jit_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("ds.jit")]


def poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y + x.pow(2).sum(-1, keepdim=True)


@pytest.mark.slow
def test_jit_function_with_inductor_matches_eager():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    fast = ds.jit(poly)
    assert fast.__name__ == "poly" and fast.eager is poly
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fast(x, y)
        out2 = fast(2 * x, y)
    assert not jit_warnings(record), "inductor compiled this; no fallback expected"
    torch.testing.assert_close(out, poly(x, y), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out2, poly(2 * x, y), atol=1e-6, rtol=1e-6)


def test_jit_module_matches_eager_and_keeps_state_dict():
    model = ds.MoETransformer(ds.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                             moe_ffn_dim=8, n_routed_experts=4, max_seq_len=16)).eval()
    ids = torch.randint(0, 32, (2, 6))
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(ids)
        same = ds.jit(model, backend="aot_eager")  # dynamo tracing without a C++ toolchain: fast
        assert same is model and list(model.state_dict()) == keys
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = model(ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not jit_warnings(record)


def test_compiled_call_failure_falls_back_to_eager_once(monkeypatch):
    calls = {"compiled": 0, "eager": 0}

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls["compiled"] += 1
            raise RuntimeError("inductor exploded")
        return compiled

    def f(x):
        calls["eager"] += 1
        return x * 3

    monkeypatch.setattr(torch, "compile", broken_compile)
    fast = ds.jit(f)
    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match=r"ds\.jit: compilation failed \(RuntimeError: inductor exploded\)"):
        out = fast(x)
    assert torch.equal(out, x * 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert torch.equal(fast(x + 1), (x + 1) * 3)
    assert not jit_warnings(record), "warn once; later calls stay eager quietly"
    assert calls == {"compiled": 1, "eager": 2}


def test_failing_backend_falls_back_to_eager():
    def bad_backend(gm, example_inputs):
        raise RuntimeError("backend cannot handle this graph")

    x = torch.randn(3, 5)
    fast = ds.jit(poly, backend=bad_backend)
    with pytest.warns(UserWarning, match="ds.jit: compilation failed"):
        out = fast(x, x)
    torch.testing.assert_close(out, poly(x, x))


def test_module_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))))
    layer = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    expected = layer(x)
    ds.jit(layer)
    with pytest.warns(UserWarning, match="ds.jit"):
        torch.testing.assert_close(layer(x), expected)


def test_compile_unavailable_returns_eager(monkeypatch):
    def unavailable(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        fast = ds.jit(poly)
    assert fast is poly


def test_error_raised_by_the_function_itself_propagates():
    def picky(x):
        if x.shape[0] != 2:
            raise ValueError("expected two rows")
        return x + 1

    fast = ds.jit(picky, backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="expected two rows"):
            fast(torch.zeros(3, 2))
        assert torch.equal(fast(torch.zeros(2, 2)), torch.ones(2, 2))
    assert not jit_warnings(record), "a user error is not a compiler failure"


def test_user_error_propagates_even_when_compiler_is_broken(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))))

    def always_fails(x):
        raise KeyError("missing field")

    with pytest.raises(KeyError, match="missing field"):
        ds.jit(always_fails)(torch.zeros(1))
