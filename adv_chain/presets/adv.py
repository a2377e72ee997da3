"""The adv_optm family as chains, accepting the reference's keywords (2.5.16 and legacy 2.2.3).

Each preset maps the reference's flags onto transforms; :mod:`adv_chain.optim` wraps them as
drop-in classes (``AdamW_adv``...). The drop-ins reproduce the reference's numbers: they select
the transform options that match its deviations from the papers (e.g. atan2 with the bias
correction outside). Known reference bugs are fixed, never reproduced. Flags whose features are
not in adv_chain yet raise ``NotImplementedError`` naming the flag, never silently ignored.
"""
from __future__ import annotations

import warnings
from typing import Any

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from .._core.transform import Transform
from ._registry import register
from ._storage import stored
from .classic import terminal

_ORTHO_MODES = ("disabled", "flattened", "iterative", True, False)


def not_yet(preset: str, **flags: Any) -> None:
    """Raise for the first reference flag whose value selects a feature adv_chain does not have yet
    (a truthy value; pass the default-equivalent ``None``/``False``/``0`` for a flag left alone)."""
    for flag, value in flags.items():
        if value:
            raise NotImplementedError(
                f"{preset}: {flag}={value!r} selects a feature adv_chain does not implement yet; leave it at its "
                "default (or use the reference optimizer for it)")


def gradient_stage(preset: str, orthogonal_gradient: Any) -> tuple[Transform, ...]:
    """OrthoGrad from the reference's ``orthogonal_gradient`` (2.5.16 string or legacy bool):
    ``'flattened'``/``True`` -> :func:`orthograd`, ``'iterative'`` -> ``orthograd(mode='iterative')``."""
    if orthogonal_gradient not in _ORTHO_MODES or isinstance(orthogonal_gradient, int) and not isinstance(
            orthogonal_gradient, bool):
        raise ValueError(f"{preset}: orthogonal_gradient={orthogonal_gradient!r} must be 'disabled', 'flattened', "
                         "'iterative' or (legacy) a bool")
    if orthogonal_gradient == "iterative":
        return (T.orthograd(mode="iterative"),)
    # per_rank=False: adv_optm projects a LoRA/OFT factor as one vector
    return (T.orthograd(per_rank=False),) if orthogonal_gradient in ("flattened", True) else ()


def direction_mask(preset: str, cautious_mask: bool, grams_moment: bool,
                   whole_tensors: bool = False) -> tuple[Transform, ...]:
    """The legacy masks: Grams takes precedence over cautious (with a warning), as the reference.
    ``whole_tensors``: the cautious count runs inside a whole-tensor segment (after ``fisher_wd``,
    whose per-element ``wd_scale`` must reach the decay)."""
    checks.flag(preset, "cautious_mask", cautious_mask)
    checks.flag(preset, "grams_moment", grams_moment)
    if grams_moment and cautious_mask:
        warnings.warn(f"{preset}: cautious_mask and grams_moment are both set; Grams takes precedence and the "
                      "cautious mask is off (as in adv_optm)", stacklevel=3)
    if grams_moment:
        return (T.grams(),)
    return (T.cautious(rescale="mean", whole_tensors=whole_tensors),) if cautious_mask else ()


def kourkoutas_stage(preset: str, enabled: bool, betas: Any, beta2_min: float, ema_alpha: float, tiny_spike: float,
                     warmup: int, layer_key_fn: Any = None) -> tuple[Transform, ...]:
    """adv_optm's ``kourkoutas_beta``: shape-shared layers (or the layers of ``layer_key_fn``),
    previous step's norms, a warm-up that ramps from beta2_max (its deviations from the paper, see
    :func:`kourkoutas_beta`)."""
    if not checks.flag(preset, "kourkoutas_beta", enabled):
        return ()
    if layer_key_fn is not None and not callable(layer_key_fn) and not (
            isinstance(layer_key_fn, str) and ":" in layer_key_fn):
        raise ValueError(f"{preset}: layer_key_fn={layer_key_fn!r} must be None, a function param -> hashable key "
                         "(parameters with equal keys share one Kourkoutas-beta layer) or a 'module:function' string")
    return (T.kourkoutas_beta(beta2_min=beta2_min, beta2_max=betas[1], ema_alpha=ema_alpha, tiny_spike=tiny_spike,
                              warmup=warmup, warmup_mode="ramp", lag=True,
                              layer_key="shape" if layer_key_fn is None else layer_key_fn),)


