"""Lion_Prodigy_adv (adv_optm 2.2.3, spec §9.6): ``ac.optim.Lion_Prodigy_adv`` and the
``lion_prodigy_adv`` preset against the spec's formulas (§9.6 with Prodigy's statistics §2.3, the
cautious mask §9.2, ``clip_threshold`` §9.5, Lion-K §5.2, flattened OrthoGrad §3.1), written out
below in plain torch: adv-optm 2.2.3 is not among the pinned test peers (it cannot be installed
next to 2.5.16), so the formulas are the oracle (tests/test_lion_prodigy_factored.py also compares
against the real 2.2.3 where it is installed apart).

Precision. Prodigy's numerator ``<g, p0 - p>`` takes the difference of nearly equal weights: with
fp32 weights near 0.5 and Lion steps of ``d * lr = 1e-6`` the displacement is a few dozen ulps, so a
one-ulp difference in how a step is rounded changes ``d`` by ~1e-4 relative (and then the whole
trajectory). The exact comparison therefore runs on fp64 parameters (adv_chain keeps fp64 state
for them), where both sides agree to ~1e-8 in ``d``; an fp32 run is checked against the same
formulas with a tolerance that allows that conditioning.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import adv_chain as ac

SHAPES = [(6, 5), (6,), (3, 6), (2, 3, 2, 2), (7,)]  # a 4-D tensor for auto_kappa_p; the last starts at zero


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, shape in enumerate(SHAPES):
        p = torch.zeros(shape) if i == len(SHAPES) - 1 else torch.randn(shape, generator=gen) * 0.5
        out.append(p.to(dtype).requires_grad_())
    return out


_GEN = torch.Generator().manual_seed(1)
_TARGETS = [torch.randn(s, generator=_GEN) for s in SHAPES]
_WEIGHTS = [torch.rand(s, generator=_GEN) + 0.5 for s in SHAPES]


def set_grads(params: list[torch.Tensor], t: int) -> None:
    """A quadratic pull toward fixed targets plus a noise term fixed by the step number (computed in
    the parameters' dtype)."""
    gen = torch.Generator().manual_seed(100 + t)
    for p, target, w in zip(params, _TARGETS, _WEIGHTS):
        noise = torch.randn(p.shape, generator=gen)
        x = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        p.grad = (2 * w.to(x) * (x - target.to(x)) + 0.5 * noise.to(x)).to(p.dtype)


def smmf_round_trip(m: torch.Tensor) -> torch.Tensor:
    """``m`` as SMMF (spec §4.4) stores and rebuilds it: the ``d1 x d2`` matricization (``d2`` the
    largest divisor of N not above sqrt(N)), the rank-1 non-negative factorization of ``|M|`` (row
    sums r, column sums c: ``|M| ~ r c^T / sum(r)``), and one sign bit per element (``m > 0``);
    exact zeros stay zero (adv_chain's fix of B18; the oracle's gradients have none anyway)."""
    n = m.numel()
    d2 = max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)
    a = m.reshape(n // d2, d2).abs()
    r, c = a.sum(1), a.sum(0)
    rebuilt = torch.outer(r, c) / r.sum().clamp_min(1e-300)
    sign = torch.where(m.reshape(a.shape) > 0, 1.0, -1.0).to(m.dtype)
    return torch.where(m.reshape(a.shape) == 0, 0.0, sign * rebuilt).view_as(m)


class Reference:
    """Lion_Prodigy_adv per spec §9.6 / §2.3, one parameter at a time, fp64 arithmetic."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, cautious_wd=False,
                 orthogonal_gradient=False, cautious_mask=False, clip_threshold=0.0, kappa_p=1.0,
                 auto_kappa_p=False, beta3=None, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
                 safeguard_warmup=False, slice_p=11, prodigy_steps=0, d_limiter=True, nnmf_factor=False,
                 vector_reshape=False, **_ignored):
        self.params, self.lr, self.betas, self.wd = params, lr, betas, weight_decay
        self.factored = nnmf_factor
        self.vector_reshape = vector_reshape
        self.cautious_wd, self.ortho, self.cautious, self.clip = cautious_wd, orthogonal_gradient, cautious_mask, \
            clip_threshold
        self.kappa_p, self.auto, self.beta3, self.d0, self.d_coef = kappa_p, auto_kappa_p, beta3, d0, d_coef
        self.growth_rate, self.safeguard, self.slice_p = growth_rate, safeguard_warmup, slice_p
        self.prodigy_steps, self.d_limiter = prodigy_steps, d_limiter
        self.d = self.d_max = d0
        self.d_numerator, self.k = 0.0, 0
        self.state = []
        for p in params:
            flat = p.detach().double().flatten()[::slice_p]
            self.state.append({"m": torch.zeros(p.shape, dtype=torch.float64),
                               "s": torch.zeros_like(flat),
                               "p0": flat.clone() if bool(p.detach().any()) else torch.zeros((), dtype=torch.float64)})

    def _gradient(self, p, g):
        if self.clip > 0:
            norm = g.norm()
            if norm > self.clip:
                g = g * (self.clip / norm)
        if self.ortho:
            w, v = p.flatten(), g.flatten()
            rho = torch.dot(w, v) / (torch.dot(w, w) + 1e-30)
            o = v - rho * w
            g = (o * (v.norm() / (o.norm() + 1e-30))).view_as(g)
        return g

    def step(self):
        b1, b2 = self.betas
        beta3 = math.sqrt(b2) if self.beta3 is None else self.beta3
        d, d0, lr = self.d, self.d0, self.lr
        dlr = d * lr
        active = self.prodigy_steps <= 0 or self.k < self.prodigy_steps
        numerator, denom = self.d_numerator * beta3, 0.0
        for p, st in zip(self.params, self.state):
            p64 = p.detach().double()
            g = self._gradient(p64, p.grad.double())
            c = b1 * st["m"] + d * (1 - b1) * g
            st["m"] = b2 * st["m"] + d * (1 - b2) * g
            if self.factored and (p.dim() >= 2 or self.vector_reshape):
                st["m"] = smmf_round_trip(st["m"])  # stored as SMMF factors: next step reads it back
            kappa = (2.0 if p.dim() >= 4 else 1.0) if self.auto else self.kappa_p
            if kappa == 1.0:
                u = torch.sign(c)
            else:
                y = torch.sign(c) * c.abs() ** (kappa - 1)
                u = y * math.sqrt(y.numel()) / max(float(y.norm()), 1e-12)
            if self.cautious:
                phi = (u * g > 0).double()
                u = u * phi / max(float(phi.mean()), 1e-3)
            update = u * dlr
            if active:
                gs, ps = g.flatten()[::self.slice_p], p64.flatten()[::self.slice_p]
                numerator += (d / d0) * dlr * float(torch.dot(gs, st["p0"] - ps))
                st["s"] = beta3 * st["s"] + ((d / d0) * d if self.safeguard else (d / d0) * dlr) * gs
                denom += float(st["s"].abs().sum())
            new = p64
            if self.wd:
                mask = (update * new >= 0).double() if self.cautious_wd else 1.0
                new = new - self.wd * dlr * mask * new
            new = new - update
            with torch.no_grad():
                p.copy_(new)
        if active and denom > 0:
            d_hat = self.d_coef * numerator / denom
            if self.d_limiter:
                d_hat = min(d_hat, d * 2 ** 0.25)
            if d == d0:
                d = max(d, d_hat)
            self.d_max = max(self.d_max, d_hat)
            self.d = min(self.d_max, d * self.growth_rate)
            self.d_numerator = numerator
        self.k += 1


CONFIGS = {
    "defaults": dict(),
    "slice1-wd": dict(slice_p=1, d_limiter=False, weight_decay=0.1),
    "slice3-cautious-cwd": dict(slice_p=3, weight_decay=0.05, cautious_wd=True, cautious_mask=True),
    "slice3-kappa2": dict(slice_p=3, kappa_p=2.0, d_limiter=False),
    "slice1-kappa1.5-cautious-wd": dict(slice_p=1, kappa_p=1.5, cautious_mask=True, weight_decay=0.01, lr=0.5),
    "auto-kappa": dict(slice_p=3, auto_kappa_p=True, d_limiter=False, lr=2.0),
    "safeguard-growth-beta3": dict(slice_p=1, safeguard_warmup=True, growth_rate=1.05, d_coef=2.0, beta3=0.95,
                                   d_limiter=False),
    "prodigy-steps": dict(slice_p=3, prodigy_steps=8, d_limiter=False, weight_decay=0.1),
    "clip-orthograd-betas": dict(slice_p=1, clip_threshold=0.5, orthogonal_gradient=True, betas=(0.8, 0.95),
                                 d_limiter=False),
}


def _run_pair(kw, steps=25, dtype=torch.float64, rel=1e-7):
    """Run the drop-in and the formulas side by side; ``d`` after every step within ``rel``, every
    parameter within ``rel`` of the distance a coordinate can have moved so far (sum of d*lr), plus
    an ulp of the weights per step."""
    kw = dict(kw)
    lr = kw.pop("lr", 1.0)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = ac.optim.Lion_Prodigy_adv(ours, lr=lr, **kw)
    ref = Reference(theirs, lr=lr, **kw)
    ds, moved = [], 0.0
    for t in range(steps):
        set_grads(ours, t)
        set_grads(theirs, t)
        moved += ref.d * lr
        opt.step()
        ref.step()
        ds.append((float(opt.param_groups[0]["d"]), ref.d))
        assert ds[-1][0] == pytest.approx(ref.d, rel=rel), f"step {t + 1}: d = {ds[-1][0]!r}, formulas: {ref.d!r}"
        for a, b in zip(ours, theirs):
            err = (a.detach().double() - b.detach().double()).abs().max().item()
            ulp = torch.finfo(dtype).eps * b.detach().double().abs().max().item()
            assert err <= rel * moved + (t + 1) * ulp, (  # every step may round one ulp apart
                f"step {t + 1}: parameter {tuple(a.shape)} differs by {err:.3e} (moved up to {moved:.3e})")
    return opt, ref, ds


@pytest.mark.parametrize("kw", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_spec_formulas(kw):
    """Oracle: the formulas above, on fp64 parameters. d after every step within 1e-7 relative;
    parameters after every step within 1e-7 of the distance they can have moved."""
    _, ref, ds = _run_pair(kw)
    assert ds[-1][1] > 3e-6, "d never moved: the comparison would be vacuous"


FACTORED = {
    "factored-kappa2": dict(slice_p=3, kappa_p=2.0, d_limiter=False, nnmf_factor=True),
    "factored-auto-kappa-vector-reshape": dict(slice_p=3, auto_kappa_p=True, d_limiter=False, lr=2.0,
                                               nnmf_factor=True, vector_reshape=True),
    "factored-cautious-cwd": dict(slice_p=3, weight_decay=0.05, cautious_wd=True, cautious_mask=True,
                                  nnmf_factor=True),
    "factored-kappa1.5-cautious-clip-orthograd": dict(slice_p=1, kappa_p=1.5, cautious_mask=True, clip_threshold=0.5,
                                                      orthogonal_gradient=True, d_limiter=False, nnmf_factor=True),
}


@pytest.mark.parametrize("kw", list(FACTORED.values()), ids=list(FACTORED))
def test_factored_moment_with_lion_k_and_cautious_matches_spec_formulas(kw):
    """``nnmf_factor=True`` with Lion-K / the cautious mask: the formulas above with the moment
    stored as SMMF factors after each update (:func:`smmf_round_trip`), on fp64 parameters. The
    factors are kept in fp32, so d and the parameters are compared within 1e-5 relative; the factored
    formulas also end apart from the dense ones (the comparison is not vacuous)."""
    opt, ref, ds = _run_pair(kw, rel=1e-5)
    assert ds[-1][1] > 3e-6
    dense = {k: v for k, v in kw.items() if k not in ("nnmf_factor", "vector_reshape")}
    dense_ref = Reference(make_params(torch.float64), **dense)
    for t in range(25):
        set_grads(dense_ref.params, t)
        dense_ref.step()
    apart = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ref.params, dense_ref.params))
    assert apart > 1e-7, "factoring changed nothing"


@pytest.mark.parametrize("name", ["slice3-cautious-cwd", "slice1-kappa1.5-cautious-wd"])
def test_fp32_follows_spec_formulas(name):
    """Oracle: the same formulas on fp32 parameters (they round every step too), within the
    conditioning of Prodigy's numerator (module docstring): d within 1%, parameters within 1% of
    the distance moved."""
    _run_pair(CONFIGS[name], dtype=torch.float32, rel=1e-2)


def test_prodigy_steps_freezes_d():
    """After prodigy_steps the estimate stays where it was and the statistics are freed."""
    opt, _, ds = _run_pair(CONFIGS["prodigy-steps"], steps=14)
    assert ds[7][0] > ds[5][0]  # step 8 still adapts...
    assert all(d == ds[7][0] for d, _ in ds[8:])  # ...steps 9-14 keep its d
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["lion_prodigy/s"].numel() == 0 and opt.state[p]["lion_prodigy/p0"].numel() == 0


def test_group_d_before_and_after_first_step():
    params = make_params()
    opt = ac.optim.Lion_Prodigy_adv(params, d0=1e-5)
    assert float(opt.param_groups[0]["d"]) == 1e-5  # before any step, as the reference's groups
    set_grads(params, 0)
    opt.step()
    d = opt.param_groups[0]["d"]
    assert isinstance(d, torch.Tensor) and d.dim() == 0 and float(d) >= 1e-5
    assert torch.equal(opt.param_groups[0]["lion_prodigy/d"], d)


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kw", [CONFIGS["slice1-kappa1.5-cautious-wd"], CONFIGS["auto-kappa"]],
                         ids=["kappa-cautious", "auto-kappa"])
def test_checkpoint_resume_is_bit_identical(kw):
    """Oracle: the uninterrupted run. 10 steps, state_dict through torch.save/load, 10 more steps on a
    fresh optimizer: parameters, d and every state tensor equal bit for bit."""
    kw = dict(kw)
    lr = kw.pop("lr", 1.0)
    params = make_params()
    opt = ac.optim.Lion_Prodigy_adv(params, lr=lr, **kw)
    for t in range(10):
        set_grads(params, t)
        opt.step()
    sd = _save_load(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    ropt = ac.optim.Lion_Prodigy_adv(resumed, lr=lr, **kw)
    ropt.load_state_dict(sd)
    for t in range(10, 20):
        for ps, o in ((params, opt), (resumed, ropt)):
            set_grads(ps, t)
            o.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt.param_groups[0]["d"], ropt.param_groups[0]["d"])
    for a, b in zip(params, resumed):
        for key, value in opt.state[a].items():
            other = ropt.state[b][key]
            assert value.dtype == other.dtype and torch.equal(value, other), key


def test_bf16_params_stochastic_rounding():
    """bf16 weights: the state stays fp32, the weights stay bf16 and finite, the counter-based noise
    makes two runs identical, and the 20-step displacement follows the fp32 run's (steps of about
    half a bf16 spacing: round-to-nearest would drop most of them, the unbiased rounding keeps them).
    Prodigy's d is estimated from the rounded weights, so it is not the fp32 run's to the digit."""
    kw = dict(slice_p=1, d0=1e-3, weight_decay=0.01, cautious_mask=True, kappa_p=1.5)
    runs = []
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float32):
        params = make_params(dtype)
        start = [p.detach().float().clone() for p in params]
        opt = ac.optim.Lion_Prodigy_adv(params, lr=1.0, stochastic_rounding=True, **kw)
        for t in range(20):
            set_grads(params, t)
            opt.step()
        for p in params:
            assert p.dtype == dtype and torch.isfinite(p).all()
            for key, value in opt.state[p].items():
                if key != "step":
                    assert value.dtype == torch.float32, key
        runs.append(torch.cat([(p.detach().float() - s).flatten() for p, s in zip(params, start)]))
    assert torch.equal(runs[0], runs[1])
    bf16, fp32 = runs[0], runs[2]
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=0) > 0.95
    assert 0.7 < (bf16.abs().sum() / fp32.abs().sum()).item() < 1.3


def test_gradient_release_first_step_matches_step():
    """Per-parameter stepping (gradient release): the Lion-K norm and the cautious count come from
    the parameter's own whole tensor (not lagged), so the first step (d = d0 either way) is the
    step() one bit for bit."""
    kw = dict(slice_p=1, kappa_p=1.5, cautious_mask=True, weight_decay=0.1, cautious_wd=True)
    a, b = make_params(), make_params()
    opt_a = ac.optim.Lion_Prodigy_adv(a, **kw)
    opt_b = ac.optim.Lion_Prodigy_adv(b, **kw)
    set_grads(a, 0)
    set_grads(b, 0)
    opt_a.step()
    group = opt_b.param_groups[0]
    for i, p in enumerate(b):
        opt_b.step_parameter(p, group, i)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_preset_registry_and_aliases():
    assert "lion_prodigy_adv" in ac.presets.names()
    chain = ac.presets.get("LION_PRODIGY_ADV", cautious_mask=True, kappa_p=2.0, clip_threshold=1.0,
                           orthogonal_gradient="flattened", weight_decay=0.1, cautious_wd=True)
    assert chain.names == ("clip_by_tensor_norm", "orthograd", "lion_prodigy", "weight_decay", "apply")
    assert ac.chain_from_config(chain.to_json()) == chain
    assert ac.optim.Prodigy_Lion_Adv is ac.optim.Lion_Prodigy_adv is ac.optim.Lion_Prodigy_Adv
    defaults = ac.presets.keywords("lion_prodigy_adv")
    assert defaults["betas"] == (0.9, 0.99) and defaults["slice_p"] == 11 and defaults["d_limiter"] is True
    t = ac.lion_prodigy(kappa_p=1.5, cautious=True)
    assert repr(t) == "lion_prodigy(kappa_p=1.5, cautious=True)"
    assert t.with_args(slice_p=1).args["slice_p"] == 1 and ac.named("lp2", t).name == "lp2"


BAD = [
    (dict(kappa_p=0.5), ValueError, "kappa_p"),
    (dict(slice_p=0), ValueError, "slice_p"),
    (dict(slice_p=1.5), ValueError, "slice_p"),
    (dict(betas=(1.5, 0.99)), ValueError, r"betas\[0\]=1\.5"),
    (dict(beta3=2.0), ValueError, "beta3"),
    (dict(d0=0.0), ValueError, "d0"),
    (dict(d_coef=-1.0), ValueError, "d_coef"),
    (dict(growth_rate=0.0), ValueError, "growth_rate"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(clip_threshold=-1.0), ValueError, "clip_threshold"),
    (dict(prodigy_steps=-1), ValueError, "prodigy_steps"),
    (dict(orthogonal_gradient="sideways"), ValueError, "orthogonal_gradient"),
    (dict(cautious_mask="yes"), ValueError, "cautious_mask"),
    (dict(lr=-1.0), ValueError, "lr"),
    # nnmf_factor with Lion-K / cautious_mask works (tests/test_lion_prodigy_factored.py); bad flags are refused
    (dict(nnmf_factor="yes", kappa_p=1.5), ValueError, "nnmf_factor"),
    (dict(auto_kappa_p="yes", nnmf_factor=True), ValueError, "auto_kappa_p"),
    (dict(fsdp_in_use="yes"), ValueError, "fsdp_in_use"),
]


@pytest.mark.parametrize("kw, error, word", BAD, ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in BAD])
def test_bad_keywords_are_clear_errors(kw, error, word):
    """Each bad value is refused at construction, naming the keyword (and, for a ValueError, the
    value and what is allowed)."""
    with pytest.raises(error, match=word) as info:
        ac.optim.Lion_Prodigy_adv(make_params(), **kw)
    if error is ValueError and "betas" not in kw:
        assert repr(next(iter(kw.values()))) in str(info.value)


def test_fsdp_in_use_sums_across_ranks_and_needs_a_process_group():
    """``fsdp_in_use=True`` is the transform's ``sum_across_ranks`` (printed, round-tripped through its
    config); in one process without a process group the first step is a ValueError naming the flag,
    raised before anything moves. The 2-rank behaviour: tests/distributed/test_prodigy_fsdp_in_use.py."""
    chain = ac.presets.lion_prodigy_adv(fsdp_in_use=True, kappa_p=2.0)
    assert "sum_across_ranks=True" in repr(chain) and ac.chain_from_config(chain.to_config()) == chain
    params = make_params()
    before = copy.deepcopy([p.detach() for p in params])
    opt = ac.optim.Lion_Prodigy_adv(params, fsdp_in_use=True)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="fsdp_in_use.*init_process_group"):
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q) and not opt.state[p]["lion_prodigy/s"].any()
    assert float(opt.param_groups[0]["d"]) == 1e-6


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="eps"):
        ac.presets.get("lion_prodigy_adv", eps=1e-8)
    with pytest.raises(TypeError):
        ac.optim.Lion_Prodigy_adv(make_params(), eps=1e-8)


def test_lr_zero_dry_step_moves_nothing():
    """A dry step (zero grads, lr = 0, as before loading a distributed checkpoint) creates the state
    and changes neither the parameters nor d."""
    params = make_params()
    before = copy.deepcopy([p.detach() for p in params])
    opt = ac.optim.Lion_Prodigy_adv(params, lr=0.0, cautious_mask=True, kappa_p=2.0, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
        assert {"lion_prodigy/exp_avg", "lion_prodigy/s", "lion_prodigy/p0", "lion_prodigy/scale"} <= set(opt.state[p])
    assert float(opt.param_groups[0]["d"]) == 1e-6


def test_loads_a_reference_layout_checkpoint():
    """A checkpoint in adv_optm's layout (spec §2.3/§9.6: per parameter ``exp_avg``, ``s``, ``p0`` and
    its ``factored`` flag; ``d``, ``d_max``, ``d_numerator``, ``k`` in the param groups) maps onto
    this chain's keys, and the run continues from it. (Built by hand: adv-optm 2.2.3 is not installed.)"""
    params = make_params()
    gen = torch.Generator().manual_seed(5)
    state = {}
    for i, p in enumerate(params):
        flat = p.detach().flatten()[::11]
        p0 = flat.clone() if bool(p.any()) else torch.zeros(())
        state[i] = {"step": torch.tensor(3.0), "factored": False, "exp_avg": torch.randn(p.shape, generator=gen),
                    "s": torch.randn(flat.shape, generator=gen), "p0": p0}
    group = {"params": list(range(len(params))), "lr": 1.0, "betas": (0.9, 0.99), "weight_decay": 0.0,
             "compiled_optimizer": False, "d": 2e-5, "d_max": 3e-5, "d_numerator": 0.25, "k": 3}
    opt = ac.optim.Lion_Prodigy_adv(params)
    opt.load_state_dict({"state": state, "param_groups": [group]})
    g = opt.param_groups[0]
    assert float(g["lion_prodigy/d"]) == 2e-5 and float(g["lion_prodigy/d_max"]) == 3e-5
    for i, p in enumerate(params):
        for key in ("exp_avg", "s", "p0"):
            assert torch.equal(opt.state[p][f"lion_prodigy/{key}"], state[i][key]), key
    set_grads(params, 0)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params) and float(g["d"]) >= 2e-5


