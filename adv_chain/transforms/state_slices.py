"""Chunked decompression for the state wrappers (:mod:`adv_chain.transforms.state_compression`).

A wrapper's step runs the inner transform on slices of its tensors: each slice's dense fp32 state is
rebuilt into a temporary, the inner transform updates it, and the slice is compressed again before
the next one, so dense state never exists for more than a chunk (``chunk_bytes``) at a time. An
elementwise inner transform runs on slices of at most ``SLICE_ELEMS`` elements cut at format
boundaries (whole matrix rows for SMMF factors, whole blocks for int8): the slicing is fixed by the
tensor's shape, so chunk sizes never change the numbers. A per-tensor inner transform sees whole
tensors.

The state the direction aliases (Adam's first moment: ``u = m / (1 - b1^t)`` left pending, folded
into the terminal's write) is rebuilt into one parameter-sized temporary per tensor instead, so the
direction needs no copy; the wrapper learns which key that is on its first chunk.
"""
from __future__ import annotations

from typing import Any

import torch

from .state_codecs import (compress_rows, decompress_rows, dequantize_range, normalize_factors,
                           quantize_range, round_into, scratch, stray_zeros)

#: the largest slice of a tensor the inner transform runs on (cache-sized)
SLICE_ELEMS = 1 << 18


def tensor_key(b: Any, i: int) -> Any:
    """Per-tensor part of the noise key: the terminal's (seed, step, parameter index) key when the
    executor provides one (a Python int, or the same value as an int32 0-d tensor under
    ``compile=True``: eager and compiled runs draw the same noise), else the tensor's position in
    the bucket."""
    keys = b.noise_keys
    if keys is not None:
        return keys[i]
    return (i * 0x9E3779B1 + 0x7F4A7C15) & 0x7FFFFFFF


