"""ac.optim.AdamW_adv against the installed adv-optm 2.5.16 (2.5.16 keywords) and against the spec's
§9 formulas (legacy 2.2.3 keywords), fp32, 50 steps with a scheduler."""
import adv_optm
import pytest
import torch

import adv_chain as ac


def _train(make, steps=50, legacy_oracle=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3))
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, cycle_momentum=False)
    x, y = torch.randn(64, 10), torch.randn(64, 3)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


CASES_2_5_16 = [
    {},
    {"weight_decay": 0.1},
    {"use_atan2": True},
    {"orthogonal_gradient": "flattened"},
    {"cautious_wd": True, "weight_decay": 0.1},
    {"use_bias_correction": False},
    {"betas": (0.0, 0.99)},
    {"eps": 1e-6, "betas": (0.8, 0.95)},
    {"use_atan2": True, "orthogonal_gradient": "flattened", "weight_decay": 0.1, "cautious_wd": True},
    {"nesterov": True},
    {"nesterov": True, "nesterov_coef": 0.5, "use_atan2": True},
    {"kourkoutas_beta": True},
    {"kourkoutas_beta": True, "k_warmup_steps": 10, "beta2_min": 0.8, "ema_alpha": 0.9},
    {"kourkoutas_beta": True, "orthogonal_gradient": "flattened", "weight_decay": 0.1},
    # more cases of these two in tests/test_orthograd_iterative_normed.py
    {"orthogonal_gradient": "iterative", "weight_decay": 0.1},
    {"normed_momentum": True, "use_atan2": True},
    # more cases of these in tests/test_decay_family.py
    {"centered_wd": 1.0, "centered_wd_mode": "int4", "cautious_wd": True, "weight_decay": 0.1},
    {"fisher_wd": True, "weight_decay": 0.5, "centered_wd": 1.0, "centered_wd_mode": "int8"},
    {"fisher_wd": True, "use_atan2": True, "weight_decay": 0.5},
    {"eps": None},  # the scale-invariant epsilon 1/sqrt(N) per tensor
    {"normed_momentum": True, "eps": None},
    {"fisher_wd": True, "eps": None, "weight_decay": 0.5},
    {"normed_momentum": True, "fisher_wd": True, "weight_decay": 0.5},
    {"normed_momentum": True, "use_atan2": True, "fisher_wd": True, "weight_decay": 0.5},
    {"normed_momentum": True, "fisher_wd": True, "eps": None, "weight_decay": 0.5, "centered_wd": 1.0},
    {"eps": None, "betas": (0.8, 0.95), "weight_decay": 0.1, "orthogonal_gradient": "flattened"},
]


