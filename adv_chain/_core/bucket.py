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
``low_precision_state``) runs the inner transform on a few tensors, or slices of tensors, at a time:
:meth:`Bucket.own_states` gives it its stored state, :meth:`Bucket.part` a bucket over some tensors
(or flat element ranges of them) whose state is the wrapper's dense temporaries (the inner transform
sees them through ``b.state(key)`` as if they were its own), and :meth:`Bucket.joiner`
takes back the direction, signals and decay terms the parts computed (a pending
direction stays pending).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from . import foreach as F

Tensors = list[torch.Tensor]


class Bucket:
    __slots__ = ("params", "_u", "_lazy", "grads", "signals", "decay_coef", "decay", "_u_owned", "_states",
                 "_scalars", "_current", "offsets", "noise_keys", "_frozen", "skip_apply",
                 "_denom_div", "_slices", "_index", "pool")

    def __init__(self, params: Tensors, u: Tensors, states: Mapping[str, Mapping[str, Tensors]],
                 scalars: Mapping[str, Mapping[str, Any]], *, grads: Tensors | None = None,
                 u_owned: bool = False, offsets: list[Any] | None = None,
                 noise_keys: list[Any] | None = None) -> None:
        self.params = params
        self._lazy: tuple[Tensors, Tensors | None, Any] | None = None
        self._denom_div: Any = None  # the published "denom" signal is signals["denom"] / this
        self._slices: list[Any] = []  # on a part: the element range of each tensor (None: whole)
        self._index: list[int] = []   # on a part: the tensor of the whole bucket behind each entry
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
        # work buffers (adv_chain.transforms.work_buffers.Scratch) a transform may write fresh
        # per-call results into, given when nothing outlives the call (a state wrapper's chunk that
        # ran the terminal); None: allocate
        self.pool: Any = None

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
            total = mine + coef
            self.decay_coef = F.AdditiveDecay(total) if isinstance(mine, F.AdditiveDecay) or isinstance(
                coef, F.AdditiveDecay) else total


    # -- wrappers ----------------------------------------------------------------------------------
    def own_states(self) -> Mapping[str, Tensors]:
        """Every state list of the calling transform, by key."""
        return self._states[self._current]

    def part(self, index: list[int], states: Mapping[str, Tensors],
             slices: "list[tuple[int, int] | None] | None" = None, rest: tuple = ()) -> "Bucket":
        """A bucket over tensors ``index`` of this one for the calling transform, whose state is
        ``states`` (aligned with ``index``). Per-tensor lists (scalars of a reduce, signals, decay
        terms, offsets, noise keys) are sliced; everything else is shared. ``slices`` (aligned with
        ``index``; only for elementwise work on contiguous tensors) runs entry ``j`` on elements
        ``start:end`` of the flattened tensor instead (``None``: the whole tensor): parameters,
        direction, reference gradient and parameter-shaped signals and decay terms become flat
        views, offsets move by ``start``; an index may then repeat. ``rest``: elementwise transforms
        that will run on the part after the calling one (:func:`run_transforms`); their state is
        cut and their scalars picked the same way."""
        cuts = [None] * len(index) if slices is None else slices

        def pick(xs: Any) -> Any:
            return [xs[i] for i in index]

        def pick_cut(xs: Any) -> Any:
            if slices is None:
                return pick(xs)
            return [_cut(xs[i], self.params[i], c) for i, c in zip(index, cuts)]

        self._settle()
        n = len(self.params)
        name = self._current
        def pick_scalars(tname: str) -> dict[str, Any]:
            return {k: (pick(v) if isinstance(v, (list, tuple)) and len(v) == n else v)
                    for k, v in self._scalars[tname].items()}

        all_states = {name: states, **{t.name: {k: pick_cut(v) for k, v in self._states[t.name].items()}
                                       for t in rest}}
        all_scalars = {name: pick_scalars(name), **{t.name: pick_scalars(t.name) for t in rest}}
        sub = Bucket(pick_cut(self.params), pick_cut(self.u), all_states, all_scalars,
                     grads=pick_cut(self.grads) if self._frozen else None, u_owned=self._u_owned,
                     offsets=None if self.offsets is None else
                     [self.offsets[i] + (0 if c is None else c[0]) for i, c in zip(index, cuts)],
                     noise_keys=None if self.noise_keys is None else pick(self.noise_keys))
        sub.signals = {k: (pick_cut(v) if isinstance(v, (list, tuple)) and len(v) == n else v)
                       for k, v in self.signals.items()}
        sub.decay_coef = pick(self.decay_coef) if isinstance(self.decay_coef, list) else self.decay_coef
        sub.decay = None if self.decay is None else pick_cut(self.decay)
        sub.skip_apply = self.skip_apply
        sub._current = name
        sub._slices = cuts
        sub._index = list(index)
        return sub

    def joiner(self) -> "Join":
        """Collects parts one at a time (:meth:`Join.add`, right after each part ran, so that its
        temporaries can go) and hands the result to this bucket (:meth:`Join.finish`)."""
        return Join(self)


