"""The immutable ``Chain`` value: composition, editing, config round trip and build-time validation.

>>> import adv_chain as ac
>>> c = ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01), ac.apply())
>>> c.names
('adam', 'eps_divide', 'weight_decay', 'apply')
>>> c.replace("eps_divide", ac.eps_divide(1e-6)) == c
False
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Mapping

from .transform import STAGES, Transform, expand, transform_from_config

CONFIG_FORMAT = "adv_chain.chain/1"


class Chain:
    """An ordered, immutable sequence of uniquely named transforms. Build it with :func:`chain`."""

    __slots__ = ("_transforms", "_all")

    def __init__(self, transforms: Iterable[Transform]) -> None:
        ts = tuple(transforms)
        validate(ts, complete=bool(ts) and ts[-1].terminal)
        object.__setattr__(self, "_transforms", ts)
        object.__setattr__(self, "_all", expand(ts))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Chain is immutable; use replace/without/insert_before/insert_after")

    # -- sequence-like access ---------------------------------------------------------------------
    @property
    def transforms(self) -> tuple[Transform, ...]:
        return self._transforms

    @property
    def all_transforms(self) -> tuple[Transform, ...]:
        """The transforms and, after each, those it runs inside (a partition's sub-chains)."""
        return self._all

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self._transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def __getitem__(self, name: str) -> Transform:
        return self._transforms[self._index(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and self._transforms == other._transforms

    def __hash__(self) -> int:
        return hash(self._transforms)

    def __repr__(self) -> str:
        if not self._transforms:
            return "chain()"
        return "chain(\n" + "".join(f"    {t!r},\n" for t in self._transforms) + ")"

    @property
    def is_complete(self) -> bool:
        return bool(self._transforms) and self._transforms[-1].terminal

    # -- editing (each returns a new validated chain) ---------------------------------------------
    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no transform named {name!r} in the chain; names are {list(self.names)}") from None

    def replace(self, name: str, new: "Transform | Chain") -> "Chain":
        i = self._index(name)
        return chain(*self._transforms[:i], new, *self._transforms[i + 1:])

    def without(self, name: str) -> "Chain":
        i = self._index(name)
        return chain(*self._transforms[:i], *self._transforms[i + 1:])

    def insert_before(self, name: str, new: "Transform | Chain") -> "Chain":
        i = self._index(name)
        return chain(*self._transforms[:i], new, *self._transforms[i:])

    def insert_after(self, name: str, new: "Transform | Chain") -> "Chain":
        i = self._index(name)
        return chain(*self._transforms[:i + 1], new, *self._transforms[i + 1:])

    # -- serialization -----------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Plain JSON-serializable description; ``chain_from_config`` rebuilds an equal chain."""
        return {"format": CONFIG_FORMAT, "transforms": [t.to_config() for t in self._transforms]}

    def to_json(self) -> str:
        return json.dumps(self.to_config())


def chain(*items: "Transform | Chain") -> Chain:
    """Compose transforms (nested chains are flattened) into a validated :class:`Chain`.

    Names must be unique; give a second copy of a transform its own name with :func:`named`.
    """
    flat: list[Transform] = []
    for item in items:
        if isinstance(item, Chain):
            flat.extend(item.transforms)
        elif isinstance(item, Transform):
            flat.append(item)
        else:
            raise TypeError(f"chain() takes transforms or chains, got {type(item).__name__}: {item!r}")
    return Chain(flat)


def named(name: str, transform: Transform) -> Transform:
    """A copy of ``transform`` under another name (its own state namespace and overrides)."""
    if not isinstance(transform, Transform):
        raise TypeError(f"named() takes a transform, got {type(transform).__name__}")
    return transform.renamed(name)


def chain_from_config(cfg: "Mapping[str, Any] | str") -> Chain:
    """Rebuild a chain from :meth:`Chain.to_config` output (a dict or its JSON text)."""
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    if cfg.get("format") != CONFIG_FORMAT:
        raise ValueError(f"not an adv_chain chain config: format={cfg.get('format')!r}, expected {CONFIG_FORMAT!r}")
    return Chain(transform_from_config(t) for t in cfg["transforms"])


def _describe(t: Transform) -> str:
    return f"{t.type_name} ({t.name!r})"


def validate(ts: tuple[Transform, ...], *, complete: bool) -> None:
    """Build-time rules; each violation is a ``ValueError`` naming the transforms and the fix.

    Always: unique names, a terminal only at the end, gradient-stage transforms before any other,
    no two mutually exclusive transforms. For a complete chain (ending in a terminal) also: every
    signal read was written earlier and every published signal is consumed.
    """
    for i, t in enumerate(ts):
        if t.terminal and i != len(ts) - 1:
            raise ValueError(
                f"terminal {_describe(t)} must be the last transform, but {_describe(ts[i + 1])} follows it; "
                "a chain has exactly one terminal (apply, stochastic_round_apply or kahan_apply), at the end")
    seen: dict[str, Transform] = {}
    for t in expand(ts):  # nested transforms (a partition's sub-chains) share the namespace
        if t.name in seen:
            raise ValueError(
                f"two transforms are named {t.name!r}: {_describe(seen[t.name])} and {_describe(t)}; "
                f"give the second its own name with ac.named('{t.name}2', ...)")
        seen[t.name] = t
    first_direction = next((t for t in ts if t.exit_stage not in ("gradient", "any")), None)
    if first_direction is not None:
        start = ts.index(first_direction)
        late = [t for t in ts[start + 1:] if t.stage == "gradient"]
        if late:
            raise ValueError(
                f"gradient-stage transform {_describe(late[0])} comes after {_describe(first_direction)} "
                f"(stage {first_direction.exit_stage!r}); gradient transforms (clipping, add_l2, orthograd) define the "
                "reference gradient and must come first: move it to the front")
    for i, a in enumerate(ts):
        for b in ts[i + 1:]:
            if b.type_name in getattr(a, "excludes", ()) or a.type_name in getattr(b, "excludes", ()):
                raise ValueError(f"{_describe(a)} and {_describe(b)} cannot be combined in one chain; keep one of them")
    if not complete:
        return
    live: dict[str, Transform] = {}
    optional: set[str] = set()
    # signals live within one segment: a layer/global transform (a reduction over whole tensors)
    # starts a new one, and what was published before it does not reach the transforms after it
    published: dict[str, Transform] = {}
    lost: dict[str, tuple[Transform, Transform]] = {}
    crossing: str | None = None
    decaying: Transform | None = None  # the last transform that wrote a decay term in this segment
    for t in ts:
        if t.scope in ("layer", "global"):
            lost.update({sig: (src, t) for sig, src in published.items()})
            published.clear()
            if decaying is not None and not t.terminal:
                # decay terms live in their segment like signals: the terminal after the barrier
                # would never see them (the decay would be silently dropped)
                raise ValueError(
                    f"{_describe(decaying)} writes a decay term, but {_describe(t)} after it reduces over whole "
                    f"tensors ({t.scope} scope) and decay terms do not cross it; move {t.name!r} before "
                    f"{decaying.name!r} (decay transforms go last, right before the terminal)")
        if "decay" in t.writes:
            decaying = t
        for r in sorted(x for x in t.reads | t.consumes if x.startswith("sig:") and x in lost):
            src, barrier = lost[r]
            crossing = crossing or (  # raised after the other signal rules (they name the likelier mistake)
                f"{_describe(t)} uses signal {r[4:]!r} published by {_describe(src)}, but {_describe(barrier)} "
                f"between them reduces over whole tensors ({barrier.scope} scope) and signals do not cross it; "
                f"move {barrier.name!r} before {src.name!r} or after {t.name!r}, or leave one of them out")
        for w in t.writes:
            if w.startswith("sig:"):
                published[w] = t
                lost.pop(w, None)
        for r in sorted(x for x in t.reads if x.startswith("sig:")):
            if r not in live and r not in optional:
                raise ValueError(
                    f"{_describe(t)} reads signal {r[4:]!r} but no earlier transform publishes it; "
                    f"put a transform that publishes it (e.g. ac.scale_by_adam() for 'denom') before {t.name!r}")
        for c in t.consumes:
            live.pop(c, None)
        optional |= t.optional_signals
        for w in t.writes - t.optional_signals:
            if w.startswith("sig:"):
                if w in live:
                    raise ValueError(f"{_describe(t)} publishes {w[4:]!r} but {_describe(live[w])} already published "
                                     "it and nothing consumed it in between")
                live[w] = t
    if live:
        sig, t = next(iter(live.items()))
        raise ValueError(
            f"{_describe(t)} publishes {sig[4:]!r} but no later transform consumes it; add a consumer after it "
            "(ac.eps_divide(1e-8) for 'denom')")
    if crossing:
        raise ValueError(crossing)
    assert all(t.stage in STAGES for t in ts)
