"""Sharded parameters (FSDP2's ``fully_shard``: DTensor parameters, gradients and state).

A step on DTensor parameters runs the same chain, the same transforms and the same executor on the
*local shards*; nothing here knows any transform's math. Per segment of the plan (plan.py):

* elementwise segments run on the local shards as they are (a shard is one more slice of a tensor);
  stochastic rounding gets each shard's global element offset, so its noise is the unsharded one;
* a barrier whose ``reduce`` is additive over slices (``clip_by_global_norm``, ``cautious``) reduces
  the local shards and all-reduces the per-tensor sums before its ``finalize``;
* any other barrier (``orthograd``, ``prodigy``) runs its ``reduce`` on gathered full tensors (every
  rank computes the same numbers), then its segment runs on the local shards;
* a segment that needs whole tensors (tensor scope: ``stable_clip``, ``factored_state``, iterative
  OrthoGrad, block-quantized anchors...) or a barrier that keeps per-tensor scalar state
  (``kourkoutas_beta``) runs on gathered full tensors, and each rank keeps its own shard of what it
  wrote (parameters, state, the materialized direction).

Gathers go one parameter at a time, so at most one full tensor (with the state of the segment's
transforms) exists at once. Every transform thus gives the unsharded answer (fp32: within a few
ulps, from partial sums added in another order and vectorized-vs-tail kernels at shard borders;
bf16 stochastic rounding: the same bits). Per-parameter stepping (gradient release) is not
supported on sharded parameters: it raises.
State laid out like its parameter is a DTensor with the parameter's placements (what
``get_optimizer_state_dict`` and DCP reshard); per-tensor scalars and state built from the whole
parameter (``StateSpec.build``: Prodigy's slices, quantized anchors, factored moments) are plain
tensors replicated on every rank.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from .bucket import Bucket
from .barrier import load_group_state, run_barrier
from .plan import Segment, Work
from .transform import expand

#: gloo/nccl move bytes of these dtypes but have no reduction or gather kernels for them
_BYTE_DTYPES = (torch.bool,) + tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _dtensor() -> Any:
    """The DTensor class if it was ever imported (a parameter can only be a DTensor then)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def is_sharded(x: Any) -> bool:
    cls = _dtensor()
    return cls is not None and isinstance(x, cls)


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter, for state built from it (a collective)."""
    return p.full_tensor() if is_sharded(p) else p


class Layout:
    """Where one parameter's local shard sits in its full tensor."""

    __slots__ = ("mesh", "placements", "shape", "stride", "index", "base", "shard_group")

    def __init__(self, p: Any) -> None:
        from torch.distributed.tensor import Shard, Replicate
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        bad = [pl for pl in self.placements if not isinstance(pl, (Shard, Replicate))]
        if bad:
            raise NotImplementedError(f"ChainOptimizer: a DTensor parameter of shape {tuple(p.shape)} has placements "
                                      f"{self.placements}; FSDP2 support covers Shard and Replicate placements only")
        self.shape, self.stride = p.shape, p.stride()
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, self.mesh, self.placements)
        self.index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
        # global flat index of the shard's first element (exact for FSDP2's dim-0 shards)
        self.base = sum(o * s for o, s in zip(offset, self.stride)) if local_shape and min(local_shape) > 0 else 0
        # partial sums over the local shards add up over this group (a 1-D mesh of Shard placements)
        self.shard_group = (self.mesh.get_group() if self.mesh.ndim == 1 and isinstance(self.placements[0], Shard)
                            else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The full tensor whose local shard (laid out like the parameter's) is ``x``."""
        from torch.distributed.tensor import DTensor

        dtype = x.dtype
        if dtype in _BYTE_DTYPES:
            x = x.view(torch.uint8)
        full = DTensor.from_local(x, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride).full_tensor()
        return full.view(dtype) if dtype in _BYTE_DTYPES else full

    def local(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.index]


class Sharding:
    """The layouts of one bucket's parameters (``None``: a plain, replicated parameter) and the ids
    of its local state tensors that are shards (the rest is replicated)."""

    __slots__ = ("params", "layouts", "bases", "sharded")

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params  # the DTensors, for what depends on the full tensor (layer keys by shape)
        self.layouts = layouts = [Layout(p) if is_sharded(p) else None for p in params]
        self.bases = [0 if lay is None else lay.base for lay in layouts]
        self.sharded: set[int] = set()


def _to_local(x: Any, lay: Layout | None) -> Any:
    if not is_sharded(x):
        return x
    if lay is not None and tuple(x.placements) != lay.placements:
        x = x.redistribute(x.device_mesh, lay.placements)
    return x.to_local()


def localize(works: list[Work]) -> bool:
    """Replace the DTensors of every bucket by their local shards (parameters, gradients, state;
    writes to them reach the DTensors). Returns whether any bucket holds sharded parameters."""
    if _dtensor() is None:
        return False
    found = False
    for w in works:
        if not any(is_sharded(p) for p in w.params):
            continue
        found = True
        d = w.dist = Sharding(w.params)
        w.params = [_to_local(p, None) for p in w.params]
        w.grads = [_to_local(g, lay) for g, lay in zip(w.grads, d.layouts)]
        for states in w.states.values():
            for key, lst in states.items():
                local = [_to_local(x, lay) for x, lay in zip(lst, d.layouts)]
                d.sharded.update(id(y) for x, y in zip(lst, local) if is_sharded(x))
                states[key] = local
    return found


# -- one step ------------------------------------------------------------------------------------
def run(opt: Any, works: list[Work], lagged: bool) -> None:
    """The plan of ``opt`` on buckets some of which hold local shards (see the module docstring)."""
    if lagged:
        raise NotImplementedError("ChainOptimizer.step_parameter (gradient release) does not support FSDP2 sharded "
                                  "(DTensor) parameters; call optimizer.step() after backward instead")
    for si, seg in enumerate(opt._plan):
        bar = seg.barrier
        gathered = seg.whole or (bar is not None and _keeps_tensor_scalars(bar, works))
        if bar is not None:
            if not gathered and _additive(bar, works):
                _all_reduce_partials(bar, works)
            else:
                _gathered_reduce(opt, bar, works)
            run_barrier(opt, bar, works)
        for w in works:
            if gathered and w.dist is not None:
                for i in range(len(w.params)):  # one full tensor at a time
                    _run_gathered(opt, si, seg, w, i)
            else:
                (opt._run_whole if seg.whole else opt._run_chunked)(si, seg, w)
            _promote(seg, w)


def _promote(seg: Segment, w: Work) -> None:
    """What ``ChainOptimizer._run`` does after a segment: its materialized output becomes the input."""
    if seg.materialize:
        w.full_u, w.full_g = w.next_u, (w.next_g if w.next_g is not None else w.full_g)
        w.next_u = w.next_g = None


def _keeps_tensor_scalars(t: Any, works: list[Work]) -> bool:
    """A barrier transform whose per-tensor scalar state its update may accumulate over slices
    (kourkoutas_beta's norms): its whole segment runs on full tensors. Every bucket is asked (a
    bucket of LoRA factors keeps per-row state instead)."""
    return any(spec.scalar for w in works for spec in t.state_specs(w.params[0], w.hps[t.name]).values())


def _additive(t: Any, works: list[Work]) -> bool:
    """Whether the barrier can reduce local shards and all-reduce the sums."""
    if not t.additive_reduce or t.group_state(works[0].hps[t.name]):
        return False
    return all(lay is None or lay.shard_group is not None
               for w in works if w.dist is not None for lay in w.dist.layouts)


def _reduce(t: Any, w: Work) -> list[torch.Tensor]:
    u = w.full_u if w.full_u is not None else w.grads
    b = Bucket(w.params, u, w.states, w.scalars, grads=w.full_g)
    b.enter(t.name, t.stage)
    return list(t.reduce(b))


def _all_reduce_partials(t: Any, works: list[Work]) -> None:
    """Local ``reduce`` values (or the partial sums the last segment kept) summed over the ranks,
    left in ``w.partials`` for ``run_barrier``: one all-reduce per process group."""
    import torch.distributed as dist

    for w in works:
        if w.partials[0] is None:
            w.partials = _reduce(t, w)
    by_group: dict[Any, list[tuple[Work, int]]] = {}
    for w in works:
        if w.dist is not None:
            for i, lay in enumerate(w.dist.layouts):
                if lay is not None:
                    by_group.setdefault(lay.shard_group, []).append((w, i))
    for group, entries in by_group.items():
        values = [w.partials[i] for w, i in entries]
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values])
        dist.all_reduce(flat, group=group)
        start = 0
        for (w, i), v in zip(entries, values):
            w.partials[i] = flat[start:start + v.numel()].view(v.shape).to(v.dtype)
            start += v.numel()


