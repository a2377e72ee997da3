"""Parity of the torch-optimi family (RAdam, Ranger, Adan, StableAdamW, Lookahead) with torch-optimi 0.3.3.

Oracles: optimi's classes (and its functional ``optimi.adan.adan`` for ``adam_wd=True``, which the
0.3.3 class never forwards), and for Lookahead a loop written here. fp32 runs go 120 steps under an
LR schedule (warm-up, then a drop) and must stay within 1e-6 of optimi. The parameters have the
scale of a small network's weights (|p| < 0.6): the remaining differences are fp32 rounding of the
parameter write (optimi's Adan writes in three roundings: two ``addcdiv`` and a division, adv_chain
in one), a random walk of size ``~ulp(|p|) * sqrt(steps)``.
"""
from __future__ import annotations

import json

import optimi
import pytest
import torch
from optimi.adan import adan as optimi_adan_functional

import adv_chain as ac
from adv_chain.transforms import lookahead, proximal_wd, scale_by_adan, scale_by_radam, stable_clip

pytestmark = pytest.mark.filterwarnings("ignore:You are using weight_decay:UserWarning")  # optimi's advice

SHAPES = [(17, 9), (9,), (4, 3, 5)]
STEPS = 120
ATOL = 1e-6


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((0.15 * torch.randn(s, generator=gen)).to(dtype)) for s in SHAPES]


