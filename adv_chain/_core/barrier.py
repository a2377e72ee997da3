"""The barrier of a layer- or global-scope transform: ``reduce`` over every bucket of the step, one
``finalize``, and the results handed back to each bucket as scalars of that transform."""
from __future__ import annotations

from typing import Any

import torch

from .bucket import Bucket
from .transform import HostView, Transform


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # mps has no float64


def load_group_state(opt: Any, t: Transform, works: list[Any]) -> dict[str, torch.Tensor]:
    """The current group state of ``t`` (``"<name>/<key>"`` in the first param group that has it;
    initial values otherwise) as 0-d tensors, and its :meth:`~Transform.state_scalars` merged into
    every bucket's scalars. Empty for a transform without group state."""
    init = t.group_state(works[0].hps[t.name])
    if not init:
        return {}
    keys = {k: f"{t.name}/{k}" for k in init}
    source = next((g for g in opt.param_groups if all(key in g for key in keys.values())), None)
    dev = works[0].params[0].device
    state = {k: torch.as_tensor(source[key] if source is not None else init[k], dtype=_state_dtype(dev),
                                device=dev) for k, key in keys.items()}
    for w in works:
        wdev = w.params[0].device
        mine = {k: v.to(device=wdev, dtype=_state_dtype(wdev)) for k, v in state.items()}
        lr = opt.param_groups[w.group_index]["lr"]
        w.scalars[t.name] = {**w.scalars[t.name], **t.state_scalars(mine, HostView(w.hps[t.name], w.step, lr))}
    return state


def store_group_state(opt: Any, t: Transform, result: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Take the next group state out of ``result`` and write it (and its plain mirrors, e.g.
    ``group["d"]``) into every param group."""
    new = {k: result.pop(k) for k in state if k in result}
    for group in opt.param_groups:
        for k, v in new.items():
            group[f"{t.name}/{k}"] = v
        for plain, k in t.group_mirrors.items():
            if k in new:
                group[plain] = new[k]


def run_barrier(opt: Any, t: Transform, works: list[Any]) -> None:
    """Reduce of a global/layer transform over every bucket, then one finalize. Results that are
    one tensor reach every bucket; per-parameter lists are split back to their buckets. A transform
    with group state (Prodigy's d) reads it before the reduce and stores its next value after."""
    state = load_group_state(opt, t, works)
    values: list[torch.Tensor] = []
    layer_keys: list[Any] = []
    for w in works:
        if w.partials[0] is not None:  # reduced already: while the last segment ran, or on gathered shards
            values.extend(w.partials)
            w.partials = [None] * len(w.params)
        else:
            u = w.full_u if w.full_u is not None else w.grads
            b = Bucket(w.params, u, w.states, w.scalars, grads=w.full_g)
            b.enter(t.name, t.stage)
            values.extend(t.reduce(b))
        group = opt.param_groups[w.group_index]
        params = w.params if w.dist is None else w.dist.params  # layer keys see whole (DTensor) parameters
        layer_keys.extend(t.layer_key(p, i, group) for p, i in zip(params, w.indices))
    result = t.finalize(values, layer_keys, {**works[0].hps[t.name], **state})
    opt.step_info[t.name] = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
    store_group_state(opt, t, result, state)
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


def _finalize_round(t: Transform, entries: dict[int, tuple[torch.Tensor, Any]], hp: Any,
                    opt: Any = None, state: dict[str, torch.Tensor] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, torch.Tensor]]]:
    """Finalize a round; given ``opt``, the round is complete and its next group state is stored."""
    order = sorted(entries)
    result = t.finalize([entries[i][0] for i in order], [entries[i][1] for i in order], {**hp, **(state or {})})
    if opt is not None and state:
        store_group_state(opt, t, result, state)
    else:  # a provisional finalize (an incomplete round) never moves the group state
        for k in state or {}:
            result.pop(k, None)
    shared = {k: v for k, v in result.items() if not isinstance(v, list)}
    per = {k: dict(zip(order, v)) for k, v in result.items() if isinstance(v, list)}
    return shared, per


def run_barrier_lagged(opt: Any, t: Transform, works: list[Any]) -> None:
    """The barrier under per-parameter stepping: each parameter adds its ``reduce`` value to the
    current round; a round is complete when a parameter comes back (its next step). A parameter
    uses the finalized results of the last complete round - one step lagged. Until a round has
    completed (the first step) it uses the finalize of what the current round has seen so far.
    Layer-scope transforms whose layers are single tensors (orthograd, cautious) run exactly.
    Group state (Prodigy's d) moves when a round completes, before the returning parameter's
    reduce, so every reduce of a round sees the same state."""
    if t.scope == "layer" and all(t.layer_key(p, i, opt.param_groups[w.group_index]) == i
                                  for w in works for p, i in zip(w.params, w.indices)):
        return run_barrier(opt, t, works)  # per-tensor layers are complete: exact, no lag
    rounds = opt.__dict__.setdefault("_lag_rounds", {})
    lag = rounds.setdefault(t.name, _Round())
    for w in works:
        group = opt.param_groups[w.group_index]
        hp = w.hps[t.name]
        if any(i in lag.current for i in w.indices):  # every parameter of the round has stepped
            state = load_group_state(opt, t, [w])
            lag.shared, lag.per_param = _finalize_round(t, lag.current, hp, opt, state)
            lag.current = {}
        state = load_group_state(opt, t, [w])
        if t.additive_reduce and w.partials[0] is not None:
            values, w.partials = w.partials, [None] * len(w.params)
        else:
            u = w.full_u if w.full_u is not None else w.grads
            b = Bucket(w.params, u, w.states, w.scalars, grads=w.full_g)
            b.enter(t.name, t.stage)
            values = t.reduce(b)
        for p, i, value in zip(w.params, w.indices, values):
            lag.current[i] = (value, t.layer_key(p, i, group))
        shared, per = lag.shared, lag.per_param
        if shared is None or any(i not in d for d in per.values() for i in w.indices):
            shared, per = _finalize_round(t, lag.current, hp, state=state)  # first round, or a new parameter
        dev = w.params[0].device
        mine = {k: v.to(dev) for k, v in shared.items()}
        mine.update({k: [d[i].to(dev) for i in w.indices] for k, d in per.items()})
        opt.step_info[t.name] = {k: v for k, v in shared.items()}
        w.scalars[t.name] = {**w.scalars[t.name], **mine}
