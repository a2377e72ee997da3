"""Terminals: the one place that writes parameters.

Every terminal computes ``p32 = p * (1 - decay_coef) - decay - lr * u`` in fp32 and writes once, so
weight decay is not lost in bf16 and an update is rounded a single time. With ``lr = 0`` and no decay
the parameters do not change (the dry step of distributed checkpoint loading).
"""
from __future__ import annotations

from typing import Any

import torch

from .._core import foreach as F
from .._core.numerics import stochastic_round
from .._core.transform import HostView, StateSpec, Transform

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _apply_fp32_(p32: list[torch.Tensor], b: Any, neg_lr: Any) -> None:
    """In place on fp32 tensors: p32 = p32 * (1 - decay_coef) - decay - lr * u."""
    if not F.is_zero(b.decay_coef):
        F.decay_(p32, b.decay_coef)
    if b.decay is not None:
        torch._foreach_sub_(p32, b.decay)
    lazy = b.lazy_u
    if lazy is None or F.is_tensor(neg_lr) or (F.is_tensor(lazy[2]) and lazy[1] is None):
        F.add_scaled_(p32, b.u, neg_lr)  # (compiled kernels: the fuser merges the division anyway)
    elif F.is_tensor(lazy[2]):  # a 0-d device scale (Prodigy's d): the same fold, its product with
        # -lr a 0-d tensor, applied in one pass over num instead of by addcdiv's host value
        torch._foreach_addcdiv_(p32, torch._foreach_mul(lazy[0], lazy[2] * neg_lr), lazy[1])
    elif lazy[1] is None:
        F.add_scaled_(p32, lazy[0], neg_lr * lazy[2])
    else:  # u = num * scale / den never written out: p -= lr * scale * num / den in one pass
        torch._foreach_addcdiv_(p32, lazy[0], lazy[1], value=neg_lr * lazy[2])


class _Terminal(Transform):
    stage = "apply"
    terminal = True
    reads = frozenset({"update", "param", "decay"})
    writes = frozenset({"param"})
    default_name = "apply"
    #: whether the executor must provide element offsets and noise keys
    needs_noise = False

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"neg_lr": -h.lr}


class Apply(_Terminal):
    """``p <- p * (1 - decay_coef) - decay - lr * u``, computed in fp32, rounded to nearest once.

    >>> import adv_chain as ac
    >>> ac.chain(ac.momentum(0.9), ac.apply()).names
    ('momentum', 'apply')
    """

    type_name = "apply"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def update(self, b: Any) -> None:
        if b.skip_apply:
            return
        if b.params[0].dtype not in _LOW_PRECISION:
            _apply_fp32_(b.params, b, b.s("neg_lr"))
            return
        p32 = [p.float() for p in b.params]
        _apply_fp32_(p32, b, b.s("neg_lr"))
        torch._foreach_copy_(b.params, p32)


class StochasticRoundApply(_Terminal):
    """Like :func:`apply`, but bf16/fp16 parameters are rounded stochastically (unbiased:
    ``E[round(x)] = x``), so updates far below the bf16 resolution still move the weights on
    average. The noise is a hash of ``(seed, step, parameter index, element)``: reproducible, free
    of ``torch.Generator`` state, compilable, and it never touches the global RNG. fp32 parameters
    are written exactly as :func:`apply` does. (Zamirai et al., arXiv 2010.06192.)

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.stochastic_round_apply(seed=1)).names
    ('adam', 'eps_divide', 'apply')
    """

    type_name = "stochastic_round_apply"
    needs_noise = True

    def __init__(self, seed: int = 0, *, name: str | None = None) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{self.type_name}: seed={seed!r} must be an int >= 0")
        super().__init__(name=name, seed=seed)

    def update(self, b: Any) -> None:
        dtype = b.params[0].dtype
        if b.skip_apply:
            return
        if dtype not in _LOW_PRECISION:
            _apply_fp32_(b.params, b, b.s("neg_lr"))
            return
        p32 = [p.float() for p in b.params]
        _apply_fp32_(p32, b, b.s("neg_lr"))
        rounded = [stochastic_round(x, dtype, off, key) for x, off, key in zip(p32, b.offsets, b.noise_keys)]
        torch._foreach_copy_(b.params, rounded)


class KahanApply(_Terminal):
    """Like :func:`apply`, with Kahan-compensated writes for bf16/fp16 parameters: the rounding error
    of each write is kept in a compensation buffer (``"apply/kahan_comp"``, in the parameter dtype)
    and added back on the next step, as optimi does. fp32 parameters need and get no buffer.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.kahan_apply()).names
    ('adam', 'eps_divide', 'apply')
    """

    type_name = "kahan_apply"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        return {"kahan_comp": StateSpec(dtype="param")} if param.dtype in _LOW_PRECISION else {}

    def update(self, b: Any) -> None:
        if b.skip_apply:
            return
        if b.params[0].dtype not in _LOW_PRECISION:
            _apply_fp32_(b.params, b, b.s("neg_lr"))
            return
        comp = b.state("kahan_comp")
        target = [p.float() for p in b.params]
        _apply_fp32_(target, b, b.s("neg_lr"))
        torch._foreach_add_(target, comp)  # the exact sum we want: p + delta + carried error
        torch._foreach_copy_(b.params, target)  # rounds to the param dtype
        torch._foreach_sub_(target, [p.float() for p in b.params])
        torch._foreach_copy_(comp, target)


apply = Apply
stochastic_round_apply = StochasticRoundApply
kahan_apply = KahanApply
