"""Prodigy presets (Mishchenko & Defazio, arXiv 2306.06101): prodigyopt's ``Prodigy`` and adv_optm's
``Prodigy_adv``, both around the global :func:`adv_chain.prodigy` transform."""
from __future__ import annotations

import math
from typing import Any

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from ._registry import register
from ..transforms.prodigy import ProdigyFisherWD
from .adv import centered_stage, decay_stage, gradient_stage, kourkoutas_stage, spectral_stage
from ._storage import state_precision_mode, stored
from .classic import terminal


@register
def prodigy(betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None, eps: float = 1e-8,
            weight_decay: float = 0.0, decouple: bool = True, use_bias_correction: bool = False,
            safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
            fsdp_in_use: bool = False, slice_p: int = 1, stochastic_rounding: bool = False,
            kahan_sum: bool = False) -> Chain:
    """Prodigy as ``prodigyopt.Prodigy`` 1.1.2 computes it (same keywords and defaults; use ``lr=1``):
    Adam with the step size ``d * lr`` estimated by :func:`adv_chain.prodigy` from all parameters.
    ``decouple=True`` decays the weights by ``d * lr * weight_decay`` (:func:`weight_decay`, scaled
    by the ``wd_scale`` Prodigy publishes); ``decouple=False`` adds ``weight_decay * p`` to the
    gradient first (:func:`add_l2`), which then also enters the ``d`` estimate, as prodigyopt.
    ``stochastic_rounding``/``kahan_sum`` choose the terminal for bf16 weights (prodigyopt has none).
    ``fsdp_in_use=True`` (for FSDP1 flat shards / ZeRO, where each rank holds part of each parameter
    as a plain tensor) sums Prodigy's numerator and ``sum |s|`` over the default process group before
    ``d`` is computed (:func:`adv_chain.prodigy`'s ``sum_across_ranks``); it needs an initialized
    process group. FSDP2's DTensor parameters need no flag (and refuse it).

    >>> import adv_chain as ac
    >>> ac.presets.prodigy(weight_decay=0.01).names
    ('prodigy', 'weight_decay', 'apply')
    >>> ac.presets.prodigy(weight_decay=0.01, decouple=False).names
    ('add_l2', 'prodigy', 'apply')
    """
    name = "prodigy"
    checks.positive(name, "eps", eps)
    checks.nonneg(name, "weight_decay", weight_decay)
    decoupled = checks.flag(name, "decouple", decouple)
    return chain(
        *(() if decoupled else (T.add_l2(weight_decay),)),
        T.prodigy(betas=betas, eps=eps, beta3=beta3, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                  safeguard_warmup=safeguard_warmup, use_bias_correction=use_bias_correction, slice_p=slice_p,
                  sum_across_ranks=checks.flag(name, "fsdp_in_use", fsdp_in_use)),
        *((T.weight_decay(weight_decay),) if decoupled else ()),
        terminal(stochastic_rounding, kahan_sum),
    )