def _normed_mode(preset: str, normed_momentum: bool, use_atan2: bool, use_ademamix: bool) -> str | None:
    """scale_by_adam's ``normed_momentum`` mode for the reference's flag (``None``: off)."""
    if not checks.flag(preset, "normed_momentum", normed_momentum):
        return None
    if use_ademamix:
        raise ValueError(f"{preset}: normed_momentum=True cannot be combined with use_AdEMAMix=True (the slow EMA "
                         "would be added unnormalized to a normalized direction; no reference version has both)")
    return "atan2" if use_atan2 else "eps"


def spectral_stage(preset: str, enabled: bool, seed: int, step_size: str | None = None) -> tuple[Transform, ...]:
    """adv_optm's ``spectral_normalization`` (:func:`spectral_normalization`, after the direction masks)."""
    if not checks.flag(preset, "spectral_normalization", enabled):
        return ()
    return (T.spectral_normalization(seed=seed, step_size=step_size),)


def decay_stage(weight_decay: float, cautious_wd: bool) -> Transform:
    if checks.flag("preset", "cautious_wd", cautious_wd):
        return T.cautious_wd(weight_decay, name="weight_decay")
    return T.weight_decay(weight_decay)


def centered_stage(preset: str, centered_wd: float, centered_wd_mode: str, cautious_wd: bool) -> tuple[Transform, ...]:
    """adv_optm's ``centered_wd``/``centered_wd_mode`` (after the ordinary decay, as the reference;
    ``cautious_wd`` masks it too). ``centered_wd=0`` adds nothing and stores no anchor."""
    checks.nonneg(preset, "centered_wd", centered_wd)
    checks.choice(preset, "centered_wd_mode", centered_wd_mode, T.decay.ANCHOR_MODES)
    if centered_wd == 0:
        return ()
    return (T.centered_wd(centered_wd, anchor=centered_wd_mode, cautious=cautious_wd),)


def fisher_stage(preset: str, fisher_wd: bool, eps: float, use_atan2: bool) -> tuple[Transform, ...]:
    """adv_optm's ``fisher_wd``: placed before the normalizer, where the denominator is published."""
    if not checks.flag(preset, "fisher_wd", fisher_wd):
        return ()
    return (T.fisher_wd(eps=eps, atan2=use_atan2),)