@pytest.mark.parametrize("kwargs", CASES_2_5_16, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_adamw_adv_matches_adv_optm_2_5_16(kwargs):
    ref = _train(lambda p: adv_optm.AdamW_adv(p, lr=1e-2, **kwargs))
    ours = _train(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, **kwargs))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def _legacy_oracle(params, steps_grads, lr, betas=(0.9, 0.999), eps=1e-8, cautious_mask=False, grams_moment=False,
                   use_AdEMAMix=False, beta3=0.9999, alpha=5.0):
    """Spec §2.1 with §9.1-§9.3 (legacy AdamW_adv), per tensor, written from the formulas."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    params = [p.clone() for p in params]
    for t, grads in enumerate(steps_grads, start=1):
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for i, g in enumerate(grads):
            v[i] = b2 * v[i] + (1 - b2) * g * g
            d = v[i].sqrt() / bc2 ** 0.5 + eps
            m[i] = b1 * m[i] + (1 - b1) * g
            num = m[i]
            if grams_moment:
                num = m[i].abs() * g.sign()
            elif cautious_mask:
                phi = (m[i] * g > 0).float()
                num = m[i] * phi / max(phi.mean().item(), 1e-3)
            if use_AdEMAMix:
                m2[i] = beta3 * m2[i] + (1 - beta3) * g
                num = num + alpha * m2[i]
            params[i] = params[i] - lr / bc1 * num / d
    return params


@pytest.mark.parametrize("legacy", [{"cautious_mask": True}, {"grams_moment": True}, {"use_AdEMAMix": True, "alpha": 2.0}])
def test_legacy_keywords_follow_the_spec_formulas(legacy):
    torch.manual_seed(0)
    shapes = [(6, 5), (5,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(20)]
    opt = ac.optim.AdamW_adv(params, lr=1e-2, stochastic_rounding=False, **legacy)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    expected = _legacy_oracle(start, grads, 1e-2, **legacy)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-5, rtol=0)


def test_grams_wins_over_cautious_with_a_warning_and_a_hand_chain_refuses_both():
    with pytest.warns(UserWarning, match="Grams takes precedence"):
        chain = ac.presets.adamw_adv(cautious_mask=True, grams_moment=True)
    assert "grams" in chain.names and "cautious" not in chain.names
    with pytest.raises(ValueError, match="grams.*cautious|cautious.*grams"):
        ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.grams(), ac.cautious(), ac.apply())


def test_ablation_ergonomics():
    variant = ac.presets.adamw_adv(cautious_mask=True).replace("cautious", ac.grams())
    assert variant.names == ("adam", "eps_divide", "grams", "weight_decay", "apply")
    assert "grams()" in repr(variant)


def test_preset_lookup_ignores_case_and_aliases_exist():
    assert ac.presets.get("ADAMW_ADV", use_atan2=True) == ac.presets.adamw_adv(use_atan2=True)
    assert ac.optim.Adam_Adv is ac.optim.AdamW_adv


def test_legacy_bool_orthogonal_gradient_works():
    assert ac.presets.adamw_adv(orthogonal_gradient=True) == ac.presets.adamw_adv(orthogonal_gradient="flattened")
    assert "orthograd" not in ac.presets.adamw_adv(orthogonal_gradient=False).names


LION_CASES = [{}, {"weight_decay": 0.1}, {"cautious_wd": True, "weight_decay": 0.1},
              {"orthogonal_gradient": "flattened"}, {"orthogonal_gradient": "iterative"}, {"betas": (0.8, 0.95)}]


@pytest.mark.parametrize("kwargs", LION_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_lion_adv_matches_adv_optm_2_5_16(kwargs):
    ref = _train(lambda p: adv_optm.Lion_adv(p, lr=1e-3, **kwargs))
    ours = _train(lambda p: ac.optim.Lion_adv(p, lr=1e-3, **kwargs))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_lion_adv_loads_its_own_state_dict():
    """adv-optm 2.5.16's Lion_adv fails here (KeyError: 'actual_state_precision'); ours round-trips."""
    model = torch.nn.Linear(4, 2)
    opt = ac.optim.Lion_adv(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    fresh = ac.optim.Lion_adv(model.parameters(), lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[model.weight]["lion/exp_avg"], opt.state[model.weight]["lion/exp_avg"])


def test_legacy_lion_cautious_mask_follows_the_spec():
    """Spec §9.2, Lion family: mask between the post-sign update and g, mean rescale."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40))
    start = p.detach().clone()
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(40, generator=gen) for _ in range(10)]
    opt = ac.optim.Lion_adv([p], lr=1e-2, cautious_mask=True, stochastic_rounding=False)
    m, w = torch.zeros(40), start.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        u = (0.9 * m + 0.1 * g).sign()
        m = 0.99 * m + 0.01 * g
        phi = (u * g > 0).float()
        w = w - 1e-2 * u * phi / max(phi.mean().item(), 1e-3)
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)


ADOPT_CASES = [({}, 1e-2), ({"weight_decay": 0.1}, 1e-2), ({"use_atan2": True}, 1e-2),
               ({"cautious_wd": True, "weight_decay": 0.1}, 1e-2), ({"clip_lambda": None}, 1e-2),
               ({"betas": (0.0, 0.99)}, 1e-3),
               ({"fisher_wd": True, "weight_decay": 0.5}, 1e-2),
               ({"fisher_wd": True, "use_atan2": True, "weight_decay": 0.5}, 1e-2),
               # fisher + strong wd + strong centered wd amplifies 1-ulp differences chaotically on this
               # model (1e-4 after 50 steps, 1e-2 after 40): moderate strengths are compared instead
               ({"fisher_wd": True, "weight_decay": 0.1, "centered_wd": 0.1, "centered_wd_mode": "int8"}, 1e-2),
               ({"kourkoutas_beta": True}, 1e-2),
               ({"kourkoutas_beta": True, "k_warmup_steps": 10, "use_atan2": True}, 1e-2),
               ({"kourkoutas_beta": True, "fisher_wd": True, "weight_decay": 0.1, "beta2_min": 0.8}, 1e-2)]


@pytest.mark.parametrize("kwargs, lr", ADOPT_CASES, ids=lambda c: str(c))
def test_adopt_adv_matches_adv_optm_2_5_16(kwargs, lr):
    def train(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 3))
        opt = make(model.parameters())
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=50, cycle_momentum=False)
        x, y = torch.randn(64, 10), torch.randn(64, 3)
        for _ in range(50):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
            sched.step()
        return list(model.parameters())
    ref = train(lambda p: adv_optm.Adopt_adv(p, lr=lr, **kwargs))
    ours = train(lambda p: ac.optim.Adopt_adv(p, lr=lr, **kwargs))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [0, -1])
def test_scale_by_adopt_follows_the_adopt_formulas(offset):
    """arXiv 2411.02853 (offset 0: clip (t)^(1/4) with t counting the init step) and adv_optm's
    shifted clip (offset -1); step 1 only initializes v and writes nothing, not even decay."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(30))
    start = p.detach().clone()
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(30, generator=gen) * (1 + 3 * (i == 2)) for i in range(8)]
    chain = ac.chain(ac.scale_by_adopt(betas=(0.9, 0.99), eps=1e-6, clip_step_offset=offset), ac.weight_decay(0.5),
                     ac.apply())
    opt = ac.ChainOptimizer([p], chain, lr=1e-2)
    w, m, v = start.clone(), torch.zeros(30), None
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        if t == 1:
            v = g * g
            assert torch.equal(p.detach(), start)
            continue
        lam = (t + offset) ** 0.25
        n = (g / (v.sqrt() + 1e-6)).clamp(-lam, lam)
        m = 0.9 * m + 0.1 * n
        v = 0.99 * v + 0.01 * g * g
        w = w * (1 - 1e-2 * 0.5) - 1e-2 * m
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"beta1_warmup": 6, "min_beta1": 0.9},
                                    {"use_bias_correction": False}])
