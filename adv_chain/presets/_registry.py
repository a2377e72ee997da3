"""The preset registry: named chains with flat, typed, JSON-serializable keywords."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .._core.chain import Chain

_PRESETS: dict[str, Callable[..., Chain]] = {}


def register(fn: Callable[..., Chain]) -> Callable[..., Chain]:
    """Register a preset function under its lowercase name."""
    _PRESETS[fn.__name__.lower()] = fn
    return fn


def names() -> list[str]:
    """Names of every registered preset."""
    return sorted(_PRESETS)


def keywords(name: str) -> dict[str, Any]:
    """The keywords of a preset with their defaults."""
    sig = inspect.signature(_lookup(name))
    return {k: p.default for k, p in sig.parameters.items()}


def summary(name: str) -> str:
    """The first sentence of a preset's docstring, on one line."""
    doc = " ".join((_lookup(name).__doc__ or "").split())
    end = doc.find(". ")
    return doc if end < 0 else doc[:end + 1]


def _lookup(name: str) -> Callable[..., Chain]:
    if not isinstance(name, str):
        raise TypeError(f"a preset name must be a string, got {type(name).__name__}")
    fn = _PRESETS.get(name.lower())
    if fn is None:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    return fn


def get(name: str, **kwargs: Any) -> Chain:
    """Build the chain of preset ``name`` (case-insensitive) with ``kwargs``.

    >>> import adv_chain as ac
    >>> ac.presets.get("ADAMW", weight_decay=0.1).names
    ('adam', 'eps_divide', 'weight_decay', 'apply')
    """
    fn = _lookup(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise TypeError(f"preset {fn.__name__!r} got unexpected keyword argument(s) {unknown}; "
                        f"it accepts {list(params)}")
    return fn(**kwargs)
