"""Prodigy's per-parameter statistics (:mod:`adv_chain.transforms.prodigy`): the sliced state it keeps
(``s``, ``p0``), the reduction ``[(d/d0) dlr <gs, p0 - ps>, sum |s|]`` that updates ``s``, and the
sum of its totals over the ranks (``sum_across_ranks``, the presets' ``fsdp_in_use``)."""
from __future__ import annotations

from typing import Any

import torch

from .._core import foreach as F
from .._core.distributed import is_sharded

#: elements per slice of the reduce: a slice of each operand stays in cache across its passes, and
#: each slice costs six op calls (1 << 18 was fastest on the gpt27m benchmark, 1 thread)
_REDUCE_SLICE = 1 << 18


def _add_scaled_(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: Any) -> None:
    """``xs += alpha * ys`` rounded once (a fused multiply-add), as prodigyopt's ``x.add_(y, alpha=a)``;
    a 0-d tensor ``alpha`` (Prodigy's ``d``) rides along as a broadcast factor: no temporary."""
    if F.is_tensor(alpha):
        torch._foreach_addcmul_(xs, ys, [alpha] * len(xs))
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _sliced(x: torch.Tensor, slice_p: int) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat if slice_p == 1 else flat[::slice_p]


def _build_s(p: torch.Tensor, slice_p: int) -> torch.Tensor:
    return torch.zeros_like(_sliced(p, slice_p), dtype=_state_dtype(p))


def _build_p0(p: torch.Tensor, slice_p: int) -> torch.Tensor:
    if not bool(p.any()):  # all zeros: a 0-d zero saves the copy (as prodigyopt); host read at init only
        return torch.zeros((), dtype=_state_dtype(p), device=p.device)
    return _sliced(p, slice_p).to(_state_dtype(p), copy=True)


def reduce_sums(b: Any, slice_p: int) -> list[torch.Tensor]:
    """Per parameter of bucket ``b`` (Prodigy's scalars and state): ``[(d/d0) dlr <gs, p0 - ps>, sum |s|]``
    in fp64, with ``s = beta3 s + s_coef gs`` updated on the way.

    A parameter at a time, slice by slice through one cache-sized scratch buffer: ``p0 - ps``
    and ``|s|`` are never full-size temporaries, and ``gs``, ``s`` stay in cache across the four
    passes (prodigyopt's loop has the same locality per parameter). A parameter of at most one
    slice computes exactly what prodigyopt does; a longer one sums its slices' fp32 partial sums
    in fp64 (another summation order, no less accurate)."""
    beta3, s_coef, num_coef = b.s("beta3"), b.s("s_coef"), b.s("num_coef")
    scratch: dict[Any, torch.Tensor] = {}
    out = []
    for g, s, p0, p in zip(b.u, b.state("s"), b.state("p0"), b.params):
        gs = _sliced(g, slice_p)
        ps = _sliced(p.detach(), slice_p)
        n = s.numel()
        key = (s.dtype, s.device)
        buf = scratch.get(key)
        if buf is None or buf.numel() < min(n, _REDUCE_SLICE):
            buf = scratch[key] = torch.empty(min(max(n, 1), _REDUCE_SLICE), dtype=s.dtype, device=s.device)
        parts = torch.empty(2, -(-n // _REDUCE_SLICE), dtype=s.dtype, device=s.device)
        for j, start in enumerate(range(0, n, _REDUCE_SLICE)):
            end = min(n, start + _REDUCE_SLICE)
            tmp, g_j, s_j = buf[:end - start], gs[start:end], s[start:end]
            if g_j.dtype != s.dtype:
                g_j = g_j.to(s.dtype)
            torch.sub(p0 if p0.dim() == 0 else p0[start:end], ps[start:end], out=tmp)
            torch.dot(g_j, tmp, out=parts[0, j])
            s_j.mul_(beta3)
            if F.is_tensor(s_coef):  # s + c*g rounded once, as prodigyopt's add_(g, alpha=c)
                s_j.addcmul_(g_j, s_coef)
            else:
                s_j.add_(g_j, alpha=s_coef)
            torch.abs(s_j, out=tmp)
            torch.sum(tmp, dim=0, out=parts[1, j])  # as prodigyopt (not a norm: another order)
        total = parts.double() if parts.shape[1] == 1 else parts.double().sum(1)
        total[0] *= num_coef
        out.append(total.view(2) if parts.shape[1] == 1 else total)
    return out


def refuse_dtensor(owner: str, param: torch.Tensor) -> None:
    """``sum_across_ranks=True`` is for plain tensors: an FSDP2 DTensor's sums are taken over the
    whole tensor on every rank already (a second sum would count them once per rank)."""
    if is_sharded(param):
        raise ValueError(f"{owner}: sum_across_ranks=True (fsdp_in_use=True) is for parameters sharded as plain "
                         f"tensors (FSDP1 flat parameters, ZeRO); a parameter of shape {tuple(param.shape)} is an "
                         "FSDP2 DTensor, whose sums adv_chain already takes over the whole tensor on every rank: "
                         "leave fsdp_in_use=False")


def check_ranks(owner: str) -> None:
    """``sum_across_ranks=True`` needs torch.distributed's default process group (checked at each
    step before the reduction touches any state)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{owner}: sum_across_ranks=True (fsdp_in_use=True) all-reduces Prodigy's sums over "
                         "torch.distributed's default process group, which is not initialized; call "
                         "torch.distributed.init_process_group() before the first step, or leave fsdp_in_use=False "
                         "in a single process")


def sum_over_ranks(total: torch.Tensor, owner: str) -> torch.Tensor:
    """``total`` (this rank's ``[numerator, sum |s|]``, fp64) summed over every rank of the default
    process group, in place: one all-reduce of all of Prodigy's sums per step."""
    import torch.distributed as dist

    check_ranks(owner)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
