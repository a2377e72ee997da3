"""Transforms of torch-optimi's optimizers: RAdam, Adan, StableAdamW's update clipping, Lookahead.

optimi folds Adam's bias correction into the decay rates ("debiased betas",
``beta_t = beta * (1 - beta^(t-1)) / (1 - beta^t)``): an average kept with ``beta_t`` *is* the
bias-corrected average, with no separate division. :func:`scale_by_radam` and :func:`scale_by_adan`
keep their moments that way, so their state holds bias-corrected averages (as optimi's does) and
their numbers match optimi's to rounding. :func:`stable_clip` composes with :func:`scale_by_adam`
(whose ``u = m / (1 - b1^t)`` and ``denom = sqrt(v / (1 - b2^t))`` are the same quantities).
"""
from __future__ import annotations

import math
import struct
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.numerics import stochastic_round
from .._core.transform import HParam, HostView, StateSpec, Transform, transform_from_config
from .apply import _LOW_PRECISION, Apply, KahanApply, StochasticRoundApply, _Terminal

Tensors = list[torch.Tensor]


def debiased_beta(beta: float, step: int) -> float:
    """optimi's debiased decay rate ``beta * (1 - beta^(t-1)) / (1 - beta^t)`` (0 on the first step):
    an average kept with it equals Adam's bias-corrected ``m_t / (1 - beta^t)``.

    >>> debiased_beta(0.9, 1), round(debiased_beta(0.9, 2), 6)
    (0.0, 0.473684)
    """
    if beta == 0.0:
        return 0.0
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta ** step)