@register
def adamw_adv(betas: tuple[float, float] = (0.9, 0.999), eps: float | None = 1e-8, weight_decay: float = 0.0,
              fisher_wd: bool = False, cautious_wd: bool = False, use_bias_correction: bool = True,
              stochastic_rounding: bool = True, use_atan2: bool = False, orthogonal_gradient: Any = "disabled",
              nesterov: bool = False, nesterov_coef: float | None = None, normed_momentum: bool = False,
              kourkoutas_beta: bool = False, beta2_min: float = 0.9, ema_alpha: float = 0.95,
              tiny_spike: float = 1e-9, k_warmup_steps: int = 0, k_logging: int = 0, layer_key_fn: Any = None,
              spectral_normalization: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
              state_precision: str = "auto", factored_2nd: bool = False, nnmf_factor: bool = False,
              vector_reshape: bool = False, cautious_mask: bool = False, grams_moment: bool = False,
              use_AdEMAMix: bool = False, beta3_ema: float = 0.9999, alpha: float = 5.0, seed: int = 0) -> Chain:
    """adv_optm's ``AdamW_adv`` (2.5.16 keywords, plus the legacy 2.2.3 ``cautious_mask``,
    ``grams_moment``, ``use_AdEMAMix``/``beta3_ema``/``alpha`` and bool ``orthogonal_gradient``).

    ``orthogonal_gradient='flattened'`` -> :func:`orthograd`; ``use_atan2`` -> :func:`atan2_scale`
    with the reference's bias correction outside; ``cautious_wd`` -> :func:`cautious_wd`;
    ``use_AdEMAMix`` -> :func:`ademamix` with the slow EMA bias-corrected (legacy behaviour);
    ``cautious_mask`` -> :func:`cautious` with the reference's mean rescale; ``grams_moment`` ->
    :func:`grams`; ``stochastic_rounding`` -> :func:`stochastic_round_apply` (bf16 weights).
    ``fisher_wd`` -> :func:`fisher_wd` before the normalizer (with ``normed_momentum``, Adam publishes
    the denominator for it: ``scale_by_adam(publish_denom=True)``); ``eps=None`` is the
    scale-invariant ``1/sqrt(N)`` everywhere eps enters (eps_divide, normed momentum, fisher_wd);
    ``centered_wd``/``centered_wd_mode`` -> :func:`centered_wd` after the ordinary decay (cautious
    with ``cautious_wd``). ``spectral_normalization`` -> :func:`spectral_normalization` after the masks
    (it normalizes ``m/bc1/D``, so the bias correction cancels: adv_optm's B13, a 10x first step, fixed).
    ``orthogonal_gradient='iterative'`` -> ``orthograd(mode='iterative')``. ``normed_momentum`` ->
    ``scale_by_adam(normed_momentum='eps')`` (``'atan2'`` with ``use_atan2``), which normalizes the
    gradient before the first moment (its denominator goes only to ``fisher_wd``), so the chain has no
    ``eps_divide``/``atan2_scale`` (spec §4.2; a copy is normalized, ``p.grad`` is not written as the
    reference does). It cannot be combined with the legacy ``use_AdEMAMix`` (no reference has both).
    Moments stay fp32 for bf16 weights (the reference keeps them in bf16).

    >>> import adv_chain as ac
    >>> ac.presets.adamw_adv(use_atan2=True, orthogonal_gradient="flattened").names
    ('orthograd', 'adam', 'atan2_scale', 'weight_decay', 'apply')
    >>> ac.presets.adamw_adv(normed_momentum=True, orthogonal_gradient="iterative").names
    ('orthograd', 'adam', 'weight_decay', 'apply')
    """
    name = "adamw_adv"
    storage = {"state_precision": state_precision, "nnmf_factor": nnmf_factor, "vector_reshape": vector_reshape,
               "seed": seed}
    checks.flag(name, "use_AdEMAMix", use_AdEMAMix)
    checks.flag(name, "use_atan2", use_atan2)
    normed = _normed_mode(name, normed_momentum, use_atan2, use_AdEMAMix)
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        *kourkoutas_stage(name, kourkoutas_beta, betas, beta2_min, ema_alpha, tiny_spike, k_warmup_steps,
                         layer_key_fn),
        stored(name, T.scale_by_adam(betas=betas,
                                     bias_correction=checks.flag(name, "use_bias_correction", use_bias_correction),
                                     nesterov=checks.flag(name, "nesterov", nesterov), nesterov_coef=nesterov_coef,
                                     **({"normed_momentum": normed} if normed else {}),
                                     **({"eps": eps} if normed == "eps" else {}),
                                     # fisher_wd reads the denominator a normed direction no longer needs
                                     **({"publish_denom": True} if normed and fisher_wd else {})),
               factored_2nd=factored_2nd, **storage),
        *((stored(name, T.ademamix(beta3=beta3_ema, alpha=alpha, slow_bias_correction=True), second_moment=False,
                  **storage),) if use_AdEMAMix else ()),
        *fisher_stage(name, fisher_wd, eps, use_atan2),
        # normed momentum: scale_by_adam already normalized (it publishes no denominator)
        *(() if normed else (T.atan2_scale(bias_correction="outside") if use_atan2 else T.eps_divide(eps),)),
        *direction_mask(name, cautious_mask, grams_moment, whole_tensors=bool(fisher_wd)),
        *spectral_stage(name, spectral_normalization, seed),
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )


