"""Moment transforms: they keep running averages of the incoming direction and emit a new one."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform
from .normalize import _eps_or_none, auto_eps_specs, eps_operand, eps_scalars


_ADAM_HPARAMS = {"betas": HParam("betas", checks.beta_pair), "amsgrad": HParam("amsgrad", checks.flag)}
_ADAM_HPARAMS_EPS = {**_ADAM_HPARAMS, "eps": HParam("eps", _eps_or_none)}
_NORMED_MODES = (None, "eps", "atan2")


def signal_ema_(v: list[torch.Tensor], g: list[torch.Tensor], beta2: list[torch.Tensor]) -> None:
    """``v = beta2 * v + (1 - beta2) * g^2`` with the ``beta2`` signal of :func:`kourkoutas_beta`: per
    tensor of the bucket a 0-d tensor, or a tensor broadcastable to it (an adapter's ``(rows, 1)`` /
    ``(1, cols)`` beta2 when the tensor is the whole parameter, the slice's own values on a slice)."""
    numbers = [F.host_number(x) for x in beta2]
    if not any(F.is_tensor(x) for x in numbers):  # on the CPU: fused scalar-list ops, no temporary
        torch._foreach_mul_(v, numbers)
        torch._foreach_addcmul_(v, g, g, [1.0 - x for x in numbers])
        return
    torch._foreach_mul_(v, beta2)
    sq = torch._foreach_mul(g, g)
    torch._foreach_mul_(sq, [1.0 - x for x in beta2])
    torch._foreach_add_(v, sq)


class ScaleByAdam(Transform):
    """Adam's moments (Kingma & Ba, arXiv 1412.6980). Publishes the denominator, does not divide.

    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g^2``; emits ``u = m / (1-b1^t)`` and publishes
    ``denom = sqrt(v) / sqrt(1-b2^t)`` for a consumer (:func:`eps_divide`).
    ``amsgrad=True`` uses the running maximum of ``v`` (Reddi et al., 2018) as torch does (a param
    group may set it, as torch allows);
    ``bias_correction=False`` drops both corrections. With ``beta1 = 0`` no first moment is kept and
    the gradient passes through (the second-moment half, e.g. under :func:`simplified_accumulator`).
    ``nesterov=True`` emits ``(c*m + (1-c)*g) / (1-b1^t)`` with ``c = nesterov_coef`` (default beta1),
    adv_optm's universal Nesterov form.
    ``betas`` is fed by ``group["betas"]``.

    ``normed_momentum`` (adv_optm's normalization-then-momentum, spec §4.2/§2.1; default ``None``,
    off) normalizes the gradient by the *current* denominator before it enters the first moment,
    and the moment is the finished direction::

        v = b2*v + (1-b2)*g^2 ;  D = sqrt(v) / sqrt(1-b2^t)        (v first, as without the option)
        x = g / (D + eps)               normed_momentum="eps"   (True is the same)
        x = atan2(g, D)                 normed_momentum="atan2" (no eps)
        m = b1*m + (1-b1)*x ;  u = A * m / (1-b1^t)    (nesterov: A * (c*m + (1-c)*x) / (1-b1^t))

    with ``A = 4/pi`` for atan2 (adv_optm's scale, as :func:`atan2_scale`'s default) and 1 otherwise;
    ``beta1 = 0`` emits ``A * x``. No denominator is published then, so no :func:`eps_divide` or
    :func:`atan2_scale` may follow (the chain refuses one: it would divide twice); with
    ``publish_denom=True`` ``D`` is published as an optional signal for a reader such as
    :func:`fisher_wd`. ``eps`` is used by ``"eps"`` only, where it is fed by ``group["eps"]``;
    ``eps=None`` is adv_optm's scale-invariant ``1/sqrt(N)`` per tensor (as :func:`eps_divide`'s).
    ``x`` is a new tensor: unlike adv_optm, which normalizes ``p.grad`` in place, the user's
    gradient is never written.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(betas=(0.9, 0.95)), ac.eps_divide(1e-8), ac.apply()).names
    ('adam', 'eps_divide', 'apply')
    >>> ac.chain(ac.scale_by_adam(normed_momentum="atan2"), ac.apply()).names
    ('adam', 'apply')
    """

    type_name = "scale_by_adam"
    default_name = "adam"
    stage = "moment"
    optional_signals = frozenset({"sig:bc1"})
    consumes = frozenset({"sig:beta2"})  # kourkoutas_beta's beta2 when present (see signal_ema_)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), amsgrad: bool = False,
                 bias_correction: bool = True, nesterov: bool = False, nesterov_coef: float | None = None,
                 normed_momentum: bool | str | None = None, eps: float | None = 1e-8, publish_denom: bool = False, *,
                 name: str | None = None) -> None:
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(self.type_name, "nesterov_coef", nesterov_coef)
        if isinstance(normed_momentum, bool):  # True: divide by (D + eps), as adv_optm's default
            normed_momentum = "eps" if normed_momentum else None
        elif normed_momentum is not None and not (isinstance(normed_momentum, str) and normed_momentum in _NORMED_MODES):
            raise ValueError(f"{self.type_name}: normed_momentum={normed_momentum!r} is not one of "
                             f"{(*_NORMED_MODES, True, False)}")
        if eps is None and normed_momentum != "eps":
            raise ValueError(f"{self.type_name}: eps=None (the scale-invariant 1/sqrt(N)) is only used with "
                             "normed_momentum='eps'; without it, pass eps=None to the eps_divide that follows")
        extra = {}
        if checks.flag(self.type_name, "publish_denom", publish_denom):
            if normed_momentum is None:
                raise ValueError(f"{self.type_name}: publish_denom=True is for normed_momentum (without it the "
                                 "denominator is always published)")
            extra["publish_denom"] = True
        super().__init__(name=name, betas=betas, amsgrad=checks.flag(self.type_name, "amsgrad", amsgrad),
                         bias_correction=checks.flag(self.type_name, "bias_correction", bias_correction),
                         nesterov=checks.flag(self.type_name, "nesterov", nesterov), nesterov_coef=nesterov_coef,
                         normed_momentum=normed_momentum,
                         eps=_eps_or_none(self.type_name, "eps", eps), **extra)

    @property
    def hparams(self) -> Mapping[str, HParam]:  # type: ignore[override]
        # eps is a runtime hyperparameter (fed by group["eps"]) only when this transform divides by it;
        # otherwise group["eps"] belongs to the normalizer that follows (eps_divide)
        args = self.__dict__.get("args")
        return _ADAM_HPARAMS_EPS if args is not None and args["normed_momentum"] == "eps" else _ADAM_HPARAMS

    @property
    def writes(self) -> frozenset[str]:  # type: ignore[override]
        if self.args["normed_momentum"] is not None and not self.args.get("publish_denom"):
            return frozenset({"update", "sig:bc1"})  # the direction is final: nothing left to divide by
        return frozenset({"update", "sig:denom", "sig:bc1"})

    @property
    def optional_signals(self) -> frozenset[str]:  # type: ignore[override]
        # a normed direction's denominator is for a reader such as fisher_wd, not for a normalizer
        return frozenset({"sig:bc1", "sig:denom"}) if self.args.get("publish_denom") else frozenset({"sig:bc1"})

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        specs = {"exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}
        if hp["normed_momentum"] == "eps":
            specs.update(auto_eps_specs(hp["eps"]))
        if hp["betas"][0] != 0:
            specs["exp_avg"] = StateSpec(kind="signed", factorable=True)
        if hp["amsgrad"]:
            specs["max_exp_avg_sq"] = StateSpec(kind="nonneg", factorable=True)
        return specs

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        bc1 = 1.0 - b1 ** h.step if h.hp["bias_correction"] else 1.0
        bc2 = 1.0 - b2 ** h.step if h.hp["bias_correction"] else 1.0
        c = b1 if h.hp["nesterov_coef"] is None else h.hp["nesterov_coef"]
        a = 4.0 / math.pi if h.hp["normed_momentum"] == "atan2" else 1.0  # scale of a normed direction
        return {"one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2,
                "m_scale": a / bc1, "bc1": bc1, "sqrt_bc2": math.sqrt(bc2), "amsgrad": h.hp["amsgrad"],
                "first_moment": b1 != 0, "nesterov": h.hp["nesterov"] and b1 != 0,
                "nesterov_m": a * c / bc1, "nesterov_g": a * (1.0 - c) / bc1, "normed_scale": a,
                **eps_scalars(h.hp["eps"])}

    static_scalars = frozenset({"amsgrad", "first_moment", "nesterov", "auto_eps"})

    def update(self, b: Any) -> None:
        g = b.u
        v = b.state("exp_avg_sq")
        normed = self.args["normed_momentum"]
        if b.s("first_moment") and normed is None:
            m = b.state("exp_avg")
            F.lerp_(m, g, b.s("one_minus_b1"))
        beta2 = b.signals.pop("beta2", None)
        if beta2 is None:
            torch._foreach_mul_(v, b.s("b2"))
            F.addcmul_(v, g, g, b.s("one_minus_b2"))
        else:  # kourkoutas_beta's beta2; the bias correction stays static
            signal_ema_(v, g, beta2)
        if b.s("amsgrad"):
            v_max = b.state("max_exp_avg_sq")
            torch._foreach_maximum_(v_max, v)
            v = v_max
        denom = F.sqrt(v, b.pool, "adam:denom")
        if normed is not None:
            torch._foreach_div_(denom, b.s("sqrt_bc2"))
            # normalize a copy of the gradient by the current denominator (never p.grad in place)
            if self.args.get("publish_denom"):  # D = sqrt(v / (1 - b2^t)) as is, for fisher_wd
                b.publish_denom(denom)
            if normed == "atan2":  # torch has no multi-tensor atan2: one op per tensor (fused under compile)
                g = [torch.atan2(x, d) for x, d in zip(g, denom)]
            else:
                eps = eps_operand(b, len(denom))
                if self.args.get("publish_denom"):  # D stays published: divide by a copy with eps
                    g = torch._foreach_div(g, torch._foreach_add(denom, eps))
                else:
                    torch._foreach_add_(denom, eps)
                    g = torch._foreach_div(g, denom)
            if b.s("first_moment"):
                m = b.state("exp_avg")
                F.lerp_(m, g, b.s("one_minus_b1"))
        if b.s("nesterov"):  # (c*m + (1-c)*g) / (1 - b1^t)
            u = torch._foreach_mul(m, b.s("nesterov_m"))
            F.add_scaled_(u, g, b.s("nesterov_g"))
            b.set_u(u)
        elif b.s("first_moment"):
            b.set_u_scaled(m, b.s("m_scale"))
        elif normed is not None:  # beta1 = 0: the normalized gradient itself (a fresh tensor)
            F.scale_(g, b.s("normed_scale"))
            b.set_u(g)
        # else (beta1 = 0, not normed): the direction is the gradient itself (no exp_avg is kept)
        if normed is None:
            b.publish_denom(denom, b.s("sqrt_bc2"))  # sqrt(v / (1 - b2^t)), divided when consumed
        b.signals["bc1"] = b.s("bc1")


class Momentum(Transform):
    """Heavy-ball momentum exactly as ``torch.optim.SGD``.

    ``buf = momentum*buf + (1-dampening)*g`` (on the first step ``buf = g``); emits ``buf``, or with
    ``nesterov=True`` emits ``g + momentum*buf``. With ``momentum=0`` it passes ``g`` through and keeps
    no state. Fed by ``group["momentum"]``, ``group["dampening"]``, ``group["nesterov"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.momentum(0.9, nesterov=True), ac.apply()).names
    ('momentum', 'apply')
    """

    type_name = "momentum"
    default_name = "momentum"
    stage = "moment"
    hparams = {"momentum": HParam("momentum", checks.unit_interval),
               "dampening": HParam("dampening", checks.closed_unit),
               "nesterov": HParam("nesterov", checks.flag)}
    static_scalars = frozenset({"active", "nesterov"})

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False, *,
                 name: str | None = None) -> None:
        super().__init__(name=name, momentum=momentum, dampening=dampening, nesterov=nesterov)
        self.check_hparams(self.type_name, self.args)

    def check_hparams(self, owner: str, hp: Any) -> None:
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov=True requires momentum > 0 and dampening = 0 "
                             f"(got momentum={hp['momentum']}, dampening={hp['dampening']})")

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        return {"momentum_buffer": StateSpec(kind="signed", factorable=True)} if hp["momentum"] != 0 else {}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        mu = h.hp["momentum"]
        first = h.step == 1
        return {"active": mu != 0, "nesterov": h.hp["nesterov"], "momentum": 0.0 if first else mu,
                "mu": mu, "grad_coef": 1.0 if first else 1.0 - h.hp["dampening"]}

    def update(self, b: Any) -> None:
        if not b.s("active"):
            return
        g = b.u
        buf = b.state("momentum_buffer")
        torch._foreach_mul_(buf, b.s("momentum"))
        F.add_scaled_(buf, g, b.s("grad_coef"))
        if b.s("nesterov"):
            u = torch._foreach_mul(buf, b.s("mu"))
            torch._foreach_add_(u, g)
            b.set_u(u)
        else:
            b.set_u(buf, owned=False)