def _beta_triple(owner: str, arg: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{owner}: {arg}={value!r} must be a triple (beta1, beta2, beta3), each in [0, 1)")
    return checks.betas(owner, arg, value)  # type: ignore[return-value]


def _fp32_round(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _fp32(xs: Tensors) -> Tensors:
    return xs if xs[0].dtype == torch.float32 else [x.float() for x in xs]


# -- RAdam ---------------------------------------------------------------------------------------------
class ScaleByRAdam(Transform):
    """RAdam's rectified direction (Liu et al., "On the Variance of the Adaptive Learning Rate and
    Beyond", arXiv 1908.03265), as torch-optimi computes it (debiased betas, ``eps`` outside the root)::

        m = b1_t*m + (1-b1_t)*g ;  v = b2_t*v + (1-b2_t)*g^2      (b_t: debiased betas, see module doc)
        rho_inf = 2/(1-b2) - 1 ;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
        rho_t > threshold:  u = r_t * m / (sqrt(v) + eps),
                            r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))
        otherwise:          u = m        (the variance is not tractable yet: SGD with momentum)

    Defaults are optimi's: ``betas=(0.9, 0.99)``, ``eps=1e-6``, ``threshold=5`` (optimi and torch
    both use 5; it must be >= 4 so that ``r_t`` is real). With ``b2 = 0.99`` the first five steps
    take the momentum fallback. The direction is final (no denominator is published). State
    ``exp_avg``, ``exp_avg_sq`` (bias-corrected averages); fed by ``group["betas"]``/``group["eps"]``.

    >>> import adv_chain as ac
    >>> from adv_chain.transforms import scale_by_radam
    >>> ac.chain(scale_by_radam(), ac.weight_decay(0.01), ac.apply()).names
    ('radam', 'weight_decay', 'apply')
    """

    type_name = "scale_by_radam"
    default_name = "radam"
    stage = "moment"
    hparams = {"betas": HParam("betas", checks.beta_pair), "eps": HParam("eps", checks.nonneg)}
    static_scalars = frozenset({"rectified"})

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-6, threshold: float = 5.0, *,
                 name: str | None = None) -> None:
        super().__init__(name=name, betas=betas, eps=eps,
                         threshold=checks.number(self.type_name, "threshold", threshold, lo=4.0))

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(kind="signed", factorable=True),
                "exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        t = h.step
        b1_t, b2_t = debiased_beta(b1, t), debiased_beta(b2, t)
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho = rho_inf - 2.0 * t * b2 ** t / (1.0 - b2 ** t) if b2 > 0 else 1.0
        rectified = rho > h.hp["threshold"]
        rect = (math.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
                if rectified else 0.0)
        return {"one_minus_b1": 1.0 - b1_t, "b2": b2_t, "one_minus_b2": 1.0 - b2_t, "eps": h.hp["eps"],
                "rectified": rectified, "rect": rect}

    def update(self, b: Any) -> None:
        g = b.u
        m, v = b.state("exp_avg"), b.state("exp_avg_sq")
        F.lerp_(m, g, b.s("one_minus_b1"))
        torch._foreach_mul_(v, b.s("b2"))
        F.addcmul_(v, g, g, b.s("one_minus_b2"))
        if not b.s("rectified"):  # momentum SGD until the variance of the adaptive rate is tractable
            b.set_u(m, owned=False)
            return
        denom = torch._foreach_sqrt(v)
        F.add_scalar_(denom, b.s("eps"))
        b.set_u_scaled(m, b.s("rect"))  # u = rect * m / denom, left to the terminal's addcdiv
        b.divide_u_(denom)


# -- Adan ----------------------------------------------------------------------------------------------
class ScaleByAdan(Transform):
    """Adan's direction (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm", arXiv 2208.06677),
    in torch-optimi's convention (``betas`` are the decay rates kept, i.e. one minus the paper's)::

        d_g = g - g_prev                 (0 on the first step)
        m = b1_t*m + (1-b1_t)*g          v = b2_t*v + (1-b2_t)*d_g
        n = b3_t*n + (1-b3_t)*(g + b2*d_g)^2            (b_t: debiased betas, see module doc)
        u = (m + b2*v) / (sqrt(n) + eps)

    Defaults are optimi's: ``betas=(0.98, 0.92, 0.99)``, ``eps=1e-6``. Adan's own weight decay is
    proximal, ``p <- (p - lr*u) / (1 + lr*wd)``: follow this transform with :func:`proximal_wd`
    (or :func:`weight_decay` for optimi's ``adam_wd=True``). State ``exp_avg``, ``exp_avg_diff``,
    ``exp_avg_sq`` (bias-corrected) and ``prev_grad``; fed by ``group["betas"]``/``group["eps"]``.

    >>> import adv_chain as ac
    >>> from adv_chain.transforms import proximal_wd, scale_by_adan
    >>> ac.chain(scale_by_adan(), proximal_wd(0.02), ac.apply()).names
    ('adan', 'proximal_wd', 'apply')
    """

    type_name = "scale_by_adan"
    default_name = "adan"
    stage = "moment"
    hparams = {"betas": HParam("betas", _beta_triple), "eps": HParam("eps", checks.nonneg)}
    static_scalars = frozenset({"first"})

    def __init__(self, betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-6, *,
                 name: str | None = None) -> None:
        super().__init__(name=name, betas=betas, eps=eps)

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(kind="signed", factorable=True),
                "exp_avg_diff": StateSpec(kind="signed", factorable=True),
                "exp_avg_sq": StateSpec(kind="nonneg", factorable=True),
                "prev_grad": StateSpec(kind="signed")}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2, b3 = h.hp["betas"][:3]
        t = h.step
        return {"first": t == 1, "one_minus_b1": 1.0 - debiased_beta(b1, t), "b2": b2,
                "one_minus_b2": 1.0 - debiased_beta(b2, t), "b3": debiased_beta(b3, t),
                "one_minus_b3": 1.0 - debiased_beta(b3, t), "eps": h.hp["eps"]}

    def update(self, b: Any) -> None:
        g = b.u
        m, v, n, prev = (b.state(k) for k in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"))
        if b.s("first"):  # no previous gradient yet: the difference is zero
            torch._foreach_copy_(prev, g)
        diff = torch._foreach_sub(g, prev)
        F.lerp_(m, g, b.s("one_minus_b1"))
        F.lerp_(v, diff, b.s("one_minus_b2"))
        torch._foreach_mul_(diff, b.s("b2"))  # diff becomes g + b2 * (g - g_prev)
        torch._foreach_add_(diff, g)
        torch._foreach_mul_(n, b.s("b3"))
        F.addcmul_(n, diff, diff, b.s("one_minus_b3"))
        torch._foreach_copy_(prev, g)
        denom = torch._foreach_sqrt(n)
        F.add_scalar_(denom, b.s("eps"))
        u = torch._foreach_mul(v, b.s("b2"))
        torch._foreach_add_(u, m)
        torch._foreach_div_(u, denom)
        b.set_u(u)


class ProximalWeightDecay(Transform):
    """Proximal (Adan-style) weight decay: the step is taken first, then the weights shrink,
    ``p <- (p - lr*u) / (1 + c)`` with ``c = lr * weight_decay``, or ``weight_decay * lr / max_lr``
    given ``max_lr`` (optimi's fully decoupled ``decouple_lr``). Multiplied by an ``lr_scale`` signal
    when one was published. It divides everything the terminal will apply (the update and the decay
    terms of the transforms before it), so place it last before the terminal. Default ``0.02`` is
    optimi's Adan default. Fed by ``group["weight_decay"]``. (Xie et al., arXiv 2208.06677, Alg. 1.)

    >>> import adv_chain as ac
    >>> from adv_chain.transforms import proximal_wd, scale_by_adan
    >>> ac.chain(scale_by_adan(), proximal_wd(0.02, max_lr=1e-3), ac.apply()).names
    ('adan', 'proximal_wd', 'apply')
    """

    type_name = "proximal_wd"
    default_name = "proximal_wd"
    stage = "decay"
    reads = frozenset({"param", "update", "decay"})
    writes = frozenset({"update", "decay"})
    hparams = {"weight_decay": HParam("weight_decay", checks.nonneg)}

    def __init__(self, weight_decay: float = 0.02, max_lr: float | None = None, *, name: str | None = None) -> None:
        if max_lr is not None:
            max_lr = checks.positive(self.type_name, "max_lr", max_lr)
        super().__init__(name=name, weight_decay=weight_decay, max_lr=max_lr)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        wd, max_lr = h.hp["weight_decay"], h.hp["max_lr"]
        c = wd * h.lr if max_lr is None else wd * h.lr / max_lr
        # 1 / (1 + c) with the divisor rounded to fp32, the number an fp32 division (optimi's) uses:
        # the factor is the same every step, so its rounding error would otherwise add up
        return {"c": c, "shrink": 1.0 / _fp32_round(1.0 + c)}

    def update(self, b: Any) -> None:
        c, shrink = b.s("c"), b.s("shrink")
        scale = b.signals.get("lr_scale")
        if scale is not None:
            c = c * scale
            shrink = 1.0 / (1.0 + c)
        elif F.is_zero(c):
            return
        F.scale_(b.own_u(), shrink)
        if b.decay is not None:
            F.scale_(b.decay, shrink)
        # p * (1 - c_old) * shrink  ==  p * (1 - c_new)
        coef = b.decay_coef
        b.decay_coef = ([1.0 - (1.0 - x) * shrink for x in coef] if isinstance(coef, list)
                        else 1.0 - (1.0 - coef) * shrink)


# -- StableAdamW ---------------------------------------------------------------------------------------
_RATIO_SLICE = 1 << 18  # elements per slice of the RMS pass: 1 MB of fp32, resident in L2


def _ratio_norms(denom: list[torch.Tensor], grads: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """Per tensor ``||g / max(denom, eps)||``, slice by slice through one cache-sized scratch buffer
    (a full-size temporary would cost a fresh allocation, and its page faults, per tensor per step)."""
    longest = max(d.numel() for d in denom)
    scratch = torch.empty(min(longest, _RATIO_SLICE), dtype=torch.float32, device=denom[0].device)
    out = []
    for d, g in zip(denom, grads):
        df, gf = d.reshape(-1), g.reshape(-1)
        n = df.numel()
        total = torch.zeros((), dtype=torch.float32, device=d.device)
        for start in range(0, n, _RATIO_SLICE):
            end = min(n, start + _RATIO_SLICE)
            buf = scratch[:end - start]
            torch.clamp_min(df[start:end], eps, out=buf)
            torch.div(gf[start:end], buf, out=buf)
            total += torch.dot(buf, buf)
        out.append(total.sqrt_())
    return out


class StableClip(Transform):
    """StableAdamW's update clipping (Wortsman et al., "Stable and low-precision training for
    large-scale vision-language models", arXiv 2304.13013), as torch-optimi computes it. Consumes
    Adam's denominator like :func:`eps_divide` and, per tensor, scales the whole step::

        u = u / (denom + eps)                       (denom = sqrt(v / (1 - b2^t)), from scale_by_adam)
        RMS = sqrt(mean(g^2 / max(denom^2, eps^2)))  (g: the reference gradient, one value per tensor)
        s = 1 / max(1, RMS)
        u <- s * u ;  every decay term (weight_decay's p * c included) <- s * term

    i.e. the tensor's learning rate is ``lr / max(1, RMS)`` for the update and the decoupled decay
    alike. It must see the decay terms, so place it after the decay transforms, right before the
    terminal (a decay transform after it is not clipped). ``eps=1e-6`` is optimi's default. Needs
    whole tensors (``"tensor"`` scope). Fed by ``group["eps"]``.

    >>> import adv_chain as ac
    >>> from adv_chain.transforms import stable_clip
    >>> ac.chain(ac.scale_by_adam(betas=(0.9, 0.99)), ac.weight_decay(0.01), stable_clip(), ac.apply()).names
    ('adam', 'weight_decay', 'stable_clip', 'apply')
    """

    type_name = "stable_clip"
    default_name = "stable_clip"
    stage = "normalize"
    scope = "tensor"
    reads = frozenset({"update", "grad", "param", "decay", "sig:denom"})
    writes = frozenset({"update", "decay"})
    consumes = frozenset({"sig:denom"})
    hparams = {"eps": HParam("eps", checks.nonneg)}

    def __init__(self, eps: float = 1e-6, *, name: str | None = None) -> None:
        super().__init__(name=name, eps=eps)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"eps": h.hp["eps"]}

    def update(self, b: Any) -> None:
        denom = b.take_denom()
        eps = b.s("eps")
        if F.is_tensor(eps):  # compiled: one fused kernel computes the ratio anyway
            ratio = torch._foreach_maximum(denom, [eps] * len(denom))
            torch._foreach_reciprocal_(ratio)
            torch._foreach_mul_(ratio, b.grads)  # g / max(denom, eps): its mean square is the RMS^2
            clip = torch._foreach_norm(ratio)
            del ratio
        else:
            clip = _ratio_norms(denom, b.grads, eps)
        torch._foreach_div_(clip, [math.sqrt(max(x.numel(), 1)) for x in denom])
        torch._foreach_clamp_min_(clip, 1.0)  # one 0-d value per tensor: max(1, RMS)
        # u / ((denom + eps) * max(1, RMS)): the clip rides on the denominator (no extra pass over
        # u, and Adam's u may still be left to the terminal's addcdiv)
        F.add_scalar_(denom, eps)
        torch._foreach_mul_(denom, clip)
        b.divide_u_(denom)
        inv = torch._foreach_reciprocal(clip)
        if b.decay is not None:
            torch._foreach_mul_(b.decay, inv)
        coef = b.decay_coef
        if not F.is_zero(coef):
            # the terminal's p * (1 - c) becomes p * (1 - c / max(1, RMS)), one coefficient per tensor
            b.decay_coef = list(torch._foreach_mul(inv, coef))


# -- Lookahead -----------------------------------------------------------------------------------------
def _lookahead_k(owner: str, arg: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {arg}={value!r} must be an int >= 1 (steps between synchronizations)")
    return value


class Lookahead(_Terminal):
    """Lookahead (Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", arXiv 1907.08610)
    around any terminal: ``inner`` writes the fast weights ``p`` every step; every ``k``-th step of a
    parameter (after that write) the slow weights ``phi`` move toward them and the fast weights
    restart from there::

        phi <- phi + alpha * (p - phi) ;  p <- phi          (when step % k == 0)

    ``phi`` starts as the parameter at its first step (state ``slow_params``, fp32 for bf16/fp16
    parameters). With a low-precision ``inner``: :func:`kahan_apply`'s fast weight is ``p + comp``
    and after the sync its compensation holds ``phi - round(phi)``; :func:`stochastic_round_apply`
    rounds ``phi`` stochastically (the same noise key as that step's write); :func:`apply` rounds
    to nearest. Defaults ``k=6``, ``alpha=0.5`` (optimi's Ranger); both may be overridden per param
    group as ``"lookahead.k"``/``"lookahead.alpha"``. The state keys of ``inner`` live under this
    transform's name (``"lookahead/kahan_comp"``).

    >>> import adv_chain as ac
    >>> from adv_chain.transforms import lookahead
    >>> c = ac.chain(ac.momentum(0.9), lookahead(ac.kahan_apply(), k=5, alpha=0.8))
    >>> c.names, c["lookahead"]
    (('momentum', 'lookahead'), lookahead(inner=kahan_apply(), k=5, alpha=0.8))
    >>> ac.chain_from_config(c.to_config()) == c
    True
    """

    type_name = "lookahead"
    default_name = "lookahead"
    hparams = {"k": HParam(None, _lookahead_k), "alpha": HParam(None, checks.closed_unit)}

    def __init__(self, inner: "Transform | Mapping[str, Any] | None" = None, k: int = 6, alpha: float = 0.5, *,
                 seed: int | None = None, name: str | None = None) -> None:
        if inner is None:
            inner = Apply()
        elif isinstance(inner, Mapping):  # from to_config
            inner = transform_from_config(inner)
        if not isinstance(inner, _Terminal) or isinstance(inner, Lookahead):
            raise ValueError(f"{self.type_name}: inner={inner!r} must be a terminal (ac.apply(), "
                             "ac.stochastic_round_apply() or ac.kahan_apply()), not a lookahead or another transform")
        extra: dict[str, Any] = {}
        if "seed" in inner.args:  # mirrored: the optimizer reads the terminal's seed for its noise keys
            if seed is not None and seed != inner.args["seed"]:
                raise ValueError(f"{self.type_name}: seed={seed!r} differs from the inner terminal's "
                                 f"seed={inner.args['seed']!r}; set the seed on the inner terminal")
            extra["seed"] = inner.args["seed"]
        super().__init__(name=name, inner=inner, k=k, alpha=alpha, **extra)

    @property
    def needs_noise(self) -> bool:  # type: ignore[override]
        return self.args["inner"].needs_noise

    @property
    def static_scalars(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"sync"}) | self.args["inner"].static_scalars

    def non_default_args(self) -> dict[str, Any]:
        out = super().non_default_args()
        out.pop("seed", None)
        if out.get("inner") == Apply():
            del out["inner"]
        return out

    def to_config(self) -> dict[str, Any]:
        return {"type": self.type_name, "name": self.name,
                "args": {"inner": self.args["inner"].to_config(), "k": self.args["k"],
                         "alpha": self.args["alpha"]}}

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {**self.args["inner"].state_specs(param, {}), "slow_params": StateSpec(init="param", kind="any")}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {**self.args["inner"].host_scalars(h), "sync": h.step % h.hp["k"] == 0, "alpha": h.hp["alpha"]}

    def update(self, b: Any) -> None:
        if b.skip_apply:
            return
        inner = self.args["inner"]
        inner.update(b)  # the fast weights' write (its scalars and state are under this name)
        if not b.s("sync"):
            return
        params, slow = b.params, b.state("slow_params")
        low = params[0].dtype in _LOW_PRECISION
        kahan = low and isinstance(inner, KahanApply)
        fast = [p.float() for p in params] if low else params
        if kahan:
            torch._foreach_add_(fast, b.state("kahan_comp"))  # the exact fast weights
        step = torch._foreach_sub(fast, slow)
        F.add_scaled_(slow, step, b.s("alpha"))
        if not low:
            torch._foreach_copy_(params, slow)
        elif isinstance(inner, StochasticRoundApply):
            rounded = [stochastic_round(x, params[0].dtype, off, key)
                       for x, off, key in zip(slow, b.offsets, b.noise_keys)]
            torch._foreach_copy_(params, rounded)
        else:
            torch._foreach_copy_(params, slow)
        if kahan:  # carry the rounding error of the new fast weights
            comp = b.state("kahan_comp")
            torch._foreach_copy_(comp, torch._foreach_sub(slow, [p.float() for p in params]))


scale_by_radam = ScaleByRAdam
scale_by_adan = ScaleByAdan
proximal_wd = ProximalWeightDecay
stable_clip = StableClip
lookahead = Lookahead
