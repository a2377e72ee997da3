"""adv_optm 2.5.16's sign-family optimizers as chains: ``SignSGD_adv`` (Signum) and ``SinkSGD_adv``
(SinkGD), with the reference's keywords and defaults (spec §2.5, §2.6, §13.1); plus the parts of
``Lion_adv`` they share (Lion-K, stochastic sign, the legacy per-tensor clip).

Deliberate differences from the reference (its bugs fixed, spec §10): ``snr_cond=True`` needs
``normed_momentum=True`` and ``momentum > 0`` and says so (SignSGD_adv silently ignores it otherwise,
SinkSGD_adv crashes or blows up, B11); the gradient is normalized as a copy, ``p.grad`` is never
written (B12); stochastic sign uses the matrix view of >= 3-D tensors (B16) and counter-based
noise; moments stay fp32 for bf16 weights.
"""
from __future__ import annotations

from typing import Any

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from .._core.transform import Transform
from ._registry import register
from ._storage import stored
from .adv import centered_stage, decay_stage, gradient_stage, spectral_stage
from .classic import terminal


def lion_projection(preset: str, kappa_p: float, auto_kappa_p: bool, stochastic_sign: bool,
                    seed: int) -> tuple[Transform, ...]:
    """What follows ``scale_by_lion(sign=False)`` for the reference's Lion options (spec §2.4):
    :func:`stochastic_sign` (it wins over kappa, as the reference), else :func:`lion_k`; empty for
    plain Lion (``scale_by_lion`` then takes the sign itself)."""
    kappa = checks.number(preset, "kappa_p", kappa_p, lo=1.0)
    auto = checks.flag(preset, "auto_kappa_p", auto_kappa_p)
    if checks.flag(preset, "stochastic_sign", stochastic_sign):
        return (T.stochastic_sign(seed=seed),)
    if auto or kappa != 1.0:
        return (T.lion_k(kappa_p=kappa, auto=auto),)
    return ()


def tensor_clip_stage(preset: str, clip_threshold: float) -> tuple[Transform, ...]:
    """adv_optm 2.2.3's ``clip_threshold`` (spec §9.5): a per-tensor norm clip before OrthoGrad
    (0 = off)."""
    if checks.nonneg(preset, "clip_threshold", clip_threshold) == 0:
        return ()
    return (T.clip_by_tensor_norm(clip_threshold),)


def _common(preset: str, normed_momentum: bool, snr_cond: bool, momentum: float,
            geometric_wd: bool) -> tuple[bool, bool, bool]:
    normed = checks.flag(preset, "normed_momentum", normed_momentum)
    snr = checks.flag(preset, "snr_cond", snr_cond)
    checks.unit_interval(preset, "momentum", momentum)
    if snr and (not normed or momentum == 0):
        raise ValueError(f"{preset}: snr_cond=True needs normed_momentum=True and momentum > 0 (got normed_momentum="
                         f"{normed_momentum!r}, momentum={momentum!r}): it measures the noise of a momentum of "
                         "normalized gradients")
    return normed, snr, checks.flag(preset, "geometric_wd", geometric_wd)


def _decay(weight_decay: float, cautious_wd: bool, geometric: bool, structural: bool, stochastic: bool,
           seed: int) -> Transform:
    if geometric:
        return T.geometric_wd(weight_decay, structural=structural, cautious=checks.flag("preset", "cautious_wd",
                                                                                        cautious_wd),
                              stochastic=stochastic, seed=seed, name="weight_decay")
    return decay_stage(weight_decay, cautious_wd)


@register
def signsgd_adv(momentum: float = 0.9, weight_decay: float = 0.0, geometric_wd: bool = False,
                cautious_wd: bool = False, stochastic_rounding: bool = True, orthogonal_gradient: Any = "disabled",
                stochastic_sign: bool = False, nesterov: bool = False, nesterov_coef: float | None = None,
                normed_momentum: bool = False, snr_cond: bool = False, centered_wd: float = 0.0,
                centered_wd_mode: str = "float8", state_precision: str = "auto",
                spectral_normalization: bool = False, nnmf_factor: bool = False, vector_reshape: bool = False,
                seed: int = 0) -> Chain:
    """adv_optm's ``SignSGD_adv``: Signum (Bernstein et al., "signSGD: Compressed Optimisation for
    Non-Convex Problems", arXiv 1802.04434) with the reference's options (spec §2.5)::

        normed_momentum=False:  m = beta*m + (1-beta)*g ;  u = S(m)   (nesterov: S((1-c)*g + c*m))
        normed_momentum=True:   x = S(g) ; m = beta*m + (1-beta)*x ;  u = m
                                (nesterov: (1-c)*|m_prev|*x + c*m ;  snr_cond: (4/pi)*atan2(u, sqrt(1-m_prev^2)))
        p <- p - lr*u - lr*weight_decay*(p, or the geometric target T(p) with geometric_wd)
               - lr*centered_wd*(p' - a, or T(p - a) with geometric_wd and weight_decay > 0)

    ``S`` = :func:`sign`, or :func:`stochastic_sign` with ``stochastic_sign=True``; the momentum is
    :func:`sign_momentum` (``momentum=0``: plain signSGD, no state); ``snr_cond`` ->
    :func:`snr_condition`; ``geometric_wd`` -> :func:`geometric_wd` (signed target, stochastic with
    ``stochastic_sign``), which also shapes :func:`centered_wd`'s pull toward the anchor ``a`` (the
    signed target of the distance, as adv-optm 2.5.16; ``p'``: the weights after the other decay);
    ``state_precision``/``nnmf_factor`` wrap the momentum as the other presets do. Defaults
    (``momentum=0.9``; the drop-in's ``lr=1e-4``) are the reference's.

    >>> import adv_chain as ac
    >>> ac.presets.signsgd_adv(weight_decay=0.1).names
    ('sign_momentum', 'sign', 'weight_decay', 'apply')
    >>> ac.presets.signsgd_adv(normed_momentum=True, snr_cond=True, geometric_wd=True, weight_decay=0.1).names
    ('sign', 'sign_momentum', 'snr_condition', 'weight_decay', 'apply')
    """
    name = "signsgd_adv"
    normed, snr, geometric = _common(name, normed_momentum, snr_cond, momentum, geometric_wd)
    stochastic = checks.flag(name, "stochastic_sign", stochastic_sign)
    direction = T.stochastic_sign(seed=seed) if stochastic else T.sign()
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        *((direction,) if normed else ()),
        stored(name, T.sign_momentum(momentum, nesterov=checks.flag(name, "nesterov", nesterov),
                                     nesterov_coef=nesterov_coef, snr_recovery=normed, publish_prev=snr),
               state_precision=state_precision, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, seed=seed),
        *(() if normed else (direction,)),
        *((T.snr_condition(),) if snr else ()),
        *spectral_stage(name, spectral_normalization, seed),
        _decay(weight_decay, cautious_wd, geometric, False, stochastic, seed),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )


