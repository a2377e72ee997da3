"""Building the variants of an ablation: a baseline chain and one change per variant.

Everything here works on text as typed on a command line or written in a TOML/JSON file, and on Python
values (a :class:`~adv_chain.Chain` is accepted wherever a spec is):

* a **value**: ``true``/``false``, ``none``, ``inf``, numbers, comma lists (``0.9,0.95`` -> a tuple)
  or any Python literal; anything else stays a string;
* a **transform spec**: ``grams``, ``grams()``, ``cautious(rescale="mean")``, ``eps_divide(1e-6)`` -
  a transform's type name (or its default chain name, ``adam``) with literal arguments;
* a **setting** ``KEY=VALUE``: a preset keyword (``cautious_mask=true``) or a namespaced transform
  argument (``adam.betas=0.9,0.95``) applied to the chain the preset built;
* a **change**, one per variant: ``swap A=B``, ``without A``, ``insert_after A=B``,
  ``insert_before A=B``, ``vary KEY=VALUE`` (the baseline's preset with one more keyword), or a whole
  chain / ``preset + set`` in a config file.

>>> from adv_chain.ablation import baseline_chain, variant_from_flag
>>> base = baseline_chain("adamw_adv", {"cautious_mask": "true"})
>>> base.names
('adam', 'eps_divide', 'cautious', 'weight_decay', 'apply')
>>> variant_from_flag(base, "swap", "cautious=grams", preset="adamw_adv", settings={})[1].names
('adam', 'eps_divide', 'grams', 'weight_decay', 'apply')
"""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import Any, Mapping

from .. import presets as _presets
from .._core.chain import Chain, chain, chain_from_config
from .._core.transform import _REGISTRY, Transform

CHANGES = ("swap", "without", "insert_after", "insert_before", "vary")


class AblationError(ValueError):
    """A malformed ablation request: the message says which argument and what is allowed."""


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a display name and the chain it trains with."""

    name: str
    chain: Chain


# -- values ---------------------------------------------------------------------------------------
def parse_value(text: Any) -> Any:
    """A typed value from command-line text (non-strings pass through)."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf", "-inf"):
        return float(low)
    if "," in s and not s.startswith(("(", "[", "{", "'", '"')):
        return tuple(parse_value(part) for part in s.split(","))
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s
    return tuple(value) if isinstance(value, list) else value


def _coerce(owner: str, key: str, value: Any, default: Any) -> Any:
    """Match a parsed value to the type of the keyword's default where that is unambiguous."""
    if isinstance(default, bool) and not isinstance(value, bool):
        if value in (0, 1):
            return bool(value)
        raise AblationError(f"{owner}: {key}={value!r} must be true or false")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def split_setting(text: str, flag: str = "--set") -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise AblationError(f"{flag} {text!r}: expected KEY=VALUE (e.g. cautious_mask=true or adam.betas=0.9,0.95)")
    return key.strip(), value.strip()


# -- transforms -----------------------------------------------------------------------------------
def _transform_types() -> dict[str, type[Transform]]:
    """Type names and unambiguous default chain names of every registered transform."""
    by_name: dict[str, type[Transform]] = dict(_REGISTRY)
    defaults: dict[str, list[type[Transform]]] = {}
    for cls in _REGISTRY.values():
        defaults.setdefault(cls.default_name, []).append(cls)
    for alias, classes in defaults.items():
        if alias not in by_name and len(classes) == 1:
            by_name[alias] = classes[0]
    return by_name


