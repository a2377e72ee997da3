"""The routing rules of :func:`~adv_chain.partition`: checked when the partition is built, matched
once per parameter (see :mod:`adv_chain.transforms.partition` for the rule keys)."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from .._core.tags import TAG_ATTRIBUTES

_CONDITIONS = ("ndim", "min_ndim", "max_ndim", "shape", "name", "tag", "group", "matrix")
_RULE_KEYS = frozenset(_CONDITIONS + ("route", "value", "missing_name"))
_MATRIX_DEFAULTS = {"min_size": 4, "max_aspect": 128.0}


def suitable_for_muon(p: torch.Tensor, min_size: int = 4, max_aspect: float = 128.0) -> bool:
    """adv_optm's ``_is_suitable_for_muon`` (spec §2.7): at least 2 dims of size > 1, neither of the
    first two dims 1, and the matrix view ``(shape[0], numel/shape[0])`` with both sides
    >= ``min_size`` and aspect ratio <= ``max_aspect``. Embeddings and output heads pass (the
    reference does not special-case them)."""
    s = tuple(p.shape)
    if len(s) < 2 or sum(1 for d in s if d > 1) < 2 or s[0] == 1 or s[1] == 1:
        return False
    rows, cols = s[0], p.numel() // s[0]
    return min(rows, cols) >= min_size and max(rows, cols) / min(rows, cols) <= max_aspect


def _bad(owner: str, what: str) -> ValueError:
    return ValueError(f"{owner}: {what}")


def _int(owner: str, rule: Mapping[str, Any], key: str) -> None:
    v = rule[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(owner, f"rule {dict(rule)!r}: {key}={v!r} must be an int >= 0")


def _check_rule(owner: str, rule: Any, routes: Sequence[str]) -> dict[str, Any]:
    """A rule normalized to plain JSON values (shape as a list, matrix as its two bounds)."""
    if not isinstance(rule, Mapping):
        raise _bad(owner, f"rule {rule!r} must be a dict such as {{'min_ndim': 2, 'route': 'muon'}}")
    rule = dict(rule)
    unknown = sorted(set(rule) - _RULE_KEYS)
    if unknown:
        raise _bad(owner, f"rule {rule!r} has unknown key(s) {unknown}; conditions are {list(_CONDITIONS)} "
                   "(with 'value' for 'group', 'missing_name' for 'name'), and 'route'")
    if rule.get("route") not in routes:
        raise _bad(owner, f"rule {rule!r}: route={rule.get('route')!r} must be one of the routes {list(routes)}")
    for key in ("ndim", "min_ndim", "max_ndim"):
        if key in rule:
            _int(owner, rule, key)
    if "shape" in rule:
        shape = rule["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                           for d in shape):
            raise _bad(owner, f"rule {rule!r}: shape={shape!r} must be a list of ints >= 0")
        rule["shape"] = list(shape)
    if "name" in rule:
        if not isinstance(rule["name"], str):
            raise _bad(owner, f"rule {rule!r}: name={rule['name']!r} must be a regular expression (a string)")
        try:
            re.compile(rule["name"])
        except re.error as e:
            raise _bad(owner, f"rule {rule!r}: name={rule['name']!r} is not a valid regular expression ({e})") from None
    if rule.get("missing_name", "error") not in ("error", "skip") or ("missing_name" in rule and "name" not in rule):
        raise _bad(owner, f"rule {rule!r}: missing_name must be 'error' or 'skip', with a 'name' condition")
    if "tag" in rule and rule["tag"] not in TAG_ATTRIBUTES:
        raise _bad(owner, f"rule {rule!r}: tag={rule['tag']!r} is not a parameter tag; tags: {sorted(TAG_ATTRIBUTES)}")
    if "group" in rule and not isinstance(rule["group"], str):
        raise _bad(owner, f"rule {rule!r}: group={rule['group']!r} must be a param-group key (a string)")
    if "value" in rule and "group" not in rule:
        raise _bad(owner, f"rule {rule!r}: 'value' needs a 'group' key to compare")
    if "matrix" in rule:
        m = rule["matrix"]
        if m is True:
            m = dict(_MATRIX_DEFAULTS)
        if not isinstance(m, Mapping) or set(m) - set(_MATRIX_DEFAULTS):
            raise _bad(owner, f"rule {rule!r}: matrix={m!r} must be true or a dict with 'min_size' and/or 'max_aspect'")
        m = {**_MATRIX_DEFAULTS, **m}
        if not isinstance(m["min_size"], int) or m["min_size"] < 1 or not m["max_aspect"] >= 1:
            raise _bad(owner, f"rule {rule!r}: matrix needs min_size an int >= 1 and max_aspect >= 1")
        rule["matrix"] = {"min_size": m["min_size"], "max_aspect": float(m["max_aspect"])}
    return rule


def _matches(rule: Mapping[str, Any], p: torch.Tensor, group: Mapping[str, Any], name: str | None,
             tags: frozenset[str], owner: str, where: str) -> bool:
    if "ndim" in rule and p.dim() != rule["ndim"]:
        return False
    if "min_ndim" in rule and p.dim() < rule["min_ndim"]:
        return False
    if "max_ndim" in rule and p.dim() > rule["max_ndim"]:
        return False
    if "shape" in rule and list(p.shape) != rule["shape"]:
        return False
    if "tag" in rule and rule["tag"] not in tags:
        return False
    if "group" in rule:
        value = group.get(rule["group"])
        if value is None or ("value" in rule and value != rule["value"]):
            return False
    if "matrix" in rule and not suitable_for_muon(p, **rule["matrix"]):
        return False
    if "name" in rule:
        if name is None:
            if rule.get("missing_name", "error") == "skip":
                return False
            raise ValueError(f"{owner}: rule {dict(rule)!r} routes by name, but {where} has none: the optimizer "
                             "got no names; pass model.named_parameters() (torch then keeps group['param_names']), "
                             "or add 'missing_name': 'skip' to the rule")
        if not re.search(rule["name"], name):
            return False
    return True


def _remap(owner: str, route: str, spec: Any) -> Any:
    """The group-key mapping of one route: a prefix string or a mapping key -> key/None."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                         for k, v in spec.items()):
        return dict(spec)
    raise _bad(owner, f"group_keys[{route!r}]={spec!r} must be a prefix string (e.g. 'adam_') or a dict "
               "plain key -> new key or None")