@register
def lion_adv(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, cautious_wd: bool = False,
             stochastic_rounding: bool = True, orthogonal_gradient: Any = "disabled", kappa_p: float = 1.0,
             auto_kappa_p: bool = False, stochastic_sign: bool = False, centered_wd: float = 0.0,
             centered_wd_mode: str = "float8", spectral_normalization: bool = False, nnmf_factor: bool = False,
             vector_reshape: bool = False, cautious_mask: bool = False, clip_threshold: float = 0.0,
             seed: int = 0) -> Chain:
    """adv_optm's ``Lion_adv`` (2.5.16 keywords plus the legacy ``cautious_mask``/``clip_threshold``):
    :func:`scale_by_lion` (sign of ``b1*m + (1-b1)*g``), decay ``lr * weight_decay``, and the
    stochastic-rounding terminal. ``cautious_mask`` masks the post-sign update against the gradient
    with the reference's mean rescale; ``centered_wd``/``centered_wd_mode`` -> :func:`centered_wd`.
    ``kappa_p``/``auto_kappa_p`` -> :func:`lion_k`, ``stochastic_sign`` -> :func:`stochastic_sign`
    (both after ``scale_by_lion(sign=False)``), ``clip_threshold`` -> :func:`clip_by_tensor_norm`.

    >>> import adv_chain as ac
    >>> ac.presets.lion_adv(weight_decay=0.1, cautious_wd=True).names
    ('lion', 'weight_decay', 'apply')
    >>> ac.presets.lion_adv(kappa_p=2.0, clip_threshold=1.0).names
    ('clip_by_tensor_norm', 'lion', 'lion_k', 'weight_decay', 'apply')
    """
    from .sign import lion_projection, tensor_clip_stage  # here: presets.sign imports this module
    name = "lion_adv"
    projection = lion_projection(name, kappa_p, auto_kappa_p, stochastic_sign, seed)
    return chain(
        *tensor_clip_stage(name, clip_threshold),
        *gradient_stage(name, orthogonal_gradient),
        stored(name, T.scale_by_lion(betas=betas, sign=not projection), nnmf_factor=nnmf_factor,
               vector_reshape=vector_reshape),
        *projection,
        *direction_mask(name, cautious_mask, False),
        *spectral_stage(name, spectral_normalization, seed),
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )


@register
def adopt_adv(betas: tuple[float, float] = (0.9, 0.9999), eps: float = 1e-6, weight_decay: float = 0.0,
              fisher_wd: bool = False, cautious_wd: bool = False, clip_exponent: float | None = 0.25,
              use_atan2: bool = False, stochastic_rounding: bool = True, orthogonal_gradient: Any = "disabled",
              nesterov: bool = False, nesterov_coef: float | None = None, kourkoutas_beta: bool = False,
              beta2_min: float = 0.9, ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
              k_logging: int = 0, layer_key_fn: Any = None, spectral_normalization: bool = False,
              centered_wd: float = 0.0,
              centered_wd_mode: str = "float8", state_precision: str = "auto", factored_2nd: bool = False,
              nnmf_factor: bool = False, vector_reshape: bool = False, cautious_mask: bool = False,
              grams_moment: bool = False, use_AdEMAMix: bool = False, beta3_ema: float = 0.9999, alpha: float = 5.0,
              Simplified_AdEMAMix: bool = False, alpha_grad: float = 100.0, seed: int = 0) -> Chain:  # noqa: N803
    """adv_optm's ``Adopt_adv``: :func:`scale_by_adopt` with the reference's clip schedule
    (``clip_step_offset=-1``; ``clip_exponent`` stands for its default ``clip_lambda = step**0.25``,
    ``None`` for no clip) and, with ``use_atan2``, no skipped first step (as the reference);
    ``centered_wd``/``centered_wd_mode`` -> :func:`centered_wd`; ``fisher_wd`` -> :func:`fisher_wd`
    on the published ``sqrt(v_(t-1))``; ``kourkoutas_beta`` -> :func:`kourkoutas_beta` feeding
    Adopt's ``v`` update; ``nesterov`` mixes the *normalized* gradient into the momentum (the
    reference mixes the raw one, its bug B3).

    >>> import adv_chain as ac
    >>> ac.presets.adopt_adv(weight_decay=0.01).names
    ('adopt', 'weight_decay', 'apply')
    """
    name = "adopt_adv"
    fisher_wd = checks.flag(name, "fisher_wd", fisher_wd)
    not_yet(name, use_AdEMAMix=use_AdEMAMix, Simplified_AdEMAMix=Simplified_AdEMAMix)
    use_atan2 = checks.flag(name, "use_atan2", use_atan2)
    spectral = spectral_stage(name, spectral_normalization, seed)
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        *kourkoutas_stage(name, kourkoutas_beta, betas, beta2_min, ema_alpha, tiny_spike, k_warmup_steps,
                         layer_key_fn),
        stored(name, T.scale_by_adopt(betas=betas, eps=eps, clip_exponent=clip_exponent, clip_step_offset=-1,
                                      use_atan2=use_atan2, skip_first=not (use_atan2 or spectral),
                                      nesterov=checks.flag(name, "nesterov", nesterov), nesterov_coef=nesterov_coef,
                                      publish_denom=fisher_wd),
               state_precision=state_precision, nnmf_factor=nnmf_factor, factored_2nd=factored_2nd,
               vector_reshape=vector_reshape, seed=seed),
        *fisher_stage(name, fisher_wd, eps, use_atan2),
        *direction_mask(name, cautious_mask, grams_moment, whole_tensors=fisher_wd),
        *spectral,
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )


@register
def simplified_ademamix(betas: tuple[float, float] = (0.99, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                        cautious_wd: bool = False, alpha_grad: float = 100.0, beta1_warmup: int | None = None,
                        min_beta1: float = 0.9, use_bias_correction: bool = True, stochastic_rounding: bool = True,
                        orthogonal_gradient: Any = False, kourkoutas_beta: bool = False, beta2_min: float = 0.9,
                        ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
                        k_logging: int = 0, layer_key_fn: Any = None, nnmf_factor: bool = False,
                        vector_reshape: bool = False,
                        seed: int = 0) -> Chain:
    """adv_optm 2.2.3's ``Simplified_AdEMAMix`` (arXiv 2502.02431 as the reference implements it):
    :func:`scale_by_adam` with ``beta1 = 0`` for the second moment, :func:`simplified_accumulator`
    with ``reference_scaling=True`` (the reference's extra ``1/(sum beta1^k + alpha_grad)`` and
    ``1/sqrt(S1)`` factors; weight decay shrinks with the first), then ``eps_divide``.
    ``kourkoutas_beta=True`` drives the second moment's beta2 per layer as in :func:`adamw_adv`
    (bias correction ``S2`` keeps the static ``betas[1]``, as the reference's).

    >>> import adv_chain as ac
    >>> ac.presets.simplified_ademamix().names
    ('adam', 'simplified_accumulator', 'eps_divide', 'weight_decay', 'apply')
    """
    name = "simplified_ademamix"
    beta1, beta2 = checks.beta_pair(name, "betas", betas)
    if beta1 == 0:
        raise ValueError(f"{name}: betas[0]=0 leaves no accumulator; Simplified AdEMAMix needs beta1 in (0, 1)")
    correct = checks.flag(name, "use_bias_correction", use_bias_correction)
    return chain(
        *gradient_stage(name, orthogonal_gradient),
        *kourkoutas_stage(name, kourkoutas_beta, betas, beta2_min, ema_alpha, tiny_spike, k_warmup_steps,
                          layer_key_fn),
        stored(name, T.scale_by_adam(betas=(0.0, beta2), bias_correction=correct), nnmf_factor=nnmf_factor,
               vector_reshape=vector_reshape),
        stored(name, T.simplified_accumulator(beta1=beta1, alpha_grad=alpha_grad, beta1_warmup=beta1_warmup,
                                              min_beta1=min_beta1, reference_scaling=True, bias_correction=correct),
               nnmf_factor=nnmf_factor, vector_reshape=vector_reshape),
        T.eps_divide(eps),
        decay_stage(weight_decay, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )
