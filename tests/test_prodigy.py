"""Prodigy (arXiv 2306.06101): ``ac.optim.Prodigy`` against prodigyopt 1.1.2, ``ac.optim.Prodigy_adv``
against adv-optm 2.5.16, bug B2 fixed, checkpoints, gradient release.

Tolerances. Prodigy's ``d`` is ill-conditioned in its first steps: the numerator is ``<g, p0 - p>``
with ``p0 - p`` a few ulps of ``p``, so one ulp anywhere changes ``d`` and, ``d`` being a running
maximum, the whole trajectory. The oracle for "equal up to rounding" is therefore prodigyopt against
itself with its parameters moved by one ulp after the first step (``_self_sensitivity``): adv_chain
must stay within a small multiple of that, and within 1e-6 where the reference itself is that stable.
"""
from __future__ import annotations

import copy
import io

import adv_optm  # the peers are pinned in the test extra: missing one is an error, not a skip
import prodigyopt
import pytest
import torch

import adv_chain as ac


_GEN = torch.Generator().manual_seed(1)
_X = torch.randn(128, 16, generator=_GEN)
_Y = _X @ (0.5 * torch.randn(4, 16, generator=_GEN)).T + 0.1 * torch.randn(128, 4, generator=_GEN)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _loss_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(_X), _Y).backward()
    opt.step()


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _schedule(opt: torch.optim.Optimizer, sched: bool) -> torch.optim.lr_scheduler.LRScheduler | None:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)) if sched else None


def _self_sensitivity(make_ref, steps: int, sched: bool) -> float:
    """How far the reference drifts from itself when its parameters move by one ulp after step 1."""
    a, b = make_model(), make_model()
    oa, ob = make_ref(a), make_ref(b)
    sa, sb = _schedule(oa, sched), _schedule(ob, sched)
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            _loss_step(m, o)
            if s is not None:
                s.step()
        if t == 0:
            with torch.no_grad():
                for p in b.parameters():
                    p.copy_(torch.nextafter(p, p + torch.randn(p.shape, generator=gen)))
    return _max_diff(a, b)


PRODIGY_CASES = [
    pytest.param({}, False, 1.0, id="defaults"),
    pytest.param({}, True, 1.0, id="lr-scheduler"),
    pytest.param(dict(weight_decay=0.1), False, 1.0, id="decoupled-wd"),
    pytest.param(dict(weight_decay=0.1, decouple=False), False, 1.0, id="coupled-wd"),
    pytest.param(dict(use_bias_correction=True), False, 1.0, id="bias-correction"),
    pytest.param(dict(safeguard_warmup=True), False, 0.5, id="safeguard-warmup"),
    pytest.param(dict(d_coef=0.5, growth_rate=1.05), False, 1.0, id="d_coef-growth_rate"),
    pytest.param(dict(slice_p=2), False, 1.0, id="slice_p-2"),
    pytest.param(dict(betas=(0.0, 0.99), beta3=0.9), False, 1.0, id="beta1-0-beta3"),
]


@pytest.mark.parametrize("kw, sched, lr", PRODIGY_CASES)
def test_prodigy_matches_prodigyopt(kw, sched, lr):
    """Oracle: prodigyopt.Prodigy, 100 fp32 steps; ``group["d"]`` compared after every step."""
    steps = 100
    ref_model, model = make_model(), make_model()
    ref = prodigyopt.Prodigy(ref_model.parameters(), lr=lr, **kw)
    opt = ac.optim.Prodigy(model.parameters(), lr=lr, **kw)
    ref_s, s = _schedule(ref, sched), _schedule(opt, sched)
    worst_d = 0.0
    for _ in range(steps):
        _loss_step(ref_model, ref)
        _loss_step(model, opt)
        if sched:
            ref_s.step()
            s.step()
        for g_ref, g in zip(ref.param_groups, opt.param_groups):
            worst_d = max(worst_d, abs(float(g["d"]) - g_ref["d"]) / g_ref["d"])
    sensitivity = _self_sensitivity(lambda m: prodigyopt.Prodigy(m.parameters(), lr=lr, **kw), steps, sched)
    diff = _max_diff(ref_model, model)
    assert worst_d <= 1e-5, f"d differs by {worst_d:.2e} (relative)"
    assert diff <= max(1e-6, 4 * sensitivity), f"params differ by {diff:.2e}; prodigyopt vs itself +1ulp: {sensitivity:.2e}"


