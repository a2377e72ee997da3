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
from .hyper import _laid_out, stat_axis

_RANK_TAGS = frozenset({"lora_A", "lora_B", "oft"})  # each row / column is a rank (an OFT block)


def squared_norms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``||x||^2`` per tensor in fp32 (fp64 for fp64 tensors): the additive per-slice reduce of the norm clips."""
    dtype = torch.float64 if xs and xs[0].dtype == torch.float64 else torch.float32
    return torch._foreach_pow(torch._foreach_norm(xs, 2, dtype=dtype), 2)


class ClipByGlobalNorm(Transform):
    """Scale all gradients by ``min(1, max_norm / (||g|| + 1e-6))``, ``||g||`` over every parameter of
    every group, as ``torch.nn.utils.clip_grad_norm_`` does (global scope: a reduction, then one
    scale). The total norm of the step is kept in ``optimizer.step_info[name]["total_norm"]``.
    Under gradient release (per-parameter steps, :func:`adv_chain.enable_gradient_release`) it is
    one step lagged: the norm of the previous round of steps scales this step's gradients.

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
        return squared_norms(b.u)

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
# orthograd takes ||o||^2 = <g,g> - 2 rho <w,g> + rho^2 <w,w> from the dot products when it is at least
# this fraction of <g,g> (cos^2(w, g) <= 15/16: the fp32 errors of the dot products grow at most
# about 60-fold in it); below, g is nearly parallel to w and ||o|| comes from the residue pass
_ANALYTIC_MIN = 1.0 / 16


_ORTHO_MODES = ("flattened", "iterative")
_OVER_RELAX = 1.01   # adv_optm's over-relaxed projection (gamma = -1.01 instead of -1)
_ITERATIONS = 3      # alternating row/column sweeps of the iterative mode


