"""Drop-in optimizer classes: the keywords and defaults of the optimizers they stand in for, so a
training script switches with one changed import.

>>> import torch, adv_chain as ac
>>> model = torch.nn.Linear(4, 2)
>>> opt = ac.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
>>> print(opt.chain.names)
('adam', 'eps_divide', 'weight_decay', 'apply')

Implementation-choice keywords of torch (``foreach``, ``fused``, ``capturable``) are accepted and do
not change the math: adv_chain picks its own kernels (``compile=True`` for fused ones).
``differentiable=True`` is not supported and says so.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from . import presets
from ._core.optimizer import ChainOptimizer


def _implementation_flags(owner: str, *, differentiable: bool = False, **_accepted: Any) -> None:
    if differentiable:
        raise NotImplementedError(f"{owner}: differentiable=True (differentiating through the optimizer step) "
                                  "is not supported by adv_chain")


class _DropIn(ChainOptimizer):
    def __init__(self, params: Iterable[Any], chain: Any, lr: float, compile: "bool | Mapping[str, Any]",
                 state_dtype: str) -> None:
        super().__init__(params, chain, lr=lr, compile=compile, state_dtype=state_dtype)


class SGD(_DropIn):
    """``torch.optim.SGD`` as a chain (preset ``sgd``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False) -> None:
        _implementation_flags("SGD", differentiable=differentiable, foreach=foreach, fused=fused)
        chain = presets.sgd(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                            maximize=maximize, stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype)


class Adam(_DropIn):
    """``torch.optim.Adam`` as a chain (preset ``adam``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False) -> None:
        _implementation_flags("Adam", differentiable=differentiable, foreach=foreach, capturable=capturable,
                              fused=fused)
        chain = presets.adam(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                             decoupled_weight_decay=decoupled_weight_decay,
                             stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype)


class AdamW(_DropIn):
    """``torch.optim.AdamW`` as a chain (preset ``adamw``); same keywords and defaults."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False) -> None:
        _implementation_flags("AdamW", differentiable=differentiable, foreach=foreach, capturable=capturable,
                              fused=fused)
        chain = presets.adamw(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                              stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype)


class Lion(_DropIn):
    """lion-pytorch's ``Lion`` as a chain (preset ``lion``); same keywords and defaults.
    ``use_triton`` is accepted (a kernel choice); ``decoupled_weight_decay=True`` scales the decay by
    ``lr / initial lr`` as lion-pytorch does."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False, decoupled_weight_decay: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False) -> None:
        chain = presets.lion(betas=betas, weight_decay=weight_decay, max_lr=lr if decoupled_weight_decay else None,
                             stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype)


__all__ = ["SGD", "Adam", "AdamW", "Lion"]
