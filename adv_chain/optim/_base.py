"""Shared by the drop-in classes: the ``_DropIn`` base and keyword helpers (torch's and optimi's)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .. import presets
from . import _foreign
from .._core import checks
from .._core.optimizer import ChainOptimizer
from .._core.release import enable_gradient_release


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

    #: writers whose checkpoints ``load_state_dict`` converts (see _foreign.py)
    foreign_checkpoints: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load an adv_chain checkpoint, or one written by the optimizer this class stands in for
        (``foreign_checkpoints``): its keys are mapped to this chain's, and a checkpoint that does not
        map unambiguously is refused with the reason."""
        if _foreign.is_foreign(state_dict):
            state_dict = _foreign.convert(self, state_dict, self.foreign_checkpoints)
        super().load_state_dict(state_dict, strict=strict)

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


def _optimi_family_kahan(owner: str, params: Iterable[Any], kahan_sum: bool | None,
                         stochastic_rounding: bool) -> tuple[list[Any], bool]:
    """optimi's ``kahan_sum=None`` (on for bf16/fp16 parameters), unless stochastic rounding was asked for."""
    if kahan_sum is None and checks.flag(owner, "stochastic_rounding", stochastic_rounding):
        return list(params), False
    return _optimi_kahan(owner, params, kahan_sum)
