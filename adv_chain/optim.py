"""Drop-in optimizer classes: the keywords and defaults of the optimizers they stand in for, so a
training script switches with one changed import.

>>> import torch, adv_chain as ac
>>> model = torch.nn.Linear(4, 2)
>>> opt = ac.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
>>> print(opt.chain.names)
('adam', 'eps_divide', 'weight_decay', 'apply')

Implementation-choice keywords of torch (``foreach``, ``fused``, ``capturable``) and optimi
(``triton``) are accepted and do not change the math: adv_chain picks its own kernels (``compile=True``
for fused ones). ``differentiable=True`` is not supported and says so.

``SGD``, ``Adam``, ``AdamW`` and ``Lion`` also take torch-optimi's keywords where they do not clash
with the torch ones: ``kahan_sum`` (``None``: on for bf16/fp16 parameters, as optimi; the default
stays ``False``, torch's behaviour), ``decouple_lr`` and ``max_lr`` (fully decoupled weight decay,
``p *= 1 - wd * lr / max_lr``), ``decouple_wd`` (SGD, Adam), and ``gradient_release=True`` (the
optimizer registers :func:`adv_chain.enable_gradient_release` hooks on its parameters; optimi needs a
separate ``prepare_for_gradient_release`` call). optimi's own defaults (``betas=(0.9, 0.99)``,
``eps=1e-6``) are not adopted: the defaults are torch's.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from . import presets
from ._core import checks
from ._core.optimizer import ChainOptimizer
from ._core.release import enable_gradient_release


def _implementation_flags(owner: str, *, differentiable: bool = False, **_accepted: Any) -> None:
    if differentiable:
        raise NotImplementedError(f"{owner}: differentiable=True (differentiating through the optimizer step) "
                                  "is not supported by adv_chain")


def _optimi_max_lr(owner: str, lr: float, decouple_lr: bool, max_lr: float | None) -> float | None:
    """optimi's fully decoupled weight decay: ``decouple_lr=True`` decays by ``wd * lr / max_lr``
    (``max_lr`` defaults to the constructor's ``lr``); ``None`` means lr-coupled decay."""
    if not checks.flag(owner, "decouple_lr", decouple_lr):
        return None
    return checks.positive(owner, "max_lr", lr if max_lr is None else max_lr)


def _optimi_kahan(owner: str, params: Iterable[Any], kahan_sum: bool | None) -> tuple[list[Any], bool]:
    """optimi's ``kahan_sum=None``: on when any parameter is bf16 or fp16."""
    params = list(params)
    if kahan_sum is not None:
        return params, checks.flag(owner, "kahan_sum", kahan_sum)
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    tensors = [t for item in tensors for t in ([item] if isinstance(item, torch.Tensor) else item)]
    return params, any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


class _DropIn(ChainOptimizer):
    def __init__(self, params: Iterable[Any], chain: Any, lr: float, compile: "bool | Mapping[str, Any]",
                 state_dtype: str, maximize: bool = False, gradient_release: bool = False) -> None:
        self._maximize = maximize
        super().__init__(params, chain, lr=lr, compile=compile, state_dtype=state_dtype)
        if checks.flag(type(self).__name__, "gradient_release", gradient_release):
            # optimi's keyword: step each parameter inside backward (ac.enable_gradient_release)
            enable_gradient_release(self, [p for group in self.param_groups for p in group["params"]])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch reads `maximize` per group; a chain fixes it when it is built, so refuse a group that
        # asks for the other direction rather than silently ignoring it
        if "maximize" in param_group and bool(param_group["maximize"]) != self._maximize:
            raise ValueError(f"{type(self).__name__}: param group maximize={param_group['maximize']!r} differs from "
                             f"the optimizer's maximize={self._maximize}; per-group maximize is not supported, "
                             "use one optimizer per direction")
        super().add_param_group(param_group)

    def _centered_anchors(self, centered_wd: float) -> None:
        """adv_optm's centered weight decay anchors the weights at construction: create every state
        now (parameters tagged as LoRA factors or OFT blocks get none, see adv_chain._core.tags)."""
        if centered_wd:
            self.init_state()


class SGD(_DropIn):
    """``torch.optim.SGD`` as a chain (preset ``sgd``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool | None = False, decouple_wd: bool = False,
                 decouple_lr: bool = False, max_lr: float | None = None, gradient_release: bool = False,
                 triton: bool | None = None, torch_init: bool = False) -> None:
        _implementation_flags("SGD", differentiable=differentiable, foreach=foreach, fused=fused, triton=triton)
        params, kahan = _optimi_kahan("SGD", params, kahan_sum)
        max_lr = _optimi_max_lr("SGD", lr, decouple_lr, max_lr)
        chain = presets.sgd(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                            maximize=maximize, stochastic_rounding=stochastic_rounding, kahan_sum=kahan,
                            decouple_wd=decouple_wd, max_lr=max_lr)
        super().__init__(params, chain, lr, compile, state_dtype, maximize, gradient_release)


class Adam(_DropIn):
    """``torch.optim.Adam`` as a chain (preset ``adam``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool | None = False, decouple_wd: bool = False,
                 decouple_lr: bool = False, max_lr: float | None = None, gradient_release: bool = False,
                 triton: bool | None = None) -> None:
        _implementation_flags("Adam", differentiable=differentiable, foreach=foreach, capturable=capturable,
                              fused=fused, triton=triton)
        params, kahan = _optimi_kahan("Adam", params, kahan_sum)
        max_lr = _optimi_max_lr("Adam", lr, decouple_lr, max_lr)
        decoupled = checks.flag("Adam", "decoupled_weight_decay", decoupled_weight_decay)
        chain = presets.adam(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                             decoupled_weight_decay=decoupled or checks.flag("Adam", "decouple_wd", decouple_wd)
                             or max_lr is not None, stochastic_rounding=stochastic_rounding, kahan_sum=kahan,
                             max_lr=max_lr)
        super().__init__(params, chain, lr, compile, state_dtype, maximize, gradient_release)


class AdamW(_DropIn):
    """``torch.optim.AdamW`` as a chain (preset ``adamw``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool | None = False, decouple_lr: bool = False,
                 max_lr: float | None = None, gradient_release: bool = False, triton: bool | None = None) -> None:
        _implementation_flags("AdamW", differentiable=differentiable, foreach=foreach, capturable=capturable,
                              fused=fused, triton=triton)
        params, kahan = _optimi_kahan("AdamW", params, kahan_sum)
        chain = presets.adamw(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                              stochastic_rounding=stochastic_rounding, kahan_sum=kahan,
                              max_lr=_optimi_max_lr("AdamW", lr, decouple_lr, max_lr))
        super().__init__(params, chain, lr, compile, state_dtype, maximize, gradient_release)


class Lion(_DropIn):
    """lion-pytorch's ``Lion`` as a chain (preset ``lion``); same keywords and defaults.
    ``use_triton`` is accepted (a kernel choice); ``decoupled_weight_decay=True`` scales the decay by
    ``lr / initial lr`` as lion-pytorch does."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False, decoupled_weight_decay: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool | None = False, decouple_lr: bool = False,
                 max_lr: float | None = None, gradient_release: bool = False, foreach: bool | None = None,
                 triton: bool | None = None) -> None:
        params, kahan = _optimi_kahan("Lion", params, kahan_sum)
        max_lr = _optimi_max_lr("Lion", lr, decouple_lr or checks.flag("Lion", "decoupled_weight_decay",
                                                                       decoupled_weight_decay), max_lr)
        chain = presets.lion(betas=betas, weight_decay=weight_decay, max_lr=max_lr,
                             stochastic_rounding=stochastic_rounding, kahan_sum=kahan)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)


