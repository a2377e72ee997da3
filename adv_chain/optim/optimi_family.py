"""Drop-ins for torch-optimi's RAdam, Ranger, Adan and StableAdamW (presets in adv_chain.presets.optimi_family)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .. import presets
from .._core import checks
from .._core.optimizer import ChainOptimizer
from .._core.release import enable_gradient_release
from ._base import ChainOptimizer, _DropIn, _implementation_flags, _optimi_family_kahan, _optimi_kahan, _optimi_max_lr  # noqa: F401


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
