"""The transform protocol: what every part of a chain declares.

A transform is a small immutable object holding configuration only (never tensors). It declares

* ``name``: its namespace for state keys (``"adam/exp_avg"``) and param-group overrides (``"adam.betas"``);
* ``stage``: where it sits in a chain (gradient -> hyper -> moment -> normalize -> mask -> scale -> decay -> apply);
* ``reads`` / ``writes``: the streams and signals it uses (``"update"``, ``"grad"``, ``"param"``, ``"sig:denom"``);
* ``hparams``: which constructor arguments are runtime hyperparameters a param group may override, and
  which plain param-group key (``"lr"``, ``"betas"``, ``"weight_decay"``...) feeds them;
* ``state_specs(param, hp)``: its per-parameter state (shape, dtype policy, kind, factorable);
* ``scope``: ``"elementwise"`` (runs on any slice of a tensor), ``"tensor"`` (its update needs whole
  tensors: the segment holding it runs on whole tensors), ``"layer"`` or ``"global"`` (needs a reduction first: ``reduce`` gives one value per
  parameter of every bucket, ``finalize`` runs once over all of them, grouped by ``layer_key`` for
  the layer scope, and returns tensors for everyone or per-parameter lists; then ``update`` runs
  elementwise with those results as scalars).

``host_scalars(h)`` turns resolved hyperparameters and the step number into the plain numbers the
kernel uses (bias corrections, ``1 - beta``...), on the host, once per bucket and step. ``update(b)``
then acts on whole lists of tensors of a :class:`~adv_chain._core.bucket.Bucket` with ``torch._foreach_*``.
"""
from __future__ import annotations

import inspect
import re
from types import MappingProxyType
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

# "any" marks a transform that may sit anywhere (e.g. value clipping of gradients or of updates)
STAGES = ("gradient", "hyper", "moment", "normalize", "mask", "scale", "decay", "apply", "any")
SCOPES = ("elementwise", "tensor", "layer", "global")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

_REGISTRY: dict[str, type["Transform"]] = {}


@dataclass(frozen=True)
class StateSpec:
    """One per-parameter state tensor a transform owns.

    ``dtype``: ``"state"`` follows the optimizer's ``state_dtype`` policy (fp32 by default, even for
    bf16 params), ``"param"`` is the parameter's dtype, or an explicit ``torch.dtype``.
    ``init``: ``"zeros"`` or ``"param"`` (a copy of the parameter). ``kind``: ``"signed"``,
    ``"nonneg"`` or ``"any"``; with ``factorable`` it tells a state-compressing wrapper what it may do.
    ``scalar=True`` makes it one 0-d fp32 value per parameter (every slice of the tensor sees it).
    ``build``: a function of the (detached) parameter returning the initial tensor in any shape and
    dtype (e.g. a block-quantized copy); it overrides ``dtype``/``init``. Such a tensor is not laid
    out like the parameter, so it is never sliced: its transform must have ``"tensor"`` scope.
    """

    dtype: Any = "state"
    init: str = "zeros"
    kind: str = "any"
    factorable: bool = False
    #: ``True``: one 0-d value per parameter (a per-tensor statistic) instead of a param-shaped tensor
    scalar: bool = False
    build: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class HParam:
    """A runtime hyperparameter: ``group_key`` is the plain param-group key that feeds it (torch
    schedulers write ``lr``, ``betas``, ``momentum``, ``weight_decay``); ``check(owner, arg, value)``
    validates and normalizes a value, raising ``ValueError`` that names the argument and the range."""

    group_key: str | None = None
    check: Callable[[str, str, Any], Any] | None = None


def _to_config_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_config_value(v) for v in value]
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return value


class Transform:
    """Base class of every transform (see the module docstring for the protocol)."""

    type_name: ClassVar[str] = ""
    default_name: ClassVar[str] = ""
    stage: ClassVar[str] = "moment"
    scope: ClassVar[str] = "elementwise"
    reads: ClassVar[frozenset[str]] = frozenset({"update"})
    writes: ClassVar[frozenset[str]] = frozenset({"update"})
    consumes: ClassVar[frozenset[str]] = frozenset()
    terminal: ClassVar[bool] = False
    hparams: ClassVar[Mapping[str, HParam]] = {}
    #: scalar names from host_scalars that stay Python values under compile (changing them recompiles)
    static_scalars: ClassVar[frozenset[str]] = frozenset()
    #: published signals a chain need not consume (e.g. Adam's bias correction ``sig:bc1``)
    optional_signals: ClassVar[frozenset[str]] = frozenset()
    #: layer/global scope: ``reduce`` on slices of a tensor sums to ``reduce`` on the whole tensor, so
    #: the executor may run it slice by slice inside the previous segment (one pass less)
    additive_reduce: ClassVar[bool] = False
    #: with ``additive_reduce``: ``reduce`` traces under ``torch.compile`` and reads only the
    #: bucket's direction, parameters and gradients, so a compiled kernel of the previous segment
    #: computes it in the same pass that writes the direction (no eager pass over it afterwards)
    traceable_reduce: ClassVar[bool] = False
    #: layer/global scope: the transform's own state keys its ``reduce`` reads; a state wrapper
    #: (``factored_state``, ``low_precision_state``) rebuilds those it stores compressed for the reduce
    reduce_reads_state: ClassVar[frozenset[str]] = frozenset()
    #: type names of transforms this one cannot share a chain with
    excludes: ClassVar[frozenset[str]] = frozenset()
    #: layer/global scope: the transform has a :meth:`prepare` step (elementwise work on the direction
    #: that the executor runs as the last transform of the previous segment)
    prepares: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.type_name:
            assert cls.stage in STAGES and (isinstance(cls.scope, property) or cls.scope in SCOPES), cls
            _REGISTRY[cls.type_name] = cls

    def __init__(self, *, name: str | None = None, **args: Any) -> None:
        name = self.default_name if name is None else name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"{self.type_name}: name={name!r} is not a valid transform name; use lowercase letters, "
                "digits and '_' starting with a letter (e.g. 'adam2')")
        for arg, spec in self.hparams.items():
            if spec.check is not None and arg in args:
                args[arg] = spec.check(self.type_name, arg, args[arg])
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", MappingProxyType(dict(args)))  # read-only view

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one or use Chain.replace")

    # -- value semantics -------------------------------------------------------------------------
    @classmethod
    def signature_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {k: p.default for k, p in sig.parameters.items()
                if k not in ("self", "name") and p.default is not inspect.Parameter.empty}

    def non_default_args(self) -> dict[str, Any]:
        defaults = self.signature_defaults()
        return {k: v for k, v in self.args.items() if k not in defaults or defaults[k] != v
                and not (isinstance(defaults[k], (list, tuple)) and tuple(defaults[k]) == v)}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.non_default_args().items())
        text = f"{self.type_name}({inner})"
        return text if self.name == self.default_name else f"named({self.name!r}, {text})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.name == other.name and self.args == other.args

    def __hash__(self) -> int:
        return hash((type(self), self.name, tuple(sorted(self.args.items()))))

    def renamed(self, name: str) -> "Transform":
        return type(self)(name=name, **self.args)

    def with_args(self, **changes: Any) -> "Transform":
        unknown = set(changes) - set(self.args)
        if unknown:
            raise TypeError(f"{self.type_name} has no argument(s) {sorted(unknown)}; it takes {sorted(self.args)}")
        return type(self)(name=self.name, **{**self.args, **changes})

    def to_config(self) -> dict[str, Any]:
        return {"type": self.type_name, "name": self.name,
                "args": {k: _to_config_value(v) for k, v in self.args.items()}}

    # -- protocol (overridden by subclasses) ------------------------------------------------------
    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {}

    def check_hparams(self, owner: str, hp: Mapping[str, Any]) -> None:
        """Rules that relate several resolved hyperparameters (e.g. nesterov needs momentum > 0);
        called for every param group, after each value passed its own check."""

    def host_scalars(self, h: "HostView") -> dict[str, Any]:
        return {}

    def update(self, b: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.type_name} defines no update")

    # -- transforms that run other transforms (ac.partition) ---------------------------------------
    #: the last stage of what this transform runs (a partition ending in decay has stage "moment"
    #: but exit stage "decay"); the chain checks the stage order with both
    @property
    def exit_stage(self) -> str:
        return self.stage

    def nested(self) -> tuple["Transform", ...]:
        """Transforms this one runs inside its ``update`` (a partition's sub-chains). The optimizer
        resolves their hyperparameters (``"<name>.<arg>"`` group keys), host scalars and state as if
        they were in the chain; their names share the chain's namespace."""
        return ()

    def nested_for(self, hp: Mapping[str, Any]) -> tuple["Transform", ...]:
        """The nested transforms that act on a parameter whose resolved hyperparameters (with its
        ``"tags"``) are ``hp``: only these get state for it."""
        return self.nested()

    def route_tags(self, param: torch.Tensor, group: Mapping[str, Any], name: str | None,
                   where: str) -> frozenset[str]:
        """Extra tags for ``param``, decided once when the optimizer first sees it (``name``: from
        ``named_parameters()``, else ``None``; ``where`` describes the parameter for errors).
        Parameters with different tags never share a bucket (a partition's route)."""
        return frozenset()

    # layer and global scope only
    def reduce(self, b: Any) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """One value per parameter of bucket ``b`` (whole tensors, ``b.u`` is the direction so far)."""
        raise NotImplementedError

    def prepare(self, b: Any) -> None:  # pragma: no cover - abstract
        """With ``prepares = True``: elementwise work on ``b.u`` done before the reduction, at the end
        of the previous segment while its slices are in cache (so ``reduce`` and ``update`` see its
        result). E.g. :func:`cautious` masks the direction here; only its per-tensor rescale waits for
        the barrier."""
        raise NotImplementedError

    def layer_key(self, param: torch.Tensor, index: int, group: Mapping[str, Any]) -> Any:
        """Which layer a parameter belongs to for a layer-scope reduction (default: its own)."""
        return index

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, "torch.Tensor | list[torch.Tensor]"]:
        """Combine every parameter's ``reduce`` value (in a fixed order, with its layer key) into
        scalars for ``update``: a tensor shared by all parameters, or a list aligned with ``values``.
        With :meth:`group_state`, ``hp`` also holds the current group state under its keys, and a
        returned key of the group state is its next value (stored, not passed to ``update``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # global scope only: scalars that outlive a step (Prodigy's d), kept in the param groups
    #: plain param-group keys that mirror a group-state key after each step (``{"d": "d"}``)
    group_mirrors: ClassVar[Mapping[str, str]] = {}

    def group_state(self, hp: Mapping[str, Any]) -> dict[str, float]:
        """The global scalars this transform keeps across steps, with their initial values. They
        live in every param group under ``"<name>/<key>"`` as 0-d tensors (so they are saved with
        ``state_dict``, need no host sync, and a param group may set them); the barrier loads them
        before ``reduce`` (see :meth:`state_scalars`) and stores what ``finalize`` returns for them."""
        return {}

    def state_scalars(self, state: Mapping[str, torch.Tensor], h: "HostView") -> dict[str, Any]:
        """Scalars for ``reduce`` and ``update`` from the current group state (0-d tensors on the
        bucket's device), once per bucket and step; by default the state values themselves."""
        return dict(state)


@dataclass
class HostView:
    """What ``host_scalars`` sees: resolved hyperparameters (plain Python values) for one param group,
    the step number being taken (1 on the first step) and the group's learning rate."""

    hp: Mapping[str, Any]
    step: int
    lr: float


def expand(transforms: "Any") -> tuple[Transform, ...]:
    """Every transform of ``transforms`` followed by its nested ones (recursively)."""
    out: list[Transform] = []
    for t in transforms:
        out.append(t)
        out.extend(expand(t.nested()))
    return tuple(out)


def transform_from_config(cfg: Mapping[str, Any]) -> Transform:
    try:
        cls = _REGISTRY[cfg["type"]]
    except KeyError:
        raise ValueError(f"unknown transform type {cfg.get('type')!r}; known: {sorted(_REGISTRY)}") from None
    args = {k: (float(v) if v in ("inf", "-inf") else v) for k, v in dict(cfg.get("args", {})).items()}
    return cls(name=cfg.get("name"), **args)

