"""Hyperparameter resolution for :class:`~adv_chain._core.optimizer.ChainOptimizer`: what each
transform of the chain uses in one param group (namespaced ``"<transform>.<arg>"`` keys win over the
plain keys schedulers write, which win over the constructor's arguments), validated once per value."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from . import checks


def checked(opt: Any, key: Any, value: Any, check: Callable[[str, str, Any], Any], owner: str, arg: str) -> Any:
    """Validate a param-group value once per value object (a tensor lr filled in place by a
    scheduler is read from the device once, not at every step)."""
    cached = opt._validated.get(key)
    if cached is not None and cached[0] is value:
        return cached[1]
    normalized = check(owner, arg, value)
    opt._validated[key] = (value, normalized)
    return normalized


def resolve_all(opt: Any, group: Mapping[str, Any], gi: int) -> dict[str, dict[str, Any]]:
    """Resolved hyperparameters of every transform of ``opt.chain`` for one group (validated)."""
    checked(opt, (gi, "lr"), group["lr"], checks.nonneg, f"param group {gi}", "lr")
    transforms = opt.chain.all_transforms  # with those nested in a partition
    names = {t.name: t for t in transforms}
    for key in group:
        if "." in key:
            tname, _, arg = key.partition(".")
            t = names.get(tname)
            if t is None or arg not in t.hparams:
                known = sorted(f"{t.name}.{a}" for t in transforms for a in t.hparams)
                raise ValueError(f"param group {gi}: unknown hyperparameter {key!r}; this chain's namespaced "
                                 f"hyperparameters are {known}")
    out = {}
    for t in transforms:
        hp = dict(t.args)
        changed = False
        for arg, spec in t.hparams.items():
            ns = f"{t.name}.{arg}"
            if ns in group:
                value = group[ns]
            elif spec.group_key is not None and spec.group_key in group:
                value = group[spec.group_key]
            else:
                continue
            if value is not t.args[arg]:
                changed = True
                if spec.check is not None:
                    value = checked(opt, (gi, t.name, arg), value, spec.check, f"param group {gi} ({t.name})", arg)
            hp[arg] = value
        if changed:
            t.check_hparams(f"param group {gi} ({t.name})", hp)
        out[t.name] = hp
    return out
