"""Execution plan: a chain split into segments, and the segment body shared by eager and compiled runs.

A *segment* is a run of transforms executed together on one slice of data. Elementwise segments run
on cache-sized groups of flat tensor slices (every transform of the segment on one group before the
next group: torch's multi-tensor amortization with a loop's locality). A global transform starts a new
segment: its ``reduce`` runs over every bucket, its ``finalize`` once, and its elementwise part joins
the segment it starts (layer-scope transforms likewise, with per-layer results). A tensor-scope
transform makes the segment that holds it run on whole tensors: it stays with its neighbours, so the
signals, decay terms and ``skip_apply`` they share (which live only as long as one segment) still
reach it and the terminal. When a segment is not the last, its output direction is materialized to
full-size fp32 tensors. A barrier transform with a ``prepare`` step (``cautious``'s mask) has it run
as the last transform of the segment before the barrier, on slices still in cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .bucket import Bucket, run_transforms
from .transform import Transform, expand

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Segment:
    transforms: tuple[Transform, ...]
    barrier: Transform | None  # a global transform whose reduce/finalize runs before this segment
    whole: bool                # holds a tensor-scope transform: runs on whole, param-shaped tensors
    materialize: bool          # the next segment needs this one's output at full size

    @property
    def all_transforms(self) -> tuple[Transform, ...]:
        """The segment's transforms and those nested in them (a partition's sub-chains)."""
        return expand(self.transforms)

    @property
    def compilable(self) -> bool:
        """False when a transform opts out of torch.compile (``compilable = False``, e.g. the
        state-compressing wrappers): under ``compile=True`` that segment then runs eagerly."""
        return all(getattr(t, "compilable", True) for t in self.transforms)


class Prepare(Transform):
    """The :meth:`~Transform.prepare` step of a layer/global transform, placed by :func:`build_plan`
    as the last transform of the segment before that transform's barrier (same name, so it sees the
    owner's state and scalars)."""

    scope = "elementwise"

    def __init__(self, owner: Transform) -> None:
        super().__init__(name=owner.name)
        object.__setattr__(self, "owner", owner)

    @property
    def stage(self) -> str:  # type: ignore[override]
        return self.owner.stage

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        return self.owner.reads

    @property
    def compilable(self) -> bool:
        return getattr(self.owner, "compilable", True)

    def __repr__(self) -> str:
        return f"prepare({self.owner!r})"

    def update(self, b: Any) -> None:
        self.owner.prepare(b)


def build_plan(transforms: tuple[Transform, ...]) -> tuple[Segment, ...]:
    raw: list[tuple[list[Transform], Transform | None, bool]] = []
    current: list[Transform] = []
    barrier: Transform | None = None
    whole = False
    for t in transforms:
        if t.scope in ("global", "layer"):
            if t.prepares:  # the previous segment (or one of its own, if t comes first) ends with it
                current.append(Prepare(t))
            if current:
                raw.append((current, barrier, whole))
            # a global transform in a state wrapper that needs whole tensors (factored rows, int8 blocks)
            current, barrier, whole = [t], t, bool(getattr(t, "whole_tensors", False))
        else:
            current.append(t)
            whole = whole or t.scope == "tensor"
    if current:
        raw.append((current, barrier, whole))
    return tuple(Segment(tuple(ts), bar, whole, i < len(raw) - 1) for i, (ts, bar, whole) in enumerate(raw))


def segment_body(transforms: tuple[Transform, ...], params: list[torch.Tensor], grads: list[torch.Tensor],
                 ref_grads: list[torch.Tensor] | None, states: dict[str, dict[str, list[torch.Tensor]]],
                 scalars: dict[str, dict[str, Any]], u_owned: bool, offsets: list[Any],
                 noise_keys: list[Any] | None, materialize: bool, dest: list[torch.Tensor] | None = None,
                 reducer: Transform | None = None) -> Any:
    """Run ``transforms`` on aligned lists; the same function runs eagerly or under ``torch.compile``.

    Low-precision gradients are promoted to fp32 here, so the math never runs in bf16/fp16.
    Returns ``(u, reference, values)`` when ``materialize`` is set (``reference`` is ``None`` while
    still in the gradient stage, ``"input"`` when it is the unmodified input gradient, else a list),
    else ``None``. ``dest``: tensors the direction is written into (``u`` is then returned as
    ``None``); ``reducer``: the next barrier (``additive_reduce``), whose ``reduce`` of this
    direction is returned as ``values`` (else ``None``).
    """
    incoming = grads
    if grads[0].dtype in LOW_PRECISION:
        grads = [g.float() for g in grads]
        u_owned = True
    b = Bucket(params, grads, states, scalars, grads=ref_grads, u_owned=u_owned, offsets=offsets,
               noise_keys=noise_keys)
    run_transforms(transforms, b)
    if not materialize:
        return None
    u, ref = b.u, (None if not b.frozen else "input" if b.grads is incoming else b.grads)
    values = None if reducer is None else reduce_direction(reducer, params, u, ref, incoming, states, scalars)
    if dest is not None:
        torch._foreach_copy_(dest, u)
        u = None
    return u, ref, values


def reduce_direction(reducer: Transform, params: list[torch.Tensor], u: list[torch.Tensor], ref: Any,
                     incoming: list[torch.Tensor], states: Any, scalars: Any) -> list[Any]:
    """``reducer.reduce`` of a materialized direction ``u`` (with :func:`segment_body`'s
    ``reference``: ``"input"`` means the incoming gradients ``incoming``)."""
    b = Bucket(params, u, states, scalars, grads=incoming if isinstance(ref, str) else ref)
    b.enter(reducer.name, reducer.stage)
    return reducer.reduce(b)


def _dense(x: torch.Tensor) -> bool:
    """True if the elements of ``x`` fill a contiguous block of memory without overlap, in some
    order of dimensions (e.g. ``channels_last``)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_view(x: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view over all elements of ``x`` in memory order, or ``None`` if ``x`` is not dense."""
    if x.is_contiguous():
        return x.view(-1)
    if _dense(x):
        return x.as_strided((x.numel(),), (1,), x.storage_offset())
    return None


class Work:
    """One bucket for one step: params of one group sharing device, dtype and step number."""

    __slots__ = ("group_index", "params", "grads", "indices", "step", "hps", "scalars", "states",
                 "noise_keys", "full_u", "full_g", "next_u", "next_g", "partials", "dist", "pool")

    def __init__(self, group_index: int, step: int) -> None:
        self.group_index = group_index
        self.step = step
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.indices: list[int] = []
        # direction and reference gradient materialized by the previous segment (None: use .grad)
        self.full_u: list[torch.Tensor] | None = None
        self.full_g: list[torch.Tensor] | None = None
        # what the running segment materializes, promoted to full_u/full_g when it ends
        self.next_u: list[torch.Tensor] | None = None
        self.next_g: list[torch.Tensor] | None = None
        # per-tensor sums of the next barrier's reduce, accumulated slice by slice
        self.partials: list[Any] = []
        # FSDP2: where the local shards sit in the full tensors (distributed.Sharding), else None
        self.dist: Any = None
        # a pipelined step: flat buffers, reused by every part of the step, that hold the direction
        # a segment materializes (see split_work); None: fresh tensors
        self.pool: dict[Any, torch.Tensor] | None = None


def per_tensor_reduction(t: Transform) -> bool:
    """A layer-scope transform whose layers are single tensors and that keeps no group state: its
    reduce -> finalize -> update can run on any subset of whole tensors with the same result."""
    if t.scope != "layer":
        return False
    try:
        probe = torch.zeros(2, 3)
        return (t.layer_key(probe, 5, {}) == 5 and t.layer_key(probe, 6, {}) == 6
                and not t.group_state(dict(t.args)))
    except Exception:  # noqa: BLE001 - a transform that needs more context: not known to be per tensor
        return False


def pipelines(plan: tuple[Segment, ...]) -> bool:
    """Every barrier of ``plan`` is a per-tensor reduction (orthograd, cautious), and a segment
    hands a materialized direction to the next: a step may then run the whole plan on a few tensors
    at a time (:func:`split_work`), so that direction exists for those tensors only, in one reused
    buffer (no parameter-sized temporary, no fresh pages). A plan whose only barrier comes first
    (orthograd alone) materializes nothing and is not split: parts would only add overhead."""
    barriers = [seg.barrier for seg in plan if seg.barrier is not None]
    return (any(seg.materialize for seg in plan) and bool(barriers)
            and all(per_tensor_reduction(t) for t in barriers))


def materialized_buffers(w: Work, si: int, kind: str = "direction") -> list[torch.Tensor]:
    """fp32 tensors shaped like ``w.params`` for what segment ``si`` materializes (the direction, or
    ``kind="reference"``: the reference gradient): views of one buffer per segment and kind in the
    step's pool when ``w`` is part of a pipelined step (allocated at the largest part's size, then
    reused by every part), else fresh tensors. Non-contiguous parameters always get fresh ones."""
    pooled = [w.pool is not None and p.is_contiguous() for p in w.params]
    need = sum(p.numel() for p, own in zip(w.params, pooled) if own)
    buf = None
    if need:
        key = (si, kind, w.params[0].device)
        buf = w.pool.get(key)
        if buf is None or buf.numel() < need:
            buf = w.pool[key] = torch.empty(need, dtype=torch.float32, device=w.params[0].device)
    out, start = [], 0
    for p, own in zip(w.params, pooled):
        if own:
            out.append(buf[start:start + p.numel()].view(p.shape))
            start += p.numel()
        else:
            out.append(torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format))
    return out


