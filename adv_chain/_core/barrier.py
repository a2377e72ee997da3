"""The barrier of a layer- or global-scope transform: ``reduce`` over every bucket of the step, one
``finalize``, and the results handed back to each bucket as scalars of that transform."""
from __future__ import annotations

from typing import Any

import torch

from .bucket import Bucket
from .transform import Transform


def run_barrier(opt: Any, t: Transform, works: list[Any]) -> None:
    """Reduce of a global/layer transform over every bucket, then one finalize. Results that are
    one tensor reach every bucket; per-parameter lists are split back to their buckets."""
    values: list[torch.Tensor] = []
    layer_keys: list[Any] = []
    for w in works:
        if t.additive_reduce and w.partials[0] is not None:  # reduced while the last segment ran
            values.extend(w.partials)
            w.partials = [None] * len(w.params)
        else:
            u = w.full_u if w.full_u is not None else w.grads
            b = Bucket(w.params, u, w.states, w.scalars, grads=w.full_g)
            b.enter(t.name, t.stage)
            values.extend(t.reduce(b))
        group = opt.param_groups[w.group_index]
        layer_keys.extend(t.layer_key(p, i, group) for p, i in zip(w.params, w.indices))
    result = t.finalize(values, layer_keys, works[0].hps[t.name])
    opt.step_info[t.name] = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
    start = 0
    for w in works:
        dev = w.params[0].device
        n = len(w.params)
        mine = {k: ([x.to(dev) for x in v[start:start + n]] if isinstance(v, list) else v.to(dev))
                for k, v in result.items()}
        w.scalars[t.name] = {**w.scalars[t.name], **mine}
        start += n


class _Round:
    """Per-parameter stepping (gradient release): the reduce values of the round in progress, and the
    finalized results of the last complete round, which this round uses (one step lagged)."""

    __slots__ = ("current", "shared", "per_param")

    def __init__(self) -> None:
        self.current: dict[int, tuple[torch.Tensor, Any]] = {}
        self.shared: dict[str, torch.Tensor] | None = None
        self.per_param: dict[str, dict[int, torch.Tensor]] = {}


def _finalize_round(t: Transform, entries: dict[int, tuple[torch.Tensor, Any]],
                    hp: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, torch.Tensor]]]:
    order = sorted(entries)
    result = t.finalize([entries[i][0] for i in order], [entries[i][1] for i in order], hp)
    shared = {k: v for k, v in result.items() if not isinstance(v, list)}
    per = {k: dict(zip(order, v)) for k, v in result.items() if isinstance(v, list)}
    return shared, per


def run_barrier_lagged(opt: Any, t: Transform, works: list[Any]) -> None:
    """The barrier under per-parameter stepping: each parameter adds its ``reduce`` value to the
    current round; a round is complete when a parameter comes back (its next step). A parameter
    uses the finalized results of the last complete round - one step lagged. Until a round has
    completed (the first step) it uses the finalize of what the current round has seen so far.
    Layer-scope transforms whose layers are single tensors (orthograd, cautious) run exactly."""
    if t.scope == "layer" and all(t.layer_key(p, i, opt.param_groups[w.group_index]) == i
                                  for w in works for p, i in zip(w.params, w.indices)):
        return run_barrier(opt, t, works)  # per-tensor layers are complete: exact, no lag
    rounds = opt.__dict__.setdefault("_lag_rounds", {})
    lag = rounds.setdefault(t.name, _Round())
    for w in works:
        if t.additive_reduce and w.partials[0] is not None:
            values, w.partials = w.partials, [None] * len(w.params)
        else:
            u = w.full_u if w.full_u is not None else w.grads
            b = Bucket(w.params, u, w.states, w.scalars, grads=w.full_g)
            b.enter(t.name, t.stage)
            values = t.reduce(b)
        group = opt.param_groups[w.group_index]
        hp = w.hps[t.name]
        for p, i, value in zip(w.params, w.indices, values):
            if i in lag.current:  # every parameter of the round has stepped: finalize it
                lag.shared, lag.per_param = _finalize_round(t, lag.current, hp)
                lag.current = {}
            lag.current[i] = (value, t.layer_key(p, i, group))
        shared, per = lag.shared, lag.per_param
        if shared is None or any(i not in d for d in per.values() for i in w.indices):
            shared, per = _finalize_round(t, lag.current, hp)  # first round, or a parameter new to it
        dev = w.params[0].device
        mine = {k: v.to(dev) for k, v in shared.items()}
        mine.update({k: [d[i].to(dev) for i in w.indices] for k, d in per.items()})
        opt.step_info[t.name] = {k: v for k, v in shared.items()}
        w.scalars[t.name] = {**w.scalars[t.name], **mine}
