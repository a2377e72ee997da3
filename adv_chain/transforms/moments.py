"""Moment transforms: they keep running averages of the incoming direction and emit a new one."""
from __future__ import annotations

import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform


class ScaleByAdam(Transform):
    """Adam's moments (Kingma & Ba, arXiv 1412.6980). Publishes the denominator, does not divide.

    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g^2``; emits ``u = m / (1-b1^t)`` and publishes
    ``denom = sqrt(v) / sqrt(1-b2^t)`` for a consumer (:func:`eps_divide`).
    ``amsgrad=True`` uses the running maximum of ``v`` (Reddi et al., 2018) as torch does;
    ``bias_correction=False`` drops both corrections. ``betas`` is fed by ``group["betas"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(betas=(0.9, 0.95)), ac.eps_divide(1e-8), ac.apply()).names
    ('adam', 'eps_divide', 'apply')
    """

    type_name = "scale_by_adam"
    default_name = "adam"
    stage = "moment"
    writes = frozenset({"update", "sig:denom"})
    hparams = {"betas": HParam("betas", checks.beta_pair)}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), amsgrad: bool = False,
                 bias_correction: bool = True, *, name: str | None = None) -> None:
        super().__init__(name=name, betas=betas, amsgrad=checks.flag(self.type_name, "amsgrad", amsgrad),
                         bias_correction=checks.flag(self.type_name, "bias_correction", bias_correction))

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        specs = {"exp_avg": StateSpec(kind="signed", factorable=True),
                 "exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}
        if hp["amsgrad"]:
            specs["max_exp_avg_sq"] = StateSpec(kind="nonneg", factorable=True)
        return specs

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        bc1 = 1.0 - b1 ** h.step if h.hp["bias_correction"] else 1.0
        bc2 = 1.0 - b2 ** h.step if h.hp["bias_correction"] else 1.0
        return {"one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2,
                "inv_bc1": 1.0 / bc1, "sqrt_bc2": math.sqrt(bc2), "amsgrad": h.hp["amsgrad"]}

    static_scalars = frozenset({"amsgrad"})

    def update(self, b: Any) -> None:
        g = b.u
        m, v = b.state("exp_avg"), b.state("exp_avg_sq")
        F.lerp_(m, g, b.s("one_minus_b1"))
        torch._foreach_mul_(v, b.s("b2"))
        F.addcmul_(v, g, g, b.s("one_minus_b2"))
        if b.s("amsgrad"):
            v_max = b.state("max_exp_avg_sq")
            torch._foreach_maximum_(v_max, v)
            v = v_max
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, b.s("sqrt_bc2"))
        b.set_u(torch._foreach_mul(m, b.s("inv_bc1")))
        b.signals["denom"] = denom


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

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_lion(betas=(0.9, 0.99)), ac.weight_decay(0.1), ac.apply()).names
    ('lion', 'weight_decay', 'apply')
    """

    type_name = "scale_by_lion"
    default_name = "lion"
    stage = "moment"
    hparams = {"betas": HParam("betas", checks.beta_pair)}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99), *, name: str | None = None) -> None:
        super().__init__(name=name, betas=betas)

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
        torch._foreach_sign_(u)
        torch._foreach_mul_(m, b.s("b2"))
        F.add_scaled_(m, g, b.s("one_minus_b2"))
        b.set_u(u)


scale_by_adam = ScaleByAdam
momentum = Momentum
scale_by_lion = ScaleByLion
