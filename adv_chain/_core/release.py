"""Gradient release: step each parameter as soon as its gradient is accumulated, then free it.

A step then never holds every gradient at once: peak memory drops by about the gradients' size.
Uses ``Tensor.register_post_accumulate_grad_hook`` (torch >= 2.1) and
:meth:`ChainOptimizer.step_parameter`.

>>> import torch, adv_chain as ac
>>> model = torch.nn.Linear(4, 2)
>>> opt = ac.ChainOptimizer(model.parameters(), "adamw", lr=1e-3)
>>> ac.enable_gradient_release(opt, model)
>>> model(torch.randn(3, 4)).sum().backward()   # stepped inside backward, grads freed
>>> model.weight.grad is None
True
>>> ac.disable_gradient_release(opt)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

_HANDLES = "_adv_chain_release_handles"


def enable_gradient_release(optimizer: Any, model_or_params: "torch.nn.Module | Iterable[torch.Tensor]") -> None:
    """Register hooks that run ``optimizer.step_parameter`` on each parameter of ``model_or_params``
    (that the optimizer holds) as soon as its gradient is ready, and free the gradient."""
    if not getattr(optimizer, "supports_fused_back_pass", lambda: False)():
        raise TypeError(f"enable_gradient_release needs an adv_chain ChainOptimizer, got {type(optimizer).__name__}")
    disable_gradient_release(optimizer)
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    where = {p: (group, i) for group in optimizer.param_groups for i, p in enumerate(group["params"])}
    handles = []
    for p in params:
        if p not in where:
            continue
        group, i = where[p]

        def hook(param: torch.Tensor, group: Any = group, i: int = i) -> None:
            optimizer.step_parameter(param, group, i)
            param.grad = None

        handles.append(p.register_post_accumulate_grad_hook(hook))
    setattr(optimizer, _HANDLES, handles)


def disable_gradient_release(optimizer: Any) -> None:
    """Remove the hooks :func:`enable_gradient_release` registered (no-op if there are none)."""
    for handle in getattr(optimizer, _HANDLES, []):
        handle.remove()
    setattr(optimizer, _HANDLES, [])
