"""Checkpoints written by the optimizers the drop-ins stand in for.

A drop-in's ``load_state_dict`` accepts the ``state_dict`` of its peer (``torch.optim.AdamW`` for
``ac.optim.AdamW``, adv-optm 2.5.16's ``AdamW_adv`` for ``ac.optim.AdamW_adv``...): each saved key
``k`` becomes the one state key of this chain that ends in ``"/k"`` (``exp_avg`` ->
``adam/exp_avg``), the step counter becomes adv_chain's, and a global transform's group state
(Prodigy's ``d``, ``d_max``, ``d_numerator``, ``k``) moves under its namespaced group keys. The
mapping must be unambiguous and the writer must be one whose stored numbers mean what this chain's
do; anything else (another library's layout, adv-optm's factored state, optimi's debiased moments) is
refused with a message that says what was found, and nothing is loaded.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

#: writers, most specific first: (label, test on the saved param groups and per-parameter states)
_WRITERS: list[tuple[str, Callable[[list[Mapping[str, Any]], list[Mapping[str, Any]]], bool]]] = [
    ("torch-optimi", lambda groups, states: any("kahan_sum" in g for g in groups)),
    ("prodigyopt", lambda groups, states: any("d_denom" in g or "d_hat" in g for g in groups)),
    ("adv_optm", lambda groups, states: any("factored" in s for s in states)
     or any("compiled_optimizer" in g for g in groups)),
    ("torch.optim", lambda groups, states: any("differentiable" in g for g in groups)),
    # lion-pytorch: the bare Lion defaults and nothing but exp_avg in the state
    ("lion_pytorch", lambda groups, states: all(set(g) <= _LION_GROUP for g in groups)
     and all(set(s) <= {"exp_avg"} for s in states)),
]
_LION_GROUP = {"params", "lr", "betas", "weight_decay", "decoupled_weight_decay", "use_triton", "initial_lr"}
_FLAGS = ("factored", "factored_2nd")  # adv-optm's per-parameter layout flags: only False converts


def is_foreign(state_dict: Mapping[str, Any]) -> bool:
    """True for a checkpoint not written by adv_chain (state keys without a transform namespace)."""
    return any(k != "step" and "/" not in k for st in state_dict.get("state", {}).values() for k in st)


def writer_of(state_dict: Mapping[str, Any]) -> str | None:
    groups, states = state_dict.get("param_groups", []), list(state_dict.get("state", {}).values())
    return next((label for label, test in _WRITERS if test(groups, states)), None)


def convert(opt: Any, state_dict: Mapping[str, Any], accepted: tuple[str, ...]) -> dict[str, Any]:
    """The peer's ``state_dict`` in adv_chain's layout for ``opt`` (a new dict; the input is untouched)."""
    owner = type(opt).__name__
    writer = writer_of(state_dict)
    if writer not in accepted:
        found = f"it looks written by {writer}" if writer else "its writer is not recognized"
        hint = (" (torch-optimi keeps debiased moments, which mean something else than this chain's)"
                if writer == "torch-optimi" else "")
        raise ValueError(f"{owner}.load_state_dict: this checkpoint was not written by adv_chain and {found}{hint}; "
                         f"{owner} converts checkpoints of {', '.join(accepted) if accepted else 'no other library'}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{owner}.load_state_dict: the checkpoint has {len(saved_groups)} param groups, the "
                         f"optimizer has {len(opt.param_groups)}")
    groups, where = [], {}
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{owner}.load_state_dict: param group {gi} has {len(saved['params'])} params in the "
                             f"checkpoint and {len(group['params'])} in the optimizer")
        new_group = dict(saved)
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        hps = opt._resolve_all(merged, gi)
        for t in opt.chain.transforms:  # global state (Prodigy's d) under its namespaced group keys
            for key in t.group_state(hps[t.name]):
                if key in saved:
                    new_group[f"{t.name}/{key}"] = saved[key]
        groups.append(new_group)
        for sid, p in zip(saved["params"], group["params"]):
            where[sid] = (gi, p, merged, hps)
    state: dict[Any, dict[str, Any]] = {}
    for sid, st in state_dict["state"].items():
        if sid not in where:
            continue
        gi, p, merged, hps = where[sid]
        ours = set(opt._specs(p, hps, merged))
        # a peer that keeps no counter (torch's SGD, lion-pytorch) has taken at least one step; nothing in
        # their chains depends on the count beyond "not the first step"
        out: dict[str, Any] = {"step": torch.tensor(float(st.get("step", 1)), dtype=torch.float32)}
        for key, value in st.items():
            if key == "step":
                continue
            if key in _FLAGS:
                if value:
                    raise ValueError(f"{owner}.load_state_dict: parameter {sid} is stored {key}=True by {writer} "
                                     "(compressed state); convert from a checkpoint without nnmf_factor/factored_2nd")
                continue
            matches = sorted(k for k in ours if k.rpartition("/")[2] == key)
            if len(matches) != 1:
                raise ValueError(f"{owner}.load_state_dict: parameter {sid}: the {writer} key {key!r} "
                                 + (f"could be any of {matches}" if matches else
                                    f"has no counterpart in this chain's state {sorted(ours)}")
                                 + "; the checkpoint and the optimizer's options differ")
            out[matches[0]] = value
        state[sid] = out
    return {"state": state, "param_groups": groups}