def transform_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_transform(spec: "str | Transform") -> Transform:
    """A transform from ``name``, ``name()`` or ``name(arg, key=value, ...)`` (literal arguments).

    >>> parse_transform('cautious(rescale="mean")')
    cautious(rescale='mean')
    """
    if isinstance(spec, Transform):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise AblationError(f"transform spec {spec!r} must be a non-empty string such as 'grams()'")
    text = spec.strip()
    try:
        node = ast.parse(text if "(" in text else text + "()", mode="eval").body
    except SyntaxError:
        raise AblationError(f"cannot read transform spec {spec!r}; write it like cautious(rescale='mean')") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise AblationError(f"cannot read transform spec {spec!r}; write it like cautious(rescale='mean')")
    types = _transform_types()
    cls = types.get(node.func.id)
    if cls is None:
        raise AblationError(f"unknown transform {node.func.id!r} in {spec!r}; available transforms: "
                            f"{', '.join(transform_names())}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except ValueError:
        raise AblationError(f"transform spec {spec!r}: arguments must be literals (numbers, strings, "
                            "True/False/None, tuples)") from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return cls(*args, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",)]
        raise AblationError(f"transform spec {spec!r}: {err}; {cls.type_name} takes {params}") from None
    except ValueError as err:
        raise AblationError(f"transform spec {spec!r}: {err}") from None


# -- chains ---------------------------------------------------------------------------------------
def _check_preset(preset: str) -> None:
    if not isinstance(preset, str) or preset.lower() not in _presets.names():
        raise AblationError(f"unknown preset {preset!r}; known presets: {', '.join(_presets.names())}")


def baseline_chain(preset: "str | Chain", settings: Mapping[str, Any] | None = None) -> Chain:
    """The preset's chain with ``settings`` applied: plain keys are preset keywords, ``name.arg`` keys
    set an argument of the transform called ``name`` in the resulting chain."""
    settings = dict(settings or {})
    if isinstance(preset, Chain):
        base = preset
        keywords: dict[str, Any] = {}
    else:
        _check_preset(preset)
        keywords = _presets.keywords(preset)
        plain = {}
        for key, value in settings.items():
            if "." in key:
                continue
            if key not in keywords:
                raise AblationError(f"{key}: preset {preset!r} has no keyword {key!r}; its keywords: "
                                    f"{', '.join(keywords)}; or set a transform argument as NAME.ARG")
            plain[key] = _coerce(preset, key, parse_value(value), keywords[key])
        try:
            base = _presets.get(preset, **plain)
        except (TypeError, ValueError, NotImplementedError) as err:
            raise AblationError(f"preset {preset!r} with {plain}: {err}") from None
    for key, value in settings.items():
        if "." not in key:
            if isinstance(preset, Chain):
                raise AblationError(f"--set {key}: a chain has no preset keywords; use NAME.ARG (names: "
                                    f"{', '.join(base.names)})")
            continue
        name, _, arg = key.partition(".")
        if name not in base.names:
            raise AblationError(f"--set {key}: no transform named {name!r} in the chain; names: {', '.join(base.names)}")
        t = base[name]
        if arg not in t.args:
            raise AblationError(f"--set {key}: transform {name!r} ({t.type_name}) has no argument {arg!r}; "
                                f"it takes {', '.join(sorted(t.args))}")
        try:
            new = t.with_args(**{arg: _coerce(name, arg, parse_value(value), t.args[arg])})
            base = base.replace(name, new)
        except (TypeError, ValueError) as err:
            raise AblationError(f"--set {key}={value}: {err}") from None
    return base


def _edit(base: Chain, kind: str, spec: str) -> Chain:
    try:
        if kind == "without":
            return base.without(spec)
        target, sep, new = spec.partition("=")
        if not sep:
            raise AblationError(f"--{kind.replace('_', '-')} {spec!r}: expected NAME=TRANSFORM (e.g. cautious=grams)")
        target = target.strip()
        method = "replace" if kind == "swap" else kind
        return getattr(base, method)(target, parse_transform(new))
    except KeyError as err:
        raise AblationError(f"--{kind.replace('_', '-')} {spec}: {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        if isinstance(err, AblationError):
            raise
        raise AblationError(f"--{kind.replace('_', '-')} {spec}: {err}") from None


def variant_from_flag(base: Chain, kind: str, spec: str, *, preset: "str | Chain",
                      settings: Mapping[str, Any]) -> tuple[str, Chain]:
    """``(display name, chain)`` of one command-line change against the baseline."""
    if kind not in CHANGES:
        raise AblationError(f"unknown change {kind!r}; changes: {', '.join(CHANGES)}")
    if kind == "vary":
        key, value = split_setting(spec, "--vary")
        if isinstance(preset, Chain) and "." not in key:
            raise AblationError(f"--vary {spec}: a chain baseline has no preset keywords; use NAME.ARG")
        return f"{key}={value}", baseline_chain(preset, {**settings, key: value})
    label = f"{kind.replace('_', '-')} {spec}" if kind != "swap" else spec.replace("=", " -> ", 1)
    return label, _edit(base, kind, spec)


def variant_from_config(base: Chain, entry: Mapping[str, Any], *, preset: "str | Chain",
                        settings: Mapping[str, Any], index: int) -> Variant:
    """A variant from one ``[[variants]]`` table of a config file (see :func:`adv_chain.ablate`)."""
    if isinstance(entry, Chain):
        return Variant(f"variant {index}", entry)
    if not isinstance(entry, Mapping):
        raise AblationError(f"variants[{index}] must be a table/dict, got {type(entry).__name__}")
    known = {"name", "chain", "preset", "set", "swap", "without", "insert_after", "insert_before"}
    unknown = set(entry) - known
    if unknown:
        raise AblationError(f"variants[{index}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    if "chain" in entry:
        spec = entry["chain"]
        if isinstance(spec, Chain):
            c = spec
        elif isinstance(spec, Mapping):
            c = chain_from_config(spec)
        elif isinstance(spec, (list, tuple)):
            c = chain(*(parse_transform(s) for s in spec))
        else:
            raise AblationError(f"variants[{index}].chain must be a list of transform specs or a chain config")
        label = " -> ".join(c.names)
    elif "preset" in entry:
        c = baseline_chain(entry["preset"], entry.get("set", {}))
        label = entry["preset"] + "".join(f" {k}={v}" for k, v in dict(entry.get("set", {})).items())
    else:
        c, parts = baseline_chain(preset, {**settings, **dict(entry.get("set", {}))}), []
        parts += [f"{k}={v}" for k, v in dict(entry.get("set", {})).items()]
        for kind in ("swap", "without", "insert_after", "insert_before"):
            value = entry.get(kind)
            if value is None:
                continue
            items = value.items() if isinstance(value, Mapping) else [(v, None) for v in
                                                                        ([value] if isinstance(value, str) else value)]
            for target, new in items:
                spec = target if new is None else f"{target}={new}"
                c = _edit(c, kind, spec)
                parts.append(f"{kind} {spec}")
        if not parts:
            raise AblationError(f"variants[{index}] changes nothing; give set, swap, without, insert_after, "
                                "insert_before, chain or preset")
        label = ", ".join(parts)
    return Variant(str(entry.get("name") or label), c)