def _gathered_reduce(opt: Any, t: Any, works: list[Work]) -> None:
    """``reduce`` of every parameter on its full tensors, one at a time (every rank computes the
    same values), left in ``w.partials`` for ``run_barrier``; what ``reduce`` wrote into sharded
    state goes back to the shards. Group state scalars (Prodigy's d) are loaded first, as
    ``run_barrier`` does before its own reduce."""
    load_group_state(opt, t, works)
    for w in works:
        if w.dist is None:
            w.partials = _reduce(t, w)
            continue
        values = []
        for i in range(len(w.params)):
            fw = _gather(w, (t,), i)
            values.extend(_reduce(t, fw))
            _scatter(w, fw, (t,), i, params=False)
        w.partials = values


def _run_gathered(opt: Any, si: int, seg: Segment, w: Work, i: int) -> None:
    """The segment on the full tensors of parameter ``i``; each rank keeps its shards of what it
    wrote (parameter, state, materialized direction)."""
    fw = _gather(w, seg.transforms, i)
    (opt._run_whole if seg.whole else opt._run_chunked)(si, seg, fw)
    _promote(seg, fw)
    _scatter(w, fw, seg.transforms, i, params=True, outputs=seg.materialize)


def _gather(w: Work, transforms: tuple[Any, ...], i: int) -> Work:
    """A one-parameter bucket over the full tensors of parameter ``i`` of ``w`` (state of
    ``transforms`` only; replicated state is shared, not copied). Aliases stay aliases."""
    d, n = w.dist, len(w.params)
    lay = d.layouts[i]
    memo: dict[int, torch.Tensor] = {}

    def full(x: torch.Tensor) -> torch.Tensor:
        if lay is None:
            return x
        if id(x) not in memo:
            memo[id(x)] = lay.gather(x)
        return memo[id(x)]

    def one(xs: Any) -> Any:  # per-parameter lists (scalars of a reduce, noise keys): this parameter's
        return [xs[i]] if isinstance(xs, list) and len(xs) == n else xs

    fw = Work(w.group_index, w.step)
    fw.hps, fw.indices, fw.noise_keys = w.hps, [w.indices[i]], one(w.noise_keys)
    fw.scalars = {name: {k: one(v) for k, v in sc.items()} for name, sc in w.scalars.items()}
    fw.params = [full(w.params[i])]
    fw.full_u = None if w.full_u is None else [full(w.full_u[i])]
    fw.grads = [w.grads[i]] if w.full_u is not None else [full(w.grads[i])]
    fw.full_g = None if w.full_g is None else [full(w.full_g[i])]
    names = {t.name for t in expand(transforms)}  # a partition's routes included
    fw.states = {name: {k: [full(lst[i]) if id(lst[i]) in d.sharded else lst[i]] for k, lst in states.items()}
                 if name in names else {} for name, states in w.states.items()}
    fw.partials = [None]
    return fw


