"""``partition``: route each parameter to its own sub-chain (Muon for hidden matrices, Adam for the rest).

A partition is one transform of a chain that holds several *routes*, each a chain without a terminal,
and *rules* that send every parameter to one route. What follows the partition (usually only the
terminal) is shared by every route::

    import adv_chain as ac
    opt_chain = ac.chain(
        ac.partition(
            {"muon": ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale()),
             "adam": ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8))},
            rules=[{"name": r"embed|head", "route": "adam"},   # by name (model.named_parameters())
                   {"min_ndim": 2, "route": "muon"}],          # hidden matrices
            default="adam"),                                   # everything else (biases, norms)
        ac.apply())

How it works:

* **Routing is decided once per parameter**, when the optimizer first sees it (its first step, or
  ``init_state``/``load_state_dict``), and becomes a parameter tag ``"<partition>=<route>"``
  (:mod:`adv_chain._core.tags`): parameters of different routes never share a bucket, so each bucket
  runs exactly one route's transforms, on whole lists of tensors as any chain does. A parameter that
  matches no rule and has no ``default`` route is a ``ValueError`` at that moment, naming it.
* **Rules** are plain dicts (JSON, so ``to_config`` round-trips), tried in order; the first whose
  conditions all hold gives the route (a rule without conditions always matches):

  ============================== ==========================================================================
  ``"ndim": 2``                  ``p.dim() == 2`` (``"min_ndim"``/``"max_ndim"``: bounds, inclusive)
  ``"shape": [768, 768]``        exact shape
  ``"name": "regex"``            ``re.search`` on the name torch keeps when the optimizer gets
                                 ``model.named_parameters()`` (``group["param_names"]``). Without names it
                                 is an error, unless ``"missing_name": "skip"`` (the rule then never matches)
  ``"tag": "lora_A"``            a parameter tag (tensor attribute or ``group["tags"]``, see tags.py)
  ``"group": "use_muon"``        the param group has that key, not ``None``; with ``"value": v``: equals ``v``
  ``"matrix": true``             adv_optm's Muon test (spec §2.7): ndim >= 2, ``shape[0]`` and ``shape[1]``
                                 not 1, and the matrix view ``(shape[0], numel/shape[0])`` has both sides
                                 >= ``min_size`` (4) and aspect ratio <= ``max_aspect`` (128); give
                                 ``{"min_size": 8, "max_aspect": 64}`` for other bounds
  ============================== ==========================================================================

* **Names, state and overrides**: the transforms of every route share the chain's namespace (names
  are unique across routes and the outer chain: ``ValueError`` at build time, rename one with
  :func:`named`). State keys stay ``"<transform>/<key>"`` and a parameter gets only its route's
  state; ``"<transform>.<arg>"`` param-group keys reach transforms inside routes. ``group_keys``
  re-maps the *plain* group keys a route's transforms read (``lr`` is always shared; two routes
  reading one key with different constructor values is a ``ValueError``, since torch keeps one
  value per param group): a string is
  a prefix (``{"adam": "adam_"}``: the Adam route reads ``group["adam_betas"]``,
  ``group["adam_weight_decay"]``, ``group["adam_eps"]``, as adv_optm's auxiliary Adam), a mapping
  renames single keys (``{"muon": {"betas": None}}``: not fed by any plain key).
* **Stages**: each route is checked like a chain (stage order, exclusions); the partition sits in
  the outer chain at the earliest stage of its routes and ends at the latest (a route that starts
  with ``orthograd`` puts the partition in the gradient stage: nothing else may then precede it but
  gradient transforms). Signals a route publishes and does not consume itself must be the same in
  every route; they and the route's decay terms reach the transforms after the partition.
* **Reductions**: per-tensor layer-scope transforms (:func:`orthograd`, :func:`cautious`,
  :func:`clip_by_tensor_norm`, ``kourkoutas_beta(layer_key="tensor")``) run inside a route, exactly,
  on whole tensors. Transforms that reduce over many tensors (``clip_by_global_norm``, Prodigy,
  Kourkoutas-beta's shape layers) are refused with a ``ValueError`` inside a route: put them
  before or after the partition.
* Under ``compile=True`` a partition is compiled with its segment, per-tensor reductions included,
  unless a route holds a state wrapper (``factored_state``...: that segment then runs eagerly). Under optimizer accumulation a
  partition whose routes start in the gradient stage runs whole (the terminal, and so every write
  to the parameters, is still skipped).

>>> import torch, adv_chain as ac
>>> part = ac.partition({"muon": ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale()),
...                      "adam": ac.chain(ac.scale_by_adam(), ac.eps_divide())},
...                     rules=[{"matrix": True, "route": "muon"}], default="adam")
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
>>> opt = ac.ChainOptimizer(model.parameters(), ac.chain(part, ac.apply()), lr=0.01)
>>> model(torch.randn(4, 8)).square().mean().backward(); opt.step()
>>> sorted(opt.state[model[0].weight]), sorted(opt.state[model[2].weight])
(['muon_momentum/momentum_buffer', 'step'], ['adam/exp_avg', 'adam/exp_avg_sq', 'step'])
>>> ac.chain_from_config(ac.chain(part, ac.apply()).to_json()) == ac.chain(part, ac.apply())
True
"""
from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from .._core.chain import Chain
from .._core.plan import per_tensor_reduction
from .._core.transform import _NAME_RE, STAGES, HParam, HostView, Transform, expand, transform_from_config
from .partition_rules import _bad, _check_rule, _matches, _remap, suitable_for_muon  # noqa: F401 - re-exported