@register
def sinksgd_adv(momentum: float = 0.0, weight_decay: float = 0.0, sinkhorn_iterations: int = 5,
                orthogonal_sinkhorn: bool = False, normed_momentum: bool = False, snr_cond: bool = False,
                nesterov: bool = False, nesterov_coef: float | None = None, geometric_wd: bool = False,
                cautious_wd: bool = False, stochastic_rounding: bool = True, orthogonal_gradient: Any = "disabled",
                spectral_normalization: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
                state_precision: str = "auto", nnmf_factor: bool = False, vector_reshape: bool = False,
                seed: int = 0) -> Chain:
    """adv_optm's ``SinkSGD_adv``: SinkGD (Scetbon et al., "Gradient Multi-Normalization for
    Stateless and Scalable LLM Training", arXiv 2502.06742) with the reference's options (spec
    §2.6): the direction is SR-Sinkhorn normalized (:func:`sinkhorn`, ``sinkhorn_iterations`` sweeps;
    ``orthogonal_sinkhorn`` projects out the weights too), vectors take the sign::

        normed_momentum=False:  b = lerp(b, g, 1-momentum) ;  u = Sinkhorn(b)    (momentum=0: Sinkhorn(g))
        normed_momentum=True:   x = Sinkhorn(g) ; b = lerp(b, x, 1-momentum) ;  u = b
        nesterov, snr_cond:     as signsgd_adv, snr_cond with row/column variances for matrices

    ``geometric_wd`` -> ``geometric_wd(structural=True)``: matrices decay by a row/column structural
    scaler ``S``, vectors toward the signed target ``T(p)``. With ``centered_wd`` too, matrices decay
    toward the anchor by ``S * (p' - a)`` (while ``weight_decay > 0``, else ``p' - a``), vectors by
    ``T(p - a)`` (also at ``weight_decay=0``), as adv-optm 2.5.16. Defaults (``momentum=0``,
    ``sinkhorn_iterations=5``; the drop-in's ``lr=1e-3``) are the reference's.

    >>> import adv_chain as ac
    >>> ac.presets.sinksgd_adv().names
    ('sign_momentum', 'sinkhorn', 'weight_decay', 'apply')
    >>> ac.presets.sinksgd_adv(momentum=0.9, normed_momentum=True, snr_cond=True).names
    ('sinkhorn', 'sign_momentum', 'snr_condition', 'weight_decay', 'apply')
    """
    name = "sinksgd_adv"
    normed, snr, geometric = _common(name, normed_momentum, snr_cond, momentum, geometric_wd)
    if not isinstance(sinkhorn_iterations, int) or isinstance(sinkhorn_iterations, bool) or sinkhorn_iterations < 0:
        raise ValueError(f"{name}: sinkhorn_iterations={sinkhorn_iterations!r} must be an int >= 0")
    direction = T.sinkhorn(iterations=sinkhorn_iterations,
                           orthogonal=checks.flag(name, "orthogonal_sinkhorn", orthogonal_sinkhorn))
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        *((direction,) if normed else ()),
        stored(name, T.sign_momentum(momentum, nesterov=checks.flag(name, "nesterov", nesterov),
                                     nesterov_coef=nesterov_coef, snr_recovery=normed, publish_prev=snr),
               state_precision=state_precision, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, seed=seed),
        *((T.snr_condition(mode="sinkhorn"),) if snr else ()),
        *(() if normed else (direction,)),
        *spectral_stage(name, spectral_normalization, seed),
        _decay(weight_decay, cautious_wd, geometric, True, False, seed),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )
