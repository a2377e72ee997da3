"""Compiled segment kernels: ``segment_body`` under ``torch.compile`` with a flat tensor signature.

A kernel takes only a flat tuple of tensors (parameters, gradients, state, 0-d hyperparameter
tensors); everything else (which transforms, state keys, static flags such as ``amsgrad``) is part of
the kernel's *layout*, fixed when it is built. Flat tensor arguments keep dynamo's guards few and
cheap, and hyperparameters as 0-d tensors mean a scheduler never triggers a recompilation. One
kernel per (segment, layout) is compiled with dynamic shapes and reused for every tensor.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import torch

from .plan import segment_body
from .transform import expand

Layout = tuple


class _PerTensor:
    """Layout marker: a scalar given as one 0-d tensor per tensor of the call."""

    def __repr__(self) -> str:
        return "per_tensor"


_PER_TENSOR = _PerTensor()
_KERNEL_IDS = itertools.count()


def layout_and_tensors(params: list[torch.Tensor], grads: list[torch.Tensor], ref: list[torch.Tensor] | None,
                       states: Mapping[str, Mapping[str, list[torch.Tensor]]],
                       scalars: Mapping[str, Mapping[str, Any]], u_owned: bool, offsets: list[Any],
                       keys: list[Any] | None, materialize: bool, dest: list[torch.Tensor] | None = None,
                       reducer: Any = None) -> tuple[Layout, list[torch.Tensor]]:
    """Split the arguments of ``segment_body`` into a hashable layout and a flat tensor list."""
    n = len(params)
    tensors: list[torch.Tensor] = [*params, *grads]
    if ref is not None:
        tensors += ref
    state_layout = []
    for tname, d in states.items():
        keys_here = tuple(d)
        state_layout.append((tname, keys_here))
        for k in keys_here:
            tensors += d[k]
    scalar_layout = []
    for tname, d in scalars.items():
        entries = []
        for name, v in d.items():
            if isinstance(v, torch.Tensor):
                entries.append((name, None))
                tensors.append(v)
            elif isinstance(v, list):  # per-tensor values of a reduce
                entries.append((name, _PER_TENSOR))
                tensors += v
            else:
                entries.append((name, v))  # static: part of the layout
        scalar_layout.append((tname, tuple(entries)))
    if keys is not None:
        tensors += keys
    if dest is not None:
        tensors += dest
    layout = (n, ref is not None, tuple(state_layout), tuple(scalar_layout), u_owned, tuple(offsets),
              keys is not None, materialize, dest is not None, reducer)
    return layout, tensors


def make_kernel(transforms: tuple, layout: Layout, options: Mapping[str, Any]) -> Callable[..., Any]:
    n, has_ref, state_layout, scalar_layout, u_owned, offsets, has_keys, materialize, has_dest, reducer = layout

    def kernel(*tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        take = lambda count: [next(it) for _ in range(count)]  # noqa: E731
        params, grads = take(n), take(n)
        ref = take(n) if has_ref else None
        states = {tname: {k: take(n) for k in keys} for tname, keys in state_layout}
        scalars = {tname: {name: (next(it) if v is None else take(n) if v is _PER_TENSOR else v)
                           for name, v in entries}
                   for tname, entries in scalar_layout}
        noise_keys = take(n) if has_keys else None
        dest = take(n) if has_dest else None
        return segment_body(transforms, params, grads, ref, states, scalars, u_owned, list(offsets), noise_keys,
                            materialize, dest, reducer)

    # dynamo keeps its compiled-graph cache on the code object: give every kernel its own, so that
    # kernels of different layouts never count against each other's recompile limit
    kernel.__code__ = kernel.__code__.replace(co_name=f"adv_chain_segment_kernel_{next(_KERNEL_IDS)}")
    return _EagerOnCompilerFailure(kernel, torch.compile(kernel, **{"dynamic": True, "fullgraph": True, **options}),
                                   transforms)


class _EagerOnCompilerFailure:
    """A compiled kernel that, if the compiler itself fails on it (an inductor bug: torch 2.13's CPU
    codegen raises ``KeyError: 'bufN'`` on sinkhorn -> cautious_wd -> centered_wd), runs the same
    segment eagerly from then on, with one warning. Compilation fails before the graph runs, so
    nothing was written yet; the eager body is the function that was being compiled."""

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any], transforms: tuple) -> None:
        self.eager, self.compiled, self.transforms = eager, compiled, transforms

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if self.compiled is None:
            return self.eager(*tensors)
        try:
            return self.compiled(*tensors)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            import warnings

            self.compiled = None
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            warnings.warn(f"adv_chain: torch.compile failed on the segment {[t.name for t in self.transforms]} "
                          f"({reason}); that segment runs eagerly from now on (same numbers, eager speed)",
                          RuntimeWarning, stacklevel=3)
            return self.eager(*tensors)


class ScalarCache:
    """0-d tensors that stand for host values in compiled kernels: one per key, filled in place
    when the value changes, so the kernels' inputs never change identity (no recompilation)."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[Any, torch.Tensor]] = {}

    def get(self, key: Any, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        entry = self._entries.get(key)
        if entry is None:
            entry = (value, torch.tensor(value, dtype=dtype, device=device))
        elif entry[0] != value:
            entry[1].fill_(value)
            entry = (value, entry[1])
        self._entries[key] = entry
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


def tensor_scalars(cache: ScalarCache, w: Any, transforms: tuple) -> dict[str, dict[str, Any]]:
    """A bucket's host scalars as cached 0-d fp32 tensors on its device; static scalars (and
    values that already are tensors or per-tensor lists) pass through."""
    dev, dtype = w.params[0].device, w.params[0].dtype
    out = {}
    for t in expand(transforms):  # with nested ones (a partition's sub-chains)
        out[t.name] = {
            name: (v if name in t.static_scalars or isinstance(v, (bool, torch.Tensor, list))
                   else cache.get((w.group_index, dev, dtype, t.name, name), float(v), torch.float32, dev))
            for name, v in w.scalars[t.name].items()}
    return out


def noise_key_tensors(cache: ScalarCache, w: Any) -> list[torch.Tensor] | None:
    """The stochastic-rounding noise keys of a bucket as cached int32 0-d tensors (one per param)."""
    if w.noise_keys is None:
        return None
    return [cache.get(("noise", p), k, torch.int32, p.device) for p, k in zip(w.params, w.noise_keys)]