def test_nnmf_factor_stores_the_moment_factored_and_trains():
    """``nnmf_factor=True``: Lion's moment is kept as SMMF row/column factors plus packed signs
    around the global transform (Prodigy's ``s``/``p0`` stay dense); ``d`` adapts and a regression
    still learns; a saved run resumes bit-identically."""
    torch.manual_seed(0)
    x, w_true = torch.randn(64, 8), torch.randn(8, 4)
    y = x @ w_true

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model = torch.nn.Linear(8, 4)
    opt = ac.optim.Lion_Prodigy_adv(model.parameters(), lr=1.0, nnmf_factor=True, d_limiter=False)
    loss0 = torch.nn.functional.mse_loss(model(x), y).item()
    run(model, opt, 60)  # dense: 10.2 -> 2.8 in 60 steps, factored 3.7
    keys = set(opt.state[model.weight])
    assert {"lion_prodigy/exp_avg:row", "lion_prodigy/exp_avg:col", "lion_prodigy/exp_avg:sign"} <= keys
    assert "lion_prodigy/exp_avg" not in keys and "lion_prodigy/s" in keys
    assert float(opt.param_groups[0]["d"]) > 1e-6
    assert torch.nn.functional.mse_loss(model(x), y).item() < 0.5 * loss0
    twin = copy.deepcopy(model)
    twin_opt = ac.optim.Lion_Prodigy_adv(twin.parameters(), lr=1.0, nnmf_factor=True, d_limiter=False)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, 5)
    run(twin, twin_opt, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