def store_materialized(w: Work, si: int, pieces: list[tuple[int, Any, Any]], cut: Any, out: tuple) -> None:
    """Keep what segment ``si`` materialized for ``pieces`` (``(index, start, end)`` slices of
    ``w``'s tensors; ``cut(x, start, end)`` takes one) as ``w.next_u`` / ``w.next_g``, from
    :func:`segment_body`'s ``(u, reference, values)``."""
    u, ref, _ = out
    if u is not None:  # (None: a compiled kernel wrote it in place)
        if w.next_u is None:
            w.next_u = materialized_buffers(w, si)
        torch._foreach_copy_([cut(w.next_u[i], s, e) for i, s, e in pieces], u)
    if ref is None:
        return
    if isinstance(ref, str):  # "input": the reference gradient is the incoming fp32 gradient, no copy
        w.next_g = w.full_u if w.full_u is not None else w.grads
        return
    if w.next_g is None:
        w.next_g = materialized_buffers(w, si, "reference")
    torch._foreach_copy_([cut(w.next_g[i], s, e) for i, s, e in pieces], ref)


def separate_buffers(w: Work, si: int, kept: dict[Any, torch.Tensor]) -> list[torch.Tensor]:
    """fp32 tensors shaped like ``w.params`` for the direction segment ``si`` materializes, for a
    compiled kernel to write into: one storage each (views of one buffer would alias the kernel's
    inputs). In a pipelined step (``w.pool`` set) they are kept in ``kept``, keyed by size and rank
    among the part's tensors of that size, so every later part and step reuses them (no fresh
    pages; at most about one part's size per distinct tensor size); otherwise fresh tensors."""
    out, seen = [], {}
    for p in w.params:
        if w.pool is None or not p.is_contiguous():
            out.append(torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format))
            continue
        rank = seen[p.numel()] = seen.get(p.numel(), -1) + 1
        key = (si, p.device, p.numel(), rank)
        buf = kept.get(key)
        if buf is None:
            buf = kept[key] = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
        out.append(buf.view(p.shape))
    return out


#: a pipelined step under compile=True runs parts of this many chunk_elems groups, one kernel call
#: per part (per-call overhead ~50 us; a part's direction stays in the last-level cache)
COMPILED_PART_GROUPS = 16


def split_work(w: Work, budget: int) -> list[Work]:
    """``w`` as consecutive parts of whole tensors of about ``budget`` elements (at least one
    tensor each); each part carries its tensors' states, scalars and noise keys."""
    parts: list[list[int]] = []
    total = budget
    for j, p in enumerate(w.params):
        if total + p.numel() > budget:
            parts.append([])
            total = 0
        parts[-1].append(j)
        total += p.numel()
    if len(parts) <= 1:
        return [w]
    n = len(w.params)
    out = []
    for index in parts:
        def pick(xs: list[Any], index: list[int] = index) -> list[Any]:
            return [xs[j] for j in index]
        part = Work(w.group_index, w.step)
        part.params, part.grads, part.indices = pick(w.params), pick(w.grads), pick(w.indices)
        part.partials = [None] * len(index)
        part.hps = w.hps
        part.scalars = {t: {k: (pick(v) if isinstance(v, list) and len(v) == n else v) for k, v in d.items()}
                        for t, d in w.scalars.items()}
        part.states = {t: {k: pick(v) for k, v in d.items()} for t, d in w.states.items()}
        part.noise_keys = None if w.noise_keys is None else pick(w.noise_keys)
        part.dist = w.dist
        out.append(part)
    return out


#: stages whose transforms keep running while the optimizer accumulates (they own the moments)
ACCUMULATING_STAGES = ("gradient", "hyper", "moment", "any")


def accumulation_transforms(transforms: tuple[Transform, ...]) -> tuple[Transform, ...]:
    """The prefix of a chain that runs under optimizer accumulation (optimi's
    ``optimizer_accumulation``): the gradient stage and the moments, up to the first transform of a
    later stage. Normalization, masks, scales, decay and the terminal are skipped: parameters and
    the terminal's own state (Kahan compensation) stay untouched."""
    keep: list[Transform] = []
    for t in transforms:
        if t.stage not in ACCUMULATING_STAGES:
            break
        keep.append(t)
    return tuple(keep)