class FactoredCodec:
    """SMMF factors of one state key: ``row``/``col`` fp32, for signed state a packed ``sign`` and
    ``zero`` mask (see :func:`compress`). A tensor with an empty ``col`` keeps its dense state in
    ``row``."""

    def __init__(self, stored: dict[str, list[torch.Tensor]], key: str) -> None:
        self.scratch = scratch()
        self.row, self.col = stored[f"{key}:row"], stored[f"{key}:col"]
        self.sign, self.zero = stored.get(f"{key}:sign"), stored.get(f"{key}:zero")
        self.work: dict[int, tuple] = {}
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def dense(self, i: int) -> torch.Tensor | None:
        return self.row[i] if self.col[i].numel() == 0 else None

    def unit(self, i: int) -> int:
        return max(1, self.col[i].numel())

    def _rows(self, i: int, cut: Any) -> tuple[int, int]:
        d2 = self.col[i].numel()
        return (0, self.row[i].numel()) if cut is None else (cut[0] // d2, cut[1] // d2)

    def load(self, i: int, cut: Any, out: torch.Tensor) -> None:
        r0, r1 = self._rows(i, cut)
        zero = self.zero[i] if self.zero is not None and self.zero[i].numel() else None
        decompress_rows(out.view(r1 - r0, -1), self.row[i][r0:r1], self.col[i],
                        None if self.sign is None else self.sign[i][r0:r1], None if zero is None else zero[r0:r1],
                        self.scratch)

    def store(self, i: int, cut: Any, x: torch.Tensor) -> None:
        row, col = self.row[i], self.col[i]
        work = self.work.get(i)
        if work is None:
            signed = self.sign is not None
            work = self.work[i] = (torch.zeros_like(col), torch.empty_like(self.sign[i]) if signed else None,
                                   torch.zeros((), dtype=torch.int64, device=col.device) if signed else None)
        col_sum, zero_new, nonzero = work
        r0, r1 = self._rows(i, cut)
        compress_rows(x.view(r1 - r0, -1), self.sign is not None, row[r0:r1], col_sum,
                      None if self.sign is None else self.sign[i][r0:r1],
                      None if zero_new is None else zero_new[r0:r1], nonzero, self.scratch)

    def finish(self, i: int) -> None:
        """Every row of tensor ``i`` is stored: normalize the factors, keep the zero mask if needed."""
        col_sum, zero_new, nonzero = self.work.pop(i)
        if zero_new is not None:
            self.pending.append((i, stray_zeros(self.row[i], col_sum, nonzero), zero_new))
        normalize_factors(self.row[i], col_sum)
        self.col[i].copy_(col_sum)

    def settle(self) -> None:
        """Keep or drop the zero masks: one read from the device for the whole bucket."""
        if not self.pending:
            return
        flags = torch.stack([s for _, s, _ in self.pending]).tolist()
        for (i, _, zero_new), stray in zip(self.pending, flags):
            zero = self.zero[i]
            if stray:
                zero.set_(zero_new)  # in place: the optimizer's state dict holds this tensor
            elif zero.numel():
                zero.set_(torch.empty(0, dtype=torch.uint8, device=zero.device))
        self.pending.clear()


class LowPrecisionCodec:
    """One state key stored as bf16/fp16, or as int8/uint8 blocks with a per-block fp32 scale."""

    def __init__(self, b: Any, stored: dict[str, list[torch.Tensor]], key: str, block: int, host_key: int) -> None:
        self.b, self.q, self.scale = b, stored[key], stored.get(f"{key}:scale")
        self.block, self.host_key = block, host_key
        self.scratch = scratch()

    def dense(self, i: int) -> None:
        return None

    def unit(self, i: int) -> int:
        return 1 if self.scale is None else self.block

    def _cut(self, i: int, cut: Any) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The codes of ``cut`` of tensor ``i`` (flat), their blocks' scales (``None`` for bf16/fp16),
        and where the cut starts: as few view ops as possible (a whole tensor's scales are the
        stored tensor itself)."""
        q, scale = self.q[i], None if self.scale is None else self.scale[i]
        if cut is None:
            return (q if q.dim() == 1 else q.view(-1)), scale, 0
        start, end = cut
        if q.is_contiguous():  # one op instead of view + slice
            q = q.as_strided((end - start,), (1,), q.storage_offset() + start)
        else:
            q = q.view(-1)[start:end]
        return q, None if scale is None else scale[start // self.block:-(-end // self.block)], start

    def load(self, i: int, cut: Any, out: torch.Tensor) -> None:
        q, scale, _ = self._cut(i, cut)
        if scale is None:
            out.copy_(q)
        else:
            dequantize_range(q, scale, self.block, out)

    def store(self, i: int, cut: Any, x: torch.Tensor) -> None:
        q, scale, start = self._cut(i, cut)
        offset = (0 if self.b.offsets is None else self.b.offsets[i]) + start
        key = self.host_key ^ tensor_key(self.b, i)
        dead = self._dead(x)
        if scale is None:
            round_into(q, x, offset, key, self.scratch, consume=dead)
        else:
            quantize_range(x, q.dtype == torch.int8, self.block, offset, key, q, scale, self.scratch, consume=dead)

    def _dead(self, x: torch.Tensor) -> bool:
        """Whether ``x`` lies in one of :func:`run_sliced`'s chunk buffers (``state:*`` in this
        thread's pool): the encoder may then work in it. Nothing reads such a buffer after its
        chunk's stores (the next chunk overwrites it), and one the direction or a signal keeps is
        dropped from the pool before the stores; a parameter-sized temporary is never pooled."""
        return self.scratch.holds("state:", x)

    def finish(self, i: int) -> None:
        pass

    def settle(self) -> None:
        pass


def _sliceable(b: Any, i: int, passing: dict[str, list[torch.Tensor]]) -> bool:
    p = b.params[i]
    tensors = [p, b.u[i], b.grads[i], *(v[i] for v in passing.values())]
    tensors += [v[i] for v in b.signals.values() if isinstance(v, (list, tuple)) and len(v) == len(b.params)]
    return all(not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() != p.numel() or x.is_contiguous()
               for x in tensors)


def run_sliced(wrapper: Any, b: Any, codecs: dict[str, Any], passing: dict[str, list[torch.Tensor]],
               chunk_elems: int, rest: tuple = ()) -> None:
    """Run ``wrapper.inner`` over ``b`` slice by slice with the dense state of ``codecs`` (by key)
    rebuilt around each chunk of slices, and ``passing`` state (stored dense) cut to match.

    ``rest``: the elementwise transforms after the wrapper in its segment; they run on each chunk
    right after the inner transform, before its state is compressed again. When they end with the
    terminal, nothing is joined back: the direction, denominator and decay terms only ever exist
    for one chunk (no parameter-sized temporary at all)."""
    slicing = wrapper.inner.scope == "elementwise"
    applied = bool(rest) and rest[-1].terminal
    jobs: list[tuple[int, Any, int]] = []
    for i, p in enumerate(b.params):
        n = p.numel()
        unit = max(c.unit(i) for c in codecs.values()) if codecs else 1
        if not slicing or n <= SLICE_ELEMS or not _sliceable(b, i, passing):
            jobs.append((i, None, n))
            continue
        step = max(unit, SLICE_ELEMS // unit * unit)
        jobs += [(i, (s, min(n, s + step)), min(n, s + step) - s) for s in range(0, n, step)]
    alias: set[str] = wrapper.__dict__.setdefault("_alias_keys", set())
    full: dict[tuple[str, int], torch.Tensor] = {}
    pool = scratch()  # a key's chunk buffer is reused while nothing points into it
    spare: dict[str, torch.Tensor] = {}
    join = None if applied else b.joiner()
    start = 0
    while start < len(jobs):
        stop, total = start + 1, jobs[start][2]
        while stop < len(jobs) and total + jobs[stop][2] <= chunk_elems:
            total += jobs[stop][2]
            stop += 1
        chunk = jobs[start:stop]
        index, cuts = [i for i, _, _ in chunk], [c for _, c, _ in chunk]
        temps: dict[str, list[torch.Tensor]] = {}
        for key, codec in codecs.items():
            flat = None
            offset = 0
            lst = []
            for i, cut, n in chunk:
                p = b.params[i]
                dense = codec.dense(i)
                if dense is not None:
                    lst.append(dense if cut is None else dense.view(-1)[cut[0]:cut[1]])
                    continue
                if key in alias and not applied:  # one parameter-sized temporary: the direction will point into it
                    buf = full.get((key, i))
                    if buf is None:
                        buf = full[(key, i)] = torch.empty(p.shape, dtype=_float(p), device=p.device)
                    x = buf.view(-1)[0 if cut is None else cut[0]:][:n]
                else:
                    if flat is None:
                        flat = spare[key] = pool.get(f"state:{wrapper.name}:{key}", total, _float(p), p.device)
                    x = flat[offset:offset + n]
                    offset += n
                codec.load(i, cut, x)
                lst.append(x.view(p.shape) if cut is None else x)
            temps[key] = lst
        for key, lst in passing.items():
            temps[key] = [lst[i] if c is None else _cut(lst[i], b.params[i], c) for i, c in zip(index, cuts)]
        sub = b.part(index, temps, cuts, rest)
        if applied:  # the terminal runs on this chunk: nothing the transforms compute outlives it
            sub.pool = pool
        wrapper.inner.update(sub)
        for t in rest:
            sub.enter(t.name, t.stage)
            t.update(sub)
        exported = set() if applied else _exported(sub)
        for key in codecs:
            buf = spare.get(key)
            if buf is not None and buf.untyped_storage().data_ptr() in exported:
                pool.drop(f"state:{wrapper.name}:{key}", buf.dtype, buf.device)  # the direction (or a signal) keeps it
                alias.add(key)  # from the next chunk on, rebuild this key into parameter-sized buffers
        for key, codec in codecs.items():
            for (i, cut, _), x in zip(chunk, temps[key]):
                if codec.dense(i) is None:
                    codec.store(i, cut, x.view(-1))
        for j, (i, cut, _) in enumerate(chunk):
            if cut is None or cut[1] == b.params[i].numel():
                for codec in codecs.values():
                    if codec.dense(i) is None:
                        codec.finish(i)
                for key in codecs:
                    full.pop((key, i), None)
        temps.clear()  # this chunk's dense state goes (the direction keeps what it points into)
        spare.clear()
        if join is not None:
            join.add(sub)
        start = stop
    for codec in codecs.values():
        codec.settle()
    if join is not None:
        join.finish()


class _Hidden(dict):
    """The state a wrapped ``reduce`` sees: a read of a key the wrapper stores compressed and was
    not asked to rebuild is an error naming the key (never the compressed codes read as values)."""

    def __init__(self, states: dict[str, list[torch.Tensor]], wrapper: Any, hidden: Any) -> None:
        super().__init__(states)
        self.wrapper, self.hidden = wrapper, frozenset(hidden)

    def __missing__(self, key: str) -> Any:
        w = self.wrapper
        if key in self.hidden:
            raise KeyError(f"{w.type_name}: the reduce of {w.inner!r} reads its state {key!r}, which "
                           f"{w.type_name} stores compressed; the inner transform must list {key!r} in its "
                           "reduce_reads_state so that the wrapper rebuilds it dense for the reduce")
        raise KeyError(key)


def reduce_dense(wrapper: Any, b: Any, codecs: dict[str, Any], passing: dict[str, list[torch.Tensor]],
                 chunk_elems: int) -> list[Any]:
    """``wrapper.inner.reduce`` over bucket ``b``, whose state ``codecs`` (by key) are stored
    compressed and ``passing`` dense. The keys the inner transform declares in
    ``reduce_reads_state`` are rebuilt dense, read-only: whole tensors, a chunk of at most
    ``chunk_elems`` elements (at least one tensor) at a time, in the chunk buffers of
    :func:`run_sliced` (no memory beyond what the update keeps); nothing is compressed back. Other
    compressed keys are hidden (reading one is an error naming it); ``passing`` state (e.g.
    Prodigy's ``s``) is the stored tensors themselves, so what the reduce writes there stays. The
    values (one per tensor) come in bucket order; one pointing into a chunk buffer is copied
    before the next chunk reuses it. Without such keys the reduce runs on the whole bucket."""
    reads = wrapper.inner.reduce_reads_state
    dense = {k: c for k, c in codecs.items() if k in reads}
    hidden = set(codecs) - set(dense)
    n_params = len(b.params)
    if not dense:
        return wrapper.inner.reduce(b.part(list(range(n_params)), _Hidden(passing, wrapper, hidden)))
    pool = scratch()
    values: list[Any] = []
    start = 0
    while start < n_params:
        stop, total = start + 1, b.params[start].numel()
        while stop < n_params and total + b.params[stop].numel() <= chunk_elems:
            total += b.params[stop].numel()
            stop += 1
        index = list(range(start, stop))
        temps = {k: [v[i] for i in index] for k, v in passing.items()}
        for key, codec in dense.items():
            flat, offset, lst = None, 0, []
            for i in index:
                p = b.params[i]
                x = codec.dense(i)  # a tensor the wrapper keeps dense (1-D without vector_reshape)
                if x is None:
                    if flat is None:
                        flat = pool.get(f"state:{wrapper.name}:{key}", total, _float(p), p.device)
                    x = flat[offset:offset + p.numel()]
                    offset += p.numel()
                    codec.load(i, None, x)
                    x = x.view(p.shape)
                lst.append(x)
            temps[key] = lst
        out = wrapper.inner.reduce(b.part(index, _Hidden(temps, wrapper, hidden)))
        values.extend(_own(out, pool))
        start = stop
    return values


def _own(values: list[Any], pool: Any) -> list[Any]:
    """``values`` with every tensor that lies in a ``state:*`` chunk buffer of ``pool`` copied."""
    def own(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.clone() if pool.holds("state:", v) else v
        return type(v)(own(x) for x in v) if isinstance(v, (list, tuple)) else v
    return [own(v) for v in values]


def _exported(sub: Any) -> set[int]:
    """Storages of the tensors a part hands back (direction, per-tensor signals, decay terms)."""
    lazy = sub.lazy_u
    lists = [lazy[0], lazy[1] or []] if lazy is not None else [sub.u]
    lists += [v for v in sub.signals.values() if isinstance(v, (list, tuple))]
    lists.append(sub.decay or [])
    return {x.untyped_storage().data_ptr() for lst in lists for x in lst if isinstance(x, torch.Tensor)}


def _float(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _cut(x: torch.Tensor, p: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
    if x.dim() == 0 or x.numel() != p.numel():
        return x
    return x.view(-1)[cut[0]:cut[1]]
