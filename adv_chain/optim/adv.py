"""Drop-ins for adv_optm's AdamW_adv, Lion_adv, Adopt_adv and Simplified_AdEMAMix (2.5.16 and legacy keywords)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .. import presets
from .._core import checks
from .._core.optimizer import ChainOptimizer
from .._core.release import enable_gradient_release
from ._base import ChainOptimizer, _DropIn, _implementation_flags, _optimi_family_kahan, _optimi_kahan, _optimi_max_lr  # noqa: F401


class AdamW_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``AdamW_adv`` as a chain (preset ``adamw_adv``): every keyword of 2.5.16 and the
    legacy 2.2.3 ones (``cautious_mask``, ``grams_moment``, ``use_AdEMAMix``, ``beta3_ema``, ``alpha``,
    bool ``orthogonal_gradient``); ``compiled_optimizer=True`` means ``compile=True``.
    With ``kourkoutas_beta=True``, parameters of the same shape share a Kourkoutas-beta layer
    (adv_optm's buckets), or those for which ``layer_key_fn(param)`` is equal (LoRA/OFT/DoRA-tagged
    parameters stay layers of their own)."""

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = 1e-8, weight_decay: float = 0.0, fisher_wd: bool = False,
                 cautious_wd: bool = False, use_bias_correction: bool = True, stochastic_rounding: bool = True,
                 use_atan2: bool = False, orthogonal_gradient: Any = "disabled", nesterov: bool = False,
                 nesterov_coef: float | None = None, normed_momentum: bool = False, kourkoutas_beta: bool = False,
                 beta2_min: float = 0.9, ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
                 k_logging: int = 0, layer_key_fn: Any = None, spectral_normalization: bool = False,
                 centered_wd: float = 0.0, centered_wd_mode: str = "float8", state_precision: str = "auto",
                 factored_2nd: bool = False, nnmf_factor: bool = False, vector_reshape: bool = False,
                 compiled_optimizer: bool = False, cautious_mask: bool = False, grams_moment: bool = False,
                 use_AdEMAMix: bool = False, beta3_ema: float = 0.9999, alpha: float = 5.0, *,  # noqa: N803
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.adamw_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            use_bias_correction=use_bias_correction, stochastic_rounding=stochastic_rounding, use_atan2=use_atan2,
            orthogonal_gradient=orthogonal_gradient, nesterov=nesterov, nesterov_coef=nesterov_coef,
            normed_momentum=normed_momentum, kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min,
            ema_alpha=ema_alpha, tiny_spike=tiny_spike, k_warmup_steps=k_warmup_steps, k_logging=k_logging,
            layer_key_fn=layer_key_fn,
            spectral_normalization=spectral_normalization, centered_wd=centered_wd,
            centered_wd_mode=centered_wd_mode, state_precision=state_precision, factored_2nd=factored_2nd,
            nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, cautious_mask=cautious_mask,
            grams_moment=grams_moment, use_AdEMAMix=use_AdEMAMix, beta3_ema=beta3_ema, alpha=alpha, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)


class Lion_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``Lion_adv`` as a chain (preset ``lion_adv``): the 2.5.16 keywords and the legacy
    ``cautious_mask``/``clip_threshold``; ``compiled_optimizer=True`` means ``compile=True`` (the
    reference ignores it). Unlike adv-optm 2.5.16, it loads its own ``state_dict``."""

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, cautious_wd: bool = False, stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = "disabled", kappa_p: float = 1.0, auto_kappa_p: bool = False,
                 stochastic_sign: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
                 spectral_normalization: bool = False, nnmf_factor: bool = False, vector_reshape: bool = False,
                 compiled_optimizer: bool = False, cautious_mask: bool = False, clip_threshold: float = 0.0, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.lion_adv(
            betas=betas, weight_decay=weight_decay, cautious_wd=cautious_wd, stochastic_rounding=stochastic_rounding,
            orthogonal_gradient=orthogonal_gradient, kappa_p=kappa_p, auto_kappa_p=auto_kappa_p,
            stochastic_sign=stochastic_sign, centered_wd=centered_wd, centered_wd_mode=centered_wd_mode,
            spectral_normalization=spectral_normalization, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape,
            cautious_mask=cautious_mask, clip_threshold=clip_threshold, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)


def _default_clip_lambda(step: int) -> float:
    return step ** 0.25


def _clip_exponent(clip_lambda: Any) -> float | None:
    """adv_optm's ``clip_lambda`` callable as the exponent of ``step ** p`` (None: no clip)."""
    if clip_lambda is None:
        return None
    if callable(clip_lambda):
        for p in (0.25, 0.5, 1.0 / 3.0):
            if all(abs(clip_lambda(t) - t ** p) <= 1e-12 * max(1.0, t ** p) for t in (1, 2, 3, 10, 1000)):
                return p
    raise NotImplementedError(f"Adopt_adv: clip_lambda={clip_lambda!r} is not a power schedule step**p with p in "
                              "(1/4, 1/3, 1/2); use the adopt_adv preset's clip_exponent for another power")