def _cut(x: Any, p: torch.Tensor, cut: "tuple[int, int] | None") -> Any:
    """Elements ``start:end`` of ``x`` flattened when ``x`` is shaped like ``p``, or broadcast to
    ``p``'s shape when ``x`` broadcasts to it (a per-row ``(rows, 1)`` or per-column ``(1, cols)``
    value, e.g. Kourkoutas-beta's ``beta2`` of a LoRA factor); else ``x``."""
    if cut is None or not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.numel() == p.numel():
        return x.view(-1)[cut[0]:cut[1]]
    if x.dim() == p.dim() and all(a in (1, n) for a, n in zip(x.shape, p.shape)):
        return broadcast_range(x, p.shape, cut[0], cut[1])
    return x


def broadcast_range(x: torch.Tensor, shape: Any, start: int, end: int) -> torch.Tensor:
    """Elements ``start:end`` of ``x`` broadcast to ``shape`` and flattened in row-major order
    (read-only: it may be a view of ``x``); only the rows of ``shape``'s first dimension that the
    range touches are expanded."""
    inner = 1
    for size in tuple(shape)[1:]:
        inner *= size
    if inner == 0 or end <= start:
        return x.new_zeros(0)
    r0, r1 = start // inner, -(-end // inner)
    return x.expand(shape)[r0:r1].reshape(-1)[start - r0 * inner:end - r0 * inner]


class _Assembled:
    """One per-tensor output rebuilt from its slices, in order: a view of the buffer the slices
    already sit in (consecutive views of one parameter-sized tensor, e.g. a wrapper's temporary),
    else a new tensor they are copied into."""

    __slots__ = ("like", "full", "done", "aliased", "owned")

    def __init__(self, like: torch.Tensor) -> None:
        self.like, self.full, self.done, self.aliased, self.owned = like, None, 0, False, True

    def add(self, cut: "tuple[int, int] | None", x: torch.Tensor, owned: bool = True, div: Any = None) -> None:
        """Slice ``cut`` of the output is ``x`` (divided by ``div`` when given: ``x`` is then the
        part's own temporary)."""
        if cut is None:
            if div is not None:
                torch.div(x, div, out=x)
            self.full, self.aliased, self.owned = x, True, owned
            return
        start, end = cut
        n = self.like.numel()
        if self.full is None:
            base = x.storage_offset() - start
            size = x.untyped_storage().nbytes() // x.element_size()
            if x.is_contiguous() and base >= 0 and size == n:  # x sits in a parameter-sized buffer
                self.full = x.as_strided(self.like.shape, _contiguous_strides(self.like.shape), base)
                self.aliased, self.owned = True, owned
            else:
                self.full = torch.empty(self.like.shape, dtype=x.dtype, device=x.device)
        flat = self.full.view(-1)
        if self.aliased and not (x.data_ptr() == flat[start:].data_ptr() and x.is_contiguous()
                                 and x.dtype == flat.dtype):
            # not where the earlier slices are: continue in a buffer of our own
            own = torch.empty(self.like.shape, dtype=flat.dtype, device=flat.device)
            own.view(-1)[:self.done].copy_(flat[:self.done])
            self.full, self.aliased, self.owned = own, False, True
            flat = own.view(-1)
        if not self.aliased:
            if div is None:
                flat[start:end].copy_(x.reshape(-1))
            else:
                torch.div(x.reshape(-1), div, out=flat[start:end])
        else:
            if div is not None:
                torch.div(x, div, out=x)
            self.owned = self.owned and owned
        self.done = end


def _contiguous_strides(shape: Any) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


_UNSET = object()


