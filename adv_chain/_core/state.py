"""Per-parameter state: allocation with declared dtypes, and checkpoint loading that keeps them.

torch's ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype
(fp32 moments of bf16 weights become bf16, uint8 bits become bf16). The optimizer lets torch load
the param groups, then puts back copies of the saved tensors with their own dtypes.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from .distributed import full_tensor, is_sharded
from .transform import StateSpec, Transform

STATE_DTYPES = ("fp32", "param")


def state_specs(transforms: Iterable[Transform], p: torch.Tensor,
                hps: Mapping[str, Mapping[str, Any]]) -> dict[str, StateSpec]:
    """Every state key of a chain for one parameter: ``"<transform>/<key>"`` -> spec (with those of
    the nested transforms that act on it, see :meth:`Transform.nested_for`)."""
    out: dict[str, StateSpec] = {}
    for t in transforms:
        out.update((f"{t.name}/{key}", spec) for key, spec in t.state_specs(p, hps[t.name]).items())
        out.update(state_specs(t.nested_for(hps[t.name]), p, hps))
    return out


def resolve_dtype(spec: StateSpec, p: torch.Tensor, policy: str) -> torch.dtype:
    """A spec's storage dtype: explicit, the parameter's, or the optimizer's policy for moments
    (``"fp32"``: at least fp32, so fp64 parameters keep fp64 state; ``"param"``: torch's behaviour)."""
    if isinstance(spec.dtype, torch.dtype):
        return spec.dtype
    if spec.dtype == "param" or policy == "param":
        return p.dtype
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def allocate_state(state: dict[str, Any], p: torch.Tensor, specs: Mapping[str, StateSpec], policy: str) -> None:
    """Create the missing keys of ``state`` (laid out like ``p``) and its CPU ``"step"`` counter."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    for key, spec in specs.items():
        if key in state:
            continue
        dtype = resolve_dtype(spec, p, policy)
        if spec.build is not None:
            state[key] = spec.build(full_tensor(p.detach()))  # a DTensor's whole tensor
        elif spec.scalar:
            state[key] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif spec.init == "param":
            state[key] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(p.detach())
        else:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def match_checkpoint(state_dict: Mapping[str, Any], param_groups: list[dict[str, Any]],
                     expected_keys: Callable[[torch.Tensor, Mapping[str, Any], int], set[str]],
                     strict: bool) -> tuple[dict[Any, dict[str, Any]], dict[Any, torch.Tensor]]:
    """Map saved state to the current params (through the saved groups' order, as torch does) and
    check its keys against this chain. Returns the state to load and the saved-id -> param map."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"load_state_dict: the checkpoint has {len(saved_groups)} param groups, the optimizer "
                         f"has {len(param_groups)}")
    id_to_param: dict[Any, torch.Tensor] = {}
    id_to_group: dict[Any, int] = {}
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"load_state_dict: param group {gi} has {len(saved['params'])} params in the "
                             f"checkpoint and {len(group['params'])} in the optimizer")
        for sid, p in zip(saved["params"], group["params"]):
            id_to_param[sid] = p
            id_to_group[sid] = gi
    kept: dict[Any, dict[str, Any]] = {}
    for sid, st in state_dict["state"].items():
        p = id_to_param.get(sid)
        if p is None:
            continue
        gi = id_to_group[sid]
        merged = {**param_groups[gi], **{k: v for k, v in saved_groups[gi].items() if k != "params"}}
        expected = expected_keys(p, merged, gi)
        extra, missing = set(st) - expected, expected - set(st)
        if strict and (extra or missing):
            raise ValueError(
                f"load_state_dict: the checkpoint was written by a different chain: parameter {sid} has keys "
                f"{sorted(extra)} this chain does not use and lacks {sorted(missing)}; pass strict=False to "
                "load the keys both chains share and initialize the rest")
        kept[sid] = {k: v for k, v in st.items() if k in expected}
    return kept, id_to_param


def restore_saved_state(state: dict[torch.Tensor, dict[str, Any]], kept: Mapping[Any, Mapping[str, Any]],
                        id_to_param: Mapping[Any, torch.Tensor]) -> None:
    """Replace what torch loaded by copies of the saved tensors in their own dtypes (copies: training
    on never mutates the caller's state_dict), laid out like their parameter."""
    for sid, st in kept.items():
        p = id_to_param[sid]
        restored = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                if k == "step":
                    v = v.detach().to(device="cpu", dtype=torch.float32, copy=True)
                elif v.shape == p.shape and v.stride() != p.stride() and is_sharded(v) == is_sharded(p):
                    v = torch.empty_like(p, dtype=v.dtype, memory_format=torch.preserve_format).copy_(v)
                else:
                    v = v.detach().to(device=p.device, copy=True)
            restored[k] = v
        state[p] = restored