class Adopt_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``Adopt_adv`` as a chain (preset ``adopt_adv``): the 2.5.16 keywords and the legacy
    ``cautious_mask``/``grams_moment``; ``clip_lambda`` may be the default ``step**0.25``, another
    power ``step**p`` or ``None``."""

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-6, weight_decay: float = 0.0, fisher_wd: bool = False, cautious_wd: bool = False,
                 clip_lambda: Any = _default_clip_lambda, use_atan2: bool = False, stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = "disabled", nesterov: bool = False, nesterov_coef: float | None = None,
                 kourkoutas_beta: bool = False, beta2_min: float = 0.9, ema_alpha: float = 0.95,
                 tiny_spike: float = 1e-9, k_warmup_steps: int = 0, k_logging: int = 0, layer_key_fn: Any = None,
                 spectral_normalization: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
                 state_precision: str = "auto", factored_2nd: bool = False, nnmf_factor: bool = False,
                 vector_reshape: bool = False, compiled_optimizer: bool = False, cautious_mask: bool = False,
                 grams_moment: bool = False, use_AdEMAMix: bool = False, beta3_ema: float = 0.9999, alpha: float = 5.0,
                 Simplified_AdEMAMix: bool = False, alpha_grad: float = 100.0, *,  # noqa: N803
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.adopt_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            clip_exponent=_clip_exponent(clip_lambda), use_atan2=use_atan2, stochastic_rounding=stochastic_rounding,
            orthogonal_gradient=orthogonal_gradient, nesterov=nesterov, nesterov_coef=nesterov_coef,
            kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike,
            k_warmup_steps=k_warmup_steps, k_logging=k_logging,
            layer_key_fn=layer_key_fn,
            spectral_normalization=spectral_normalization,
            centered_wd=centered_wd, centered_wd_mode=centered_wd_mode, state_precision=state_precision,
            factored_2nd=factored_2nd, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape,
            cautious_mask=cautious_mask, grams_moment=grams_moment, use_AdEMAMix=use_AdEMAMix, beta3_ema=beta3_ema,
            alpha=alpha, Simplified_AdEMAMix=Simplified_AdEMAMix, alpha_grad=alpha_grad, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)


class Simplified_AdEMAMix(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm 2.2.3's ``Simplified_AdEMAMix`` as a chain (preset ``simplified_ademamix``), with its
    keywords and defaults (``lr=1e-5``, ``betas=(0.99, 0.999)``, ``alpha_grad=100``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, betas: tuple[float, float] = (0.99, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, cautious_wd: bool = False, alpha_grad: float = 100.0,
                 beta1_warmup: int | None = None, min_beta1: float = 0.9, use_bias_correction: bool = True,
                 stochastic_rounding: bool = True, orthogonal_gradient: Any = False, kourkoutas_beta: bool = False,
                 beta2_min: float = 0.9, ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
                 k_logging: int = 0, layer_key_fn: Any = None, nnmf_factor: bool = False,
                 vector_reshape: bool = False, compiled_optimizer: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.simplified_ademamix(
            betas=betas, eps=eps, weight_decay=weight_decay, cautious_wd=cautious_wd, alpha_grad=alpha_grad,
            beta1_warmup=beta1_warmup, min_beta1=min_beta1, use_bias_correction=use_bias_correction,
            stochastic_rounding=stochastic_rounding, orthogonal_gradient=orthogonal_gradient,
            kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike,
            k_warmup_steps=k_warmup_steps, k_logging=k_logging, layer_key_fn=layer_key_fn,
            nnmf_factor=nnmf_factor,
            vector_reshape=vector_reshape, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)


#: the names the seeds' documents and OneTrainer use
Adam_Adv = AdamW_adv
Lion_Adv = Lion_adv
Adopt_Adv = Adopt_adv