def _grads(steps):
    """Gaussian gradients with a spike every 13 steps (so StableAdamW's clip engages)."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) * (4.0 if t % 13 == 5 else 1.0) for s in SHAPES] for t in range(steps)]


def _schedule(t: int) -> float:
    return min(1.0, (t + 1) / 10) * (0.5 if t > 60 else 1.0)


def _run(make, steps=STEPS, dtype=torch.float32):
    params = _params(dtype)
    opt = make(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    for grads in _grads(steps):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        sched.step()
    return params


def _assert_close(ours, theirs, atol=ATOL, rtol=0.0):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"param {i}: {m}")


LR = 1e-2
CASES = {  # id -> (our drop-in, optimi class, shared keywords)
    "radam": (ac.optim.RAdam, optimi.RAdam, {}),
    "radam l2": (ac.optim.RAdam, optimi.RAdam, dict(weight_decay=1e-2)),
    "radam decouple_wd": (ac.optim.RAdam, optimi.RAdam, dict(weight_decay=1e-2, decouple_wd=True, betas=(0.8, 0.95))),
    "radam decouple_lr": (ac.optim.RAdam, optimi.RAdam, dict(weight_decay=1e-3, decouple_lr=True)),
    "radam decouple_lr max_lr": (ac.optim.RAdam, optimi.RAdam, dict(weight_decay=1e-3, decouple_lr=True, max_lr=2e-2)),
    "ranger": (ac.optim.Ranger, optimi.Ranger, {}),
    "ranger k alpha wd": (ac.optim.Ranger, optimi.Ranger, dict(k=4, alpha=0.7, weight_decay=1e-2)),
    "ranger l2 k1": (ac.optim.Ranger, optimi.Ranger, dict(k=1, alpha=0.3, weight_decay=1e-2, decouple_wd=False)),
    "ranger decouple_lr": (ac.optim.Ranger, optimi.Ranger, dict(k=5, alpha=0.5, weight_decay=1e-3, decouple_lr=True,
                                                                max_lr=2e-2)),
    "adan": (ac.optim.Adan, optimi.Adan, {}),
    "adan no wd": (ac.optim.Adan, optimi.Adan, dict(weight_decay=0.0, eps=1e-8)),
    "adan decouple_lr": (ac.optim.Adan, optimi.Adan, dict(weight_decay=1e-3, decouple_lr=True, max_lr=2e-2)),
    "adan betas": (ac.optim.Adan, optimi.Adan, dict(betas=(0.9, 0.9, 0.999), weight_decay=0.05)),
    "stableadamw": (ac.optim.StableAdamW, optimi.StableAdamW, {}),
    "stableadamw no wd": (ac.optim.StableAdamW, optimi.StableAdamW, dict(weight_decay=0.0)),
    "stableadamw decouple_lr": (ac.optim.StableAdamW, optimi.StableAdamW, dict(weight_decay=1e-3, decouple_lr=True)),
    "stableadamw wd betas": (ac.optim.StableAdamW, optimi.StableAdamW, dict(weight_decay=0.1, betas=(0.95, 0.98),
                                                                          eps=1e-8)),
}


@pytest.mark.parametrize("case", CASES)
def test_drop_in_matches_optimi_fp32(case):
    ours_cls, theirs_cls, kw = CASES[case]
    ours = _run(lambda ps: ours_cls(ps, lr=LR, **kw))
    theirs = _run(lambda ps: theirs_cls(ps, lr=LR, kahan_sum=False, triton=False, **kw))
    _assert_close(ours, theirs)


PRESET_CASES = {  # id -> (preset, preset keywords, optimi class, optimi keywords)
    "radam": ("radam", dict(weight_decay=1e-3, decouple_lr=True, max_lr=2e-2), optimi.RAdam,
              dict(weight_decay=1e-3, decouple_lr=True, max_lr=2e-2)),
    "ranger": ("ranger", dict(k=3, alpha=0.6, weight_decay=1e-2), optimi.Ranger, dict(k=3, alpha=0.6, weight_decay=1e-2)),
    "adan": ("adan", dict(max_lr=2e-2, weight_decay=1e-3), optimi.Adan,
             dict(decouple_lr=True, max_lr=2e-2, weight_decay=1e-3)),
    "stableadamw": ("stableadamw", dict(weight_decay=0.05), optimi.StableAdamW, dict(weight_decay=0.05)),
}


@pytest.mark.parametrize("case", PRESET_CASES)
def test_preset_matches_optimi_fp32(case):
    name, pkw, theirs_cls, kw = PRESET_CASES[case]
    ours = _run(lambda ps: ac.ChainOptimizer(ps, name, lr=LR, **pkw))
    theirs = _run(lambda ps: theirs_cls(ps, lr=LR, kahan_sum=False, triton=False, **kw))
    _assert_close(ours, theirs)


def test_adan_adam_wd_matches_optimi_functional():
    """optimi 0.3.3's ``Adan`` class does not forward ``adam_wd``; its functional ``adan`` implements it
    (weight decay ``p *= 1 - lr*wd`` before the step): that is the oracle."""
    wd, betas, eps = 0.05, (0.98, 0.92, 0.99), 1e-6
    ours = _run(lambda ps: ac.optim.Adan(ps, lr=LR, weight_decay=wd, adam_wd=True))
    params = _params()
    state = None
    step = torch.tensor(0, dtype=torch.int32)
    for t, grads in enumerate(_grads(STEPS)):
        grads = [g.clone() for g in grads]
        if state is None:
            state = {"m": [torch.zeros_like(p) for p in params], "d": [torch.zeros_like(p) for p in params],
                     "n": [torch.zeros_like(p) for p in params], "prev": [-g for g in grads]}
        with torch.no_grad():
            optimi_adan_functional(params, grads, state["m"], state["d"], state["n"], state["prev"], None,
                             lr=LR * _schedule(t), beta1=betas[0], beta2=betas[1], beta3=betas[2], weight_decay=wd,
                             eps=eps, step=step, adam_wd=True, foreach=False, triton=False)
    _assert_close(ours, params)


def test_adan_adam_wd_differs_from_proximal():
    """adam_wd selects a different decay (the option is not silently dropped)."""
    a = _run(lambda ps: ac.optim.Adan(ps, lr=LR, weight_decay=0.5), steps=20)
    b = _run(lambda ps: ac.optim.Adan(ps, lr=LR, weight_decay=0.5, adam_wd=True), steps=20)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-5


# -- bf16 with Kahan summation -------------------------------------------------------------------------
#: optimi's own bf16 tolerance (tests/config.py: atol=1e-3, rtol=1e-2, at most 1% of the elements
#: outside it). optimi keeps its moments in bf16 and applies the decay in a separate bf16 write;
#: adv_chain keeps fp32 moments and writes once, so the two bf16 runs agree only to that tolerance.
BF16_ATOL, BF16_RTOL, BF16_MAX_ERROR_RATE = 1e-3, 1e-2, 0.01
BF16_STEPS = 40

BF16_CASES = {
    "radam": (ac.optim.RAdam, optimi.RAdam, dict(weight_decay=1e-2, decouple_wd=True)),
    "ranger": (ac.optim.Ranger, optimi.Ranger, dict(k=4, weight_decay=1e-2)),
    "adan": (ac.optim.Adan, optimi.Adan, dict(weight_decay=1e-2)),
    "stableadamw": (ac.optim.StableAdamW, optimi.StableAdamW, dict(weight_decay=1e-2)),
}


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_kahan_matches_optimi_bf16_kahan(case):
    ours_cls, theirs_cls, kw = BF16_CASES[case]
    lr = 1e-3
    ours = _run(lambda ps: ours_cls(ps, lr=lr, kahan_sum=True, **kw), steps=BF16_STEPS, dtype=torch.bfloat16)
    theirs = _run(lambda ps: theirs_cls(ps, lr=lr, kahan_sum=True, triton=False, **kw), steps=BF16_STEPS,
                  dtype=torch.bfloat16)
    start = _params(torch.bfloat16)
    moved = max((b.float() - s.float()).abs().max().item() for b, s in zip(theirs, start))
    assert moved > 10 * 2 ** -8 * lr, "optimi's run did not move: the comparison is vacuous"
    total = bad = 0
    for a, b in zip(ours, theirs):
        a, b = a.float(), b.float()
        off = (a - b).abs() > BF16_ATOL + BF16_RTOL * b.abs()
        total += off.numel()
        bad += int(off.sum())
    assert bad <= BF16_MAX_ERROR_RATE * total, f"{bad}/{total} elements outside optimi's bf16 tolerance"


@pytest.mark.parametrize("cls", [ac.optim.RAdam, ac.optim.Ranger, ac.optim.StableAdamW, ac.optim.Adan])
def test_kahan_sum_none_follows_the_parameter_dtype(cls):
    """optimi's ``kahan_sum=None``: Kahan for bf16/fp16 parameters only."""
    def terminal(opt):
        t = opt.chain.transforms[-1]
        return t.args["inner"] if t.type_name == "lookahead" else t
    fp32 = cls(_params(), lr=1e-3, kahan_sum=None)
    bf16 = cls(_params(torch.bfloat16), lr=1e-3, kahan_sum=None)
    assert terminal(fp32).type_name == "apply" and terminal(bf16).type_name == "kahan_apply"
    sr = cls(_params(torch.bfloat16), lr=1e-3, kahan_sum=None, stochastic_rounding=True)
    assert terminal(sr).type_name == "stochastic_round_apply"
    default = cls(_params(torch.bfloat16), lr=1e-3)  # optimi's defaults: None, except Adan's False
    assert terminal(default).type_name == ("apply" if cls is ac.optim.Adan else "kahan_apply")