def test_prodigy_first_steps_exact():
    """Oracle: prodigyopt. Before rounding differences can matter (first 3 steps, defaults), the
    parameters agree to 1e-7 and d to 1e-6 relative."""
    ref_model, model = make_model(), make_model()
    ref = prodigyopt.Prodigy(ref_model.parameters())
    opt = ac.optim.Prodigy(model.parameters())
    for _ in range(3):
        _loss_step(ref_model, ref)
        _loss_step(model, opt)
        assert _max_diff(ref_model, model) <= 1e-7
        assert abs(float(opt.param_groups[0]["d"]) / ref.param_groups[0]["d"] - 1) <= 1e-6


def test_prodigy_lr_zero_step_is_noop():
    """Oracle: prodigyopt. A step at lr=0 (warm-up from 0) changes no parameter, no moment and not d."""
    model = make_model()
    before = copy.deepcopy(model)
    opt = ac.optim.Prodigy(model.parameters(), weight_decay=0.1)
    for g in opt.param_groups:
        g["lr"] = 0.0
    _loss_step(model, opt)
    assert _max_diff(before, model) == 0.0
    assert float(opt.param_groups[0]["d"]) == 1e-6
    assert all(float(v.abs().sum()) == 0 for st in opt.state.values() for k, v in st.items() if k.endswith("exp_avg"))


ADV_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param(dict(weight_decay=0.1, slice_p=1), id="wd-slice1"),
    pytest.param(dict(weight_decay=0.1, cautious_wd=True), id="cautious_wd"),
    pytest.param(dict(use_atan2=True), id="atan2"),
    pytest.param(dict(orthogonal_gradient="flattened", weight_decay=0.01), id="orthograd"),
    pytest.param(dict(d_limiter=True, d_coef=2.0, growth_rate=1.1), id="d_limiter"),
    pytest.param(dict(safeguard_warmup=True, beta3=0.99), id="safeguard"),
]


@pytest.mark.parametrize("kw", ADV_CASES)
def test_prodigy_adv_matches_adv_optm(kw):
    """Oracle: adv_optm.Prodigy_adv 2.5.16, 50 fp32 steps (stochastic rounding is a no-op on fp32)."""
    steps = 50
    ref_model, model = make_model(), make_model()
    ref = adv_optm.Prodigy_adv(ref_model.parameters(), **kw)
    opt = ac.optim.Prodigy_adv(model.parameters(), **kw)
    for _ in range(steps):
        _loss_step(ref_model, ref)
        _loss_step(model, opt)
        if "orthogonal_gradient" not in kw:  # orthograd's dot products are summed in fp64 here (not
            # bit-equal): d is then only as close as the sensitivity bound below allows
            assert abs(float(opt.param_groups[0]["d"]) / ref.param_groups[0]["d"] - 1) <= 1e-4
    sensitivity = _self_sensitivity(lambda m: adv_optm.Prodigy_adv(m.parameters(), **kw), steps, False)
    diff = _max_diff(ref_model, model)
    assert diff <= max(1e-5, 4 * sensitivity), f"params differ by {diff:.2e}; adv_optm vs itself +1ulp: {sensitivity:.2e}"


def test_nesterov_b2_fixed():
    """adv_optm's B2: its nesterov mixes the raw gradient into the d-scaled momentum, so the first
    step moves by ~(1-b1)/sqrt(1-b2)*lr = 3.16. Fixed here: the gradient term carries d, so the first
    step is the same size as without nesterov (~d0 * 3.16), and equals (c*m + (1-c)*d*g)/(sqrt(v)+d*eps)*d*lr."""
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(64))
    p = torch.nn.Parameter(p_ref.detach().clone())
    g = torch.randn(64)
    ref = adv_optm.Prodigy_adv([p_ref], nesterov=True, slice_p=1)
    opt = ac.optim.Prodigy_adv([p], nesterov=True, slice_p=1)
    start = p.detach().clone()
    p_ref.grad, p.grad = g.clone(), g.clone()
    ref.step()
    opt.step()
    assert (p_ref - start).abs().max() > 1.0  # the reference's bug
    d, b1, b2, eps = 1e-6, 0.9, 0.999, 1e-8
    m, v = d * (1 - b1) * g, d * d * (1 - b2) * g * g
    expected = start - d * (b1 * m + (1 - b1) * d * g) / (v.sqrt() + d * eps)
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-6)
    assert (p - start).abs().max() < 1e-5


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls, kw", [(ac.optim.Prodigy, dict(weight_decay=0.01, use_bias_correction=True)),
                                     (ac.optim.Prodigy_adv, dict(weight_decay=0.01, use_atan2=True))])
