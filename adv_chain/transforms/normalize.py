"""Normalizers: they turn a moment's direction into a step direction (divide, sign)."""
from __future__ import annotations

import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform


def _eps_or_none(owner: str, arg: str, value: Any) -> Any:
    return None if value is None else checks.nonneg(owner, arg, value)


def _scale_invariant_eps(p: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 / math.sqrt(max(1, p.numel())), dtype=torch.float32, device=p.device)


# adv_optm's eps=None (spec §4.5), shared by every transform that adds an epsilon: the per-tensor
# 1/sqrt(N) is a 0-d state "<name>/auto_eps" built from the whole parameter (a slice or an FSDP
# shard sees the same value); the transform's host scalars say which of the two applies
def auto_eps_specs(eps: Any) -> dict[str, StateSpec]:
    """The state of a transform whose epsilon ``eps`` may be ``None`` (scale invariant)."""
    return {"auto_eps": StateSpec(scalar=True, build=_scale_invariant_eps)} if eps is None else {}


def eps_scalars(eps: Any) -> dict[str, Any]:
    """Host scalars ``eps`` (0 when automatic) and the static ``auto_eps`` flag."""
    return {"eps": 0.0 if eps is None else eps, "auto_eps": eps is None}


def eps_operand(b: Any, n: int) -> Any:
    """What to add to ``n`` tensors for the calling transform's epsilon: its per-tensor 1/sqrt(N)
    states, a list of its 0-d tensor eps (the 0-d overload of ``_foreach_add`` syncs to the host),
    or its number."""
    if b.s("auto_eps"):
        return b.state("auto_eps")
    eps = b.s("eps")
    return [eps] * n if F.is_tensor(eps) else eps


class EpsDivide(Transform):
    """``u = u / (denom + eps)``: consumes the ``denom`` a moment transform published (Adam's).

    ``eps=None`` is adv_optm's scale-invariant epsilon (spec §4.5): ``eps = 1/sqrt(N)`` for a tensor
    of ``N`` elements, kept as a per-tensor 0-d state ``"eps_divide/auto_eps"`` (created when the
    parameter's state is). Fed by ``group["eps"]`` (a number, or ``None``).

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-6), ac.apply()).names
    ('adam', 'eps_divide', 'apply')
    >>> ac.eps_divide(None)
    eps_divide(eps=None)
    """

    type_name = "eps_divide"
    default_name = "eps_divide"
    stage = "normalize"
    reads = frozenset({"update", "sig:denom"})
    consumes = frozenset({"sig:denom"})
    hparams = {"eps": HParam("eps", _eps_or_none)}

    def __init__(self, eps: float | None = 1e-8, *, name: str | None = None) -> None:
        super().__init__(name=name, eps=eps)

    def state_specs(self, param: torch.Tensor, hp: Any) -> dict[str, StateSpec]:
        return auto_eps_specs(hp["eps"])

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return eps_scalars(h.hp["eps"])

    def update(self, b: Any) -> None:
        if b.s("auto_eps"):
            denom = b.take_denom()
            torch._foreach_add_(denom, eps_operand(b, len(denom)))
            b.divide_u_(denom)
        else:
            b.divide_u_by_denom_(b.s("eps"))


#: ``atan(t) = t * P(t^2)`` on ``[0, 1]``: a degree-8 polynomial in ``t^2``, fit for this library by
#: iteratively reweighted least squares (fp32 evaluation error <= 1.2e-7 absolute, ~1 ulp of pi/4)
_ATAN_COEFFS = (1.0, -0.3333309292793274, 0.1999305635690689, -0.14207148551940918, 0.1065472662448883,
                -0.07533769309520721, 0.043040379881858826, -0.016283586621284485, 0.002903688931837678)