def test_drop_ins_take_optimi_defaults():
    import inspect
    for ours, theirs in ((ac.optim.RAdam, optimi.RAdam), (ac.optim.Ranger, optimi.Ranger),
                         (ac.optim.Adan, optimi.Adan), (ac.optim.StableAdamW, optimi.StableAdamW)):
        a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        for k, p in b.items():
            assert k in a, f"{ours.__name__} lacks optimi's keyword {k}"
            assert a[k].default == p.default, f"{ours.__name__}.{k}: {a[k].default!r} != optimi's {p.default!r}"


def test_gradient_release_steps_inside_backward():
    model = torch.nn.Linear(5, 3)
    ref = torch.nn.Linear(5, 3)
    ref.load_state_dict(model.state_dict())
    opt = ac.optim.Ranger(model.parameters(), lr=1e-2, k=2, gradient_release=True)
    ref_opt = ac.optim.Ranger(ref.parameters(), lr=1e-2, k=2)
    x = torch.randn(4, 5)
    for _ in range(5):
        model(x).square().sum().backward()  # stepped inside backward
        assert model.weight.grad is None
        ref_opt.zero_grad()
        ref(x).square().sum().backward()
        ref_opt.step()
    torch.testing.assert_close(model.weight, ref.weight, atol=0, rtol=0)
    ac.disable_gradient_release(opt)


# -- Lookahead against a hand-written loop --------------------------------------------------------------
def _reference_lookahead_sgd(params, grads_per_step, lr, momentum, k, alpha):
    """SGD with heavy-ball momentum (torch's: buf = g on the first step, then mu*buf + g) as the fast
    optimizer; every k steps phi += alpha * (p - phi) and p = phi."""
    slow = [p.detach().clone() for p in params]
    bufs = [None] * len(params)
    with torch.no_grad():
        for t, grads in enumerate(grads_per_step, start=1):
            for i, (p, g) in enumerate(zip(params, grads)):
                bufs[i] = g.clone() if bufs[i] is None else bufs[i] * momentum + g
                p -= lr * bufs[i]
            if t % k == 0:
                for p, s in zip(params, slow):
                    s += alpha * (p - s)
                    p.copy_(s)
    return params


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (3, 0.6), (6, 0.5), (5, 1.0)])
def test_lookahead_matches_hand_written_loop(k, alpha):
    grads = _grads(30)
    ref = _reference_lookahead_sgd(_params(), grads, lr=0.05, momentum=0.9, k=k, alpha=alpha)
    params = _params()
    opt = ac.ChainOptimizer(params, ac.chain(ac.momentum(0.9), lookahead(ac.apply(), k=k, alpha=alpha)), lr=0.05)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    _assert_close(params, ref, atol=1e-6)


def test_lookahead_alpha_one_is_the_inner_optimizer():
    """alpha=1 moves the slow weights all the way: the same trajectory as without Lookahead."""
    grads = _grads(20)
    runs = []
    for term in (ac.apply(), lookahead(ac.apply(), k=3, alpha=1.0)):
        params = _params()
        opt = ac.ChainOptimizer(params, ac.chain(ac.momentum(0.9), term), lr=0.05)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    _assert_close(*runs, atol=1e-6)


