"""Drop-ins for torch.optim's SGD, Adam, AdamW and lion-pytorch's Lion (with optimi's extra keywords)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .. import presets
from .._core import checks
from .._core.optimizer import ChainOptimizer
from .._core.release import enable_gradient_release
from ._base import ChainOptimizer, _DropIn, _implementation_flags, _optimi_family_kahan, _optimi_kahan, _optimi_max_lr  # noqa: F401


class SGD(_DropIn):
    """``torch.optim.SGD`` as a chain (preset ``sgd``); same keywords and defaults."""

    foreign_checkpoints = ("torch.optim",)

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

    foreign_checkpoints = ("torch.optim",)

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

    foreign_checkpoints = ("torch.optim",)

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

    foreign_checkpoints = ("lion_pytorch",)

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