class AdamW_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``AdamW_adv`` as a chain (preset ``adamw_adv``): every keyword of 2.5.16 and the
    legacy 2.2.3 ones (``cautious_mask``, ``grams_moment``, ``use_AdEMAMix``, ``beta3_ema``, ``alpha``,
    bool ``orthogonal_gradient``); ``compiled_optimizer=True`` means ``compile=True``.
    ``layer_key_fn`` belongs to Kourkoutas-beta, which is not implemented yet."""

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
        presets.adv.not_yet("AdamW_adv", layer_key_fn=layer_key_fn)
        chain = presets.adamw_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            use_bias_correction=use_bias_correction, stochastic_rounding=stochastic_rounding, use_atan2=use_atan2,
            orthogonal_gradient=orthogonal_gradient, nesterov=nesterov, nesterov_coef=nesterov_coef,
            normed_momentum=normed_momentum, kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min,
            ema_alpha=ema_alpha, tiny_spike=tiny_spike, k_warmup_steps=k_warmup_steps, k_logging=k_logging,
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
        presets.adv.not_yet("Adopt_adv", layer_key_fn=layer_key_fn)
        chain = presets.adopt_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            clip_exponent=_clip_exponent(clip_lambda), use_atan2=use_atan2, stochastic_rounding=stochastic_rounding,
            orthogonal_gradient=orthogonal_gradient, nesterov=nesterov, nesterov_coef=nesterov_coef,
            kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike,
            k_warmup_steps=k_warmup_steps, k_logging=k_logging, spectral_normalization=spectral_normalization,
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
        presets.adv.not_yet("Simplified_AdEMAMix", layer_key_fn=layer_key_fn)
        chain = presets.simplified_ademamix(
            betas=betas, eps=eps, weight_decay=weight_decay, cautious_wd=cautious_wd, alpha_grad=alpha_grad,
            beta1_warmup=beta1_warmup, min_beta1=min_beta1, use_bias_correction=use_bias_correction,
            stochastic_rounding=stochastic_rounding, orthogonal_gradient=orthogonal_gradient,
            kourkoutas_beta=kourkoutas_beta, beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike,
            k_warmup_steps=k_warmup_steps, k_logging=k_logging, nnmf_factor=nnmf_factor,
            vector_reshape=vector_reshape, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)


#: the names the seeds' documents and OneTrainer use
Adam_Adv = AdamW_adv
Lion_Adv = Lion_adv
Adopt_Adv = Adopt_adv

__all__ = ["SGD", "Adam", "AdamW", "Lion", "AdamW_adv", "Adam_Adv", "Lion_adv", "Lion_Adv", "Adopt_adv", "Adopt_Adv",
           "Simplified_AdEMAMix"]


# -- torch-optimi's RAdam, Ranger, Adan, StableAdamW (presets in adv_chain.presets.optimi_family) ---------
def _optimi_family_kahan(owner: str, params: Iterable[Any], kahan_sum: bool | None,
                         stochastic_rounding: bool) -> tuple[list[Any], bool]:
    """optimi's ``kahan_sum=None`` (on for bf16/fp16 parameters), unless stochastic rounding was asked for."""
    if kahan_sum is None and checks.flag(owner, "stochastic_rounding", stochastic_rounding):
        return list(params), False
    return _optimi_kahan(owner, params, kahan_sum)