_ORDER = {s: i for i, s in enumerate(STAGES)}


class _Inner(Transform):
    """How a partition runs one transform of a route: the same transform (name, arguments, state,
    update), reading re-mapped plain group keys (``group_keys``), and for a per-tensor reduction
    (``local``) also carrying its resolved hyperparameters in its host scalars, which its
    ``finalize`` needs (static scalars: a tuple of items). Not registered: configs and
    reprs show the inner transform itself."""

    def __init__(self, inner: Transform, group_keys: Any, local: bool) -> None:  # noqa: D107
        for attr in ("name", "args", "type_name", "stage", "scope", "reads", "writes", "consumes",
                     "optional_signals", "excludes", "terminal", "prepares"):
            object.__setattr__(self, attr, getattr(inner, attr))
        hparams = dict(inner.hparams)
        if group_keys is not None:
            for arg, h in hparams.items():
                key = h.group_key
                if key is not None:
                    key = group_keys + key if isinstance(group_keys, str) else group_keys.get(key, key)
                hparams[arg] = HParam(key, h.check)
        object.__setattr__(self, "hparams", MappingProxyType(hparams))
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "static_scalars", inner.static_scalars | ({"hp"} if local else set()))
        object.__setattr__(self, "compilable", getattr(inner, "compilable", True))

    @property
    def exit_stage(self) -> str:  # type: ignore[override]
        return self.inner.exit_stage

    def __repr__(self) -> str:
        return repr(self.inner)

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> Any:
        return self.inner.state_specs(param, hp)

    def check_hparams(self, owner: str, hp: Mapping[str, Any]) -> None:
        self.inner.check_hparams(owner, hp)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        out = self.inner.host_scalars(h)
        # hashable: under compile=True static scalars are part of the kernel's layout
        return {**out, "hp": tuple(sorted(h.hp.items()))} if self.local else out

    def update(self, b: Any) -> None:
        self.inner.update(b)

    def prepare(self, b: Any) -> None:
        self.inner.prepare(b)

    def reduce(self, b: Any) -> list[torch.Tensor]:
        return self.inner.reduce(b)

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any], hp: Mapping[str, Any]) -> Any:
        return self.inner.finalize(values, layer_keys, hp)

    def nested(self) -> tuple[Transform, ...]:
        return self.inner.nested()

    def nested_for(self, hp: Mapping[str, Any]) -> tuple[Transform, ...]:
        return self.inner.nested_for(hp)

    def route_tags(self, param: torch.Tensor, group: Mapping[str, Any], name: str | None,
                   where: str) -> frozenset[str]:
        return self.inner.route_tags(param, group, name, where)