class ScaleByLion(Transform):
    """Lion's sign update (Chen et al., arXiv 2302.06675), as lion-pytorch computes it.

    ``u = sign(b1*m + (1-b1)*g)``, then ``m = b2*m + (1-b2)*g``. Fed by ``group["betas"]``.
    ``sign=False`` emits ``b1*m + (1-b1)*g`` itself, for another projection to follow
    (:func:`lion_k`, :func:`stochastic_sign`).

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_lion(betas=(0.9, 0.99)), ac.weight_decay(0.1), ac.apply()).names
    ('lion', 'weight_decay', 'apply')
    """

    type_name = "scale_by_lion"
    default_name = "lion"
    stage = "moment"
    hparams = {"betas": HParam("betas", checks.beta_pair)}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99), sign: bool = True, *,
                 name: str | None = None) -> None:
        super().__init__(name=name, betas=betas, sign=checks.flag(self.type_name, "sign", sign))

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(kind="signed", factorable=True)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        return {"b1": b1, "one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2}

    def update(self, b: Any) -> None:
        g = b.u
        m = b.state("exp_avg")
        u = torch._foreach_mul(m, b.s("b1"))
        F.add_scaled_(u, g, b.s("one_minus_b1"))
        if self.args["sign"]:
            torch._foreach_sign_(u)
        torch._foreach_mul_(m, b.s("b2"))
        F.add_scaled_(m, g, b.s("one_minus_b2"))
        b.set_u(u)


class ScaleByAdopt(Transform):
    """ADOPT (Taniguchi et al., arXiv 2411.02853): normalize the gradient by the *previous* second
    moment, then take momentum; no bias correction::

        step 1:  v = g^2                         (initialization only: skip_first=True writes nothing)
        n = clamp(g / (sqrt(v) + eps), -lam, lam),   lam = (t + clip_step_offset) ** clip_exponent
        m = b1*m + (1-b1)*n ;  u = m  (b1 = 0: u = n)
        v = b2*v + (1-b2)*g^2

    ``t`` counts steps from 1 including the initialization, so the default ``clip_step_offset=0`` is
    the paper's clip (first real clip ``2**0.25``); ``-1`` is adv_optm's (first real clip 1).
    ``clip_exponent=None`` disables the clip. ``use_atan2=True`` replaces the division and clip by
    ``(4/pi) * atan2(g, sqrt(v))`` (adv_optm's Adopt-atan2). Fed by ``group["betas"]``/``group["eps"]``.

    ``nesterov=True``: ``u = c*m + (1-c)*n`` with ``c = nesterov_coef`` (default ``b1``) - the
    normalized gradient ``n``, where adv_optm mixes in the raw ``g`` (its bug B3: mismatched units).
    A ``beta2`` signal (from :func:`kourkoutas_beta`: per tensor, or per row/column of a LoRA/OFT
    adapter) replaces ``b2`` in the ``v`` update.
    ``publish_denom=True`` publishes ``sqrt(v_{t-1})`` as the optional ``denom`` signal (for
    :func:`fisher_wd`; nothing else consumes it).

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adopt(), ac.apply()).names
    ('adopt', 'apply')
    """

    type_name = "scale_by_adopt"
    default_name = "adopt"
    stage = "moment"
    hparams = {"betas": HParam("betas", checks.beta_pair), "eps": HParam("eps", checks.nonneg)}
    static_scalars = frozenset({"first", "init_only", "first_moment", "clip", "use_atan2", "nesterov"})
    consumes = frozenset({"sig:beta2"})  # kourkoutas_beta's beta2 when present (see signal_ema_)
    optional_signals = frozenset({"sig:denom"})

    def __init__(self, betas: tuple[float, float] = (0.9, 0.9999), eps: float = 1e-6,
                 clip_exponent: float | None = 0.25, clip_step_offset: int = 0, use_atan2: bool = False,
                 skip_first: bool = True, nesterov: bool = False, nesterov_coef: float | None = None,
                 publish_denom: bool = False, *, name: str | None = None) -> None:
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(self.type_name, "nesterov_coef", nesterov_coef)
        extra = {}  # only non-default options enter args, so older configs and reprs stay as they were
        if checks.flag(self.type_name, "nesterov", nesterov):
            extra.update(nesterov=True, nesterov_coef=nesterov_coef)
        elif nesterov_coef is not None:
            raise ValueError(f"{self.type_name}: nesterov_coef={nesterov_coef!r} needs nesterov=True")
        if checks.flag(self.type_name, "publish_denom", publish_denom):
            extra["publish_denom"] = True
        if clip_exponent is not None:
            clip_exponent = checks.positive(self.type_name, "clip_exponent", clip_exponent)
        if not isinstance(clip_step_offset, int) or isinstance(clip_step_offset, bool) or clip_step_offset < -1:
            raise ValueError(f"{self.type_name}: clip_step_offset={clip_step_offset!r} must be an int >= -1")
        super().__init__(name=name, betas=betas, eps=eps, clip_exponent=clip_exponent,
                         clip_step_offset=clip_step_offset,
                         use_atan2=checks.flag(self.type_name, "use_atan2", use_atan2),
                         skip_first=checks.flag(self.type_name, "skip_first", skip_first), **extra)

    @property
    def writes(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"update", "sig:denom"}) if self.args.get("publish_denom") else frozenset({"update"})

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        specs = {"exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}
        if hp["betas"][0] != 0:
            specs["exp_avg"] = StateSpec(kind="signed", factorable=True)
        return specs

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        first = h.step == 1
        exponent = h.hp["clip_exponent"]
        clip = not h.hp["use_atan2"] and exponent is not None
        lam = float(max(h.step + h.hp["clip_step_offset"], 0)) ** exponent if clip else 0.0
        return {"first": first, "init_only": first and h.hp["skip_first"], "first_moment": b1 != 0,
                "clip": clip, "use_atan2": h.hp["use_atan2"], "one_minus_b1": 1.0 - b1, "b2": b2,
                "one_minus_b2": 1.0 - b2, "eps": h.hp["eps"], "lam": lam, "neg_lam": -lam,
                "atan2_scale": 4.0 / math.pi, "nesterov": bool(h.hp.get("nesterov")),
                "nesterov_c": b1 if h.hp.get("nesterov_coef") is None else h.hp["nesterov_coef"]}

    def update(self, b: Any) -> None:
        g = b.u
        v = b.state("exp_avg_sq")
        beta2 = b.signals.pop("beta2", None)
        if b.s("first"):
            torch._foreach_copy_(v, torch._foreach_mul(g, g))
        if b.s("init_only"):
            if self.args.get("publish_denom"):
                b.signals["denom"] = torch._foreach_sqrt(v)
            b.set_u(torch._foreach_mul(g, 0.0))
            b.skip_apply = True
            return
        denom = torch._foreach_sqrt(v)
        if self.args.get("publish_denom"):
            b.signals["denom"] = [d.clone() for d in denom] if not b.s("use_atan2") else denom
        if b.s("use_atan2"):
            n = [torch.atan2(x, d) for x, d in zip(g, denom)]
        else:
            F.add_scalar_(denom, b.s("eps"))
            n = torch._foreach_div(g, denom)
            if b.s("clip"):
                F.clamp_(n, b.s("neg_lam"), b.s("lam"))
        if b.s("first_moment"):
            m = b.state("exp_avg")
            F.lerp_(m, n, b.s("one_minus_b1"))
            if b.s("nesterov"):  # c*m + (1-c)*n, with the normalized n (bug B3 fixed)
                n = torch._foreach_sub(n, m)
                torch._foreach_mul_(n, 1.0 - b.s("nesterov_c"))
                torch._foreach_add_(n, m)
            else:
                n = [x.clone() for x in m] if b.s("use_atan2") else m
        if beta2 is None:
            torch._foreach_mul_(v, b.s("b2"))
            F.addcmul_(v, g, g, b.s("one_minus_b2"))
        else:
            signal_ema_(v, g, beta2)
        if b.s("use_atan2"):
            torch._foreach_mul_(n, b.s("atan2_scale"))
            b.set_u(n)
        else:
            b.set_u(n, owned=not b.s("first_moment") or b.s("nesterov"))


scale_by_adam = ScaleByAdam
scale_by_adopt = ScaleByAdopt
momentum = Momentum
scale_by_lion = ScaleByLion