def atan2_pointwise(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``atan2(y, x)`` from elementwise arithmetic only, for compiled kernels: with
    ``t = min(|y|,|x|) / max(|y|,|x|)``, ``r = t * P(t^2)`` (:data:`_ATAN_COEFFS`), then
    ``pi/2 - r`` where ``|y| > |x|``, ``pi - r`` where ``x < 0``, and ``y``'s sign. Inductor fuses it
    into the surrounding kernel, where ``torch.atan2`` compiles to a per-element library call
    (4M elements, 1 thread: 3.1 vs 5.3 ms). At most 3e-7 from fp64 ``atan2`` (fp32
    ``torch.atan2``: 1.4e-7); the same as ``torch.atan2`` at zeros, infinities (``atan2(inf, inf) =
    pi/4``) and NaN, except for signed zeros: ``y = -0`` counts as ``+0`` (``atan2(-0, -1)`` is ``pi``,
    not ``-pi``) and ``x = -0`` as ``+0`` (``atan2(0, -0)`` is ``0``, not ``pi``); an optimizer's
    denominator is ``>= +0``, where none of these arise.

    >>> import torch
    >>> y, x = torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([1.0, 0.5, 0.0, -1.0])
    >>> bool((atan2_pointwise(y, x) - torch.atan2(y, x)).abs().max() < 3e-7)
    True
    """
    ay, ax = y.abs(), x.abs()
    lo, hi = torch.minimum(ay, ax), torch.maximum(ay, ax)
    t = torch.where(lo == hi, (hi > 0).to(y.dtype), lo / hi)  # 0/0 -> 0 and inf/inf -> 1; NaN stays NaN
    s = t * t
    poly = torch.full_like(s, _ATAN_COEFFS[-1])
    for c in _ATAN_COEFFS[-2::-1]:
        poly = poly * s + c
    r = t * poly
    r = torch.where(ay > ax, math.pi / 2 - r, r)
    r = torch.where(x < 0, math.pi - r, r)
    return torch.where(y < 0, -r, r)


class Atan2Scale(Transform):
    """Adam-atan2 (Everett et al., arXiv 2407.05872): ``u = a * atan2(u, b * denom)`` replaces
    ``u / (denom + eps)``; no epsilon, and ``|u| <= a * pi / 2``. Consumes the ``denom`` a moment
    transform published (Adam's ``sqrt(v / (1 - b2^t))``, with ``u = m / (1 - b1^t)``: bias
    correction inside the atan2, as the paper). ``a = 4/pi, b = 1`` is adv_optm's choice (its small
    ratios behave like ``u / denom``); lucidrains' adam-atan2-pytorch uses ``a = 1.27, b = 1``.
    ``bias_correction="outside"`` reproduces adv_optm's ``use_atan2``: ``a * atan2(m, b*denom) / (1 - b1^t)``
    (its first step is 27% larger than the paper's).

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.atan2_scale(), ac.apply()).names
    ('adam', 'atan2_scale', 'apply')
    """

    type_name = "atan2_scale"
    default_name = "atan2_scale"
    stage = "normalize"
    consumes = frozenset({"sig:denom"})

    def __init__(self, a: float = 4 / math.pi, b: float = 1.0, bias_correction: str = "inside", *,
                 name: str | None = None) -> None:
        super().__init__(name=name, a=checks.positive(self.type_name, "a", a),
                         b=checks.positive(self.type_name, "b", b),
                         bias_correction=checks.choice(self.type_name, "bias_correction", bias_correction,
                                                       ("inside", "outside")))

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        extra = {"sig:bc1"} if self.args["bias_correction"] == "outside" else set()
        return frozenset({"update", "sig:denom", *extra})

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"a": h.hp["a"], "b": h.hp["b"]}

    def update(self, b: Any) -> None:
        denom = b.take_denom(scale=b.s("b"))
        num = b.u
        a = b.s("a")
        if self.args["bias_correction"] == "outside":
            bc1 = b.signals["bc1"]
            num = torch._foreach_mul(num, bc1)
            a = a / bc1
        # torch has no multi-tensor atan2: one op per tensor; compiled, the pointwise form fuses
        atan2 = atan2_pointwise if torch.compiler.is_compiling() else torch.atan2
        u = [atan2(x, d) for x, d in zip(num, denom)]
        torch._foreach_mul_(u, a)
        b.set_u(u)


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
atan2_scale = Atan2Scale
sign = Sign