def test_lookahead_bf16_kahan_tracks_fp32():
    """With Kahan, the bf16 fast weights continue from the exact (fp32) slow weights: the run stays
    closer to the fp32 one than plain bf16 does."""
    grads = _grads(60)

    def run(dtype, inner):
        params = _params(dtype)
        opt = ac.ChainOptimizer(params, ac.chain(ac.momentum(0.9), lookahead(inner, k=4, alpha=0.5)), lr=1e-3)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            opt.step()
        return params

    ref = run(torch.float32, ac.apply())
    err = {name: max((a.float() - b).abs().max().item() for a, b in zip(run(torch.bfloat16, inner), ref))
           for name, inner in (("plain", ac.apply()), ("kahan", ac.kahan_apply()))}
    assert err["kahan"] < 0.25 * err["plain"], err


def test_lookahead_config_repr_and_state():
    for inner in (ac.apply(), ac.kahan_apply(), ac.stochastic_round_apply(seed=3)):
        c = ac.chain(scale_by_radam(), ac.weight_decay(0.0), lookahead(inner, k=4, alpha=0.25))
        assert ac.chain_from_config(json.loads(c.to_json())) == c
        assert repr(ac.chain_from_config(c.to_config())) == repr(c)
        assert repr(c).count("seed") == ("seed" in inner.args)  # the inner terminal's, not repeated
    c = ac.chain(ac.momentum(), lookahead())
    assert repr(c["lookahead"]) == "lookahead()"
    assert c["lookahead"].with_args(k=2).args["k"] == 2
    params = _params(torch.bfloat16)
    opt = ac.ChainOptimizer(params, ac.chain(ac.momentum(), lookahead(ac.kahan_apply())), lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[params[0]]
    assert st["lookahead/slow_params"].dtype == torch.float32
    assert st["lookahead/kahan_comp"].dtype == torch.bfloat16


def test_lookahead_param_group_override():
    """``lookahead.k`` / ``lookahead.alpha`` in a param group override the constructor's."""
    grads = _grads(12)
    ref = _reference_lookahead_sgd(_params(), grads, lr=0.05, momentum=0.9, k=2, alpha=0.8)
    params = _params()
    opt = ac.ChainOptimizer([{"params": params, "lookahead.k": 2, "lookahead.alpha": 0.8}],
                            ac.chain(ac.momentum(0.9), lookahead()), lr=0.05)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    _assert_close(params, ref)


def test_transforms_compose_outside_their_presets():
    """stable_clip after AdamW's moments with cautious decay; proximal decay after momentum; the chains
    build, train and keep finite weights."""
    for c in (ac.chain(ac.scale_by_adam(), ac.cautious_wd(0.1), stable_clip(), lookahead(ac.apply(), k=3)),
              ac.chain(ac.momentum(0.9), proximal_wd(0.1), ac.apply()),
              ac.chain(scale_by_adan(), ac.cautious(), proximal_wd(0.02), ac.kahan_apply())):
        params = _params()
        opt = ac.ChainOptimizer(params, c, lr=1e-2)
        for gs in _grads(10):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda: lookahead(k=0), ["k=0", ">= 1"]),
    (lambda: lookahead(alpha=1.5), ["alpha=1.5", "[0.0, 1.0]"]),
    (lambda: lookahead(ac.momentum()), ["inner", "terminal"]),
    (lambda: lookahead(lookahead()), ["inner", "terminal"]),
    (lambda: lookahead(ac.stochastic_round_apply(seed=1), seed=2), ["seed=2"]),
    (lambda: scale_by_radam(threshold=3.0), ["threshold=3.0", "[4.0"]),
    (lambda: scale_by_radam(betas=(0.9, 1.0)), ["betas[1]=1.0"]),
    (lambda: scale_by_adan(betas=(0.9, 0.9)), ["betas=(0.9, 0.9)", "triple"]),
    (lambda: proximal_wd(-1.0), ["weight_decay=-1.0"]),
    (lambda: proximal_wd(0.1, max_lr=0.0), ["max_lr=0.0"]),
    (lambda: stable_clip(eps=-1.0), ["eps=-1.0"]),
    (lambda: ac.presets.radam(decouple_lr=True), ["decouple_lr=True", "max_lr"]),
    (lambda: ac.presets.ranger(k=0), ["k=0"]),
    (lambda: ac.optim.Adan(_params(), lr=1e-3, adam_wd=1), ["adam_wd=1"]),
    (lambda: ac.optim.RAdam(_params(), lr=-1.0), ["lr=-1.0"]),
])
def test_bad_input_names_argument_and_range(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), (w, str(err.value))