class Orthograd(Transform):
    """OrthoGrad (Prieto et al., arXiv 2501.04697): remove the gradient's component parallel to the
    weights and restore its norm, per tensor.

    ``mode="flattened"`` (default; the paper's, and adv_optm's ``orthogonal_gradient='flattened'``)
    treats each tensor as one vector::

        rho = <w, g> / (<w, w> + 1e-30),   o = g - rho * w,   g' = o * ||g|| / (||o|| + 1e-30)

    It runs as a per-tensor (layer-scope) reduction: fp32 dot products ``<w,g>, <w,w>, <g,g>`` over
    slices of 256K elements, summed in fp64. ``||o||^2`` is ``<g,g> - 2 rho <w,g> + rho^2 <w,w>`` (with
    the fp32 ``rho`` the update applies) when that is at least ``<g,g> / 16``; otherwise g is nearly
    parallel to w, the difference cancels (it can reach 0 while the applied fp32 residue does not:
    the scale would explode), and a second pass takes the norm of the fp32 residue ``g - rho*w``
    exactly as the update rounds it (so ``||g'|| <= ||g||`` holds even when g is parallel to w up to
    rounding). On accelerators the choice would need a device sync, so there the second pass always
    runs. The update then applies ``g' = s * (g - rho * w)`` elementwise with the per-tensor ``rho``
    and ``s`` (host numbers on the CPU) into a fresh fp32 direction (the gradient is not copied),
    ``g - rho*w`` rounded as the residue pass rounds it (``rho*w``, then the difference; adv_optm's
    rounding too).

    ``mode="iterative"`` is adv_optm's rank-2 variant (``orthogonal_gradient='iterative'``, spec
    §3.1; not in the paper). On the matrix view ``G, W`` (``rows x rest``, ``m x n``) it alternates
    projections per column and per row, 3 sweeps, over-relaxed by 1.01, restoring the original
    per-slice norms after each projection. With ``d1`` = the dimension reduced first (rows, i.e.
    per-column quantities, if ``m > n``, else columns) and ``d2`` the other, for ``d`` in both::

        P_d = sum_d W^2 + 1e-30,   lb_d = 1 / sqrt(size_d),   T_d = max(||G||_d, lb_d)   (original G)
        repeat 3 times, for d in (d1, d2):
            G = G - 1.01 * (sum_d (W * G) / P_d) * W
            G = G * T_d / max(||G||_d, lb_d)

    (``sum_d`` and ``||.||_d`` reduce over dimension ``d``, keeping it.) Every row and column ends
    nearly orthogonal to the weights'; the global norm is only approximately kept. 1-D (and 0-d)
    parameters, and parameters tagged ``vector`` or ``dora_scale`` (:mod:`adv_chain._core.tags`; adv_optm's
    ``is_vector``/``_is_dora_scale`` attributes), use the flattened formula. This mode needs whole tensors, so it is a tensor-scope transform (a
    segment of its own); it computes in fp32, with same-shaped tensors stacked into one batch.

    LoRA and OFT factors (``per_rank=True``, the default; parameters tagged ``lora_A``, ``oft``: each
    row, ``lora_B``: each column, see :mod:`adv_chain._core.tags`) get one projection per rank (OFT
    block): ``rho``, ``o`` and the restored norm are taken over that row or column, so each rank's
    update is orthogonal to its own weights and keeps its own gradient norm (a DoRA scale, and an
    adapter with fewer than two dimensions, stays one vector). adv_optm projects every tensor as one
    vector; its drop-ins pass ``per_rank=False``.

    Neither mode writes the user's ``p.grad``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(), ac.apply()).names
    ('orthograd', 'adam', 'eps_divide', 'apply')
    >>> ac.orthograd(mode="iterative"), ac.orthograd(mode="iterative").scope
    (orthograd(mode='iterative'), 'tensor')
    """

    type_name = "orthograd"
    default_name = "orthograd"
    stage = "gradient"
    reads = frozenset({"update", "param"})

    def __init__(self, mode: str = "flattened", per_rank: bool = True, *, name: str | None = None) -> None:
        extra = {} if checks.flag(self.type_name, "per_rank", per_rank) else {"per_rank": False}
        super().__init__(name=name, mode=checks.choice(self.type_name, "mode", mode, _ORTHO_MODES), **extra)

    @property
    def scope(self) -> str:  # type: ignore[override]
        # flattened: per tensor, reduced slice by slice (the default layer key is the tensor itself);
        # iterative: per-row/per-column reductions need whole tensors
        return "tensor" if self.args["mode"] == "iterative" else "layer"

    def reduce(self, b: Any) -> list[torch.Tensor]:
        # per tensor: fp32 (rho, -s) (s negated for the update's rounding, see there); per rank for
        # a tagged adapter: (2, *shape), rho and -s of each row / column expanded over it
        out = []
        tags = b.s("adapter_tags")
        for w, g in zip(b.params, b.u):
            axis = stat_axis(tuple(w.shape), tags) if tags else None
            if axis is not None:
                out.append(_per_rank_values(w.detach(), g, axis))
                continue
            w_flat, g_flat = w.detach().reshape(-1), g.reshape(-1)
            dot, ww, gg = _ortho_dots(w_flat, g_flat)
            if isinstance(dot, float):  # host numbers (CPU, eager): decide per tensor, no sync
                rho = torch.tensor(dot / (ww + 1e-30), dtype=torch.float32).tolist()  # as the update applies it
                oo = gg - 2.0 * rho * dot + rho * rho * ww
                if not oo >= _ANALYTIC_MIN * gg:  # nearly parallel (or not finite): the residue pass
                    oo = _ortho_residue_norm2(w_flat, g_flat, rho)
                out.append(torch.tensor((rho, -(math.sqrt(gg) / (math.sqrt(oo) + 1e-30))),
                                        dtype=torch.float32, device=g.device))
            else:  # 0-d fp64 device tensors: the residue pass always (choosing would sync)
                rho = (dot / (ww + 1e-30)).float()
                oo = _ortho_residue_norm2(w_flat, g_flat, rho)
                out.append(torch.stack((rho, (gg.sqrt() / (oo.sqrt() + 1e-30)).neg().float())))
        return out

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        return {"rho": [v[0] for v in values], "neg_scale": [v[1] for v in values]}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        # a bucket's parameters share their tags (adv_chain._core.tags): vectors for the iterative
        # mode, LoRA/OFT factors for the per-rank projection
        tags = h.hp.get("tags", frozenset())
        ranks = tags & _RANK_TAGS if h.hp.get("per_rank", True) and h.hp["mode"] == "flattened" else frozenset()
        return {"vector_tagged": bool(tags & {"vector", "dora_scale"}), "adapter_tags": frozenset(ranks)}

    static_scalars = frozenset({"vector_tagged", "adapter_tags"})

    def update(self, b: Any) -> None:
        if self.args["mode"] == "iterative":
            b.set_u(_iterative_orthograd(b.params, b.u, b.s("vector_tagged")))
            return
        # g' = (-s) * (rho*w - g): the rounding of s * (g - rho*w) (negation is exact) that the residue
        # pass measured, into a fresh fp32 direction (the gradient is not copied first)
        if any(x.dim() for x in b.s("rho")):  # per-rank values of an adapter: one tensor at a time
            offsets = b.offsets if b.offsets is not None else [0] * len(b.params)
            out = []
            for p, g, r, ns, off in zip(b.params, b.u, b.s("rho"), b.s("neg_scale"), offsets):
                r, ns = (F.host_number(r), F.host_number(ns)) if r.dim() == 0 else (
                    _laid_out(r, g, off), _laid_out(ns, g, off))
                out.append(torch.mul(p.float(), r).sub_(g).mul_(ns))
            b.set_u(out)
            return
        rho = [F.host_number(x) for x in b.s("rho")]  # host numbers on the CPU: scalar-list kernels
        neg_scale = [F.host_number(x) for x in b.s("neg_scale")]
        if b.params[0].dtype == torch.float32:
            o = torch._foreach_mul(b.params, rho)
        else:
            o = [p.float() for p in b.params]
            torch._foreach_mul_(o, rho)
        torch._foreach_sub_(o, b.u)
        torch._foreach_mul_(o, neg_scale)
        b.set_u(o)