def test_simplified_ademamix_follows_the_spec_formulas(kwargs):
    """Spec §9.4 (adv_optm 2.2.3's Simplified_AdEMAMix), written out per step."""
    import math
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    w = p.detach().clone()
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(50, generator=gen) for _ in range(12)]
    lr, (b1, b2), eps, alpha, wd = 1e-2, (0.99, 0.999), 1e-8, 100.0, kwargs.get("weight_decay", 0.0)
    warm, min_b1 = kwargs.get("beta1_warmup"), kwargs.get("min_beta1", 0.9)
    correct = kwargs.get("use_bias_correction", True)
    opt = ac.optim.Simplified_AdEMAMix([p], lr=lr, stochastic_rounding=False, **kwargs)
    m, v, s1, s2 = torch.zeros(50), torch.zeros(50), 0.0, 0.0

    def f(b):
        return math.log(0.5) / math.log(b) - 1

    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        b1t = b1 if warm is None or t >= warm else 0.5 ** (1 / (1 + (1 - t / warm) * f(min_b1) + t / warm * f(b1)))
        s1, s2 = (b1t * s1 + 1, b2 * s2 + (1 - b2)) if correct else (1.0, 1.0)
        eta = lr / ((1 - b1t ** t) / (1 - b1t) + alpha)
        m = b1t * m + g
        v = b2 * v + (1 - b2) * g * g
        update = (m + alpha * g) / (v.sqrt() + math.sqrt(s2) * eps) * eta * math.sqrt(s2 / s1)
        w = w - eta * wd * w - update
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("warmup", [0, 3])
def test_kourkoutas_beta_paper_mode_follows_the_formulas(warmup):
    """arXiv 2508.12996 (kbeta): current-step layer norm, EMA before the ratio, sunspike, hold-warmup;
    layers = one tensor each; Adam's v uses the layer's beta2, bias correction stays 1 - beta2_max^t."""
    import math
    torch.manual_seed(0)
    shapes = [(6, 5), (5,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, generator=gen) * (1 + 4 * (t == 4)) for s in shapes] for t in range(8)]
    b2min, b2max, alpha, tiny, lr = 0.88, 0.999, 0.93, 1e-9, 1e-2
    chain = ac.chain(ac.kourkoutas_beta(beta2_min=b2min, beta2_max=b2max, ema_alpha=alpha, warmup=warmup),
                     ac.scale_by_adam(betas=(0.9, b2max)), ac.eps_divide(1e-8), ac.apply())
    opt = ac.ChainOptimizer(params, chain, lr=lr)
    w = [s.clone() for s in start]
    m = [torch.zeros(s) for s in shapes]
    v = [torch.zeros(s) for s in shapes]
    r = [0.0 for _ in shapes]
    for t, step_grads in enumerate(grads, start=1):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            n = g.norm().item()
            r[i] = alpha * r[i] + (1 - alpha) * n
            ratio = n / (r[i] + tiny)
            beta2 = b2max - (b2max - b2min) * ratio / (1 + ratio)
            if t <= warmup:
                beta2 = 0.5 * (b2min + b2max)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            w[i] = w[i] - lr * (m[i] / (1 - 0.9 ** t)) / ((v[i] / (1 - b2max ** t)).sqrt() + 1e-8)
    for p, e in zip(params, w):
        torch.testing.assert_close(p.detach(), e, atol=1e-5, rtol=0)
    assert math.isclose(float(opt.state[params[1]]["kourkoutas/r_ema"]), r[1], rel_tol=1e-5)


