"""Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
arXiv 2306.06101): Adam whose step size ``d`` is estimated from a reduction over every parameter.

One transform, :func:`prodigy`, of *global* scope. Why one and not ``prodigy`` + ``scale_by_adam`` +
``eps_divide``: the reference update is Adam on ``d``-scaled gradients with ``eps`` scaled by the
``d`` estimated *in the same step*, a gradient term scaled by that new ``d`` when ``betas[0] = 0``,
and moments that must stay untouched when ``lr = 0`` (prodigyopt then skips the whole step). A split
chain can express the first only up to those three points, each a real (not rounding) difference
from prodigyopt, so the moments live here. Everything that is not Prodigy-specific stays outside:
gradient-stage transforms (``add_l2`` for coupled decay, ``orthograd``), decay transforms
(``weight_decay``, ``cautious_wd``, ``centered_wd``; they are scaled by the ``wd_scale`` signal this
transform publishes, i.e. decay by ``d * lr`` as the reference; with :class:`ProdigyFisherWD` the
``d`` travels as ``lr_scale`` instead) and the terminal. A Kourkoutas-beta for ``v`` is the one
outside transform that runs *inside*: its per-layer reduction has to finish before this
transform's update, and a signal cannot cross this transform's own reduction, so its reduce,
finalize and update ride along with this transform's (``kourkoutas=ac.kourkoutas_beta(...)``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform, transform_from_config
from .decay import FisherWD
from .normalize import _eps_or_none, auto_eps_specs, eps_scalars
from .prodigy_sums import (  # noqa: F401 - the state builders and helpers, importable from here too
    _REDUCE_SLICE, _add_scaled_, _build_p0, _build_s, _sliced, _state_dtype, check_ranks, reduce_sums, refuse_dtensor,
    sum_over_ranks)

_STEP_D = ("next", "current")
#: the signal carrying the step's ``d * bc`` for the decay transforms (``"lr_scale"`` leaves
#: ``wd_scale`` to :func:`fisher_wd`)
_DECAY_SIGNALS = ("wd_scale", "lr_scale")
_ATAN2_SCALE = 4.0 / math.pi
_STATIC = frozenset({"lr_on", "first_moment", "nesterov", "use_atan2", "adapting", "auto_eps"})


def _beta3(owner: str, arg: str, value: Any) -> Any:
    return None if value is None else checks.unit_interval(owner, arg, value)


def _kourkoutas(owner: str, value: Any) -> Any:
    """``None``, or a Kourkoutas-beta transform (or its ``to_config``) whose reduction rides along."""
    if isinstance(value, Mapping):
        value = transform_from_config(value)
    if value is not None and not (isinstance(value, Transform) and value.scope == "layer"
                                  and "sig:beta2" in value.writes and not value.nested()):
        raise ValueError(f"{owner}: kourkoutas={value!r} is not allowed; pass None or ac.kourkoutas_beta(...) "
                         "(a layer-scope transform publishing beta2)")
    return value


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
    ``eps=None`` is the scale-invariant ``eps = 1/sqrt(N)`` per tensor of ``N`` elements (state
    ``auto_eps``, spec §4.5). ``prodigy_steps=n > 0`` stops adapting ``d`` after a parameter's
    ``n``-th step: ``d``, ``d_max``, ``d_numerator`` then stay, ``s`` and ``p0`` are freed (made
    empty) and the update keeps the frozen ``d`` (adv_optm counts the optimizer's steps; here each
    parameter's own, the same when every parameter gets a gradient every step). ``kourkoutas`` (an
    :func:`kourkoutas_beta`) gives ``v`` a per-layer ``beta2`` (spec §4.3): its reduction runs
    inside this one (a reduction before a global transform cannot pass it a signal), with its state
    ``r_ema``/``sq_norm`` under this transform's name and its arguments as given (param-group
    overrides of ``beta2_min`` do not reach it); ``beta3`` and the bias correction keep the static
    ``b2``. ``publish_denom`` publishes the step's denominator (``sqrt(v) + d*eps``; ``sqrt(v)``
    with ``use_atan2``) as the optional ``denom`` signal for :func:`fisher_wd`; ``decay_signal=
    "lr_scale"`` publishes ``d*bc`` as ``lr_scale`` (the decays multiply their coefficient by it)
    instead of ``wd_scale``, which :func:`fisher_wd` then sets.

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

    ``sum_across_ranks=True`` (the presets' ``fsdp_in_use``) is for parameters sharded as plain
    tensors (FSDP1 flat shards, ZeRO): each rank's ``[num, den]`` (sums over its shards) is summed
    over torch.distributed's default group (one all-reduce a step) before ``d_hat``, as prodigyopt,
    so every rank has the one-process ``d`` (``slice_p > 1``: each shard takes its own every
    ``slice_p``-th element). Every rank must step (and, under gradient release, the same
    parameters in the same order). No process group: ``ValueError``; FSDP2 DTensors: refused
    (their sums are over whole tensors already).

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
    hparams = {"betas": HParam("betas", checks.beta_pair), "eps": HParam("eps", _eps_or_none),
               "beta3": HParam("beta3", _beta3), "d_coef": HParam("d_coef", checks.positive),
               "growth_rate": HParam("growth_rate", checks.positive)}
    group_mirrors = {"d": "d"}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float | None = 1e-8,
                 beta3: float | None = None, d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
                 safeguard_warmup: bool = False, use_bias_correction: bool = False, slice_p: int = 1,
                 d_limiter: bool = False, step_d: str = "next", use_atan2: bool = False, nesterov: bool = False,
                 nesterov_coef: float | None = None, prodigy_steps: int = 0, kourkoutas: Any = None,
                 publish_denom: bool = False, decay_signal: str = "wd_scale", sum_across_ranks: bool = False, *,
                 name: str | None = None) -> None:
        owner = self.type_name
        if not isinstance(slice_p, int) or isinstance(slice_p, bool) or slice_p < 1:
            raise ValueError(f"{owner}: slice_p={slice_p!r} must be an int >= 1 (statistics on every slice_p-th element)")
        if not isinstance(prodigy_steps, int) or isinstance(prodigy_steps, bool) or prodigy_steps < 0:
            raise ValueError(f"{owner}: prodigy_steps={prodigy_steps!r} must be an int >= 0 (steps that adapt d; "
                             "0: every step)")
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(owner, "nesterov_coef", nesterov_coef)
        super().__init__(name=name, betas=betas, eps=eps, beta3=beta3, d0=checks.positive(owner, "d0", d0),
                         d_coef=d_coef, growth_rate=growth_rate,
                         safeguard_warmup=checks.flag(owner, "safeguard_warmup", safeguard_warmup),
                         use_bias_correction=checks.flag(owner, "use_bias_correction", use_bias_correction),
                         slice_p=slice_p, d_limiter=checks.flag(owner, "d_limiter", d_limiter),
                         step_d=checks.choice(owner, "step_d", step_d, _STEP_D),
                         use_atan2=checks.flag(owner, "use_atan2", use_atan2),
                         nesterov=checks.flag(owner, "nesterov", nesterov), nesterov_coef=nesterov_coef,
                         prodigy_steps=prodigy_steps, kourkoutas=_kourkoutas(owner, kourkoutas),
                         publish_denom=checks.flag(owner, "publish_denom", publish_denom),
                         decay_signal=checks.choice(owner, "decay_signal", decay_signal, _DECAY_SIGNALS),
                         sum_across_ranks=checks.flag(owner, "sum_across_ranks", sum_across_ranks))

    @property
    def static_scalars(self) -> frozenset[str]:  # type: ignore[override]
        kb = self.args.get("kourkoutas")
        return _STATIC | (frozenset() if kb is None else kb.static_scalars)

    @property
    def writes(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"update"}) | self.optional_signals

    @property
    def optional_signals(self) -> frozenset[str]:  # type: ignore[override]
        denom = {"sig:denom"} if self.args.get("publish_denom") else set()
        return frozenset({f"sig:{self.args.get('decay_signal', 'wd_scale')}", *denom})

    def to_config(self) -> dict[str, Any]:
        cfg = super().to_config()
        if self.args["kourkoutas"] is not None:
            cfg["args"]["kourkoutas"] = self.args["kourkoutas"].to_config()
        return cfg

    def _kb_hp(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """What the nested Kourkoutas-beta sees as its hyperparameters: its own arguments, the tags."""
        return {**self.args["kourkoutas"].args, "tags": hp.get("tags", frozenset())}

    # -- state -------------------------------------------------------------------------------------
    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        slice_p = self.args["slice_p"]
        if self.args["sum_across_ranks"]:
            refuse_dtensor(self.type_name, param)
        specs = {"exp_avg_sq": StateSpec(kind="nonneg", factorable=True)}
        if hp["betas"][0] != 0:
            specs["exp_avg"] = StateSpec(kind="signed", factorable=True)
        specs["s"] = StateSpec(kind="signed", build=functools.partial(_build_s, slice_p=slice_p))
        specs["p0"] = StateSpec(kind="signed", build=functools.partial(_build_p0, slice_p=slice_p))
        specs.update(auto_eps_specs(hp["eps"]))
        if self.args["kourkoutas"] is not None:
            specs.update(self.args["kourkoutas"].state_specs(param, self._kb_hp(hp)))
        return specs

    def group_state(self, hp: Mapping[str, Any]) -> dict[str, float]:
        d0 = self.args["d0"]
        return {"d": d0, "d_max": d0, "d_numerator": 0.0, "k": 0.0}

    def layer_key(self, param: torch.Tensor, index: int, group: Mapping[str, Any]) -> Any:
        kb = self.args["kourkoutas"]
        return index if kb is None else kb.layer_key(param, index, group)

    # -- scalars -----------------------------------------------------------------------------------
    def _beta3_of(self, hp: Mapping[str, Any]) -> float:
        return math.sqrt(hp["betas"][1]) if hp["beta3"] is None else hp["beta3"]

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        b1, b2 = h.hp["betas"][:2]
        c = b1 if h.hp["nesterov_coef"] is None else h.hp["nesterov_coef"]
        lr_on = isinstance(h.lr, torch.Tensor) or h.lr != 0
        steps = self.args["prodigy_steps"]
        out = {"lr_on": lr_on, "first_moment": b1 != 0, "nesterov": h.hp["nesterov"] and b1 != 0,
               "use_atan2": h.hp["use_atan2"], "b1": b1, "b2": b2, "beta3": self._beta3_of(h.hp),
               **eps_scalars(h.hp["eps"]),
               "nesterov_c": c, "adapting": steps == 0 or h.step <= steps}
        if self.args["kourkoutas"] is not None:
            out.update(self.args["kourkoutas"].host_scalars(HostView(self._kb_hp(h.hp), h.step, h.lr)))
        return out

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
        out = {"d": d, "d_bc": d_bc, "num_coef": ratio * dlr, "s_coef": ratio * (d if hp["safeguard_warmup"] else dlr),
               "m_coef": d * (1.0 - b1), "v_coef": d * d * (1.0 - b2), "dd": d * d, "nesterov_g": d * (1.0 - c)}
        # on the CPU the coefficients become Python numbers (no sync there): fused scalar ops, as prodigyopt
        return {k: F.host_number(v) for k, v in out.items()}

    # -- the reduction -----------------------------------------------------------------------------
    def reduce(self, b: Any) -> list[torch.Tensor]:
        """Per parameter ``[(d/d0) dlr <gs, p0 - ps>, sum |s|]`` (fp64), updating ``s`` on the way
        (:func:`~adv_chain.transforms.prodigy_sums.reduce_sums`); with a nested Kourkoutas-beta a
        pair per parameter: those sums and its value."""
        if self.args["sum_across_ranks"]:
            check_ranks(self.type_name)  # before any state moves
        kb = self.args["kourkoutas"]
        layer = None if kb is None else kb.reduce(b)  # its state lives under this transform's name
        if not b.s("lr_on") or not b.s("adapting"):
            if not b.s("adapting"):  # d is frozen: free the statistics (adv_optm deletes them)
                for x in (*b.state("s"), *b.state("p0")):
                    if x.numel():
                        x.set_(x.new_empty(0))
            out = [torch.zeros(2, dtype=torch.float64, device=p.device) for p in b.params]
        else:
            out = self._reduce_sums(b)
        if layer is None:
            return out
        return list(zip(out, layer))  # (Prodigy's sums, Kourkoutas-beta's value) per parameter

    def _reduce_sums(self, b: Any) -> list[torch.Tensor]:
        return reduce_sums(b, self.args["slice_p"])

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        kb = self.args["kourkoutas"]
        layer: dict[str, Any] = {}
        if kb is not None:  # the per-layer beta2 (and next r_ema) of the nested Kourkoutas-beta
            layer = kb.finalize([v[1] for v in values], layer_keys, self._kb_hp(hp))
            values = [v[0] for v in values]
        dev = values[0].device
        total = torch.stack([v.to(dev) for v in values]).sum(0)
        if self.args["sum_across_ranks"]:  # every rank's [numerator, sum |s|] (its shards' sums), as prodigyopt
            total = sum_over_ranks(total, self.type_name)
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
                "d_denom": den, **layer}

    # -- the update --------------------------------------------------------------------------------
    def update(self, b: Any) -> None:
        beta2 = None
        if self.args["kourkoutas"] is not None:
            # r_ema <- its new value; this step's ||g||^2 kept for the next (it runs whatever lr is,
            # as the kourkoutas_beta transform does)
            self.args["kourkoutas"].update(b)
            beta2 = b.signals.pop("beta2")
        if not b.s("lr_on"):
            b.skip_apply = True  # prodigyopt skips a group with lr = 0 (and the whole step if all are)
            return
        g = b.u
        v = b.state("exp_avg_sq")
        if b.s("first_moment"):
            m = b.state("exp_avg")
            torch._foreach_mul_(m, b.s("b1"))
            _add_scaled_(m, g, b.s("m_coef"))
        if beta2 is None:
            torch._foreach_mul_(v, b.s("b2"))
            F.addcmul_(v, g, g, b.s("v_coef"))
        else:  # one beta2 per tensor: v = beta2 v + d^2 (1 - beta2) g^2 (the coefficient in fp64, as adv_optm)
            torch._foreach_mul_(v, beta2)
            dd = b.s("dd")
            torch._foreach_addcmul_(v, torch._foreach_mul(g, [dd * (1.0 - x) for x in beta2]), g)
        d_step = F.host_number(b.s("d_next")) if self.args["step_d"] == "next" else b.s("d")
        if b.s("nesterov"):  # c*m + (1-c)*d*g  (adv_optm's B2 mixes the raw g)
            n = torch._foreach_mul(m, b.s("nesterov_c"))
            _add_scaled_(n, g, b.s("nesterov_g"))
        elif b.s("first_moment"):
            n = m
        else:
            n = None  # u = d' * g: the scale takes d' (prodigyopt's addcdiv(g, denom, -dlr * d'))
        denom = torch._foreach_sqrt(v)
        # frozen d (prodigy_steps): the finalize saw no sums, yet the step moves with the kept d
        scale = b.s("d_bc") * F.host_number(b.s("active")) if b.s("adapting") else b.s("d_bc")
        if b.s("use_atan2"):
            if n is None:
                n = torch._foreach_mul(g, d_step)
            u = [torch.atan2(x, y) for x, y in zip(n, denom)]
            torch._foreach_mul_(u, scale * _ATAN2_SCALE)
            b.set_u(u)
        else:
            if b.s("auto_eps"):  # d * eps with eps = 1/sqrt(N) per tensor
                torch._foreach_add_(denom, [d_step * e for e in b.state("auto_eps")])
            else:
                F.add_scalar_(denom, d_step * b.s("eps"))
            # u = (dlr/lr * m) / denom left pending: the terminal folds it into prodigyopt's
            # addcdiv(m, denom, value=-dlr), and u is never written out
            if n is None:
                b.set_u_scaled(g, scale * d_step)
            else:
                b.set_u_scaled(n, scale)
            b.divide_u_(denom)
        if self.args["publish_denom"]:  # read (not changed) by fisher_wd
            b.publish_denom(denom)
        # decay by d*lr*wd: the decay transforms' multiplier, applied as p - c*p (prodigyopt's rounding:
        # an additive coefficient when it is a host number, else an explicit term), not as p * (1 - c)
        b.signals[self.args["decay_signal"]] = scale


class ProdigyFisherWD(FisherWD):
    """:func:`fisher_wd` on the denominator :func:`prodigy` publishes (``publish_denom=True``), which
    holds Prodigy's ``d * eps`` already: ``eps`` (default 0) is not fed by ``group["eps"]`` (that is
    Prodigy's), only by ``group["fisher_wd.eps"]``. Pair it with ``prodigy(decay_signal="lr_scale")``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.prodigy(publish_denom=True, decay_signal="lr_scale"), ProdigyFisherWD(),
    ...          ac.weight_decay(0.1), ac.apply()).names
    ('prodigy', 'fisher_wd', 'weight_decay', 'apply')
    """

    type_name = "prodigy_fisher_wd"
    hparams = {"eps": HParam(None, checks.nonneg)}

    def __init__(self, eps: float = 0.0, atan2: bool = False, *, name: str | None = None) -> None:
        super().__init__(eps=eps, atan2=atan2, name=name)


prodigy = Prodigy
