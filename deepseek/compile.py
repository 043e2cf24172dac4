"""``ds.jit``: torch.compile where it works, eager where it does not."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def jit(target: F, **compile_kwargs) -> F:
    """Compile a function or module with ``torch.compile``; fall back to eager where compilation fails.

    Compilation happens at the first call, so that is where the fallback happens too: if the compiled
    call raises, the same call is repeated eagerly and every later call stays eager (with one
    warning). An error that eager execution raises as well is the caller's own and propagates.
    A module is returned as the same module (parameters and state_dict untouched), its ``forward``
    compiled.
    """
    if isinstance(target, torch.nn.Module):
        target.forward = _compiled_with_fallback(target.forward, compile_kwargs)
        return target
    return _compiled_with_fallback(target, compile_kwargs)  # type: ignore[return-value]


def _compiled_with_fallback(eager: Callable, compile_kwargs: dict) -> Callable:
    try:
        compiled = torch.compile(eager, **compile_kwargs)
    except Exception as exc:  # e.g. a Python version or platform torch.compile does not support
        warnings.warn(f"ds.jit: torch.compile unavailable ({exc}); running eagerly", stacklevel=3)
        return eager
    chosen = None

    @functools.wraps(eager)
    def call(*args, **kwargs):
        nonlocal chosen
        if chosen is not None:
            return chosen(*args, **kwargs)
        try:
            result = compiled(*args, **kwargs)
            chosen = compiled
        except Exception as exc:
            result = eager(*args, **kwargs)  # raises again if the function itself is at fault
            warnings.warn(f"ds.jit: compilation failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "running eagerly", stacklevel=2)
            chosen = eager
        return result

    call.eager = eager  # type: ignore[attr-defined]
    return call