def _per_rank_values(w: torch.Tensor, g: torch.Tensor, axis: int) -> torch.Tensor:
    """OrthoGrad's ``(rho, -s)`` for each row (``axis=0``: LoRA A, OFT blocks) or column (``axis=1``:
    LoRA B) of an adapter, the other dimensions reduced (fp64 sums; the residue norm of the fp32
    residue as the update rounds it), expanded to ``(2, *w.shape)``."""
    dims = tuple(d for d in range(w.dim()) if d != axis)
    w32, g32 = w.float(), g.float()

    def total(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=dims, keepdim=True, dtype=torch.float64)

    dot, ww, gg = total(w32 * g32), total(w32 * w32), total(g32 * g32)
    rho = (dot / (ww + 1e-30)).float()
    o = g32 - rho * w32
    neg_scale = -(gg.sqrt() / (total(o * o).sqrt() + 1e-30))
    return torch.stack((rho, neg_scale.float())).expand(2, *w.shape)


def _ortho_dots(w: torch.Tensor, g: torch.Tensor) -> tuple[Any, Any, Any]:
    """``<w,g>, <w,w>, <g,g>`` of two flat tensors: fp32 dot products per slice summed in fp64, as
    Python floats on the CPU in eager mode (reading them is free), else 0-d fp64 tensors."""
    host = [0.0, 0.0, 0.0]
    sums = None
    for i in range(0, w.numel(), _SLICE):
        ws, gs = w[i:i + _SLICE].float(), g[i:i + _SLICE].float()  # no copies for fp32
        dots = (torch.dot(ws, gs), torch.dot(ws, ws), torch.dot(gs, gs))
        first = F.host_number(dots[0])
        if isinstance(first, float):
            host[0] += first
            host[1] += F.host_number(dots[1])
            host[2] += F.host_number(dots[2])
        else:
            part = torch.stack(dots).double()
            sums = part if sums is None else sums + part
    if sums is None:
        return host[0], host[1], host[2]
    return sums[0], sums[1], sums[2]


