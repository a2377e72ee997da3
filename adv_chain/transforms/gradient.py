"""Gradient-stage transforms: they shape the gradient before any moment sees it.

What leaves this stage is the *reference gradient* ``b.grads`` that later transforms (cautious masks,
Grams) compare against. The user's ``p.grad`` is never modified.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, Transform


class ClipByGlobalNorm(Transform):
    """Scale all gradients by ``min(1, max_norm / (||g|| + 1e-6))``, ``||g||`` over every parameter of
    every group, as ``torch.nn.utils.clip_grad_norm_`` does (global scope: a reduction, then one
    scale). The total norm of the step is kept in ``optimizer.step_info[name]["total_norm"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.clip_by_global_norm(1.0), ac.scale_by_adam(), ac.eps_divide(), ac.apply()).names
    ('clip_by_global_norm', 'adam', 'eps_divide', 'apply')
    """

    type_name = "clip_by_global_norm"
    default_name = "clip_by_global_norm"
    stage = "gradient"
    scope = "global"
    additive_reduce = True  # squared norms of slices add up
    hparams = {"max_norm": HParam(None, checks.positive)}

    def __init__(self, max_norm: float = 1.0, *, name: str | None = None) -> None:
        super().__init__(name=name, max_norm=max_norm)

    def reduce(self, b: Any) -> list[torch.Tensor]:
        return torch._foreach_pow(torch._foreach_norm(b.u, 2, dtype=torch.float32), 2)

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        device = values[0].device
        total = torch.stack([x.to(device) for x in values]).sum().sqrt()
        coef = (hp["max_norm"] / (total + 1e-6)).clamp(max=1.0)
        return {"total_norm": total, "coef": coef}

    def update(self, b: Any) -> None:
        torch._foreach_mul_(b.own_u(), b.s("coef"))


class ClipByValue(Transform):
    """Clamp every coordinate of the direction to ``[-max_abs, max_abs]``. Position-free: before the
    moments it clips gradients, after them it clips updates.

    >>> import adv_chain as ac
    >>> ac.chain(ac.clip_by_value(0.5), ac.momentum(0.9), ac.apply()).names
    ('clip_by_value', 'momentum', 'apply')
    """

    type_name = "clip_by_value"
    default_name = "clip_by_value"
    stage = "any"
    hparams = {"max_abs": HParam(None, checks.positive)}
    static_scalars = frozenset({"max_abs", "neg_max_abs"})

    def __init__(self, max_abs: float = 1.0, *, name: str | None = None) -> None:
        super().__init__(name=name, max_abs=max_abs)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"max_abs": h.hp["max_abs"], "neg_max_abs": -h.hp["max_abs"]}

    def update(self, b: Any) -> None:
        if math.isinf(b.s("max_abs")):
            return
        u = b.own_u()
        torch._foreach_clamp_min_(u, b.s("neg_max_abs"))
        torch._foreach_clamp_max_(u, b.s("max_abs"))


class AddL2(Transform):
    """Coupled (L2) weight decay: ``g = g + weight_decay * p``, as ``torch.optim.SGD``/``Adam`` do.
    For decoupled decay (AdamW) use :func:`weight_decay`. Fed by ``group["weight_decay"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.add_l2(1e-4), ac.momentum(0.9), ac.apply()).names
    ('add_l2', 'momentum', 'apply')
    """

    type_name = "add_l2"
    default_name = "add_l2"
    stage = "gradient"
    reads = frozenset({"update", "param"})
    hparams = {"weight_decay": HParam("weight_decay", checks.nonneg)}

    def __init__(self, weight_decay: float = 0.0, *, name: str | None = None) -> None:
        super().__init__(name=name, weight_decay=weight_decay)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"weight_decay": h.hp["weight_decay"]}

    def update(self, b: Any) -> None:
        wd = b.s("weight_decay")
        if F.is_zero(wd):
            return
        u = b.own_u()
        if F.is_tensor(wd) or b.params[0].dtype == torch.float32:
            F.add_scaled_(u, b.params, wd)
        else:
            F.add_scaled_(u, [p.float() for p in b.params], wd)


_SLICE = 1 << 18  # elements per slice of orthograd's reduction


class Orthograd(Transform):
    """OrthoGrad (Prieto et al., arXiv 2501.04697): remove the gradient's component parallel to the
    weights and restore its norm, per tensor:

    ``rho = <w, g> / (<w, w> + 1e-30)``, ``o = g - rho * w``, ``g' = o * ||g|| / (||o|| + 1e-30)``.

    ``mode="flattened"`` (the paper's, and adv_optm's ``orthogonal_gradient='flattened'``) treats
    each tensor as one vector. The reduction makes two passes (fp32 dot products over slices of
    256K elements, summed in fp64): the dot products,
    then the norm of the fp32 residue ``g - rho*w`` exactly as the update will apply it (so
    ``||g'|| = ||g||`` holds even when g is parallel to w up to rounding); the update then applies
    ``g' = s * (g - rho * w)`` elementwise with the per-tensor ``rho`` and ``s``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(), ac.apply()).names
    ('orthograd', 'adam', 'eps_divide', 'apply')
    """

    type_name = "orthograd"
    default_name = "orthograd"
    stage = "gradient"
    scope = "layer"  # per tensor: the default layer key is the tensor itself
    reads = frozenset({"update", "param"})

    def __init__(self, mode: str = "flattened", *, name: str | None = None) -> None:
        super().__init__(name=name, mode=checks.choice(self.type_name, "mode", mode, ("flattened",)))

    def reduce(self, b: Any) -> list[torch.Tensor]:
        out = []
        for w, g in zip(b.params, b.u):
            w_flat, g_flat = w.detach().reshape(-1), g.reshape(-1)
            n = w_flat.numel()
            sums = torch.zeros(3, dtype=torch.float64, device=g.device)  # <w,g>, <w,w>, <g,g>
            for i in range(0, n, _SLICE):  # fp32 dot products per slice, summed in fp64
                ws, gs = w_flat[i:i + _SLICE].float(), g_flat[i:i + _SLICE].float()
                sums += torch.stack((torch.dot(ws, gs), torch.dot(ws, ws), torch.dot(gs, gs))).double()
            dot, ww, gg = sums.unbind()
            rho = (dot / (ww + 1e-30)).float()
            # ||o|| of the fp32 residue the update will apply (not <g,g> - rho<w,g>, which cancels to 0
            # when g is parallel to w while the applied fp32 residue does not: the scale would explode)
            oo = torch.zeros((), dtype=torch.float64, device=g.device)
            for i in range(0, n, _SLICE):
                o = g_flat[i:i + _SLICE].float() - rho * w_flat[i:i + _SLICE].float()
                oo = oo + torch.dot(o, o).double()
            out.append(torch.stack((rho, (gg.sqrt() / (oo.sqrt() + 1e-30)).float())))
        return out

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        return {"rho": [v[0] for v in values], "scale": [v[1] for v in values]}

    def update(self, b: Any) -> None:
        u = b.own_u()
        w = b.params if b.params[0].dtype == torch.float32 else [p.float() for p in b.params]
        torch._foreach_sub_(u, torch._foreach_mul(w, b.s("rho")))
        torch._foreach_mul_(u, b.s("scale"))


class Negate(Transform):
    """``g = -g``: gradient ascent (torch's ``maximize=True``).

    >>> import adv_chain as ac
    >>> ac.chain(ac.negate(), ac.apply()).names
    ('negate', 'apply')
    """

    type_name = "negate"
    default_name = "negate"
    stage = "gradient"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def update(self, b: Any) -> None:
        torch._foreach_neg_(b.own_u())


clip_by_global_norm = ClipByGlobalNorm
clip_by_value = ClipByValue
add_l2 = AddL2
negate = Negate
orthograd = Orthograd