def _signals(route: Sequence[Transform]) -> tuple[set[str], set[str], set[str], set[str]]:
    """(signals read from outside, consumed from outside, published and left, optional) of a route."""
    published: set[str] = set()
    reads: set[str] = set()
    consumes: set[str] = set()
    optional: set[str] = set()
    for t in route:
        reads |= {r for r in t.reads if r.startswith("sig:") and r not in published}
        consumes |= {c for c in t.consumes if c.startswith("sig:") and c not in published}
        published -= set(t.consumes)
        published |= {w for w in t.writes if w.startswith("sig:")}
        optional |= set(t.optional_signals)
    return reads, consumes, published, optional


class Partition(Transform):
    """Route each parameter to one of several sub-chains (see the module docstring for the rules).

    Args:
        routes: route name -> a chain without terminal (or a list of transforms / their configs).
        rules: dicts tried in order; the first that matches gives the route.
        default: the route of a parameter no rule matches (``None``: such a parameter is an error).
        group_keys: route -> prefix string or ``{plain key: new key or None}`` for the plain
            param-group keys its transforms read.
    """

    type_name = "partition"
    default_name = "partition"
    static_scalars = frozenset({"route"})

    def __init__(self, routes: Mapping[str, Any], rules: Sequence[Mapping[str, Any]] = (),
                 default: str | None = None, group_keys: Mapping[str, Any] | None = None, *,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        owner = self.type_name if self.name == self.default_name else f"{self.type_name} {self.name!r}"
        if not isinstance(routes, Mapping) or not routes:
            raise _bad(owner, f"routes={routes!r} must be a non-empty dict route name -> chain")
        chains: dict[str, Chain] = {}
        for r, c in routes.items():
            if not isinstance(r, str) or not _NAME_RE.match(r):
                raise _bad(owner, f"route name {r!r} must be lowercase letters, digits and '_' starting with a letter")
            items = c.transforms if isinstance(c, Chain) else c
            if isinstance(items, Transform) or not isinstance(items, (list, tuple)):
                raise _bad(owner, f"route {r!r} must be a chain (ac.chain(...)) or a list of transforms, got {c!r}")
            items = [transform_from_config(t) if isinstance(t, Mapping) else t for t in items]
            for t in items:
                if not isinstance(t, Transform):
                    raise _bad(owner, f"route {r!r} holds {t!r}, which is not a transform")
                if t.terminal:
                    raise _bad(owner, f"route {r!r} holds the terminal {t.type_name} ({t.name!r}); the terminal comes "
                               "after the partition, shared by every route: ac.chain(ac.partition(...), ac.apply())")
            try:
                chains[r] = Chain(items)
            except ValueError as e:
                raise _bad(owner, f"route {r!r}: {e}") from None
        if default is not None and default not in chains:
            raise _bad(owner, f"default={default!r} must be None or one of the routes {list(chains)}")
        if group_keys is not None and not isinstance(group_keys, Mapping):
            raise _bad(owner, f"group_keys={group_keys!r} must be a dict route -> prefix or key mapping")
        gk = {r: _remap(owner, r, s) for r, s in (group_keys or {}).items()}
        unknown = sorted(set(gk) - set(chains))
        if unknown:
            raise _bad(owner, f"group_keys names unknown route(s) {unknown}; routes are {list(chains)}")
        rules = tuple(_check_rule(owner, rule, list(chains)) for rule in (rules or ()))
        run: dict[str, tuple[Transform, ...]] = {}
        local: set[str] = set()
        for r, c in chains.items():
            for t in expand(c.transforms):
                if t.scope in ("layer", "global") and not per_tensor_reduction(t):
                    raise _bad(owner, f"route {r!r} holds {t.type_name} ({t.name!r}), which reduces over many tensors "
                               f"({t.scope} scope); inside a partition only per-tensor reductions run (orthograd, "
                               "cautious, clip_by_tensor_norm, kourkoutas_beta(layer_key='tensor')): put it before or "
                               "after the partition")
            run[r] = tuple(_Inner(t, gk.get(r), t.scope == "layer") for t in c.transforms)
            local |= {t.name for t in c.transforms if t.scope == "layer"}
        seen: dict[str, str] = {}
        for r, c in chains.items():
            for t in expand(c.transforms):
                if t.name in seen or t.name == self.name:
                    raise _bad(owner, f"two transforms are named {t.name!r} (routes {seen.get(t.name, 'partition')!r} and "
                               f"{r!r}); names are shared by every route and the outer chain: rename one with "
                               f"ac.named('{t.name}2', ...)")
                seen[t.name] = r
        # a plain group key read by several routes feeds them all (torch fills it from one default)
        keys: dict[str, tuple[str, Transform, Any]] = {}
        for r, ts in run.items():
            for t in ts:
                for arg, h in t.hparams.items():
                    if h.group_key is None:
                        continue
                    prev = keys.setdefault(h.group_key, (r, t, t.args[arg]))
                    if prev[0] != r and prev[2] != t.args[arg]:
                        raise _bad(owner, f"routes {prev[0]!r} ({prev[1].name}.{arg}={prev[2]!r}) and {r!r} "
                                   f"({t.name}.{arg}={t.args[arg]!r}) both read the param-group key "
                                   f"{h.group_key!r}, with different values; torch keeps one value per group, so give "
                                   f"a route its own keys: group_keys={{{r!r}: '{r}_'}} (or {{{r!r}: "
                                   f"{{{h.group_key!r}: None}}}})")
        # signals and stages seen from the outer chain
        info = {r: _signals(ts) for r, ts in run.items()}
        left = {r: frozenset(v[2] - v[3]) for r, v in info.items()}
        if len(set(left.values())) > 1:
            raise _bad(owner, "routes leave different signals for the transforms after the partition: "
                       + ", ".join(f"{r!r} leaves {sorted(s[4:] for s in v) or 'none'}" for r, v in left.items())
                       + "; consume them inside each route")
        every = [t for c in chains.values() for t in expand(c.transforms)]
        streams = {x for t in every for x in t.reads if not x.startswith("sig:")}
        stages = [t.stage for t in every if t.stage != "any"] or ["moment"]
        exits = [t.exit_stage for t in every if t.exit_stage != "any"] or ["moment"]
        whole = any(t.scope != "elementwise" for t in every)
        attrs = {
            "routes": MappingProxyType(chains), "rules": rules, "default": default,
            "group_keys": MappingProxyType(gk), "_run": MappingProxyType(run), "_local": frozenset(local),
            "stage": min(stages, key=_ORDER.__getitem__), "_exit": max(exits, key=_ORDER.__getitem__),
            "scope": "tensor" if whole else "elementwise",
            "reads": frozenset({"update"} | streams | {s for v in info.values() for s in v[0]}),
            "consumes": frozenset(s for v in info.values() for s in v[1]),
            "writes": frozenset({"update"} | {s for v in info.values() for s in v[2]}),
            "optional_signals": frozenset(s for v in info.values() for s in v[3]),
            "compilable": all(getattr(t, "compilable", True) for t in every),
        }
        for k, v in attrs.items():
            object.__setattr__(self, k, v)

    @property
    def exit_stage(self) -> str:  # type: ignore[override]
        return self._exit

    # -- value semantics ------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {"rules": [dict(r) for r in self.rules], "default": self.default,
                "group_keys": dict(self.group_keys) or None}

    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and self.name == other.name
                and dict(self.routes) == dict(other.routes) and self._options() == other._options())

    def __hash__(self) -> int:
        return hash((type(self), self.name, tuple(self.routes.items()), json.dumps(self._options(), sort_keys=True)))

    def non_default_args(self) -> dict[str, Any]:
        return {"routes": dict(self.routes), **{k: v for k, v in self._options().items() if v not in (None, [])}}

    def __repr__(self) -> str:
        routes = ", ".join(f"{r!r}: [{', '.join(repr(t) for t in c)}]" for r, c in self.routes.items())
        extra = "".join(f", {k}={v!r}" for k, v in self._options().items() if v not in (None, []))
        text = f"{self.type_name}({{{routes}}}{extra})"
        return text if self.name == self.default_name else f"named({self.name!r}, {text})"

    def renamed(self, name: str) -> "Transform":
        return type(self)(dict(self.routes), name=name, **self._options())

    def with_args(self, **changes: Any) -> "Transform":
        allowed = {"routes", "rules", "default", "group_keys"}
        unknown = set(changes) - allowed
        if unknown:
            raise TypeError(f"partition has no argument(s) {sorted(unknown)}; it takes {sorted(allowed)}")
        return type(self)(**{"routes": dict(self.routes), **self._options(), **changes}, name=self.name)

    def to_config(self) -> dict[str, Any]:
        routes = {r: [t.to_config() for t in c] for r, c in self.routes.items()}
        return {"type": self.type_name, "name": self.name, "args": {"routes": routes, **self._options()}}

    # -- routing --------------------------------------------------------------------------------------
    def route_of(self, p: torch.Tensor, group: Mapping[str, Any], name: str | None = None,
                 tags: frozenset[str] = frozenset(), where: str = "a parameter") -> str:
        """The route of parameter ``p`` of ``group`` (first matching rule, else ``default``)."""
        owner = f"{self.type_name} {self.name!r}"
        for rule in self.rules:
            if _matches(rule, p, group, name, tags, owner, where):
                return rule["route"]
        if self.default is None:
            raise ValueError(f"{owner}: {where} (shape {tuple(p.shape)}) matches no rule and the partition has no "
                             f"default route; rules: {[dict(r) for r in self.rules]}; add a rule for it or "
                             f"default='<route>' (routes: {list(self.routes)})")
        return self.default

    def route_tags(self, param: torch.Tensor, group: Mapping[str, Any], name: str | None,
                   where: str) -> frozenset[str]:
        from .._core.tags import param_tags
        return frozenset({f"{self.name}={self.route_of(param, group, name, param_tags(param, group), where)}"})

    def _route(self, hp: Mapping[str, Any]) -> str | None:
        prefix = self.name + "="
        return next((t[len(prefix):] for t in hp.get("tags", ()) if t.startswith(prefix)), None)

    # -- protocol -------------------------------------------------------------------------------------
    def nested(self) -> tuple[Transform, ...]:
        return tuple(t for ts in self._run.values() for t in ts)

    def nested_for(self, hp: Mapping[str, Any]) -> tuple[Transform, ...]:
        route = self._route(hp)
        return self.nested() if route is None else self._run[route]

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        route = self._route(h.hp)
        if route is None:
            raise RuntimeError(f"partition {self.name!r}: the parameters have no route tag; a partition runs "
                               "inside a ChainOptimizer, which routes each parameter")
        return {"route": route}

    def update(self, b: Any) -> None:
        for t in self._run[b.s("route")]:
            b.enter(t.name, t.stage)
            if t.name in self._local:  # a per-tensor reduction: reduce, finalize and update right here
                if t.prepares:
                    t.prepare(b)
                hp = dict(b.s("hp"))
                result = t.finalize(t.reduce(b), list(range(len(b.params))), hp)
                b._scalars = {**b._scalars, t.name: {**b._scalars[t.name], **result}}
            t.update(b)


partition = Partition
