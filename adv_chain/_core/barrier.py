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