def test_checkpoint_resume_bit_identical(cls, kw):
    """Oracle: the uninterrupted run. Save after 10 steps, load into a fresh optimizer, continue both
    10 steps: parameters and d are bit-identical (d, d_max, d_numerator, k live in the param groups)."""
    model = make_model()
    opt = cls(model.parameters(), **kw)
    for _ in range(10):
        _loss_step(model, opt)
    sd = _save_load(opt.state_dict())
    resumed = make_model()
    resumed.load_state_dict(model.state_dict())
    ropt = cls(resumed.parameters(), **kw)
    ropt.load_state_dict(sd)
    for _ in range(10):
        _loss_step(model, opt)
        _loss_step(resumed, ropt)
    assert _max_diff(model, resumed) == 0.0
    assert float(opt.param_groups[0]["d"]) == float(ropt.param_groups[0]["d"])


def test_gradient_release_runs_lagged():
    """Under gradient release d is estimated one round late; it still grows, training works, and
    every group mirrors the same d."""
    model = make_model()
    opt = ac.optim.Prodigy(model.parameters(), gradient_release=True)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()  # steps inside backward
        losses.append(loss.item())
    assert float(opt.param_groups[0]["d"]) > 1e-4
    assert losses[-1] < 0.5 * losses[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="d0"):
        ac.prodigy(d0=0.0)
    with pytest.raises(ValueError, match="slice_p"):
        ac.prodigy(slice_p=0)
    with pytest.raises(ValueError, match="sum_across_ranks=1"):
        ac.prodigy(sum_across_ranks=1)
    with pytest.raises(ValueError, match="fsdp_in_use='yes'"):
        ac.optim.Prodigy(make_model().parameters(), fsdp_in_use="yes")
    # the other reference keywords (storage, K-beta, fisher/centered decay): tests/test_prodigy_adv_features.py
    with pytest.raises(ValueError, match="fsdp_in_use=1"):
        ac.optim.Prodigy_adv(make_model().parameters(), fsdp_in_use=1)


@pytest.mark.parametrize("cls", [ac.optim.Prodigy, ac.optim.Prodigy_adv])
def test_fsdp_in_use_sums_across_ranks_and_needs_a_process_group(cls):
    """``fsdp_in_use=True`` is the transform's ``sum_across_ranks`` (printed, round-tripped through the
    chain's config); in one process without a process group the first step is a ValueError naming
    the flag, raised before the statistics, moments or parameters move (prodigyopt fails there too,
    in its all-reduce). The 2-rank behaviour: tests/distributed/test_prodigy_fsdp_in_use.py."""
    t = ac.prodigy(sum_across_ranks=True)
    assert repr(t) == "prodigy(sum_across_ranks=True)"
    assert ac.chain_from_config(ac.chain(t).to_config())["prodigy"] == t
    model = make_model()
    before = copy.deepcopy(model)
    opt = cls(model.parameters(), fsdp_in_use=True)
    assert ac.chain_from_config(opt.chain.to_config()) == opt.chain
    assert any(x.args.get("sum_across_ranks") for x in opt.chain.all_transforms)
    model(_X).square().mean().backward()
    with pytest.raises(ValueError, match="fsdp_in_use=True.*init_process_group"):
        opt.step()
    assert _max_diff(model, before) == 0.0
    for p in model.parameters():
        assert all(not v.any() for k, v in opt.state[p].items() if k.endswith(("/s", "exp_avg", "exp_avg_sq")))
    assert float(opt.param_groups[0]["d"]) == 1e-6