class RAdam(_DropIn):
    """torch-optimi's ``RAdam`` as a chain (preset ``radam``), with optimi 0.3.3's keywords and defaults:
    ``lr`` is required, ``betas=(0.9, 0.99)``, ``eps=1e-6``, L2 weight decay unless ``decouple_wd`` /
    ``decouple_lr`` (``max_lr`` defaults to ``lr``), ``kahan_sum=None`` (on for bf16/fp16 parameters).
    This is **not** ``torch.optim.RAdam``: torch's takes ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``decoupled_weight_decay`` and adds ``eps`` after the bias correction; use optimi's keywords here.
    ``foreach``/``triton`` are accepted (kernel choices); ``gradient_release=True`` steps each
    parameter inside backward (:func:`adv_chain.enable_gradient_release`).

    >>> import torch, adv_chain as ac
    >>> opt = ac.optim.RAdam(torch.nn.Linear(4, 2).parameters(), lr=1e-3, weight_decay=1e-2, decouple_wd=True)
    >>> opt.chain.names
    ('radam', 'weight_decay', 'apply')
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0, eps: float = 1e-6, decouple_wd: bool = False, decouple_lr: bool = False,
                 max_lr: float | None = None, kahan_sum: bool | None = None, foreach: bool | None = None,
                 triton: bool | None = None, gradient_release: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False) -> None:
        params, kahan = _optimi_family_kahan("RAdam", params, kahan_sum, stochastic_rounding)
        max_lr = _optimi_max_lr("RAdam", lr, decouple_lr, max_lr)
        chain = presets.radam(betas=betas, weight_decay=weight_decay, eps=eps, decouple_wd=decouple_wd,
                              max_lr=max_lr, kahan_sum=kahan, stochastic_rounding=stochastic_rounding)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)


class Ranger(_DropIn):
    """torch-optimi's ``Ranger`` (RAdam + Lookahead) as a chain (preset ``ranger``), with optimi 0.3.3's
    keywords and defaults: ``k=6``, ``alpha=0.5``, ``decouple_wd=True``, otherwise as :class:`RAdam`.

    >>> import torch, adv_chain as ac
    >>> ac.optim.Ranger(torch.nn.Linear(4, 2).parameters(), lr=1e-3, k=5).chain.names
    ('radam', 'weight_decay', 'lookahead')
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0, eps: float = 1e-6, k: int = 6, alpha: float = 0.5, decouple_wd: bool = True,
                 decouple_lr: bool = False, max_lr: float | None = None, kahan_sum: bool | None = None,
                 foreach: bool | None = None, triton: bool | None = None, gradient_release: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False) -> None:
        params, kahan = _optimi_family_kahan("Ranger", params, kahan_sum, stochastic_rounding)
        max_lr = _optimi_max_lr("Ranger", lr, decouple_lr, max_lr)
        chain = presets.ranger(betas=betas, weight_decay=weight_decay, eps=eps, k=k, alpha=alpha,
                               decouple_wd=decouple_wd, max_lr=max_lr, kahan_sum=kahan,
                               stochastic_rounding=stochastic_rounding)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)


