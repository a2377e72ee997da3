"""Guards run before a step changes anything: non-finite gradients, and state that must follow a
parameter moved to another device.

``ChainOptimizer(..., nonfinite=...)`` chooses what a NaN or infinite gradient does:

* ``"raise"`` (default): :class:`NonFiniteGradientError` naming the parameter (index, name when the
  optimizer was given ``named_parameters()``, shape, group); no step counter advances, no state and
  no parameter changes, so training can go on after the caller handles it.
* ``"skip"``: the whole step is skipped (as ``torch.amp.GradScaler`` does) and counted in
  ``optimizer.nonfinite_steps``; the state is untouched.
* ``"off"``: no check (no extra pass over the gradients, no device sync): NaN flows into the state.

The check is one sum per gradient (one read of the gradients; a sum that overflowed although every
element is finite is cleared by an exact re-check) and one device-to-host sync per step (per
parameter under gradient release): the price of knowing before anything is written. On the 27.8M
set it costs about 3 ms of a 40 ms AdamW step on one CPU thread; ``"off"`` removes both.
"""
from __future__ import annotations

from typing import Any

import torch

from . import distributed

NONFINITE = ("raise", "skip", "off")


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or inf; the step was not taken and the optimizer is unchanged."""


def param_label(opt: Any, p: torch.Tensor, gi: int) -> str:
    group = opt.param_groups[gi]
    label = f"parameter {opt._param_index[p]}"
    names = group.get("param_names")
    if names is not None:
        for q, name in zip(group["params"], names):
            if q is p:
                label += f" {name!r}"
                break
    return f"{label} (shape {tuple(p.shape)}, param group {gi})"


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if distributed.is_sharded(g) else g


def gradients_finite(opt: Any, todo: list[tuple[int, list[torch.Tensor], Any]]) -> bool:
    """``todo``: ``(group index, params with a gradient, ...)``. True when every gradient is finite;
    otherwise raise or (``nonfinite="skip"``) count the step and return False. With FSDP2 (DTensor
    gradients) each rank screens its shards and the ranks agree through one all-reduce, so all of
    them raise or skip together."""
    if opt.nonfinite == "off":
        return True
    entries = [(gi, p) for gi, params, *_ in todo for p in params]
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, p) in enumerate(entries):
        if _local(p.grad).numel():
            by_device.setdefault(_local(p.grad).device, []).append(k)
    bad: list[int] = []
    for ks in by_device.values():
        # a plain sum per gradient is the cheapest exact screen CPU kernels offer (one read, about as
        # fast as any elementwise op): it is non-finite whenever an element is; a sum that only
        # overflowed (elements near 3e38 / numel) is cleared by the exact re-check below
        sums = torch.stack([_local(entries[k][1].grad).sum(dtype=torch.float32) for k in ks])
        flagged = ~torch.isfinite(sums)
        if bool(flagged.any()):  # the one device sync of the check
            bad += [k for k, f in zip(ks, flagged.tolist())
                    if f and not bool(torch.isfinite(_local(entries[k][1].grad)).all())]
    meshes = {id(p.grad.device_mesh): p.grad.device_mesh for _, p in entries if distributed.is_sharded(p.grad)}
    if meshes:
        count = torch.tensor(len(bad), device=next(iter(meshes.values())).device_type)
        for mesh in meshes.values():
            for dim in range(mesh.ndim):
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM, group=mesh.get_group(dim))
        total = int(count)
    else:
        total = len(bad)
    if total == 0:
        return True
    if opt.nonfinite == "skip":
        opt.nonfinite_steps += 1
        return False
    where = (f"the gradient of {param_label(opt, entries[bad[0]][1], entries[bad[0]][0])}" if bad
             else "a gradient shard on another rank")
    raise NonFiniteGradientError(
        f"ChainOptimizer: {where} holds NaN or inf" + (f" ({total} tensors in all)" if total > 1 else "")
        + "; the step was not taken and the optimizer state is unchanged. Pass nonfinite='skip' to "
          "skip such steps (counted in optimizer.nonfinite_steps) or nonfinite='off' to run no check")


def follow_device(opt: Any, p: torch.Tensor) -> None:
    """Move the state of ``p`` to the device ``p`` lives on now (``model.to(device)`` after the
    optimizer was built); the step counter stays a CPU tensor."""
    state = opt.state[p]
    for key, value in state.items():
        if key != "step" and isinstance(value, torch.Tensor) and value.device != p.device:
            state[key] = value.to(p.device)