def _ortho_residue_norm2(w: torch.Tensor, g: torch.Tensor, rho: Any) -> Any:
    """``||g - rho*w||^2`` of the fp32 residue (rounded as orthograd's update applies it: ``rho*w``,
    then the difference), fp32 dot products per slice summed in fp64 (a host number when ``rho`` is
    one)."""
    oo: Any = 0.0 if isinstance(rho, float) else torch.zeros((), dtype=torch.float64, device=g.device)
    for i in range(0, w.numel(), _SLICE):
        o = g[i:i + _SLICE].float() - rho * w[i:i + _SLICE].float()
        d = torch.dot(o, o)
        oo = oo + (F.host_number(d) if isinstance(rho, float) else d.double())
    return oo


def _is_vector(p: torch.Tensor, tagged: bool = False) -> bool:
    """adv_optm's vector test for the iterative mode: fewer than 2 dims, or a vector tag (``is_vector``
    or ``_is_dora_scale``, on the tensor or in the param group's ``tags``)."""
    return tagged or p.dim() < 2 or bool(getattr(p, "is_vector", False)) or bool(getattr(p, "_is_dora_scale", False))


def _iterative_orthograd(params: list[torch.Tensor], grads: list[torch.Tensor],
                         vector_tagged: bool = False) -> list[torch.Tensor]:
    """Iterative OrthoGrad of every (param, grad) pair: fresh fp32 tensors shaped like the grads.

    Tensors are grouped by their view (matrix ``(m, n)`` or vector ``(n,)``) and each group is
    stacked into one batch ``(B, ...)``; all math is fp32 and never touches the inputs."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        view = (p.numel(),) if _is_vector(p, vector_tagged) else (p.shape[0], p.numel() // p.shape[0])
        groups.setdefault(view, []).append(i)
    out: list[Any] = [None] * len(params)
    for view, idx in groups.items():
        w = torch.stack([params[i].detach().reshape(view).float() for i in idx])
        g = torch.stack([grads[i].reshape(view).float() for i in idx])  # a copy: the input stays intact
        result = _flattened_batch(w, g) if len(view) == 1 else _rank2_batch(w, g)
        for k, i in enumerate(idx):
            out[i] = result[k].view(grads[i].shape)
    return out


def _flattened_batch(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The flattened formula on a batch of vectors ``(B, n)``, fp32."""
    rho = (w * g).sum(-1, keepdim=True) / ((w * w).sum(-1, keepdim=True) + 1e-30)
    o = g - rho * w
    return o * (torch.linalg.vector_norm(g, dim=-1, keepdim=True)
                / (torch.linalg.vector_norm(o, dim=-1, keepdim=True) + 1e-30))


def _rank2_batch(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """adv_optm's alternating per-column / per-row projection on a batch of matrices ``(B, m, n)``
    (modified in place: ``g`` must be a fresh copy)."""
    m, n = g.shape[1], g.shape[2]
    first = 1 if m > n else 2  # reduce over rows first (per-column quantities) for tall matrices
    dims = (first, 3 - first)
    power = [(w * w).sum(d, keepdim=True) + 1e-30 for d in dims]
    floor = [g.shape[d] ** -0.5 for d in dims]
    target = [torch.linalg.vector_norm(g, dim=d, keepdim=True).clamp_min(lb) for d, lb in zip(dims, floor)]
    for _ in range(_ITERATIONS):
        for d, pw, lb, tn in zip(dims, power, floor, target):
            coef = (w * g).sum(d, keepdim=True) / pw
            g.addcmul_(coef, w, value=-_OVER_RELAX)
            g.mul_(tn / torch.linalg.vector_norm(g, dim=d, keepdim=True).clamp_min(lb))
    return g


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
