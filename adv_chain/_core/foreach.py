"""Multi-tensor helpers that accept a scalar as a Python number (eager) or a 0-d tensor (compiled).

torch's ``_foreach_*`` ops take Python scalars fastest; under ``torch.compile`` the scalars arrive
as cached 0-d tensors so that a scheduler changing ``lr`` never triggers a recompilation. A few ops
have no 0-d tensor overload; these helpers route around that so transforms are written once.
"""
from __future__ import annotations

from typing import Any

import torch

Tensors = list[torch.Tensor]


def is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def host_number(x: Any) -> Any:
    """A 0-d tensor in CPU memory as a Python number (eager mode only), else ``x`` unchanged.

    Reading a CPU tensor is no device synchronization (host and "device" share the memory), and
    a Python number lets a multi-tensor op take its fused scalar path instead of a per-tensor
    broadcast. Accelerator tensors, and every tensor while ``torch.compile`` traces, stay tensors."""
    if (isinstance(x, torch.Tensor) and x.dim() == 0 and x.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return x.tolist()
    return x


def is_zero(x: Any) -> bool:
    """True only for a host scalar equal to 0 (a tensor scalar is never treated as a known zero)."""
    return not is_tensor(x) and x == 0


def is_one(x: Any) -> bool:
    return not is_tensor(x) and x == 1


class AdditiveDecay(float):
    """A decay coefficient ``c`` that the terminal applies additively, ``p += (-c) * p`` (one in-place
    pass, the rounding of prodigyopt's ``p.add_(p, alpha=-c)``), instead of ``p *= 1 - c`` (torch's
    AdamW rounding). A sum with one stays additive (:meth:`Bucket.add_decay_coef`)."""

    __slots__ = ()


def decay_(xs: Tensors, coef: Any) -> None:
    """``xs *= 1 - coef`` in place (an :class:`AdditiveDecay` as ``xs += (-coef) * xs``)."""
    if isinstance(coef, AdditiveDecay):
        torch._foreach_add_(xs, xs, alpha=-float(coef))
    else:
        torch._foreach_mul_(xs, one_minus(coef))


def decayed(xs: Tensors, coef: Any) -> Tensors:
    """``xs * (1 - coef)`` as new tensors, rounded as :func:`decay_`."""
    if isinstance(coef, AdditiveDecay):
        return torch._foreach_add(xs, xs, alpha=-float(coef))
    return torch._foreach_mul(xs, one_minus(coef))


def one_minus(coef: Any) -> Any:
    """``1 - coef`` for a decay coefficient: a number, a 0-d tensor, or a per-tensor list of either."""
    if isinstance(coef, list):
        return [1.0 - c for c in coef]
    return 1.0 - coef


def addcmul_(xs: Tensors, a: Tensors, b: Tensors, value: Any) -> None:
    """xs += value * a * b"""
    if is_tensor(value):
        torch._foreach_addcmul_(xs, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcmul_(xs, a, b, value=value)


def add_scaled_(xs: Tensors, ys: Tensors, alpha: Any) -> None:
    """xs += alpha * ys"""
    if is_tensor(alpha):
        torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
    elif alpha != 0:
        torch._foreach_add_(xs, ys, alpha=alpha)


def lerp_(xs: Tensors, ys: Tensors, weight: Any) -> None:
    """xs += weight * (ys - xs)"""
    if is_tensor(weight):  # the tensor-weight overload of _foreach_lerp_ does not fuse under compile
        torch._foreach_add_(xs, torch._foreach_mul(torch._foreach_sub(ys, xs), weight))
    else:
        torch._foreach_lerp_(xs, ys, weight)


def add_scalar_(xs: Tensors, value: Any) -> None:
    """xs += value (the 0-d tensor overload of ``_foreach_add_`` would sync to the host)."""
    if is_tensor(value):
        torch._foreach_add_(xs, [value] * len(xs))
    elif value != 0:
        torch._foreach_add_(xs, value)


def scale_(xs: Tensors, factor: Any) -> None:
    if not is_one(factor):
        torch._foreach_mul_(xs, factor)


def clamp_(xs: Tensors, lo: Any, hi: Any) -> None:
    """xs = min(max(xs, lo), hi)"""
    if is_tensor(lo):
        torch._foreach_maximum_(xs, [lo] * len(xs))
        torch._foreach_minimum_(xs, [hi] * len(xs))
    else:
        torch._foreach_clamp_min_(xs, lo)
        torch._foreach_clamp_max_(xs, hi)


def sqrt(xs: Tensors, pool: Any = None, name: str = "sqrt") -> Tensors:
    """``sqrt`` of each tensor: one multi-tensor op into fresh tensors, or with ``pool`` (a
    :class:`~adv_chain.transforms.work_buffers.Scratch`) into views of one reused buffer (no
    allocation, no page faults on the fresh memory; valid until the pool's next use of ``name``)."""
    if pool is None or not xs:
        return torch._foreach_sqrt(xs)
    buf = pool.get(name, sum(x.numel() for x in xs), torch.float32, xs[0].device)
    out, start = [], 0
    for x in xs:
        if x.dtype != torch.float32:
            return torch._foreach_sqrt(xs)
        out.append(torch.sqrt(x, out=buf[start:start + x.numel()].view(x.shape)))
        start += x.numel()
    return out