class Adan(_DropIn):
    """torch-optimi's ``Adan`` as a chain (preset ``adan``), with optimi 0.3.3's keywords and defaults:
    ``betas=(0.98, 0.92, 0.99)``, ``weight_decay=2e-2`` (Adan's proximal form), ``eps=1e-6``,
    ``kahan_sum=False`` (optimi's Adan default; ``None`` turns it on for bf16/fp16 parameters).
    ``adam_wd=True`` decays Adam-style as optimi documents it (optimi 0.3.3's class ignores it).

    >>> import torch, adv_chain as ac
    >>> ac.optim.Adan(torch.nn.Linear(4, 2).parameters(), lr=1e-3).chain.names
    ('adan', 'proximal_wd', 'apply')
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 weight_decay: float = 2e-2, eps: float = 1e-6, decouple_lr: bool = False,
                 max_lr: float | None = None, adam_wd: bool = False, kahan_sum: bool | None = False,
                 foreach: bool | None = None, triton: bool | None = None, gradient_release: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False) -> None:
        params, kahan = _optimi_family_kahan("Adan", params, kahan_sum, stochastic_rounding)
        max_lr = _optimi_max_lr("Adan", lr, decouple_lr, max_lr)
        chain = presets.adan(betas=betas, weight_decay=weight_decay, eps=eps, max_lr=max_lr, adam_wd=adam_wd,
                             kahan_sum=kahan, stochastic_rounding=stochastic_rounding)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)


class StableAdamW(_DropIn):
    """torch-optimi's ``StableAdamW`` as a chain (preset ``stableadamw``), with optimi 0.3.3's keywords
    and defaults: ``betas=(0.9, 0.99)``, ``weight_decay=1e-2`` (decoupled), ``eps=1e-6``,
    ``kahan_sum=None`` (on for bf16/fp16 parameters).

    >>> import torch, adv_chain as ac
    >>> ac.optim.StableAdamW(torch.nn.Linear(4, 2).parameters(), lr=1e-3).chain.names
    ('adam', 'weight_decay', 'stable_clip', 'apply')
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 1e-2, eps: float = 1e-6, decouple_lr: bool = False,
                 max_lr: float | None = None, kahan_sum: bool | None = None, foreach: bool | None = None,
                 triton: bool | None = None, gradient_release: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False) -> None:
        params, kahan = _optimi_family_kahan("StableAdamW", params, kahan_sum, stochastic_rounding)
        max_lr = _optimi_max_lr("StableAdamW", lr, decouple_lr, max_lr)
        chain = presets.stableadamw(betas=betas, weight_decay=weight_decay, eps=eps, max_lr=max_lr,
                                    kahan_sum=kahan, stochastic_rounding=stochastic_rounding)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)


__all__ += ["RAdam", "Ranger", "Adan", "StableAdamW"]