def test_kourkoutas_after_the_moment_it_feeds_is_a_build_error():
    with pytest.raises(ValueError, match="kourkoutas.*beta2.*no later transform consumes"):
        ac.chain(ac.scale_by_adam(), ac.kourkoutas_beta(), ac.eps_divide(), ac.apply())


def test_adopt_nesterov_mixes_the_normalized_gradient_bug_b3_fixed():
    """u = c*m + (1-c)*n with n = clamp(g / (sqrt(v_prev) + eps)); adv-optm mixes in the raw g (B3)."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = ac.optim.Adopt_adv([p], lr=0.1, nesterov=True, nesterov_coef=0.7, stochastic_rounding=False)
    w, v, m = w0.clone(), None, torch.zeros(4, 3)
    for c, g in enumerate(grads):  # c: the reference's 0-based call counter
        p.grad = g.clone()
        opt.step()
        if v is None:
            v = g * g  # the first call only initializes v
            continue
        n = (g / (v.sqrt() + 1e-6)).clamp(-c ** 0.25, c ** 0.25)
        m = 0.9 * m + 0.1 * n
        w = w - 0.1 * (0.7 * m + 0.3 * n)
        v = 0.9999 * v + 0.0001 * g * g
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)
    q = torch.nn.Parameter(w0.clone())
    ref = adv_optm.Adopt_adv([q], lr=0.1, nesterov=True, nesterov_coef=0.7)
    for g in grads:
        q.grad = g.clone()
        ref.step()
    assert (q.detach() - p.detach()).abs().max() > 1e-2  # the reference's raw-gradient mix differs
