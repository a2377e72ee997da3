"""``fsdp_in_use=True`` of the Prodigy drop-ins on 2 CPU ranks (gloo): FSDP1 / ZeRO sharding emulated by
hand. Each parameter of a small model is flattened and cut in two; each rank's optimizer steps plain
tensors, its part of every parameter with the matching part of the gradient (the same batch on both
ranks, so the gradient is the one-process one), and the parts are gathered after each step for the
next forward. Oracle: the same optimizer in one process on the whole parameters.

The cut is at a multiple of 11 (the adv presets' ``slice_p``), so each shard's every-11th elements
are the whole tensor's; the 4-element bias leaves rank 1 an empty shard. Prodigy's sums are then
the one-process sums added in another order: the runs agree to fp32 rounding.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

import adv_chain as ac

from _harness import spawn

STEPS = 10
SLICE = 11
TOL = 1e-6
CASES = {"prodigy": ("Prodigy", dict(weight_decay=0.01)),
         "prodigy_adv": ("Prodigy_adv", dict(weight_decay=0.01, cautious_wd=True)),
         "lion_prodigy_adv": ("Lion_Prodigy_adv", dict(weight_decay=0.01)),
         "prodigy-gradient_release": ("Prodigy", dict(weight_decay=0.01))}

_GEN = torch.Generator().manual_seed(1)
_X = torch.randn(64, 16, generator=_GEN)
_Y = _X @ (0.5 * torch.randn(4, 16, generator=_GEN)).T + 0.1 * torch.randn(64, 4, generator=_GEN)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _cuts(model: torch.nn.Module, rank: int | None) -> list[slice]:
    """Rank's part of each flattened parameter (``None``: the whole)."""
    out = []
    for p in model.parameters():
        n = p.numel()
        cut = min(n, math.ceil(n / 2 / SLICE) * SLICE)
        out.append(slice(0, n) if rank is None else (slice(0, cut) if rank == 0 else slice(cut, n)))
    return out


def _run(make_opt, rank: int | None, release: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """``STEPS`` steps on rank's shards (``None``: one process, whole parameters): the final flat
    parameters (whole, gathered) and ``d`` after each step."""
    import torch.distributed as dist

    model = _model()
    cuts = _cuts(model, rank)
    shards = [torch.nn.Parameter(p.detach().reshape(-1)[c].clone()) for p, c in zip(model.parameters(), cuts)]
    opt = make_opt(shards)
    ds = []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(_X), _Y).backward()
        for q, p, c in zip(shards, model.parameters(), cuts):
            q.grad = p.grad.reshape(-1)[c].clone()
        if release:  # gradient release: one parameter at a time, in the same order on every rank
            for q in shards:
                opt.step_parameter(q, opt.param_groups[0])
        else:
            opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
        with torch.no_grad():  # gather the parts for the next forward (zeros elsewhere: exact sums)
            for q, p, c in zip(shards, model.parameters(), cuts):
                flat = torch.zeros(p.numel())
                flat[c] = q
                if rank is not None:
                    dist.all_reduce(flat)
                p.copy_(flat.view_as(p))
    return [p.detach().reshape(-1).clone() for p in model.parameters()], ds


def _drop_in(case: str, fsdp_in_use: bool):
    cls_name, kw = CASES[case]
    return lambda params: getattr(ac.optim, cls_name)(params, fsdp_in_use=fsdp_in_use, **kw)


def _prodigyopt(params, fsdp_in_use: bool):
    import prodigyopt  # the peer, as an oracle

    return prodigyopt.Prodigy(params, weight_decay=0.01, fsdp_in_use=fsdp_in_use)


