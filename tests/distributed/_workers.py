"""What each rank runs (spawned by _harness.spawn): DDP, FSDP2 and DCP checks over many presets in
one process group. Each returns ``{case id: result or error text}``; the tests assert on them."""
from __future__ import annotations

from typing import Any

import torch

import adv_chain as ac
from _harness import full_params, guarded, make_net, make_opt, max_diff, shard, train, train_averaged

STEPS = 6  # ranger's lookahead synchronizes on step 6
Case = tuple  # (case id, preset name or chain config, keywords)


def reference(name: Any, kw: dict[str, Any], dtype: torch.dtype = torch.float32, steps: int = STEPS,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """The single-process run every distributed run must reproduce (full batches)."""
    model = make_net(dtype, seed)
    train(model, make_opt(model.parameters(), name, kw), steps)
    return full_params(model)


# -- DDP -----------------------------------------------------------------------------------------
def ddp_case(rank: int, name: Any, kw: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    """DDP over half batches per rank: (max |p - p of one process averaging the halves' gradients|,
    this rank's params)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_net())
    train(model, make_opt(model.parameters(), name, kw), STEPS, rank=rank)
    mine = full_params(model.module)
    ref = make_net()
    train_averaged(ref, make_opt(ref.parameters(), name, kw), STEPS)
    return max_diff(mine, full_params(ref)), mine


# -- FSDP2 ---------------------------------------------------------------------------------------
def _state_layout_error(opt: ac.ChainOptimizer, model: torch.nn.Module) -> str | None:
    """State laid out like its parameter is a DTensor with the parameter's placements; state built
    from the whole parameter and per-tensor scalars are plain (replicated) tensors."""
    from torch.distributed.tensor import DTensor

    for gi, group in enumerate(opt.param_groups):
        hps = opt._resolve_all(group, gi)
        for p in group["params"]:
            specs = opt._specs(p, hps, group)
            for key, v in opt.state[p].items():
                spec = specs.get(key)
                laid_out = spec is not None and spec.build is None and not spec.scalar
                if laid_out != isinstance(v, DTensor):
                    return f"state {key!r} of a sharded parameter is a {type(v).__name__}"
                if laid_out and (v.shape != p.shape or tuple(v.placements) != tuple(p.placements)):
                    return f"state {key!r}: {tuple(v.shape)} {v.placements} vs param {tuple(p.shape)} {p.placements}"
    return None


def fsdp2_case(name: Any, kw: dict[str, Any], dtype: torch.dtype = torch.float32) -> Any:
    """FSDP2 (fully_shard) with the same full batch on every rank, so the sharded gradients equal the
    single-process ones: max |p - single-process p| over the gathered params (or an error text)."""
    model = shard(make_net(dtype))
    opt = make_opt(model.parameters(), name, kw)
    train(model, opt, STEPS)
    return _state_layout_error(opt, model) or max_diff(full_params(model), reference(name, kw, dtype))


# -- DCP -----------------------------------------------------------------------------------------
def dcp_roundtrip(name: Any, kw: dict[str, Any], path: str, sharded: bool, dtype: torch.dtype = torch.float32,
                  steps: int = 3) -> str | None:
    """Train, save model + optimizer with DCP (get_*_state_dict), train on (the uninterrupted run). A
    fresh model + optimizer from another seed: get_optimizer_state_dict (its dry step must allocate
    every key and move nothing), dcp.load, set_*_state_dict, train on: bit-identical to the
    uninterrupted run, state dtypes kept. Returns None when it passes, else what went wrong."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    def build(seed: int) -> tuple[torch.nn.Module, ac.ChainOptimizer]:
        model = make_net(dtype, seed)
        if sharded:
            shard(model)
        return model, make_opt(model.parameters(), name, kw)

    model, opt = build(0)
    train(model, opt, steps)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    train(model, opt, steps, start=steps)
    expected = full_params(model)

    fresh, fresh_opt = build(1)
    before = full_params(fresh)
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    moved = [k for k, v in full_params(fresh).items() if not torch.equal(v, before[k])]
    if moved:
        return f"the dry step moved {moved}"
    for p, q in zip(model.parameters(), fresh.parameters()):
        if set(opt.state[p]) != set(fresh_opt.state[q]):
            return f"the dry step allocated {sorted(fresh_opt.state[q])}, training {sorted(opt.state[p])}"
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    for p, q in zip(model.parameters(), fresh.parameters()):
        for k, v in opt.state[p].items():
            if fresh_opt.state[q][k].dtype != v.dtype:
                return f"state {k!r} loaded as {fresh_opt.state[q][k].dtype}, saved as {v.dtype}"
    train(fresh, fresh_opt, steps, start=steps)
    got = full_params(fresh)
    diff = [k for k in expected if not torch.equal(expected[k], got[k])]
    return f"resumed run differs from the uninterrupted one in {diff} (max {max_diff(expected, got):.2e})" if diff else None


def gradient_release_error(name: Any, kw: dict[str, Any]) -> str:
    """step_parameter (gradient release) on sharded parameters: the error message."""
    model = shard(make_net())
    opt = make_opt(model.parameters(), name, kw)
    torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 1)).backward()
    try:
        opt.step_parameter(model.fc1.weight, opt.param_groups[0])
    except NotImplementedError as ex:
        return repr(ex)
    return "step_parameter raised nothing"


def nonfinite_on_one_rank(rank: int, name: Any, kw: dict[str, Any]) -> str:
    """A NaN in rank 0's shard only: every rank must raise (none may go on into the next collective)
    and leave its parameters and state as they were; with nonfinite="skip" every rank skips."""
    from adv_chain._core.guard import NonFiniteGradientError

    model = shard(make_net())
    opt = make_opt(model.parameters(), name, kw)
    train(model, opt, 1)
    before = {k: v.clone() for k, v in full_params(model).items()}
    torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 1)).backward()
    if rank == 0:
        model.fc1.weight.grad.to_local().view(-1)[0] = float("nan")
    try:
        opt.step()
        return "step raised nothing"
    except NonFiniteGradientError as ex:
        message = str(ex)
    if any(not torch.equal(before[k], v) for k, v in full_params(model).items()):
        return "parameters changed"
    opt.nonfinite = "skip"
    opt.step()
    if opt.nonfinite_steps != 1:
        return f"nonfinite_steps={opt.nonfinite_steps}"
    return message


# -- one spawn for the whole suite -----------------------------------------------------------------
def suite(rank: int, world: int, plan: dict[str, list[Case]], root: str) -> dict[str, dict[str, Any]]:
    """Every section of ``plan`` ("ddp", "fsdp2", "fsdp2_bf16", "dcp_fsdp2", "errors") on its cases."""
    runners = {
        "ddp": lambda cid, name, kw: ddp_case(rank, name, kw),
        "fsdp2": lambda cid, name, kw: fsdp2_case(name, kw),
        "fsdp2_bf16": lambda cid, name, kw: fsdp2_case(name, kw, torch.bfloat16),
        "dcp_fsdp2": lambda cid, name, kw: dcp_roundtrip(name, kw, f"{root}/{cid}", sharded=True),
        "errors": lambda cid, name, kw: (nonfinite_on_one_rank(rank, name, kw) if cid == "nonfinite"
                                         else gradient_release_error(name, kw)),
    }
    return {section: {cid: guarded(lambda: runners[section](cid, name, kw)) for cid, name, kw in cases}
            for section, cases in plan.items()}
