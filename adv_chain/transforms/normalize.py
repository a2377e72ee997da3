"""Normalizers: they turn a moment's direction into a step direction (divide, sign)."""
from __future__ import annotations

from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, Transform


class EpsDivide(Transform):
    """``u = u / (denom + eps)``: consumes the ``denom`` a moment transform published (Adam's).

    Fed by ``group["eps"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-6), ac.apply()).names
    ('adam', 'eps_divide', 'apply')
    """

    type_name = "eps_divide"
    default_name = "eps_divide"
    stage = "normalize"
    reads = frozenset({"update", "sig:denom"})
    consumes = frozenset({"sig:denom"})
    hparams = {"eps": HParam("eps", checks.nonneg)}

    def __init__(self, eps: float = 1e-8, *, name: str | None = None) -> None:
        super().__init__(name=name, eps=eps)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"eps": h.hp["eps"]}

    def update(self, b: Any) -> None:
        denom = b.signals.pop("denom")
        F.add_scalar_(denom, b.s("eps"))
        torch._foreach_div_(b.own_u(), denom)


class Sign(Transform):
    """``u = sign(u)`` (signSGD / Signum when placed after a momentum).

    >>> import adv_chain as ac
    >>> ac.chain(ac.momentum(0.9), ac.sign(), ac.apply()).names
    ('momentum', 'sign', 'apply')
    """

    type_name = "sign"
    default_name = "sign"
    stage = "normalize"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def update(self, b: Any) -> None:
        torch._foreach_sign_(b.own_u())


eps_divide = EpsDivide
sign = Sign