def _scatter(w: Work, fw: Work, transforms: tuple[Any, ...], i: int, *, params: bool, outputs: bool = False) -> None:
    """Rank keeps its shard of what the full run of parameter ``i`` wrote: the parameter, sharded
    state of ``transforms`` and (``outputs``) the materialized direction and reference gradient."""
    d = w.dist
    lay = d.layouts[i]
    if lay is None:
        local = None
    else:
        local = lay.local
        if params:
            w.params[i].copy_(local(fw.params[0]))
        for t in expand(transforms):
            for key, lst in w.states.get(t.name, {}).items():
                if id(lst[i]) in d.sharded:
                    lst[i].copy_(local(fw.states[t.name][key][0]))
    if outputs:
        n = len(w.params)
        if w.next_u is None:
            w.next_u, w.next_g = [None] * n, ([None] * n if fw.full_g is not None else None)

        def keep(x: torch.Tensor) -> torch.Tensor:  # a copy laid out like the local parameter
            if local is None:
                return x
            return torch.empty_like(w.params[i], dtype=x.dtype, memory_format=torch.preserve_format).copy_(local(x))

        u = keep(fw.full_u[0])
        w.next_u[i] = u
        if fw.full_g is not None:
            w.next_g[i] = u if fw.full_g[0] is fw.full_u[0] else keep(fw.full_g[0])
    w.partials = [None] * len(w.params)  # sums over full tensors: the next barrier reduces again