@register
def prodigy_adv(betas: tuple[float, float] = (0.9, 0.999), eps: float | None = 1e-8, weight_decay: float = 0.0,
                fisher_wd: bool = False, cautious_wd: bool = False, stochastic_rounding: bool = True,
                use_atan2: bool = False, orthogonal_gradient: Any = "disabled", nesterov: bool = False,
                nesterov_coef: float | None = None, state_precision: str = "auto", factored_2nd: bool = False,
                nnmf_factor: bool = False, vector_reshape: bool = False, beta3: float | None = None,
                d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf, safeguard_warmup: bool = False,
                fsdp_in_use: bool = False, slice_p: int = 11, prodigy_steps: int = 0, d_limiter: bool = False,
                kourkoutas_beta: bool = False, beta2_min: float = 0.9, ema_alpha: float = 0.95,
                tiny_spike: float = 1e-9, k_warmup_steps: int = 0, k_logging: int = 0, layer_key_fn: Any = None,
                centered_wd: float = 0.0,
                centered_wd_mode: str = "float8", spectral_normalization: bool = False, seed: int = 0) -> Chain:
    """adv_optm 2.5.16's ``Prodigy_adv`` (its keywords and defaults, ``slice_p=11``): OrthoGrad
    (``orthogonal_gradient``), :func:`adv_chain.prodigy` with ``step_d="current"`` (adv_optm scales
    eps by the ``d`` the step started with), ``d_limiter``, ``use_atan2`` (``(4/pi) atan2``, no eps),
    ``nesterov``/``nesterov_coef`` with the reference's bug B2 fixed (the gradient term is scaled by
    ``d`` too), decay by ``d * lr`` (``cautious_wd`` masks it), stochastic rounding of bf16 weights.
    ``prodigy_steps`` stops adapting ``d`` after that many steps; ``eps=None`` is the scale-invariant
    ``1/sqrt(N)``; ``kourkoutas_beta`` (with ``beta2_min``, ``ema_alpha``, ``tiny_spike``,
    ``k_warmup_steps``) gives ``v`` a per-layer ``beta2`` as adv_optm (shape-shared layers, last
    step's norms, a ramp from ``betas[1]``; ``beta3`` stays ``sqrt(betas[1])``; ``k_logging`` is
    unused, as in adv_optm), computed inside :func:`adv_chain.prodigy`'s reduction;
    ``centered_wd``/``centered_wd_mode`` -> :func:`centered_wd` after the ordinary decay;
    ``fisher_wd`` -> :class:`~adv_chain.transforms.prodigy.ProdigyFisherWD` (:func:`fisher_wd` on
    Prodigy's denominator ``sqrt(v) + d*eps``), Prodigy's ``d`` then reaching the decays as
    ``lr_scale``. ``state_precision`` ``'auto'``/``'fp32'`` both keep fp32 moments; ``'bf16_sr'``,
    ``'int8_sr'``, ``'factored'``/``nnmf_factor``, ``factored_2nd`` and ``vector_reshape`` store
    Prodigy's moments through :func:`low_precision_state` / :func:`factored_state` (its ``s`` and
    ``p0`` stay dense, as in adv_optm); ``'fp16'`` is refused (Prodigy's ``v`` is of order ``d^2``,
    below fp16's range; adv_optm's fp16 state diverges). ``fsdp_in_use=True`` sums Prodigy's
    step sums over the ranks, as :func:`prodigy` (adv_optm all-reduces ``beta3 * d_numerator`` too,
    counting the history once per rank: not reproduced). ``spectral_normalization`` ->
    :func:`spectral_normalization` with Prodigy's ``d`` kept as the step size (adv_optm: ``spectral(u, d*lr)``).

    >>> import adv_chain as ac
    >>> ac.presets.prodigy_adv(orthogonal_gradient="flattened", weight_decay=0.1, cautious_wd=True).names
    ('orthograd', 'prodigy', 'weight_decay', 'apply')
    >>> ac.presets.prodigy_adv(fisher_wd=True, weight_decay=0.1, centered_wd=0.5).names
    ('prodigy', 'fisher_wd', 'weight_decay', 'centered_wd', 'apply')
    """
    name = "prodigy_adv"
    if state_precision_mode(name, state_precision) == "fp16":
        raise ValueError(f"{name}: state_precision={state_precision!r} is not allowed for Prodigy: its second moment "
                         "is of order d^2 (1e-12 at d0=1e-6), which fp16 (smallest normal 6e-5) flushes to zero; use "
                         "one of 'auto', 'fp32', 'bf16_sr', 'int8_sr', 'factored'")
    checks.flag(name, "vector_reshape", vector_reshape)
    checks.nonneg(name, "weight_decay", weight_decay)
    if eps is not None:
        checks.nonneg(name, "eps", eps)
    fisher = checks.flag(name, "fisher_wd", fisher_wd)
    use_atan2 = checks.flag(name, "use_atan2", use_atan2)
    layer = kourkoutas_stage(name, kourkoutas_beta, betas, beta2_min, ema_alpha, tiny_spike, k_warmup_steps,
                             layer_key_fn)
    # fisher_wd sets the decays' per-element wd_scale: Prodigy's d then reaches them as lr_scale
    step_signal = "lr_scale" if fisher else "wd_scale"
    moments = T.prodigy(betas=betas, eps=eps, beta3=beta3, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                        safeguard_warmup=safeguard_warmup, slice_p=slice_p, d_limiter=d_limiter, step_d="current",
                        use_atan2=use_atan2, nesterov=checks.flag(name, "nesterov", nesterov),
                        nesterov_coef=nesterov_coef, prodigy_steps=prodigy_steps,
                        kourkoutas=layer[0] if layer else None, publish_denom=fisher, decay_signal=step_signal,
                        sum_across_ranks=checks.flag(name, "fsdp_in_use", fsdp_in_use))
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        stored(name, moments, state_precision=state_precision, nnmf_factor=nnmf_factor, factored_2nd=factored_2nd,
               vector_reshape=vector_reshape, seed=seed),
        # fisher_wd on the published denominator, which holds d*eps already
        *((ProdigyFisherWD(atan2=use_atan2),) if fisher else ()),
        *spectral_stage(name, spectral_normalization, seed, step_size=step_signal),
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )
