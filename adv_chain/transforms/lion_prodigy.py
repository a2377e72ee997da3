"""Lion with Prodigy's step size: :func:`lion_prodigy`, the update of adv_optm's legacy
``Lion_Prodigy_adv`` (release 2.2.3 and earlier; spec §9.6). Lion: Chen et al., "Symbolic Discovery
of Optimization Algorithms", arXiv 2302.06675. Prodigy: Mishchenko & Defazio, "Prodigy: An
Expeditiously Adaptive Parameter-Free Learner", arXiv 2306.06101.

The transform subclasses :class:`~adv_chain.transforms.prodigy.Prodigy`: the D-adaptation (the group
state ``d``, ``d_max``, ``d_numerator``, ``k``, the sliced statistics ``s``/``p0``, the reduction and
its ``finalize``, ``prodigy_steps``, the ``wd_scale`` signal) is Prodigy's own code, only the moments
and the direction are Lion's.

Why the Lion-K projection and the cautious mask live inside this transform instead of following it
as :func:`lion_k` and :func:`cautious`: the step is ``d * lr * P(c)`` where the projection ``P``
(a sign, or a per-tensor normalization) removes any factor put into ``c`` before it, so ``d`` must
be multiplied in after ``P``; and the decay is scaled by ``d`` through the ``wd_scale`` signal, which
cannot cross the per-tensor reduction of ``cautious``'s rescale. Their per-tensor sums (``||P(c)||``
and the mask count) are therefore taken in this transform's own reduction, on whole tensors, and kept
as a 0-d state per parameter, so the elementwise update stays exact on slices, under gradient release
(per-parameter stepping) and on sharded parameters.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .._core import checks
from .._core.transform import HParam, HostView, StateSpec, Transform
from .prodigy import Prodigy, _add_scaled_, _beta3, _state_dtype

Tensors = list[torch.Tensor]
#: elements per slice of the extra per-tensor sums (as Prodigy's own reduction: no full-size temporaries)
_SLICE = 1 << 18
#: the keywords of :class:`LionProdigy`; every other entry of ``args`` is a fixed Prodigy option
_PUBLIC = ("betas", "beta3", "d0", "d_coef", "growth_rate", "safeguard_warmup", "slice_p", "d_limiter",
           "prodigy_steps", "kappa_p", "auto_kappa_p", "cautious", "sum_across_ranks")


def _kappa_exponent(p: torch.Tensor) -> torch.Tensor:
    """``auto_kappa_p``: ``kappa - 1`` of a tensor, 1 (kappa = 2) for 4 or more dims, else 0 (sign)."""
    return torch.tensor(1.0 if p.dim() >= 4 else 0.0, dtype=torch.float32, device=p.device)


def _zero_scalar(p: torch.Tensor) -> torch.Tensor:
    """The per-tensor factor's storage: 0-d, fp32 (fp64 for an fp64 parameter, as Prodigy's statistics)."""
    return torch.zeros((), dtype=_state_dtype(p), device=p.device)


def _promoted(x: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 gradient in fp32, as the executor hands it to ``update`` (fp32/fp64 stay)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _agree(u: Tensors, g: Tensors) -> Tensors:
    """``1[u * g > 0]`` as fp32 (the cautious mask; zeros do not pass)."""
    mask = torch._foreach_sign(torch._foreach_mul(u, g))
    torch._foreach_clamp_min_(mask, 0.0)
    return mask


class LionProdigy(Prodigy):
    """Lion whose step size is Prodigy's ``d * lr`` (adv_optm 2.2.3's ``Lion_Prodigy_adv``, spec
    §9.6). With ``g`` the gradient (after the gradient stage), ``d`` the current estimate and
    ``P`` the Lion-K projection (spec §5.2), each step does::

        c = b1 m + d (1 - b1) g                the direction before projection
        m = b2 m + d (1 - b2) g
        u = d * P(c)                            cautious: d * P(c) * phi / max(mean(phi), 1e-3),
                                                          phi = 1[P(c) g > 0]
        P(c) = sign(c)                          kappa_p = 1
             = y sqrt(N) / max(||y||, 1e-12)    otherwise, y = sign(c) |c|^(kappa_p - 1) (per tensor of N)

    and publishes ``wd_scale = d`` (the decay transforms then decay by ``lr * wd * d``, i.e. by
    ``dlr``); the terminal applies ``p -= lr * u``. ``auto_kappa_p=True`` takes ``kappa = 2`` for
    tensors of 4 or more dims and the sign otherwise. ``d`` is estimated exactly as by
    :func:`adv_chain.prodigy` (spec §2.3, ``dlr = d * lr``, no bias correction): over every
    ``slice_p``-th element ``gs``, ``ps``, ``p0`` of ``g``, ``p`` and the initial ``p``::

        num = beta3 num + sum (d/d0) dlr <gs, p0 - ps> ;  s = beta3 s + (d/d0) (d if safeguard_warmup else dlr) gs
        d_hat = d_coef num / sum |s|   (d_limiter: at most 2^(1/4) d)
        d = max(d, d_hat) if d == d0 ;  d_max = max(d_max, d_hat) ;  d = min(d_max, d growth_rate)

    ``beta3=None`` means ``sqrt(b2)``. The step uses the ``d`` it started with (the new ``d`` takes
    effect at the next step), as the reference. Defaults are the reference's (``betas=(0.9, 0.99)``,
    ``slice_p=11``, ``d_limiter=True``); ``prodigy_steps=n > 0`` freezes ``d`` after a parameter's
    ``n``-th step and frees ``s``, ``p0``. ``sum_across_ranks=True`` (the preset's ``fsdp_in_use``)
    sums ``num`` and ``sum |s|`` over the ranks of parameters sharded as plain tensors, as
    :func:`adv_chain.prodigy` does; the per-tensor factors of ``P`` (``kappa_p != 1``) and of the
    cautious rescale stay sums over each rank's own shard, as the reference's.

    Deliberate differences from the reference: its factored path (``nnmf_factor``) updates ``m`` with
    ``b1`` instead of ``b2`` - a bug, not reproduced (factored state: wrap this transform in
    :func:`factored_state`, which rebuilds ``m`` dense for the reduction, see
    :attr:`reduce_reads_state`); a param group with ``lr = 0`` is left entirely untouched (no
    moment update, no statistics), where
    the reference still updates ``m`` and ``s``. Unlike :func:`adv_chain.prodigy`, a step
    whose statistics are all zero (``sum |s| = 0``) still moves the parameters with the current ``d``,
    as the reference does.

    State per parameter: ``exp_avg`` (fp32 for fp32/bf16 parameters), Prodigy's ``s`` and ``p0``,
    ``scale`` (0-d, in the statistics' dtype: the per-tensor factor of ``P`` and of the cautious
    rescale, only with ``kappa_p != 1``, ``auto_kappa_p`` or ``cautious``) and ``kappa_exp`` (0-d,
    with ``auto_kappa_p``).
    The global ``d``, ``d_max``, ``d_numerator``, ``k`` live in every param group under
    ``"lion_prodigy/..."``, ``group["d"]`` mirrors ``d`` (see :func:`adv_chain.prodigy`). Fed by
    ``group["betas"]``, ``group["beta3"]``, ``group["d_coef"]``, ``group["growth_rate"]``.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.ChainOptimizer(model.parameters(), ac.chain(ac.lion_prodigy(), ac.weight_decay(0.1), ac.apply()),
    ...                         lr=1.0)
    >>> x = torch.randn(8, 4)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(x).square().mean().backward(); opt.step()
    >>> float(opt.param_groups[0]["d"]) > 1e-6
    True
    """

    type_name = "lion_prodigy"
    default_name = "lion_prodigy"
    reads = frozenset({"update", "param", "grad"})
    hparams = {"betas": HParam("betas", checks.beta_pair), "beta3": HParam("beta3", _beta3),
               "d_coef": HParam("d_coef", checks.positive), "growth_rate": HParam("growth_rate", checks.positive)}

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99), beta3: float | None = None, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = math.inf, safeguard_warmup: bool = False,
                 slice_p: int = 11, d_limiter: bool = True, prodigy_steps: int = 0, kappa_p: float = 1.0,
                 auto_kappa_p: bool = False, cautious: bool = False, sum_across_ranks: bool = False, *,
                 name: str | None = None) -> None:
        owner = self.type_name
        extra = {"kappa_p": checks.number(owner, "kappa_p", kappa_p, lo=1.0),
                 "auto_kappa_p": checks.flag(owner, "auto_kappa_p", auto_kappa_p),
                 "cautious": checks.flag(owner, "cautious", cautious)}
        super().__init__(betas=betas, beta3=beta3, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                         safeguard_warmup=safeguard_warmup, slice_p=slice_p, d_limiter=d_limiter,
                         prodigy_steps=prodigy_steps, sum_across_ranks=sum_across_ranks, name=name)
        object.__setattr__(self, "args", MappingProxyType({**self.args, **extra}))

    # -- value semantics: only this transform's own keywords (the rest are fixed Prodigy options) ----
    def _public(self) -> dict[str, Any]:
        return {k: self.args[k] for k in _PUBLIC}

    def non_default_args(self) -> dict[str, Any]:
        return {k: v for k, v in super().non_default_args().items() if k in _PUBLIC}

    def renamed(self, name: str) -> Transform:
        return type(self)(name=name, **self._public())

    def with_args(self, **changes: Any) -> Transform:
        unknown = set(changes) - set(_PUBLIC)
        if unknown:
            raise TypeError(f"{self.type_name} has no argument(s) {sorted(unknown)}; it takes {sorted(_PUBLIC)}")
        return type(self)(name=self.name, **{**self._public(), **changes})

    def to_config(self) -> dict[str, Any]:
        cfg = Transform.to_config(self)
        cfg["args"] = {k: v for k, v in cfg["args"].items() if k in _PUBLIC}
        return cfg

    # -- state -------------------------------------------------------------------------------------
    @property
    def _scaled(self) -> bool:
        """Whether the direction needs a per-tensor factor from the reduction."""
        a = self.args
        return a["kappa_p"] != 1.0 or a["auto_kappa_p"] or a["cautious"]

    @property
    def reduce_reads_state(self) -> frozenset[str]:  # type: ignore[override]
        """The state keys :meth:`reduce` reads: the moment, for the per-tensor sums. A state wrapper
        (:func:`factored_state`, :func:`low_precision_state`) rebuilds them dense for the reduce."""
        return frozenset({"exp_avg"}) if self._scaled else frozenset()

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        specs = super().state_specs(param, hp)  # Prodigy's statistics (s, p0) and its moments
        specs.pop("exp_avg_sq", None)
        specs["exp_avg"] = StateSpec(kind="signed", factorable=True)  # Lion keeps m even with b1 = 0
        if self._scaled:
            specs["scale"] = StateSpec(scalar=True, build=_zero_scalar)
        if self.args["auto_kappa_p"]:
            specs["kappa_exp"] = StateSpec(scalar=True, build=_kappa_exponent)
        return specs

    # -- scalars -----------------------------------------------------------------------------------
    def state_scalars(self, state: Mapping[str, torch.Tensor], h: HostView) -> dict[str, Any]:
        out = super().state_scalars(state, h)  # d, and the statistics' coefficients num_coef, s_coef
        b1, b2 = h.hp["betas"][:2]
        out["c_coef"] = out["d"] * (1.0 - b1)
        out["m2_coef"] = out["d"] * (1.0 - b2)
        return out

    # -- the reduction -----------------------------------------------------------------------------
    def reduce(self, b: Any) -> list[torch.Tensor]:
        """Prodigy's statistics (its reduction, unchanged); with a projection or the cautious mask
        also each tensor's factor of ``P`` and of the mask rescale, stored in its ``scale``."""
        out = super().reduce(b)
        if self._scaled and b.s("lr_on"):
            self._direction_scales(b)
        return out

    def _direction(self, m: Tensors, g: Tensors, b: Any, exps: Tensors | None) -> Tensors:
        """``sign(c) |c|^(kappa - 1)`` of ``c = b1 m + d (1 - b1) g`` (a fresh list; shared by the
        reduction and the update, so both see the same numbers)."""
        c = torch._foreach_mul(m, b.s("b1"))
        _add_scaled_(c, g, b.s("c_coef"))
        kappa = self.args["kappa_p"]
        if exps is None and kappa == 1.0:
            torch._foreach_sign_(c)
        elif exps is not None or kappa != 2.0:
            mag = torch._foreach_abs(c)
            if exps is None:
                torch._foreach_pow_(mag, kappa - 1.0)
            else:
                mag = torch._foreach_pow(mag, exps)  # |c|^0 = 1: the sign
            torch._foreach_sign_(c)
            torch._foreach_mul_(c, mag)
        return c

    def _direction_scales(self, b: Any) -> None:
        auto, cautious = self.args["auto_kappa_p"], self.args["cautious"]
        exps = b.state("kappa_exp") if auto else [None] * len(b.params)
        for m, g, ref, scale, e, p in zip(b.state("exp_avg"), b.u, b.grads, b.state("scale"), exps, b.params):
            n = m.numel()
            kappa = (2.0 if p.dim() >= 4 else 1.0) if auto else self.args["kappa_p"]
            m, g, ref = m.reshape(-1), g.reshape(-1), ref.reshape(-1)
            acc = torch.float32 if m.device.type == "mps" else torch.float64  # mps has no float64
            sums = torch.zeros(2, dtype=acc, device=m.device)  # ||y||^2, mask count
            for start in range(0, n, _SLICE):
                end = min(n, start + _SLICE)
                g_j = _promoted(g[start:end])  # as the update sees it
                y = self._direction([m[start:end]], [g_j], b, None if e is None else [e])
                if kappa != 1.0:
                    sums[0] += torch.linalg.vector_norm(y[0]).to(acc).square()
                if cautious:
                    sums[1] += _agree(y, [_promoted(ref[start:end])])[0].sum(dtype=acc)
            factor = torch.ones((), dtype=acc, device=m.device)
            if kappa != 1.0:
                factor = math.sqrt(n) / sums[0].sqrt().clamp_min(1e-12)
            if cautious:
                factor = factor / (sums[1] / max(n, 1)).clamp_min(1e-3)
            scale.copy_(factor)

    # -- the update --------------------------------------------------------------------------------
    def update(self, b: Any) -> None:
        if not b.s("lr_on"):
            b.skip_apply = True  # as Prodigy: a group with lr = 0 is not touched
            return
        g = b.u
        m = b.state("exp_avg")
        y = self._direction(m, g, b, b.state("kappa_exp") if self.args["auto_kappa_p"] else None)
        torch._foreach_mul_(m, b.s("b2"))
        _add_scaled_(m, g, b.s("m2_coef"))
        if self.args["cautious"]:
            torch._foreach_mul_(y, _agree(y, b.grads))
        if self._scaled:
            torch._foreach_mul_(y, b.state("scale"))
        d = b.s("d")
        b.set_u_scaled(y, d)  # u = d * P(c): the terminal folds d into its lr
        b.signals[self.args["decay_signal"]] = d


lion_prodigy = LionProdigy