class Join:
    """Takes back what the inner transform did on parts of a bucket, one part at a time (see
    :meth:`Bucket.joiner`). A direction left pending by every part (``u = num * scale [/ den]`` with one ``scale``) stays pending in the
    whole bucket, its ``num`` reassembled without a copy when the parts' ``num`` are views of one
    parameter-sized temporary."""

    def __init__(self, b: Bucket) -> None:
        self.b = b
        n = len(b.params)
        self.lazy = True
        self.scale: Any = _UNSET
        self.num = [_Assembled(p) for p in b.params]
        self.den: list[_Assembled] | None = None
        self.signals: dict[str, Any] = {}
        self.per_tensor: dict[str, list[Any]] = {}
        self.decay: list[_Assembled] | None = None
        self.decay_coef: Any = _UNSET
        self.coef_list: list[Any] | None = None
        self.skip = False
        self.n = n
        self.seen_keys: set[str] = set()

    def _materialize(self) -> None:
        """Turn the pending direction collected so far into computed slices."""
        for i, num in enumerate(self.num):
            if num.full is None:
                continue
            u = torch.mul(num.full, self.scale)
            if self.den is not None and self.den[i].full is not None:
                u.div_(self.den[i].full)
            self.num[i] = fresh = _Assembled(num.like)
            fresh.full, fresh.done = u, num.done
        self.lazy, self.den = False, None

    def add(self, sub: Bucket) -> None:
        cuts = sub._slices
        div = None  # a pending "denom" divisor is applied while the slices are copied together
        denom = sub.signals.get("denom")
        if sub._denom_div is not None and isinstance(denom, (list, tuple)) and len(denom) == len(cuts):
            div, sub._denom_div = sub._denom_div, None
        sub._settle()
        lazy = sub.lazy_u
        first = self.scale is _UNSET
        if self.lazy and lazy is not None and not isinstance(lazy[2], list) and (
                first or (lazy[2] is self.scale or (not F.is_tensor(lazy[2]) and lazy[2] == self.scale))) and (
                first or (lazy[1] is None) == (self.den is None)):
            num, den, self.scale = lazy
            if den is not None and self.den is None:
                self.den = [_Assembled(p) for p in self.b.params]
            for j, (i, cut) in enumerate(zip(sub._index, cuts)):
                self.num[i].add(cut, num[j], False)
                if den is not None:
                    self.den[i].add(cut, den[j])
        else:
            if self.lazy and not first:
                self._materialize()
            self.lazy = False
            owned = sub.u_owned
            for j, (i, cut) in enumerate(zip(sub._index, cuts)):
                self.num[i].add(cut, sub.u[j], owned)
        for key, value in sub.signals.items():
            self.seen_keys.add(key)
            if isinstance(value, (list, tuple)) and len(value) == len(cuts):
                slots = self.per_tensor.setdefault(key, [None] * self.n)
                for j, (i, cut) in enumerate(zip(sub._index, cuts)):
                    v = value[j]
                    if cut is not None and isinstance(v, torch.Tensor) and v.dim() and v.numel() == cut[1] - cut[0]:
                        if not isinstance(slots[i], _Assembled):
                            slots[i] = _Assembled(self.b.params[i])
                        slots[i].add(cut, v, div=div if key == "denom" else None)
                    else:
                        if key == "denom" and div is not None and isinstance(v, torch.Tensor):
                            v = torch.div(v, div, out=v) if cut is None else v.div(div)
                        slots[i] = v
            else:
                self.signals[key] = value
        if sub.decay is not None and self.decay is None:
            self.decay = [_Assembled(p) for p in self.b.params]
            for i in range(self.n):  # parts without decay terms contributed zeros
                self.decay[i].full = torch.zeros_like(self.b.params[i], dtype=torch.float32)
        if self.decay is not None:
            terms = sub.decay if sub.decay is not None else None
            for j, (i, cut) in enumerate(zip(sub._index, cuts)):
                if terms is not None:
                    self.decay[i].add(cut, terms[j])
        if isinstance(sub.decay_coef, list):
            if self.coef_list is None:
                self.coef_list = [self.decay_coef if self.decay_coef is not _UNSET else 0.0] * self.n
            for j, i in enumerate(sub._index):
                self.coef_list[i] = sub.decay_coef[j]
        else:
            self.decay_coef = sub.decay_coef
            if self.coef_list is not None:
                for i in sub._index:
                    self.coef_list[i] = sub.decay_coef
        self.skip = self.skip or sub.skip_apply

    def finish(self) -> None:
        b = self.b
        if self.lazy and self.scale is not _UNSET:
            b.set_u_scaled([a.full for a in self.num], self.scale)
            if self.den is not None:
                b.divide_u_([a.full for a in self.den])
        else:
            b.set_u([a.full for a in self.num], owned=all(a.owned for a in self.num))
        if not b._frozen:
            b.grads = b.u
        for key in [k for k in b.signals if k not in self.seen_keys]:
            del b.signals[key]  # consumed by the inner transform
        b.signals.update(self.signals)
        for key, slots in self.per_tensor.items():
            b.signals[key] = [v.full if isinstance(v, _Assembled) else v for v in slots]
        if self.decay is not None:
            b.decay = [a.full for a in self.decay]
        if self.coef_list is not None:
            b.decay_coef = self.coef_list
        elif self.decay_coef is not _UNSET:
            b.decay_coef = self.decay_coef
        b.skip_apply = self.skip


def run_transforms(transforms: tuple, b: Bucket) -> None:
    for k, t in enumerate(transforms):
        b.enter(t.name, t.stage)
        rest = transforms[k + 1:]
        if rest and getattr(t, "runs_rest", False) and all(r.scope == "elementwise" for r in rest):
            # a state wrapper that works slice by slice runs the elementwise rest of the segment on
            # each of its slices too: nothing it hands on needs to exist at full size
            t.update(b, rest)
            return
        t.update(b)

