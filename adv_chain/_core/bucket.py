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
* ``b.decay_coef`` / ``b.decay`` - decay the terminal applies: ``p * (1 - decay_coef) - decay``
  (``decay_coef``: a number, a 0-d tensor, or one of these per tensor in a list).
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

from . import foreach as F

Tensors = list[torch.Tensor]


class Bucket:
    __slots__ = ("params", "_u", "_lazy", "grads", "signals", "decay_coef", "decay", "_u_owned", "_states",
                 "_scalars", "_current", "offsets", "noise_keys", "_frozen", "skip_apply", "eager_u",
                 "_denom_div")

    def __init__(self, params: Tensors, u: Tensors, states: Mapping[str, Mapping[str, Tensors]],
                 scalars: Mapping[str, Mapping[str, Any]], *, grads: Tensors | None = None,
                 u_owned: bool = False, offsets: list[Any] | None = None,
                 noise_keys: list[Any] | None = None) -> None:
        self.params = params
        self._lazy: tuple[Tensors, Tensors | None, Any] | None = None
        self.eager_u = False  # set on wrapper parts: their state temporaries are reused, never alias them
        self._denom_div: Any = None  # the published "denom" signal is signals["denom"] / this
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

    # -- the direction -----------------------------------------------------------------------------
    @property
    def u(self) -> Tensors:
        if self._lazy is not None:
            self._materialize()
        return self._u

    @u.setter
    def u(self, value: Tensors) -> None:
        self._u = value
        self._lazy = None

    @property
    def lazy_u(self) -> "tuple[Tensors, Tensors | None, Any] | None":
        """``(num, den, scale)`` while ``u = num * scale / den`` (``den`` may be ``None``) has not been
        computed yet, else ``None``. A terminal folds it into one ``addcdiv`` (``p -= lr * scale * num
        / den``: the division torch's Adam does) and the full-size ``u`` is never written; every other
        reader of ``b.u`` gets it computed, with the same rounding as computing it eagerly."""
        return self._lazy

    def set_u_scaled(self, num: Tensors, scale: Any) -> None:
        """``u = num * scale``, computed only if someone reads ``b.u``. ``num`` may alias state (it
        is never written through ``u``), but must not change until the step's terminal ran."""
        if self.eager_u:
            self.set_u(torch._foreach_mul(num, scale))
            return
        self._u, self._lazy, self._u_owned = num, (num, None, scale), False

    def divide_u_(self, den: Tensors) -> None:
        """``u /= den``; ``den`` is the caller's own temporary (it may be kept until the terminal)."""
        if self._lazy is not None and self._lazy[1] is None:
            self._lazy = (self._lazy[0], den, self._lazy[2])
            return
        torch._foreach_div_(self.own_u(), den)

    def publish_denom(self, raw: Tensors, divisor: Any = None) -> None:
        """Publish the ``"denom"`` signal as ``raw / divisor`` without dividing yet (Adam's
        ``sqrt(v) / sqrt(1 - b2^t)``): a consumer that adds epsilon folds the divisor into its own
        scalars (:meth:`divide_u_by_denom_`), one pass fewer over the data."""
        self.signals["denom"] = raw
        self._denom_div = None if F.is_one(divisor) else divisor

    def take_denom(self, scale: Any = 1.0) -> Tensors:
        """Pop the published ``"denom"`` (the caller owns it), multiplied by ``scale``."""
        denom, c = self.signals.pop("denom"), self._denom_div
        self._denom_div = None
        if c is not None and F.is_one(scale):
            torch._foreach_div_(denom, c)  # the rounding of dividing right away
        else:
            F.scale_(denom, scale if c is None else scale / c)
        return denom

    def read_denom(self) -> Tensors:
        """The published ``"denom"``, left in place for its consumer (read-only)."""
        self._settle()
        return self.signals["denom"]

    def divide_u_by_denom_(self, eps: Any) -> None:
        """``u /= denom + eps``, consuming the published ``"denom"``. When Adam left both ``u = m *
        scale`` and ``denom = raw / c`` pending this is ``u = m * (scale * c) / (raw + eps * c)``:
        the division by ``c`` and the write of ``u`` both fold into the terminal's ``addcdiv``."""
        lazy, c = self._lazy, self._denom_div
        if c is not None and lazy is not None and lazy[1] is None:
            raw = self.signals.pop("denom")
            self._denom_div = None
            F.add_scalar_(raw, eps * c)
            self._lazy = (lazy[0], raw, lazy[2] * c)
            return
        denom = self.take_denom()
        F.add_scalar_(denom, eps)
        self.divide_u_(denom)

    def _settle(self) -> None:
        """Carry out what is pending (wrappers split and join buckets)."""
        if self._denom_div is not None and "denom" in self.signals:
            self.signals["denom"] = self.take_denom()
        self._denom_div = None

    def _materialize(self) -> None:
        num, den, scale = self._lazy  # type: ignore[misc]
        self._lazy = None
        u = torch._foreach_mul(num, scale)
        if den is not None:
            torch._foreach_div_(u, den)
        self._u, self._u_owned = u, True

    # -- what transforms use -----------------------------------------------------------------------
    def state(self, key: str) -> Tensors:
        return self._states[self._current][key]

    def s(self, name: str) -> Any:
        return self._scalars[self._current][name]

    def own_u(self) -> Tensors:
        """``u`` as a list this transform may modify in place."""
        if self._lazy is not None:
            self._materialize()
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
        """Add to the coefficient of ``p`` the terminal removes (``p * (1 - decay_coef)``): a number,
        a 0-d tensor, or a per-tensor list of either (e.g. after StableAdamW's per-tensor clip)."""
        mine = self.decay_coef
        if isinstance(mine, list) or isinstance(coef, list):
            n = len(self.params)
            mine = mine if isinstance(mine, list) else [mine] * n
            coef = coef if isinstance(coef, list) else [coef] * n
            self.decay_coef = [a + c for a, c in zip(mine, coef)]
        else:
            self.decay_coef = mine + coef


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

        self._settle()
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
        sub.eager_u = True
        sub.decay_coef = pick(self.decay_coef) if isinstance(self.decay_coef, list) else self.decay_coef
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
        for sub in subs:
            sub._settle()
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
        if any(isinstance(sub.decay_coef, list) for sub in subs):
            self.decay_coef = gather([sub.decay_coef if isinstance(sub.decay_coef, list) else
                                      [sub.decay_coef] * len(sub.params) for sub in subs])
        else:
            self.decay_coef = subs[-1].decay_coef
        self.skip_apply = any(sub.skip_apply for sub in subs)


def run_transforms(transforms: tuple, b: Bucket) -> None:
    for t in transforms:
        b.enter(t.name, t.stage)
        t.update(b)