def _worker(rank: int, world: int) -> dict:
    from _harness import make_net, shard

    torch.set_num_threads(1)
    out = {}
    for case in CASES:
        release = case.endswith("gradient_release")
        out[case] = {"one": _run(_drop_in(case, False), None, release),
                     "sharded": _run(_drop_in(case, True), rank, release)}
    out["prodigy-without-flag"] = _run(_drop_in("prodigy", False), rank)
    # prodigyopt 1.1.2 builds its all-reduce buffer with .cuda(): on these CPU ranks it stays on the CPU
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        out["prodigyopt"] = {"one": _run(lambda ps: _prodigyopt(ps, False), None),
                             "sharded": _run(lambda ps: _prodigyopt(ps, True), rank)}
    # FSDP2: DTensor parameters are summed over whole tensors already; the flag is refused
    net = shard(make_net())
    opt = ac.optim.Prodigy(net.parameters(), fsdp_in_use=True)
    net(torch.randn(4, 8)).square().mean().backward()
    try:
        opt.step()
        out["fsdp2"] = None
    except ValueError as ex:
        out["fsdp2"] = str(ex)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(_worker, timeout=120)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_run_matches_one_process(results, case):
    """Each rank's parts (gathered) equal the one-process parameters within 1e-6, and every rank's
    ``d`` is the one-process ``d`` (relative 1e-6; the same bits on both ranks) after every step;
    ``d`` moved. Under gradient release (one parameter at a time, the same order on every rank)
    too, where both runs estimate ``d`` one step lagged."""
    for rank, r in enumerate(results):
        (want, want_d), (got, got_d) = r[case]["one"], r[case]["sharded"]
        assert _max_diff(got, want) <= TOL, f"rank {rank}: max |sharded - one process| = {_max_diff(got, want):.3e}"
        assert _rel(got_d, want_d) <= 1e-6, f"rank {rank}: d {got_d} vs one process {want_d}"
        assert want_d[-1] > 1.5 * want_d[0] > 0  # (Lion_Prodigy_adv's d_limiter: at most 2^(1/4) a step)
    assert results[0][case]["sharded"][1] == results[1][case]["sharded"][1]  # the ranks' d: the same bits


def test_without_fsdp_in_use_each_rank_has_its_own_d(results):
    """Why the flag exists: without it each rank estimates ``d`` from its own shards only, so the
    ranks disagree with each other and with one process, far beyond the rounding the flag leaves
    (here by ~2e-4 relative against ~1e-7: halves of the same random layers have alike ratios of
    sums; shards holding different layers would differ more)."""
    want_d = results[0]["prodigy"]["one"][1]
    flag_gap = max(_rel(r["prodigy"]["sharded"][1], want_d) for r in results)
    d0, d1 = (r["prodigy-without-flag"][1] for r in results)
    assert min(_rel(d0, want_d), _rel(d1, want_d)) > max(1e-5, 100 * flag_gap)
    assert abs(d0[-1] - d1[-1]) > 1e-5 * want_d[-1]


def test_prodigyopt_fsdp_in_use_agrees(results):
    """prodigyopt 1.1.2 with ``fsdp_in_use=True`` on the same shards gives its one-process result
    too, and ac.optim.Prodigy's sharded run stays as close to it as the one-process runs are."""
    for rank, r in enumerate(results):
        (ref, ref_d), (ref_sharded, ref_sharded_d) = r["prodigyopt"]["one"], r["prodigyopt"]["sharded"]
        ours, ours_d = r["prodigy"]["sharded"]
        assert _max_diff(ref_sharded, ref) <= TOL and _rel(ref_sharded_d, ref_d) <= 1e-6, f"rank {rank}"
        one_gap = _max_diff(r["prodigy"]["one"][0], ref)
        assert _max_diff(ours, ref_sharded) <= max(TOL, 2 * one_gap), f"rank {rank}"
        assert _rel(ours_d, ref_sharded_d) <= 1e-5, f"rank {rank}: d {ours_d} vs prodigyopt {ref_sharded_d}"


def test_fsdp2_dtensor_parameters_refuse_the_flag(results):
    """On FSDP2 DTensors adv_chain's sums are over whole tensors already: a second sum would count
    them once per rank, so ``fsdp_in_use=True`` is a ValueError that says to leave it False."""
    for rank, message in enumerate(r["fsdp2"] for r in results):
        assert message is not None and "DTensor" in message and "fsdp_in_use=False" in message, f"rank {rank}"
