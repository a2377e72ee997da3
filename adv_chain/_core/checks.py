"""Argument checks shared by transforms, presets and the optimizer.

Every check raises ``ValueError`` naming the owner, the argument, the value and the allowed range, and
returns the normalized value (floats as ``float``, pairs as tuples).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(owner: str, arg: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A real number in the given range. A one-element tensor (lr for capturable training) is checked
    by value (a host read, so callers check a tensor once, not at every step) and returned as is."""
    checked = value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        checked = float(value.detach())
    if not _is_number(checked) or math.isnan(checked):
        raise ValueError(f"{owner}: {arg}={value!r} must be a real number")
    below = checked <= lo if lo_open else checked < lo
    above = checked >= hi if hi_open else checked > hi
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{owner}: {arg}={value!r} is outside the allowed range {left}{lo}, {hi}{right}")
    return value if isinstance(value, torch.Tensor) else float(value)


def nonneg(owner: str, arg: str, value: Any) -> float:
    return number(owner, arg, value, lo=0.0)


def positive(owner: str, arg: str, value: Any) -> float:
    return number(owner, arg, value, lo=0.0, lo_open=True)


def unit_interval(owner: str, arg: str, value: Any) -> float:
    """A decay rate in [0, 1)."""
    return number(owner, arg, value, lo=0.0, hi=1.0, hi_open=True)


def closed_unit(owner: str, arg: str, value: Any) -> float:
    return number(owner, arg, value, lo=0.0, hi=1.0)


def betas(owner: str, arg: str, value: Any) -> tuple[float, ...]:
    """A tuple of one or more decay rates, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) < 1:
        raise ValueError(f"{owner}: {arg}={value!r} must be a tuple of decay rates, each in [0, 1)")
    return tuple(unit_interval(owner, f"{arg}[{i}]", b) for i, b in enumerate(value))


def beta_pair(owner: str, arg: str, value: Any) -> tuple[float, float]:
    """``(beta1, beta2)``, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: {arg}={value!r} must be a pair (beta1, beta2), each in [0, 1)")
    return betas(owner, arg, value)


def flag(owner: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {arg}={value!r} must be True or False")
    return value


def choice(owner: str, arg: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if value not in allowed:
        raise ValueError(f"{owner}: {arg}={value!r} is not one of {allowed}")
    return value
