"""The sign family: Lion_adv's Lion-K / stochastic sign / legacy clip, SignSGD_adv, SinkSGD_adv, and the
never-released freeze_on_flip / l1_adaptive.

Oracles: adv-optm 2.5.16 itself for every deterministic path (fp32, 50 steps with a scheduler, the
protocol of test_parity_adv_optm.py), hand-written formulas of adv_optm_spec.md for the paths the spec
does not mark verified (SNR conditioning, geometric WD, Sinkhorn), statistics for the stochastic sign,
and small hand-computed cases for the ideas that have no released reference.
"""
import math

import adv_optm
import pytest
import torch
from test_parity_adv_optm import _train

import adv_chain as ac

TOL = 2e-6


def _train_conv(make, steps=50):
    """_train's protocol on a model with a 4-D conv weight (Lion-K's auto kappa, Sinkhorn's matrix view)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(96, 3))
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, cycle_momentum=False)
    x, y = torch.randn(16, 3, 6, 6), torch.randn(16, 3)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _ids(case):
    return ",".join(f"{k}={v}" for k, v in case[1].items()) or "defaults"


PARITY = [
    # Lion_adv (spec §2.4 [V]) with Lion-K (§5.2)
    ("Lion_adv", {"kappa_p": 2.0}, _train), ("Lion_adv", {"kappa_p": 1.5, "weight_decay": 0.1}, _train),
    ("Lion_adv", {"kappa_p": 3.0, "orthogonal_gradient": "flattened"}, _train),
    ("Lion_adv", {"auto_kappa_p": True, "weight_decay": 0.1}, _train_conv),
    ("Lion_adv", {"kappa_p": 2.0, "nnmf_factor": True}, _train),
    # SignSGD_adv (§2.5, [V] default/nesterov path). Its constructor takes ~1.5 s: few cases
    ("SignSGD_adv", {}, _train),
    ("SignSGD_adv", {"nesterov": True, "nesterov_coef": 0.5, "cautious_wd": True, "weight_decay": 0.1}, _train),
    # deterministic, not marked verified by the spec (normed momentum, SNR, geometric WD): also matched
    ("SignSGD_adv", {"normed_momentum": True, "nesterov": True, "snr_cond": True, "geometric_wd": True,
                     "weight_decay": 0.1}, _train),
    # SinkSGD_adv (§2.6, [V] momentum path; §5.5 [V])
    ("SinkSGD_adv", {}, _train), ("SinkSGD_adv", {"momentum": 0.9}, _train),
    ("SinkSGD_adv", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, _train),
    ("SinkSGD_adv", {"momentum": 0.9, "sinkhorn_iterations": 2}, _train_conv),
    ("SinkSGD_adv", {"orthogonal_sinkhorn": True}, _train),
    ("SinkSGD_adv", {"momentum": 0.9, "nnmf_factor": True}, _train),
    ("SinkSGD_adv", {"momentum": 0.9, "normed_momentum": True, "nesterov": True}, _train),
    ("SinkSGD_adv", {"momentum": 0.9, "normed_momentum": True, "snr_cond": True, "geometric_wd": True,
                     "weight_decay": 0.1}, _train),
    ("SinkSGD_adv", {"geometric_wd": True, "weight_decay": 0.1, "cautious_wd": True}, _train_conv),
]


@pytest.mark.parametrize("case", PARITY, ids=lambda c: f"{c[0]}-{_ids(c)}-{c[2].__name__}")
def test_matches_adv_optm_2_5_16(case):
    cls, kwargs, train = case
    ref = train(lambda p: getattr(adv_optm, cls)(p, lr=1e-3, **kwargs))
    ours = train(lambda p: getattr(ac.optim, cls)(p, lr=1e-3, **kwargs))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)


# -- hand-written oracles from the spec's formulas -------------------------------------------------------
def _sinkhorn_oracle(x, iters):
    """§5.5 on one matrix, slice by slice in plain loops."""
    x = x.clone()
    m, n = x.shape
    order = (0, 1) if m > n else (1, 0)  # 0: per-column norms (over rows)
    for _ in range(iters):
        for d in order:
            size = x.shape[d]
            norms = x.norm(dim=d, keepdim=True).clamp_min(1 / math.sqrt(size))
            x = x * math.sqrt(size) / norms
    return x


def test_sinkhorn_follows_the_formula_and_ends_with_unit_rms_slices():
    torch.manual_seed(0)
    g = {(7, 3): torch.randn(7, 3), (3, 7): torch.randn(3, 7), "v": torch.randn(5)}
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(7, 3), (3, 7), (5,)]]
    opt = ac.ChainOptimizer(params, ac.chain(ac.sinkhorn(iterations=4), ac.apply()), lr=1.0)
    for p, x in zip(params, g.values()):
        p.grad = x.clone()
    opt.step()
    for p, (key, x) in zip(params, g.items()):
        u = -p.detach()
        if key == "v":
            assert torch.equal(u, x.sign())
            continue
        torch.testing.assert_close(u, _sinkhorn_oracle(x, 4), atol=1e-6, rtol=0)
        last = 1 if key[0] > key[1] else 0  # the dimension normalized last: those slices have RMS 1
        torch.testing.assert_close(u.square().mean(dim=last), torch.ones(u.shape[1 - last]), atol=1e-5, rtol=0)
        assert torch.equal(p.grad, x)  # the user's gradient is not written


def test_signsgd_normed_snr_geometric_follow_the_spec_formulas():
    """§2.5 + §5.4 + §7.5 (normed momentum, Nesterov with SNR recovery, SNR conditioning, geometric WD)."""
    torch.manual_seed(1)
    shapes = [(5, 4), (4,)]
    start = [torch.randn(s) for s in shapes]
    params = [torch.nn.Parameter(s.clone()) for s in start]
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]
    lr, beta, c, wd = 1e-2, 0.8, 0.6, 0.3
    opt = ac.optim.SignSGD_adv(params, lr=lr, momentum=beta, nesterov=True, nesterov_coef=c, normed_momentum=True,
                               snr_cond=True, geometric_wd=True, weight_decay=wd, stochastic_rounding=False)
    w, m = [s.clone() for s in start], [torch.zeros(s) for s in shapes]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step):
            x = g.sign()
            d = (1 - m[i] ** 2).clamp_min(1e-30).sqrt()
            q = m[i].abs() * x
            m[i] = beta * m[i] + (1 - beta) * x
            u = torch.atan2((1 - c) * q + c * m[i], d)
            t = torch.atan2(w[i].sign(), d)
            t = t * w[i].norm() / max(t.norm().item(), 1 / math.sqrt(w[i].numel()))
            w[i] = w[i] - lr * wd * t - lr * 4 / math.pi * u
    for p, e in zip(params, w):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=0)


def test_sinksgd_snr_and_structural_decay_follow_the_spec_formulas():
    """§2.6 (normed momentum, row/column SNR conditioning) + §7.5 (structural scaler for matrices)."""
    torch.manual_seed(2)
    start = torch.randn(6, 4)
    p = torch.nn.Parameter(start.clone())
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(10)]
    lr, beta, wd = 1e-2, 0.9, 0.2
    opt = ac.optim.SinkSGD_adv([p], lr=lr, momentum=beta, normed_momentum=True, snr_cond=True, geometric_wd=True,
                               weight_decay=wd, sinkhorn_iterations=3, stochastic_rounding=False)
    w, b = start.clone(), torch.zeros(6, 4)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        x = _sinkhorn_oracle(g, 3)
        r = (1 - (b ** 2).mean(dim=1)).clamp_min(1e-30)
        col = (1 - (b ** 2).mean(dim=0)).clamp_min(1e-30)
        b = b + (1 - beta) * (x - b)
        u = torch.atan(b / r.sqrt()[:, None] / col.sqrt()[None, :])
        rho = w.norm(dim=1).clamp_min(1 / math.sqrt(4)).sqrt()
        gam = w.norm(dim=0).clamp_min(1 / math.sqrt(6)).sqrt()
        s = torch.outer(torch.atan2(rho, r.sqrt()), torch.atan2(gam, col.sqrt()))
        s = s / s.mean()
        w = w - lr * wd * s * w - lr * 4 / math.pi * u
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)


def test_lion_clip_threshold_clips_each_tensor_norm():
    """§9.5: g <- g * tau / ||g|| when ||g|| > tau, per tensor, before the Lion-K projection; p.grad intact."""
    torch.manual_seed(3)
    shapes = [(8, 3), (3,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    w = [p.detach().clone() for p in params]
    grads = [[torch.randn(s) * k for s in shapes] for k in (0.1, 5.0, 1.0, 3.0)]
    tau, lr, (b1, b2) = 1.0, 1e-2, (0.9, 0.99)
    opt = ac.optim.Lion_adv(params, lr=lr, clip_threshold=tau, kappa_p=2.0, stochastic_rounding=False)
    m = [torch.zeros(s) for s in shapes]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step):
            assert torch.equal(params[i].grad, g)
            g = g * min(1.0, tau / g.norm().item())
            c = b1 * m[i] + (1 - b1) * g
            m[i] = b2 * m[i] + (1 - b2) * g
            w[i] = w[i] - lr * c * math.sqrt(c.numel()) / c.norm()
    for p, e in zip(params, w):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=0)


# -- stochastic sign: statistics ------------------------------------------------------------------------
@pytest.mark.parametrize("stochastic_rounding", [False, True], ids=["apply", "sr_terminal"])
def test_stochastic_sign_is_unbiased_for_the_normalized_direction(stochastic_rounding):
    """§5.3: E[u] = X with X the row- then column-max-normalized matrix; vectors get the plain sign.
    Oracle: the mean of 1500 draws (standard error <= 1/sqrt(1500) = 0.026) within 0.1 of X."""
    torch.manual_seed(4)
    g = torch.randn(4, 6)
    x = g / g.abs().amax(dim=1, keepdim=True)
    x = x / x.abs().amax(dim=0, keepdim=True)
    mat, vec = torch.nn.Parameter(torch.zeros(4, 6)), torch.nn.Parameter(torch.zeros(5))
    terminal = ac.stochastic_round_apply(seed=3) if stochastic_rounding else ac.apply()
    opt = ac.ChainOptimizer([mat, vec], ac.chain(ac.stochastic_sign(seed=1), terminal), lr=1.0)
    v = torch.randn(5)
    steps, draws = 1500, set()
    for _ in range(steps):
        before = mat.detach().clone()
        mat.grad, vec.grad = g.clone(), v.clone()
        opt.step()
        draws.update((before - mat.detach()).unique().tolist())
    assert draws <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(-mat.detach() / steps, x, atol=0.1, rtol=0)
    assert torch.equal(-vec.detach(), steps * v.sign())


def test_stochastic_sign_noise_is_reproducible_and_depends_on_the_seed():
    def run(seed, lion=False):
        torch.manual_seed(5)
        model = torch.nn.Linear(6, 4)
        opt = (ac.optim.Lion_adv(model.parameters(), lr=1e-2, stochastic_sign=True, seed=seed) if lion else
               ac.optim.SignSGD_adv(model.parameters(), lr=1e-2, stochastic_sign=True, seed=seed))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        return model.weight.detach().clone()
    for lion in (False, True):
        assert torch.equal(run(0, lion), run(0, lion))
        assert not torch.equal(run(0, lion), run(1, lion))


# -- never released: hand-computed cases --------------------------------------------------------------
def test_freeze_on_flip_hand_computed():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ac.ChainOptimizer([p], ac.chain(ac.freeze_on_flip(), ac.apply()), lr=1.0)
    grads = [[1.0, -1.0, 2.0, 0.0], [1.0, 1.0, -1.0, 0.5], [-2.0, 1.0, -1.0, 0.5], [3.0, -1.0, 1.0, -1.0]]
    expected = [[-1.0, 1.0, -2.0, 0.0],   # step 1: nothing frozen, the bitmap starts as [1, 0, 1, 0]
                [-2.0, 1.0, -2.0, 0.0],   # positivity [1, 1, 0, 1]: only coordinate 0 kept
                [-2.0, 0.0, -1.0, -0.5],  # [0, 1, 0, 1]: coordinate 0 flipped
                [-2.0, 0.0, -1.0, -0.5]]  # [1, 0, 1, 0]: everything flipped
    for g, e in zip(grads, expected):
        p.grad = torch.tensor(g)
        opt.step()
        assert p.detach().tolist() == e
    assert opt.state[p]["freeze_on_flip/prev_positive"].dtype == torch.uint8
    assert opt.state[p]["freeze_on_flip/prev_positive"].tolist() == [1, 0, 1, 0]
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))  # the bitmap stays uint8 through a checkpoint
    resumed = ac.ChainOptimizer([q], ac.chain(ac.freeze_on_flip(), ac.apply()), lr=1.0)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[q]["freeze_on_flip/prev_positive"].dtype == torch.uint8


@pytest.mark.parametrize("tag, expected", [
    (None, [[1.25, -1.75, 2.25], [-3.125, 4.375, -5.625]]),   # outer(row means, column means)
    ("lora_A", [[1.0, -1.0, 1.0], [-2.5, 2.5, -2.5]]),       # row means
    ("lora_B", [[1.25, -1.75, 2.25], [-1.25, 1.75, -2.25]]),  # column means
])
def test_l1_adaptive_hand_computed(tag, expected):
    """k = 1/((1 - 0.5)/(1 - 0.5) + 1) = 0.5 at step 1; a = |x| * k = [[.5, 1, 1.5], [2, 2.5, 3]];
    vector [1, -3]: a = [.5, 1.5], mean 1."""
    mat, vec = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [mat], **({"tags": [tag]} if tag else {})}, {"params": [vec]}]
    opt = ac.ChainOptimizer(groups, ac.chain(ac.l1_adaptive(beta=0.5, alpha_grad=1.0), ac.apply()), lr=1.0)
    mat.grad = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    vec.grad = torch.tensor([1.0, -3.0])
    opt.step()
    torch.testing.assert_close(-mat.detach(), torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(-vec.detach(), torch.tensor([1.0, -1.0]), atol=1e-6, rtol=0)


def test_lion_k_projections_by_kappa():
    """§5.2 on a (2, 2) and a (1, 1, 2, 2) tensor: kappa 2 -> x * sqrt(N) / ||x||; auto -> 2 for 4-D only."""
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    for kappa, expected in ((1.0, x.sign()), (2.0, x * 2 / 5),
                            (3.0, x.sign() * x ** 2 * 2 / math.sqrt(9 ** 2 + 16 ** 2))):
        p = torch.nn.Parameter(torch.zeros(2, 2))
        opt = ac.ChainOptimizer([p], ac.chain(ac.lion_k(kappa_p=kappa), ac.apply()), lr=1.0)
        p.grad = x.clone()
        opt.step()
        torch.testing.assert_close(-p.detach(), expected, atol=1e-6, rtol=0)
    conv, mat = torch.nn.Parameter(torch.zeros(1, 1, 2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = ac.ChainOptimizer([conv, mat], ac.chain(ac.lion_k(auto=True), ac.apply()), lr=1.0)
    conv.grad, mat.grad = x.view(1, 1, 2, 2).clone(), x.clone()
    opt.step()
    torch.testing.assert_close(-conv.detach(), (x * 2 / 5).view(1, 1, 2, 2), atol=1e-6, rtol=0)
    assert torch.equal(-mat.detach(), x.sign())


def test_presets_and_drop_ins_are_registered_with_the_reference_defaults():
    import inspect
    assert {"signsgd_adv", "sinksgd_adv"} <= set(ac.presets.names())
    for ours, ref in ((ac.optim.SignSGD_adv, adv_optm.SignSGD_adv), (ac.optim.SinkSGD_adv, adv_optm.SinkSGD_adv),
                      (ac.optim.Lion_adv, adv_optm.Lion_adv)):
        theirs = inspect.signature(ref).parameters
        mine = inspect.signature(ours).parameters
        for k, v in theirs.items():
            assert k in mine and mine[k].default == v.default, (ours.__name__, k)
    chain = ac.presets.lion_adv(stochastic_sign=True, kappa_p=2.0)  # stochastic sign wins, as the reference
    assert chain.names == ("lion", "stochastic_sign", "weight_decay", "apply")
    assert ac.chain_from_config(chain.to_json()) == chain


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, match", [
    (lambda: ac.lion_k(kappa_p=0.5), ValueError, r"lion_k: kappa_p=0.5 is outside the allowed range \[1.0, inf\]"),
    (lambda: ac.presets.lion_adv(kappa_p=0.5), ValueError, r"lion_adv: kappa_p=0.5 .*\[1.0, inf\]"),
    (lambda: ac.presets.lion_adv(clip_threshold=-1.0), ValueError, r"lion_adv: clip_threshold=-1.0 .*\[0.0, inf\]"),
    (lambda: ac.presets.lion_adv(auto_kappa_p=1), ValueError, r"auto_kappa_p=1 must be True or False"),
    (lambda: ac.presets.sinksgd_adv(sinkhorn_iterations=-1), ValueError, r"sinksgd_adv: sinkhorn_iterations=-1 .*>= 0"),
    (lambda: ac.presets.sinksgd_adv(sinkhorn_iterations=2.5), ValueError, r"sinkhorn_iterations=2.5 must be an int"),
    (lambda: ac.presets.signsgd_adv(snr_cond=True), ValueError, r"signsgd_adv: snr_cond=True needs normed_momentum"),
    (lambda: ac.presets.sinksgd_adv(snr_cond=True, normed_momentum=True), ValueError,
     r"sinksgd_adv: snr_cond=True needs .*momentum > 0 .*momentum=0.0"),
    (lambda: ac.presets.signsgd_adv(momentum=1.0), ValueError, r"signsgd_adv: momentum=1.0 .*\[0.0, 1.0\)"),
    (lambda: ac.presets.signsgd_adv(nesterov=True, nesterov_coef=1.5), ValueError, r"nesterov_coef=1.5 .*\[0.0, 1.0\]"),
    (lambda: ac.presets.signsgd_adv(geometric_wd=True, centered_wd=-0.1), ValueError,
     r"signsgd_adv: centered_wd=-0.1 is outside the allowed range \[0.0, inf\]"),
    (lambda: ac.presets.sinksgd_adv(geometric_wd=True, centered_wd=0.1, centered_wd_mode="int2"), ValueError,
     r"sinksgd_adv: centered_wd_mode='int2' is not one of"),
    (lambda: ac.presets.get("signsgd_adv", kappa_p=2.0), TypeError, r"signsgd_adv.*kappa_p"),
    (lambda: ac.sign_momentum(0.0, publish_prev=True), ValueError, r"momentum=0.0 keeps no momentum"),
    (lambda: ac.sinkhorn(iterations=-2), ValueError, r"sinkhorn: iterations=-2 must be an int >= 0"),
    (lambda: ac.stochastic_sign(seed=-1), ValueError, r"stochastic_sign: seed=-1 must be an int >= 0"),
    (lambda: ac.l1_adaptive(beta=1.0), ValueError, r"l1_adaptive: beta=1.0 .*\[0.0, 1.0\)"),
    (lambda: ac.snr_condition(mode="rows"), ValueError, r"snr_condition: mode='rows' is not one of"),
    (lambda: ac.clip_by_tensor_norm(0.0), ValueError, r"clip_by_tensor_norm: max_norm=0.0 .*\(0.0, inf\]"),
    (lambda: ac.chain(ac.sign_momentum(), ac.snr_condition(), ac.apply()), ValueError,
     r"snr_condition.*reads signal 'prev_momentum'"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
