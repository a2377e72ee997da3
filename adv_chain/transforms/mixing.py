"""Mixing moments: AdEMAMix's slow EMA and Simplified AdEMAMix's accumulator, which add to (or
replace) the first moment of :func:`scale_by_adam`."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform


def _half_life(beta: float) -> float:
    return math.log(0.5) / math.log(beta) - 1.0


class AdEMAMix(Transform):
    """AdEMAMix (Pagliardini et al., arXiv 2409.03137): mix a slow EMA of the gradient into Adam's
    fast moment. Placed right after :func:`scale_by_adam` (whose ``u = m / (1 - b1^t)``)::

        m2 = beta3 * m2 + (1 - beta3) * g      (g: the reference gradient; m2 not bias-corrected)
        u  = u + alpha_t * m2                   (then eps_divide / atan2_scale divides by the denominator)

    Warm-ups as the paper: ``alpha_warmup=T`` ramps ``alpha_t = alpha * min(t/T, 1)``;
    ``beta3_warmup=T`` moves beta3 from ``beta_start`` (the paper's beta1) to ``beta3`` linearly in
    half-life: ``beta3(t) = 0.5 ** (1 / (1 + (1 - t/T) f(beta_start) + (t/T) f(beta3)))`` with
    ``f(b) = ln 0.5 / ln b - 1``. ``slow_bias_correction=True`` divides ``m2`` by Adam's
    ``1 - b1^t`` too, as adv_optm's legacy ``use_AdEMAMix`` does (the paper does not). State
    ``exp_avg_slow``; fed by ``group["beta3"]``/``group["alpha"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.ademamix(alpha=5.0), ac.eps_divide(), ac.apply()).names
    ('adam', 'ademamix', 'eps_divide', 'apply')
    """

    type_name = "ademamix"
    default_name = "ademamix"
    stage = "moment"

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        extra = {"sig:bc1"} if self.args["slow_bias_correction"] else set()
        return frozenset({"update", "grad", *extra})
    hparams = {"beta3": HParam("beta3", checks.unit_interval), "alpha": HParam("alpha", checks.nonneg)}

    def __init__(self, beta3: float = 0.9999, alpha: float = 5.0, alpha_warmup: int | None = None,
                 beta3_warmup: int | None = None, beta_start: float = 0.9, slow_bias_correction: bool = False, *,
                 name: str | None = None) -> None:
        for arg, value in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{self.type_name}: {arg}={value!r} must be None or an int >= 1 (steps)")
        super().__init__(name=name, beta3=beta3, alpha=alpha, alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup,
                         beta_start=checks.number(self.type_name, "beta_start", beta_start, lo=0.0, hi=1.0,
                                                  lo_open=True, hi_open=True),
                         slow_bias_correction=checks.flag(self.type_name, "slow_bias_correction",
                                                          slow_bias_correction))

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg_slow": StateSpec(kind="signed", factorable=True)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        t, alpha = h.step, h.hp["alpha"]
        if h.hp["alpha_warmup"] is not None:
            alpha = alpha * min(t / h.hp["alpha_warmup"], 1.0)
        beta3 = _warmed_beta(h.hp["beta3"], h.hp["beta3_warmup"], h.hp["beta_start"], t)
        return {"beta3": beta3, "one_minus_beta3": 1.0 - beta3, "alpha": alpha}

    def update(self, b: Any) -> None:
        m2 = b.state("exp_avg_slow")
        F.lerp_(m2, b.grads, b.s("one_minus_beta3"))
        alpha = b.s("alpha")
        if self.args["slow_bias_correction"]:
            alpha = alpha / b.signals["bc1"]
        lazy = b.lazy_u
        if lazy is not None and lazy[1] is None:
            # u = m * scale still pending (Adam's m / (1 - b1^t)): u + alpha m2 = (m + (alpha/scale) m2) * scale
            # stays pending, so the denominator and the terminal still fold into one addcdiv
            num, _, scale = lazy
            mixed = torch._foreach_mul(m2, alpha / scale)
            torch._foreach_add_(mixed, num)
            b.set_u_scaled(mixed, scale)
            return
        F.add_scaled_(b.own_u(), m2, alpha)


@functools.lru_cache(maxsize=64)
def _warmup_sums(beta: float, warmup: int | None, start: float) -> tuple[float, ...]:
    """``S1_t = beta_t * S1_{t-1} + 1`` for t = 1..warmup, while beta_t still ramps (memoized; empty
    without a warm-up)."""
    out, s1 = [], 0.0
    for t in range(1, (warmup or 0) + 1 if beta > 0 else 1):
        s1 = _warmed_beta(beta, warmup, start, t) * s1 + 1.0
        out.append(s1)
    return tuple(out)


def _warmed_beta_sum(beta: float, warmup: int | None, start: float, t: int) -> float:
    """``S1_t``: the memoized warm-up part, then the closed form of the constant-beta recurrence
    (``S1_t = beta^k S1_W + (1 - beta^k) / (1 - beta)``, k = t - W): O(1) per step and memory bounded
    by the warm-up, however long the run."""
    prefix = _warmup_sums(beta, warmup, start)
    if t <= len(prefix):
        return prefix[t - 1]
    k, s0 = t - len(prefix), (prefix[-1] if prefix else 0.0)
    if beta >= 1.0:
        return s0 + k
    return beta ** k * s0 + (1.0 - beta ** k) / (1.0 - beta)


def _warmed_beta(beta: float, warmup: int | None, start: float, t: int) -> float:
    """The paper's half-life-linear schedule from ``start`` to ``beta`` over ``warmup`` steps."""
    if warmup is None or t >= warmup or beta <= 0:
        return beta
    frac = t / warmup
    return 0.5 ** (1.0 / (1.0 + (1.0 - frac) * _half_life(start) + frac * _half_life(beta)))


class SimplifiedAccumulator(Transform):
    """Simplified AdEMAMix's first moment (Morwani et al., arXiv 2502.02431): an accumulator instead
    of an EMA, mixed with the current gradient::

        m = beta1_t * m + g          u = m + alpha_grad * g

    Used with a second moment and no first moment, e.g.
    ``chain(scale_by_adam(betas=(0.0, 0.95)), simplified_accumulator(0.99, 100.0), eps_divide(1e-8), apply())``,
    which is the paper's ``(alpha*g + m) / (sqrt(v) + eps*sqrt(S2)) * sqrt(S2)`` with ``S2 = 1 - b2^t``.
    ``beta1_warmup=T`` ramps beta1 from ``min_beta1`` in half-life steps (as AdEMAMix's beta3).
    ``reference_scaling=True`` reproduces adv_optm's ``Simplified_AdEMAMix``: the update is further
    multiplied by ``1 / ((1 - beta1_t^t)/(1 - beta1_t) + alpha_grad)`` (published as ``lr_scale``, so
    weight decay shrinks by it too) and, with ``bias_correction``, by ``1/sqrt(S1)``,
    ``S1_t = beta1_t S1_{t-1} + 1``. State ``exp_avg``; fed by ``group["alpha_grad"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(betas=(0.0, 0.95)), ac.simplified_accumulator(), ac.eps_divide(), ac.apply()).names
    ('adam', 'simplified_accumulator', 'eps_divide', 'apply')
    """

    type_name = "simplified_accumulator"
    default_name = "simplified_accumulator"
    stage = "moment"
    reads = frozenset({"update", "grad"})
    writes = frozenset({"update", "sig:lr_scale"})
    optional_signals = frozenset({"sig:lr_scale"})
    hparams = {"beta1": HParam(None, checks.unit_interval), "alpha_grad": HParam("alpha_grad", checks.nonneg)}
    static_scalars = frozenset({"reference_scaling"})

    def __init__(self, beta1: float = 0.99, alpha_grad: float = 100.0, beta1_warmup: int | None = None,
                 min_beta1: float = 0.9, reference_scaling: bool = False, bias_correction: bool = True, *,
                 name: str | None = None) -> None:
        if beta1_warmup is not None and (not isinstance(beta1_warmup, int) or isinstance(beta1_warmup, bool)
                                         or beta1_warmup < 1):
            raise ValueError(f"{self.type_name}: beta1_warmup={beta1_warmup!r} must be None or an int >= 1 (steps)")
        super().__init__(name=name, beta1=beta1, alpha_grad=alpha_grad, beta1_warmup=beta1_warmup,
                         min_beta1=checks.number(self.type_name, "min_beta1", min_beta1, lo=0.0, hi=1.0,
                                                 lo_open=True, hi_open=True),
                         reference_scaling=checks.flag(self.type_name, "reference_scaling", reference_scaling),
                         bias_correction=checks.flag(self.type_name, "bias_correction", bias_correction))

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(kind="signed", factorable=True)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        hp, t = h.hp, h.step
        beta1 = _warmed_beta(hp["beta1"], hp["beta1_warmup"], hp["min_beta1"], t)
        out = {"beta1": beta1, "alpha_grad": hp["alpha_grad"], "reference_scaling": hp["reference_scaling"]}
        if hp["reference_scaling"]:
            geometric = (1.0 - beta1 ** t) / (1.0 - beta1) if beta1 < 1 else float(t)
            lr_scale = 1.0 / (geometric + hp["alpha_grad"])
            s1 = _warmed_beta_sum(hp["beta1"], hp["beta1_warmup"], hp["min_beta1"], t) \
                if hp["bias_correction"] else 1.0
            out.update(lr_scale=lr_scale, update_scale=lr_scale / math.sqrt(s1))
        return out

    def update(self, b: Any) -> None:
        m = b.state("exp_avg")
        torch._foreach_mul_(m, b.s("beta1"))
        torch._foreach_add_(m, b.grads)
        u = torch._foreach_mul(b.grads, b.s("alpha_grad"))
        torch._foreach_add_(u, m)
        if b.s("reference_scaling"):
            torch._foreach_mul_(u, b.s("update_scale"))
            b.signals["lr_scale"] = b.s("lr_scale")
        b.set_u(u)


ademamix = AdEMAMix
simplified_accumulator = SimplifiedAccumulator