# -- Prodigy (presets in adv_chain.presets.prodigy) -------------------------------------------------------
class Prodigy(_DropIn):
    """prodigyopt's ``Prodigy`` (1.1.2) as a chain (preset ``prodigy``): same keywords and defaults
    (``lr=1.0``). ``group["d"]`` holds the current ``d`` after each step (a 0-d tensor, no host sync;
    ``float(group["d"])`` for a number); ``d``, ``d_max``, ``d_numerator`` and ``k`` are kept under
    ``"prodigy/..."`` in every param group and saved with ``state_dict``. Under gradient release
    the ``d`` estimate runs one step lagged (see :func:`adv_chain.prodigy`). ``fsdp_in_use=True`` is
    not implemented yet.

    >>> import torch, adv_chain as ac
    >>> opt = ac.optim.Prodigy(torch.nn.Linear(4, 2).parameters(), weight_decay=0.01)
    >>> opt.chain.names, float(opt.param_groups[0]["d"])
    (('prodigy', 'weight_decay', 'apply'), 1e-06)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), fsdp_in_use: bool = False, slice_p: int = 1,
                 *, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False, gradient_release: bool = False) -> None:
        checks.positive("Prodigy", "lr", lr)  # prodigyopt refuses lr <= 0 at construction
        chain = presets.prodigy(betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                                d_coef=d_coef, growth_rate=growth_rate, fsdp_in_use=fsdp_in_use, slice_p=slice_p,
                                stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)
        _prodigy_groups(self)


def _prodigy_groups(opt: ChainOptimizer) -> None:
    """Give every param group Prodigy's initial state and the ``d`` mirror now (prodigyopt's groups
    hold ``d = d0`` before the first step; loggers read it)."""
    t = next(t for t in opt.chain if t.type_name == "prodigy")
    for group in opt.param_groups:
        for key, value in t.group_state(t.args).items():
            group.setdefault(f"{t.name}/{key}", value)
        group.setdefault("d", group[f"{t.name}/d"])


class Prodigy_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm 2.5.16's ``Prodigy_adv`` as a chain (preset ``prodigy_adv``): its keywords and defaults
    (``lr=1``, ``slice_p=11``); ``compiled_optimizer=True`` means ``compile=True``. Its ``nesterov``
    bug B2 is fixed. Keywords of features adv_chain lacks raise ``NotImplementedError`` (see the preset)."""

    def __init__(self, params: Iterable[Any], lr: float = 1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = 1e-8, weight_decay: float = 0.0, fisher_wd: bool = False,
                 cautious_wd: bool = False, stochastic_rounding: bool = True, use_atan2: bool = False,
                 orthogonal_gradient: Any = "disabled", nesterov: bool = False, nesterov_coef: float | None = None,
                 state_precision: str = "auto", factored_2nd: bool = False, nnmf_factor: bool = False,
                 vector_reshape: bool = False, compiled_optimizer: bool = False, beta3: float | None = None,
                 d0: float = 1e-6, d_coef: float = 1, growth_rate: float = float("inf"),
                 safeguard_warmup: bool = False, fsdp_in_use: bool = False, slice_p: int = 11,
                 prodigy_steps: int = 0, d_limiter: bool = False, kourkoutas_beta: bool = False,
                 beta2_min: float = 0.9, ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
                 k_logging: int = 0, layer_key_fn: Any = None, centered_wd: float = 0.0,
                 centered_wd_mode: str = "float8", spectral_normalization: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        presets.adv.not_yet("Prodigy_adv", layer_key_fn=layer_key_fn)
        chain = presets.prodigy_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            stochastic_rounding=stochastic_rounding, use_atan2=use_atan2, orthogonal_gradient=orthogonal_gradient,
            nesterov=nesterov, nesterov_coef=nesterov_coef, state_precision=state_precision,
            factored_2nd=factored_2nd, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, beta3=beta3, d0=d0,
            d_coef=d_coef, growth_rate=growth_rate, safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use,
            slice_p=slice_p, prodigy_steps=prodigy_steps, d_limiter=d_limiter, kourkoutas_beta=kourkoutas_beta,
            beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike, k_warmup_steps=k_warmup_steps,
            k_logging=k_logging, centered_wd=centered_wd, centered_wd_mode=centered_wd_mode,
            spectral_normalization=spectral_normalization, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        _prodigy_groups(self)


Prodigy_Adv = Prodigy_adv

__all__ += ["Prodigy", "Prodigy_adv", "Prodigy_Adv"]
