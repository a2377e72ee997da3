"""Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
arXiv 2306.06101): Adam whose step size ``d`` is estimated from a reduction over every parameter.

One transform, :func:`prodigy`, of *global* scope. Why one and not ``prodigy`` + ``scale_by_adam`` +
``eps_divide``: the reference update is Adam on ``d``-scaled gradients with ``eps`` scaled by the
``d`` estimated *in the same step*, a gradient term scaled by that new ``d`` when ``betas[0] = 0``,
and moments that must stay untouched when ``lr = 0`` (prodigyopt then skips the whole step). A split
chain can express the first only up to those three points, each a real (not rounding) difference
from prodigyopt, so the moments live here. Everything that is not Prodigy-specific stays outside:
gradient-stage transforms (``add_l2`` for coupled decay, ``orthograd``), decay transforms
(``weight_decay``, ``cautious_wd``; they are scaled by the ``wd_scale`` signal this transform
publishes, i.e. decay by ``d * lr`` as the reference) and the terminal.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform

_STEP_D = ("next", "current")
_ATAN2_SCALE = 4.0 / math.pi
#: elements per slice of the reduce: a slice of each operand stays in cache across its passes, and
#: each slice costs six op calls (1 << 18 was fastest on the gpt27m benchmark, 1 thread)
_REDUCE_SLICE = 1 << 18


def _beta3(owner: str, arg: str, value: Any) -> Any:
    return None if value is None else checks.unit_interval(owner, arg, value)


def _add_scaled_(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: Any) -> None:
    """``xs += alpha * ys`` rounded once (a fused multiply-add), as prodigyopt's ``x.add_(y, alpha=a)``;
    a 0-d tensor ``alpha`` (Prodigy's ``d``) rides along as a broadcast factor: no temporary."""
    if F.is_tensor(alpha):
        torch._foreach_addcmul_(xs, ys, [alpha] * len(xs))
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _sliced(x: torch.Tensor, slice_p: int) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat if slice_p == 1 else flat[::slice_p]


def _build_s(p: torch.Tensor, slice_p: int) -> torch.Tensor:
    return torch.zeros_like(_sliced(p, slice_p), dtype=_state_dtype(p))


def _build_p0(p: torch.Tensor, slice_p: int) -> torch.Tensor:
    if not bool(p.any()):  # all zeros: a 0-d zero saves the copy (as prodigyopt); host read at init only
        return torch.zeros((), dtype=_state_dtype(p), device=p.device)
    return _sliced(p, slice_p).to(_state_dtype(p), copy=True)


class Prodigy(Transform):
    """Prodigy's D-adaptation and its Adam update, as ``prodigyopt.Prodigy`` (1.1.2) computes them.

    With ``t`` = the optimizer step, ``lr`` the group's learning rate, ``bc = sqrt(1 - b2^k) / (1 -
    b1^k)`` (``use_bias_correction``; else 1; ``k`` counts the steps that moved ``d``) and
    ``dlr = d * lr * bc``, each step does, over every parameter of every group (``g`` the gradient as
    it arrives, ``gs``/``ps``/``p0`` every ``slice_p``-th element of ``g``, ``p`` and the initial ``p``)::

        reduce (per parameter)     num += (d/d0) * dlr * <gs, p0 - ps>
                                   s    = beta3 * s + (d/d0) * (d if safeguard_warmup else dlr) * gs
                                   den += sum |s|
        finalize (once)            num  = beta3 * num_prev + num ;  d_hat = d_coef * num / den
                                   (d_limiter: d_hat = min(d_hat, 2^(1/4) d))
                                   d' = max(d, d_hat) if d == d0 else d ;  d_max = max(d_max, d_hat)
                                   d' = min(d_max, d' * growth_rate)
        update (elementwise)       m = b1 m + d (1-b1) g ;  v = b2 v + d^2 (1-b2) g^2
                                   u = d*bc * m / (sqrt(v) + d'*eps)          (betas[0] = 0: n = d' g)
                                   publishes wd_scale = d*bc (decay by lr * wd * wd_scale = dlr * wd)

    and the terminal applies ``p -= lr * u``. ``d0=1e-6``, ``d_coef=1``, ``growth_rate=inf``
    (``d`` is then the running maximum of ``d_hat``), ``beta3=None`` means ``sqrt(b2)``. When ``den =
    0`` (no gradient signal yet) ``d``, ``num`` and ``k`` stay and no parameter moves (the moments do
    update), as prodigyopt. A group with ``lr = 0`` contributes nothing and its moments stay; unlike
    prodigyopt its parameters do not move either (prodigyopt still applies its stale momentum with
    the other groups' ``d * lr``). With every ``lr = 0`` the step is a no-op, as prodigyopt.

    Options beyond prodigyopt (adv_optm's ``Prodigy_adv``): ``step_d="current"`` scales ``eps`` (and
    the gradient when ``betas[0] = 0``) by the ``d`` the step started with instead of the new one;
    ``use_atan2`` replaces the division by ``(4/pi) * atan2(n, sqrt(v))`` (no eps); ``nesterov``
    uses ``n = c m + (1-c) d g`` with ``c = nesterov_coef`` (default ``b1``) - the ``d`` on the
    gradient term is adv_optm's bug B2 fixed (it mixes the raw ``g``: a first step ~3.16 lr).

    State per parameter: ``exp_avg`` (if ``b1 > 0``), ``exp_avg_sq``, ``s`` and ``p0`` (1-D, every
    ``slice_p``-th element; ``p0`` is a 0-d zero for an all-zero parameter), fp32 for fp32/bf16
    parameters. The global ``d``, ``d_max``, ``d_numerator`` and ``k`` are 0-d fp64 tensors in every
    param group under ``"prodigy/d"``... (saved with ``state_dict``, no host sync in a step), and
    ``group["d"]`` mirrors ``d`` after each step for loggers (OneTrainer reads it; it is a 0-d tensor
    - ``float(group["d"])`` for a number); ``optimizer.step_info["prodigy"]`` also holds ``d_hat``
    and ``d_denom``. Fed by ``group["betas"]``, ``group["eps"]``, ``group["beta3"]``,
    ``group["d_coef"]``, ``group["growth_rate"]``; the global values come from the first group.

    Under gradient release (:meth:`~adv_chain.ChainOptimizer.step_parameter`) the reduction runs one
    step lagged, automatically: ``d`` moves when a round of per-parameter steps completes (when a
    parameter steps again) and every parameter of a round uses the same ``d``; the new ``d`` of a
    round is not known within it, so ``eps`` uses the round's ``d``.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.ChainOptimizer(model.parameters(), ac.chain(ac.prodigy(), ac.apply()), lr=1.0)
    >>> x = torch.randn(8, 4)
    >>> for _ in range(3):  # d moves from the second step on (the first has p = p0)
    ...     opt.zero_grad(); model(x).square().mean().backward(); opt.step()
    >>> float(opt.param_groups[0]["d"]) > 1e-6
    True
    """

    type_name = "prodigy"
    default_name = "prodigy"
    stage = "moment"
    scope = "global"
    reads = frozenset({"update", "param"})
    writes = frozenset({"update", "sig:wd_scale"})
    optional_signals = frozenset({"sig:wd_scale"})
    hparams = {"betas": HParam("betas", checks.beta_pair), "eps": HParam("eps", checks.nonneg),
               "beta3": HParam("beta3", _beta3), "d_coef": HParam("d_coef", checks.positive),
               "growth_rate": HParam("growth_rate", checks.positive)}
    static_scalars = frozenset({"lr_on", "first_moment", "nesterov", "use_atan2"})
    group_mirrors = {"d": "d"}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, beta3: float | None = None,
                 d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
                 safeguard_warmup: bool = False, use_bias_correction: bool = False, slice_p: int = 1,
                 d_limiter: bool = False, step_d: str = "next", use_atan2: bool = False, nesterov: bool = False,
                 nesterov_coef: float | None = None, *, name: str | None = None) -> None:
        owner = self.type_name
        if not isinstance(slice_p, int) or isinstance(slice_p, bool) or slice_p < 1:
            raise ValueError(f"{owner}: slice_p={slice_p!r} must be an int >= 1 (statistics on every slice_p-th element)")
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(owner, "nesterov_coef", nesterov_coef)
        super().__init__(name=name, betas=betas, eps=eps, beta3=beta3, d0=checks.positive(owner, "d0", d0),
                         d_coef=d_coef, growth_rate=growth_rate,
                         safeguard_warmup=checks.flag(owner, "safeguard_warmup", safeguard_warmup),
                         use_bias_correction=checks.flag(owner, "use_bias_correction", use_bias_correction),
                         slice_p=slice_p, d_limiter=checks.flag(owner, "d_limiter", d_limiter),
                         step_d=checks.choice(owner, "step_d", step_d, _STEP_D),
                         use_atan2=checks.flag(owner, "use_atan2", use_atan2),
                         nesterov=checks.flag(owner, "nesterov", nesterov), nesterov_coef=nesterov_coef)

    # -- state -------------------------------------------------------------------------------------
    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        slice_p = self.args["slice_p"]
        specs = {"exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}
        if hp["betas"][0] != 0:
            specs["exp_avg"] = StateSpec(kind="signed", factorable=True)
        specs["s"] = StateSpec(kind="signed", build=functools.partial(_build_s, slice_p=slice_p))
        specs["p0"] = StateSpec(kind="signed", build=functools.partial(_build_p0, slice_p=slice_p))
        return specs

    def group_state(self, hp: Mapping[str, Any]) -> dict[str, float]:
        d0 = self.args["d0"]
        return {"d": d0, "d_max": d0, "d_numerator": 0.0, "k": 0.0}

    # -- scalars -----------------------------------------------------------------------------------
    def _beta3_of(self, hp: Mapping[str, Any]) -> float:
        return math.sqrt(hp["betas"][1]) if hp["beta3"] is None else hp["beta3"]

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        c = b1 if h.hp["nesterov_coef"] is None else h.hp["nesterov_coef"]
        lr_on = isinstance(h.lr, torch.Tensor) or h.lr != 0
        return {"lr_on": lr_on, "first_moment": b1 != 0, "nesterov": h.hp["nesterov"] and b1 != 0,
                "use_atan2": h.hp["use_atan2"], "b1": b1, "b2": b2, "beta3": self._beta3_of(h.hp),
                "eps": h.hp["eps"], "nesterov_c": c}

    def state_scalars(self, state: Mapping[str, torch.Tensor], h: HostView) -> dict[str, Any]:
        hp = h.hp
        b1, b2 = hp["betas"][:2]
        d, k = state["d"], state["k"]
        if hp["use_bias_correction"]:
            bc = (1.0 - torch.pow(b2, k + 1.0)).sqrt() / (1.0 - torch.pow(b1, k + 1.0))
        else:
            bc = torch.ones_like(d)
        d_bc = d * bc                                   # dlr / lr: the step's scale of u
        dlr = d * h.lr * bc if not isinstance(h.lr, torch.Tensor) else d * h.lr.to(d) * bc
        ratio = d / hp["d0"]
        c = b1 if hp["nesterov_coef"] is None else hp["nesterov_coef"]
        return {"d": d, "d_bc": d_bc, "num_coef": ratio * dlr, "s_coef": ratio * (d if hp["safeguard_warmup"] else dlr),
                "m_coef": d * (1.0 - b1), "v_coef": d * d * (1.0 - b2), "nesterov_g": d * (1.0 - c)}

    # -- the reduction -----------------------------------------------------------------------------
    def reduce(self, b: Any) -> list[torch.Tensor]:
        """Per parameter ``[(d/d0) dlr <gs, p0 - ps>, sum |s|]`` (fp64), updating ``s`` on the way.

        A parameter at a time, slice by slice through one cache-sized scratch buffer: ``p0 - ps``
        and ``|s|`` are never full-size temporaries, and ``gs``, ``s`` stay in cache across the four
        passes (prodigyopt's loop has the same locality per parameter). A parameter of at most one
        slice computes exactly what prodigyopt does; a longer one sums its slices' fp32 partial sums
        in fp64 (another summation order, no less accurate)."""
        if not b.s("lr_on"):
            return [torch.zeros(2, dtype=torch.float64, device=p.device) for p in b.params]
        slice_p = self.args["slice_p"]
        beta3, s_coef, num_coef = b.s("beta3"), b.s("s_coef"), b.s("num_coef")
        scratch: dict[Any, torch.Tensor] = {}
        out = []
        for g, s, p0, p in zip(b.u, b.state("s"), b.state("p0"), b.params):
            gs = _sliced(g, slice_p)
            ps = _sliced(p.detach(), slice_p)
            n = s.numel()
            key = (s.dtype, s.device)
            buf = scratch.get(key)
            if buf is None or buf.numel() < min(n, _REDUCE_SLICE):
                buf = scratch[key] = torch.empty(min(max(n, 1), _REDUCE_SLICE), dtype=s.dtype, device=s.device)
            parts = torch.empty(2, -(-n // _REDUCE_SLICE), dtype=s.dtype, device=s.device)
            for j, start in enumerate(range(0, n, _REDUCE_SLICE)):
                end = min(n, start + _REDUCE_SLICE)
                tmp, g_j, s_j = buf[:end - start], gs[start:end], s[start:end]
                if g_j.dtype != s.dtype:
                    g_j = g_j.to(s.dtype)
                torch.sub(p0 if p0.dim() == 0 else p0[start:end], ps[start:end], out=tmp)
                torch.dot(g_j, tmp, out=parts[0, j])
                s_j.mul_(beta3)
                if F.is_tensor(s_coef):  # s + c*g rounded once, as prodigyopt's add_(g, alpha=c)
                    s_j.addcmul_(g_j, s_coef)
                else:
                    s_j.add_(g_j, alpha=s_coef)
                torch.abs(s_j, out=tmp)
                torch.sum(tmp, dim=0, out=parts[1, j])  # as prodigyopt (not a norm: another order)
            total = parts.double() if parts.shape[1] == 1 else parts.double().sum(1)
            total[0] *= num_coef
            out.append(total.view(2) if parts.shape[1] == 1 else total)
        return out

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        dev = values[0].device
        total = torch.stack([v.to(dev) for v in values]).sum(0)
        d, d_max, num_prev, k = (hp[key].to(dev) for key in ("d", "d_max", "d_numerator", "k"))
        num = num_prev * self._beta3_of(hp) + total[0]
        den = total[1]
        active = den > 0
        d_hat = hp["d_coef"] * num / den
        if hp["d_limiter"]:
            d_hat = torch.minimum(d_hat, d * 2 ** 0.25)
        d_new = torch.where(d == hp["d0"], torch.maximum(d, d_hat), d)
        d_max_new = torch.maximum(d_max, d_hat)
        d_new = torch.minimum(d_max_new, d_new * hp["growth_rate"])
        d_next = torch.where(active, d_new, d)
        return {"d": d_next, "d_max": torch.where(active, d_max_new, d_max),
                "d_numerator": torch.where(active, num, num_prev), "k": k + active.to(k.dtype),
                "d_next": d_next, "active": active.to(d.dtype), "d_hat": torch.where(active, d_hat, d),
                "d_denom": den}

    # -- the update --------------------------------------------------------------------------------
    def update(self, b: Any) -> None:
        if not b.s("lr_on"):
            b.skip_apply = True  # prodigyopt skips a group with lr = 0 (and the whole step if all are)
            return
        g = b.u
        v = b.state("exp_avg_sq")
        if b.s("first_moment"):
            m = b.state("exp_avg")
            torch._foreach_mul_(m, b.s("b1"))
            _add_scaled_(m, g, b.s("m_coef"))
        torch._foreach_mul_(v, b.s("b2"))
        F.addcmul_(v, g, g, b.s("v_coef"))
        d_step = b.s("d_next") if self.args["step_d"] == "next" else b.s("d")
        if b.s("nesterov"):  # c*m + (1-c)*d*g  (adv_optm's B2 mixes the raw g)
            n = torch._foreach_mul(m, b.s("nesterov_c"))
            _add_scaled_(n, g, b.s("nesterov_g"))
        elif b.s("first_moment"):
            n = m
        else:
            n = None  # u = d' * g: the scale takes d' (prodigyopt's addcdiv(g, denom, -dlr * d'))
        denom = torch._foreach_sqrt(v)
        scale = b.s("d_bc") * b.s("active")
        if b.s("use_atan2"):
            if n is None:
                n = torch._foreach_mul(g, d_step)
            u = [torch.atan2(x, y) for x, y in zip(n, denom)]
            torch._foreach_mul_(u, scale * _ATAN2_SCALE)
            b.set_u(u)
        else:
            F.add_scalar_(denom, d_step * b.s("eps"))
            # u = (dlr/lr * m) / denom left pending: the terminal folds it into prodigyopt's
            # addcdiv(m, denom, value=-dlr), and u is never written out
            if n is None:
                b.set_u_scaled(g, scale * d_step)
            else:
                b.set_u_scaled(n, scale)
            b.divide_u_(denom)
        # decay by d*lr*wd: as the decay transforms' multiplier (an explicit term p - c*p; the
        # coefficient path p * (1 - c) would round 1 - c to fp32 and lose most of a tiny c = wd*d*lr)
        b.signals["wd_scale"] = scale


prodigy = Prodigy
