"""The bucket: what a transform's ``update(b)`` sees.

A bucket is a set of same-device, same-dtype parameters of one param group at the same step, or a
cache-sized slice of them (flat views of a few tensors, so that every elementwise transform of the
chain runs on data still in cache). All lists are aligned: ``b.params[i]``, ``b.u[i]``,
``b.state("exp_avg")[i]`` refer to the same elements.

* ``b.params`` - the parameters (any float dtype; written only by the terminal).
* ``b.u`` - the update direction, fp32. Before the first non-gradient transform it *is* the
  gradient; gradient-stage transforms modify it with ``b.own_u()`` (copy-on-write, the user's
  ``.grad`` is never written).
* ``b.grads`` - the reference gradient (fp32): ``u`` as it left the gradient stage, frozen.
* ``b.state(key)`` - the calling transform's own state list.
* ``b.s(name)`` - the calling transform's scalars: a Python number in eager mode, a 0-d tensor
  under ``compile=True``; either works with the helpers in :mod:`adv_chain._core.foreach`.
* ``b.signals`` - per-step values published by one transform for a later one (``"denom"``).
* ``b.decay_coef`` / ``b.decay`` - decay the terminal applies: ``p * (1 - decay_coef) - decay``.
* ``b.skip_apply`` - set when this step must not touch the parameters at all (no update, no decay).

A wrapper transform that stores another transform's state differently (``factored_state``,
``low_precision_state``) runs the inner transform on a few tensors at a time: :meth:`Bucket.own_states`
gives it its stored state, :meth:`Bucket.part` a bucket over some tensors whose state is the wrapper's
dense temporaries (the inner transform sees them through ``b.state(key)`` as if they were its own),
and :meth:`Bucket.join` takes back the direction, signals and decay terms the parts computed.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

Tensors = list[torch.Tensor]


class Bucket:
    __slots__ = ("params", "u", "grads", "signals", "decay_coef", "decay", "_u_owned", "_states",
                 "_scalars", "_current", "offsets", "noise_keys", "_frozen", "skip_apply")

    def __init__(self, params: Tensors, u: Tensors, states: Mapping[str, Mapping[str, Tensors]],
                 scalars: Mapping[str, Mapping[str, Any]], *, grads: Tensors | None = None,
                 u_owned: bool = False, offsets: list[Any] | None = None,
                 noise_keys: list[Any] | None = None) -> None:
        self.params = params
        self.u = u
        self.grads = u if grads is None else grads
        self._u_owned = u_owned
        self._frozen = grads is not None
        self.signals: dict[str, Any] = {}
        self.decay_coef: Any = 0.0
        self.decay: Tensors | None = None
        self.skip_apply = False  # set by a transform whose step only initializes state (ADOPT's first)
        self._states = states
        self._scalars = scalars
        self._current = ""
        self.offsets = offsets
        self.noise_keys = noise_keys

    @property
    def frozen(self) -> bool:
        """True once the reference gradient ``grads`` is fixed (after the gradient stage)."""
        return self._frozen

    # -- executor hooks ----------------------------------------------------------------------------
    def enter(self, transform_name: str, stage: str) -> None:
        self._current = transform_name
        if stage not in ("gradient", "any") and not self._frozen:
            self.grads = self.u
            self._frozen = True
            self._u_owned = False  # writes to u must now leave the reference gradient intact

    @property
    def u_owned(self) -> bool:
        """True when ``u`` is this chain's own fp32 temporary (in-place writes are safe)."""
        return self._u_owned

    # -- what transforms use -----------------------------------------------------------------------
    def state(self, key: str) -> Tensors:
        return self._states[self._current][key]

    def s(self, name: str) -> Any:
        return self._scalars[self._current][name]

    def own_u(self) -> Tensors:
        """``u`` as a list this transform may modify in place."""
        if not self._u_owned:
            self.u = [x.to(torch.float32, copy=True) for x in self.u]
            self._u_owned = True
        return self.u

    def set_u(self, new_u: Tensors, *, owned: bool = True) -> None:
        """Replace ``u``: ``owned=True`` for fresh fp32 temporaries, ``False`` when ``new_u`` aliases
        state (a later in-place write then copies first)."""
        self.u = new_u
        self._u_owned = owned

    def add_decay(self, terms: Tensors) -> None:
        if self.decay is None:
            self.decay = terms
        else:
            torch._foreach_add_(self.decay, terms)

    def add_decay_coef(self, coef: Any) -> None:
        self.decay_coef = self.decay_coef + coef


    # -- wrappers ----------------------------------------------------------------------------------
    def own_states(self) -> Mapping[str, Tensors]:
        """Every state list of the calling transform, by key."""
        return self._states[self._current]

    def part(self, index: list[int], states: Mapping[str, Tensors]) -> "Bucket":
        """A bucket over tensors ``index`` of this one for the calling transform, whose state is
        ``states`` (aligned with ``index``). Per-tensor lists (scalars of a reduce, signals, decay
        terms, offsets, noise keys) are sliced; everything else is shared."""
        def pick(xs: Any) -> Any:
            return [xs[i] for i in index]

        n = len(self.params)
        name = self._current
        scalars = {k: (pick(v) if isinstance(v, (list, tuple)) and len(v) == n else v)
                   for k, v in self._scalars[name].items()}
        sub = Bucket(pick(self.params), pick(self.u), {name: states}, {name: scalars},
                     grads=pick(self.grads) if self._frozen else None, u_owned=self._u_owned,
                     offsets=None if self.offsets is None else pick(self.offsets),
                     noise_keys=None if self.noise_keys is None else pick(self.noise_keys))
        sub.signals = {k: (pick(v) if isinstance(v, (list, tuple)) and len(v) == n else v)
                       for k, v in self.signals.items()}
        sub.decay_coef = self.decay_coef
        sub.decay = None if self.decay is None else pick(self.decay)
        sub.skip_apply = self.skip_apply
        sub._current = name
        return sub

    def join(self, parts: list[tuple[list[int], "Bucket"]]) -> None:
        """Take back what the inner transform did on ``parts`` (``(index, bucket)`` from :meth:`part`,
        covering every tensor once): the direction (owned if every part owns its own; a part whose
        direction aliases the wrapper's private temporaries should ``set_u(u, owned=True)``),
        signals (per-tensor lists are reassembled, consumed ones removed), decay terms, skip flag."""
        n = len(self.params)

        def gather(lists: list[Any]) -> list[Any]:
            out: list[Any] = [None] * n
            for (index, _), values in zip(parts, lists):
                for j, i in enumerate(index):
                    out[i] = values[j]
            return out

        subs = [sub for _, sub in parts]
        owned = all(sub._u_owned for sub in subs)
        self.set_u(gather([sub.u for sub in subs]), owned=owned)
        if not self._frozen:
            self.grads = self.u
        for key in [k for k in self.signals if all(k not in sub.signals for sub in subs)]:
            del self.signals[key]  # consumed by the inner transform
        for key in {k for sub in subs for k in sub.signals}:
            values = [sub.signals.get(key) for sub in subs]
            per_tensor = all(isinstance(v, (list, tuple)) and len(v) == len(index) for v, (index, _) in zip(values, parts))
            self.signals[key] = gather(values) if per_tensor else values[-1]
        if any(sub.decay is not None for sub in subs):
            self.decay = gather([sub.decay if sub.decay is not None else
                                 [torch.zeros_like(p, dtype=torch.float32) for p in sub.params] for sub in subs])
        self.decay_coef = subs[-1].decay_coef
        self.skip_apply = any(sub.skip_apply for sub in subs)


def run_transforms(transforms: tuple, b: Bucket) -> None:
    for t in transforms:
        b.enter(t.name, t.stage)
        t.update(b)

