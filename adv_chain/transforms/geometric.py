"""Geometric weight decay (adv_optm's ``geometric_wd`` of SignSGD_adv / SinkSGD_adv, spec §7.5):
decoupled decay reshaped to the geometry of a sign or Sinkhorn update."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, Transform
from .decay import WeightDecay, _agree_mask
from .sign_family import is_vector, key_halves, matrix, snr_denominator, snr_row_col, stochastic_sign_of, tensor_keys, \
    vector_tagged


def signed_target(p32: torch.Tensor, prev: torch.Tensor | None, stochastic: bool, key: Any,
                  vector: bool) -> torch.Tensor:
    """The signed decay target of spec §7.5: ``T = sign(p)`` (or its stochastic sign), with an SNR
    denominator ``T <- atan2(T, D)`` and ``tau = max(||T||, 1/sqrt(N))``, else ``tau = sqrt(N)``;
    then ``T * ||p|| / tau`` (the L2 norm of ``p``)."""
    t = stochastic_sign_of(p32, key, vector) if stochastic else torch.sign(p32)
    n = p32.numel()
    if prev is not None:
        t = torch.atan2(t, snr_denominator(prev))
        tau = torch.linalg.vector_norm(t).clamp_min(1.0 / math.sqrt(n))
    else:
        tau = math.sqrt(n)
    return t * (torch.linalg.vector_norm(p32) / tau)


def structural_scaler(p32: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """SinkSGD's per-element decay multiplier of a matrix (spec §7.5): ``rho_i = max(||p_i.||,
    1/sqrt(cols))``, ``gamma_j = max(||p_.j||, 1/sqrt(rows))``, factors ``sqrt(rho)``, ``sqrt(gamma)``
    (with SNR: ``atan2(sqrt(rho), sqrt(r_i))``, ``atan2(sqrt(gamma), sqrt(c_j))``), ``S = outer / mean``."""
    pm = matrix(p32)
    rows, cols = pm.shape
    row = torch.linalg.vector_norm(pm, dim=1, keepdim=True).clamp_min(1.0 / math.sqrt(cols)).sqrt()
    col = torch.linalg.vector_norm(pm, dim=0, keepdim=True).clamp_min(1.0 / math.sqrt(rows)).sqrt()
    if prev is not None:
        r, c = snr_row_col(prev)
        row = torch.atan2(row, r.sqrt().view(rows, 1))
        col = torch.atan2(col, c.sqrt().view(1, cols))
    s = row * col
    return (s / s.mean().clamp_min(1e-12)).view(p32.shape)


class GeometricWD(Transform):
    """Geometric weight decay (adv_optm's ``geometric_wd``, spec §7.5). Replaces :func:`weight_decay`:
    with ``c = lr * weight_decay`` the terminal applies ``p <- p - c * M * T`` where

    * ``structural=False`` (SignSGD, every tensor) and, with ``structural=True``, vectors: ``T`` is
      the signed target ``sign(p)`` (``stochastic=True``: its stochastic sign, as
      :func:`stochastic_sign`) divided through ``atan2`` by the SNR level ``sqrt(1 - m_prev^2)`` when
      a :func:`sign_momentum` publishes ``prev_momentum``, and rescaled to the L2 norm of ``p``: a
      decay of the same strength as L2's, shaped like a sign update;
    * ``structural=True`` (SinkSGD), matrices: ``T = S * p`` with the structural scaler ``S`` (row and
      column norms of ``p``, optionally SNR-weighted, normalized to mean 1): dominant rows/columns
      decay more. ``S`` is also published as ``wd_scale`` (1 for vectors), which a later
      :func:`centered_wd` multiplies its decay by, as the reference scales both.

    A later :func:`centered_wd` takes the same geometry (the reference's ``cwd_target``): for every
    tensor decayed toward a signed target, this publishes the ``decay_target`` signal, with which
    the centered term becomes ``strength * lr * M' * T(p - a)``, the signed target built from the
    distance of the undecayed weights to the anchor ``a`` (same SNR denominator; stochastic with
    ``stochastic=True``, from noise of its own) and ``M' = 1[u * T(p - a) >= 0]`` when cautious.
    ``structural=True`` (SinkSGD) publishes it for vectors even while ``weight_decay`` is 0, and its
    matrices keep ``p' - a`` scaled by ``S``; ``structural=False`` (SignSGD) publishes nothing while
    ``weight_decay`` is 0 (the centered term is then the plain ``p - a``), as the reference.

    ``M = 1[u * p >= 0]`` with ``cautious=True`` (adv_optm's ``cautious_wd``), else 1. ``T`` is
    computed from the weights before the step. Nothing is decayed while ``weight_decay`` is 0 (the
    reference's rule). Fed by ``group["weight_decay"]``. Needs whole tensors.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign_momentum(0.9), ac.sign(), ac.geometric_wd(0.1), ac.apply()).names
    ('sign_momentum', 'sign', 'geometric_wd', 'apply')
    """

    type_name = "geometric_wd"
    default_name = "geometric_wd"
    stage = "decay"
    scope = "tensor"
    consumes = frozenset({"sig:prev_momentum"})  # optional: the SNR level, when a momentum publishes it
    hparams = {"weight_decay": HParam("weight_decay", checks.nonneg)}
    static_scalars = frozenset({"vector_tagged", "wd_on"})
    #: the noise of the centered target's stochastic sign: the tensor keys xor this
    CENTERED_SALT = 0x2C1B3C6D

    def __init__(self, weight_decay: float = 0.01, structural: bool = False, cautious: bool = False,
                 stochastic: bool = False, seed: int = 0, *, name: str | None = None) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{self.type_name}: seed={seed!r} must be an int >= 0")
        super().__init__(name=name, weight_decay=weight_decay,
                         structural=checks.flag(self.type_name, "structural", structural),
                         cautious=checks.flag(self.type_name, "cautious", cautious),
                         stochastic=checks.flag(self.type_name, "stochastic", stochastic), seed=seed)

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"param", "update"}) if self.args["cautious"] else frozenset({"param"})

    @property
    def writes(self) -> frozenset[str]:  # type: ignore[override]
        return self.optional_signals | {"decay"}

    @property
    def optional_signals(self) -> frozenset[str]:  # type: ignore[override]
        # decay_target: read only by a later centered_wd
        return frozenset({"sig:wd_scale", "sig:decay_target"}) if self.args["structural"] else frozenset(
            {"sig:decay_target"})

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        wd = h.hp["weight_decay"]
        return {"coef": wd * h.lr, "wd_on": wd > 0, "vector_tagged": vector_tagged(h),
                **key_halves(h.hp["seed"], h.step, 0x6E0D)}

    def update(self, b: Any) -> None:
        coef = WeightDecay._coef(b)
        structural, stochastic = self.args["structural"], self.args["stochastic"]
        on = b.s("wd_on")  # static (weight_decay > 0): the reference's switch, for the centered target too
        if not (on or structural):
            return
        decaying = on and not F.is_zero(coef)
        prev = b.signals.get("prev_momentum")
        tagged = b.s("vector_tagged")
        keys = tensor_keys(b) if stochastic else [None] * len(b.params)
        terms, scales, targets = [], [], []
        for i, p in enumerate(b.params):
            m = None if prev is None else prev[i]
            vector = is_vector(p, tagged)
            signed = vector or not structural
            # centered_wd's target: T(p - a), computed there from the distance
            targets.append(functools.partial(signed_target, prev=m, stochastic=stochastic, vector=vector,
                                             key=None if keys[i] is None else keys[i] ^ self.CENTERED_SALT)
                           if signed else None)
            if not decaying:
                continue
            p32 = p.detach().float()
            if signed:
                terms.append(signed_target(p32, m, stochastic, keys[i], vector))
                scales.append(torch.ones((), device=p.device))
            else:
                s = structural_scaler(p32, m)
                terms.append(s * p32)
                scales.append(s)
        b.signals["decay_target"] = targets
        if not decaying:
            return
        if self.args["cautious"]:
            torch._foreach_mul_(terms, _agree_mask(b.u, [p.detach().float() for p in b.params]))
        torch._foreach_mul_(terms, coef)
        b.add_decay(terms)
        if structural:
            b.signals["wd_scale"] = scales


geometric_wd = GeometricWD
