"""SignSGD_adv / SinkSGD_adv with ``geometric_wd=True`` and ``centered_wd > 0`` (spec §7.3 + §7.5):
``geometric_wd`` publishes the signed target it decays by, and ``centered_wd`` applies it to the
distance to its anchor, ``T(p - a)``, as adv-optm 2.5.16's ``cwd_target``.

Oracles: adv-optm 2.5.16 itself (fp32, 50 steps with a scheduler, the protocol of
test_parity_adv_optm.py / test_sign_family.py), the formula by hand on tiny tensors, and the
uninterrupted run for checkpoints (test_presets_suite.checkpoint_roundtrip).
"""
import math

import adv_optm
import pytest
import torch
from test_decay_family import _model, _steps
from test_parity_adv_optm import _train
from test_presets_suite import checkpoint_roundtrip, make_model, make_opt, train
from test_sign_family import _train_conv

import adv_chain as ac

TOL = 1e-5
GEO = {"geometric_wd": True, "weight_decay": 0.1, "centered_wd": 1.0}  # the drop-ins' default anchor: float8

PARITY = [
    ("SignSGD_adv", GEO, _train),
    ("SignSGD_adv", {**GEO, "cautious_wd": True}, _train),
    ("SignSGD_adv", {**GEO, "cautious_wd": True}, _train_conv),
    ("SignSGD_adv", {**GEO, "normed_momentum": True, "nesterov": True, "snr_cond": True, "cautious_wd": True}, _train),
    ("SignSGD_adv", {**GEO, "centered_wd_mode": "int8"}, _train),
    ("SinkSGD_adv", GEO, _train),
    ("SinkSGD_adv", {**GEO, "cautious_wd": True}, _train),
    ("SinkSGD_adv", {**GEO, "cautious_wd": True}, _train_conv),
    ("SinkSGD_adv", {**GEO, "momentum": 0.9, "normed_momentum": True, "snr_cond": True, "cautious_wd": True}, _train),
    # weight_decay = 0: SinkSGD's vectors still take the signed target of the distance
    ("SinkSGD_adv", {**GEO, "weight_decay": 0.0, "cautious_wd": True}, _train),
]


def _ids(case):
    extra = ",".join(f"{k}={v}" for k, v in case[1].items() if k not in GEO or GEO[k] != v)
    return f"{case[0]}-{extra or 'geometric+centered'}-{case[2].__name__}"


def _max_diff(xs, ys):
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


def _plain_centered(cls, kwargs):
    """The same chain with centered_wd moved before the geometric decay: the plain ``p - a``."""
    preset = ac.presets.get(cls.lower(), **kwargs)
    moved = preset.without("centered_wd").insert_before("weight_decay", preset["centered_wd"])
    return lambda p: ac.ChainOptimizer(p, moved, lr=1e-3)


@pytest.mark.parametrize("case", PARITY, ids=_ids)
def test_matches_adv_optm_2_5_16(case):
    """Max abs difference <= 1e-5 after 50 fp32 steps; and the combination is not vacuous: without
    centered_wd, or with the plain p - a for it, the result is far from the reference."""
    cls, kwargs, train_fn = case
    ref = train_fn(lambda p: getattr(adv_optm, cls)(p, lr=1e-3, **kwargs))
    ours = train_fn(lambda p: getattr(ac.optim, cls)(p, lr=1e-3, **kwargs))
    assert _max_diff(ref, ours) <= TOL
    no_centered = train_fn(lambda p: getattr(ac.optim, cls)(p, lr=1e-3, **{**kwargs, "centered_wd": 0.0}))
    assert _max_diff(ref, no_centered) > 1e-3, "centered decay changed nothing"
    assert _max_diff(ref, train_fn(_plain_centered(cls, kwargs))) > 1e-4, "the signed target changed nothing"


@pytest.mark.parametrize("cls", ["SignSGD_adv", "SinkSGD_adv"])
def test_the_drop_in_anchor_precision_is_the_references(cls):
    """adv-optm's default centered_wd_mode is float8 for both classes: so is the drop-ins'."""
    for make, key in ((getattr(adv_optm, cls), "anchor_data"), (getattr(ac.optim, cls), "centered_wd/anchor")):
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = make([p], **GEO)
        assert opt.state[p][key].dtype == torch.float8_e4m3fn


def _signed(x):
    """Spec §7.5 without SNR: sign(x) * ||x|| / sqrt(N)."""
    return torch.sign(x) * x.norm() / math.sqrt(x.numel())


@pytest.mark.parametrize("cautious", [False, True])
def test_two_steps_by_hand(cautious):
    """sign -> geometric_wd -> centered_wd -> apply on a vector and a 2x2 matrix, lr=0.1, wd=0.5,
    cwd=2, full anchor a = p0. Step 1: T(p0 - a) = 0, so only p1 = p0 - lr*wd*M*T(p0) - lr*u1.
    Step 2: p2 = p1 - lr*wd*M*T(p1) - lr*cwd*M'*T(p1 - a) - lr*u2 with (cautious) M = 1[u*p >= 0],
    M' = 1[u2 * T(p1 - a) >= 0]."""
    lr, wd, cwd = 0.1, 0.5, 2.0
    p0 = [torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([[0.5, -1.0], [2.0, 0.25]])]
    grads = [[torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor([[-1.0, 1.0], [1.0, 1.0]])],
             [torch.tensor([-1.0, 1.0, 1.0, -1.0]), torch.tensor([[1.0, -1.0], [-1.0, 1.0]])]]
    params = [torch.nn.Parameter(x.clone()) for x in p0]
    chain = ac.chain(ac.sign(), ac.geometric_wd(wd, cautious=cautious),
                     ac.centered_wd(cwd, anchor="full", cautious=cautious), ac.apply())
    opt = ac.ChainOptimizer(params, chain, lr=lr)
    expected = [x.clone() for x in p0]
    masks = []
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i, (x, g) in enumerate(zip(expected, gs)):
            u = torch.sign(g)
            keep = (u * x >= 0).float() if cautious else torch.ones_like(x)
            new = x - lr * wd * keep * _signed(x) - lr * u
            if step == 1:
                target = _signed(x - p0[i])
                keep_c = (u * target >= 0).float() if cautious else torch.ones_like(x)
                masks.append(keep_c)
                new = new - lr * cwd * keep_c * target
            expected[i] = new
        for p, x in zip(params, expected):
            torch.testing.assert_close(p.detach(), x, atol=1e-6, rtol=0)
    if cautious:  # the centered mask both keeps and drops elements
        flat = torch.cat([m.flatten() for m in masks])
        assert 0 < flat.sum() < flat.numel()


@pytest.mark.parametrize("cls, signed_matrix, signed_vector", [("SignSGD_adv", False, False),
                                                               ("SinkSGD_adv", False, True)])
def test_at_weight_decay_zero_by_hand(cls, signed_matrix, signed_vector):
    """weight_decay=0 (the reference's switches, spec §7.5): SignSGD's centered term is the plain
    p - a; SinkSGD's vectors still take T(p - a), its matrices p - a. With momentum 0 the update does
    not depend on p, so step 2 with and without centered_wd differs by exactly lr*cwd*target(p1 - a)."""
    lr, cwd = 0.05, 2.0
    p0 = [torch.tensor([[0.5, -1.0, 0.3], [2.0, 0.25, -0.7]]), torch.tensor([1.0, -2.0, 0.5, 3.0])]
    grads = [[torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]]), torch.tensor([1.0, -1.0, 1.0, -1.0])],
             [torch.tensor([[-1.0, 1.0, 2.0], [1.0, -0.5, 1.0]]), torch.tensor([-1.0, 1.0, 1.0, 1.0])]]
    runs = []
    for centered in (cwd, 0.0):
        params = [torch.nn.Parameter(x.clone()) for x in p0]
        opt = getattr(ac.optim, cls)(params, lr=lr, momentum=0.0, geometric_wd=True, weight_decay=0.0,
                                     centered_wd=centered, centered_wd_mode="full", stochastic_rounding=False)
        history = []
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            history.append([p.detach().clone() for p in params])
        runs.append(history)
    (c1, c2), (n1, n2) = runs
    for i, signed in enumerate((signed_matrix, signed_vector)):
        assert torch.equal(c1[i], n1[i])  # step 1: p0 - a = 0
        dist = c1[i] - p0[i]
        target = _signed(dist) if signed else dist
        torch.testing.assert_close(n2[i] - c2[i], lr * cwd * target, atol=1e-6, rtol=0)


KW = {"signsgd_adv": {**GEO, "cautious_wd": True, "normed_momentum": True, "snr_cond": True,
                      "stochastic_sign": True},
      "sinksgd_adv": {**GEO, "cautious_wd": True, "momentum": 0.9, "normed_momentum": True, "snr_cond": True}}


@pytest.mark.parametrize("name", list(KW))
def test_bf16_params_with_stochastic_rounding_step(name):
    """bf16 weights, stochastic rounding: 20 steps stay bf16 and finite, lower the loss, keep the float8
    anchor and fp32 moments, and the centered pull shrinks the distance to the initial weights."""
    dist = {}
    for centered in (GEO["centered_wd"], 0.0):
        model = make_model(torch.bfloat16)
        start = [p.detach().float().clone() for p in model.net.parameters()]
        opt = make_opt(model, name, {**KW[name], "centered_wd": centered, "stochastic_rounding": True}, lr=1e-2)
        losses = train(model, opt, 20)
        assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)
        for p in model.net.parameters():
            assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
            if centered:
                assert opt.state[p]["centered_wd/anchor"].dtype == torch.float8_e4m3fn
        dist[centered] = sum((p.float() - s).norm() for p, s in zip(model.net.parameters(), start))
    assert dist[GEO["centered_wd"]] < dist[0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(KW))
def test_save_load_continue_is_bit_identical(name, dtype):
    """Oracle: the uninterrupted run (checkpoint_roundtrip), stochastic sign and rounding included."""
    checkpoint_roundtrip(name, {**KW[name], "centered_wd_mode": "int8"}, dtype)
    checkpoint_roundtrip(name, KW[name], dtype)


def test_compiled_matches_eager():
    """compile=True traces geometric_wd's published targets into centered_wd's kernel: same result.
    (SignSGD only: on CPU, inductor fails to compile sinkhorn -> geometric_wd(structural=True) ->
    centered_wd, as it already does sinkhorn -> cautious_wd -> centered_wd, with ``KeyError: 'bufN'``
    in its outer-loop fusion.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = []
    for compile in (False, True):
        model = _model()
        opt = ac.ChainOptimizer(model.parameters(), "signsgd_adv", lr=1e-2, compile=compile, **KW["signsgd_adv"])
        _steps(model, opt, 5, seed=3)
        runs.append(list(model.parameters()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "compile=True compiled nothing"
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_stochastic_sign_centered_target_by_hand():
    """SignSGD_adv(stochastic_sign=True): the centered target is the stochastic sign of the distance
    (spec §5.3 on the matrix view) times ||p - a|| / sqrt(N). Step 1 is equal with and without
    centered_wd (p0 - a = 0) and the noise depends only on (seed, step), so step 2 differs by
    lr*cwd*T: every element has magnitude ||p1 - a|| / sqrt(N), and some signs differ from sign(p1 - a)."""
    lr, cwd = 0.05, 2.0
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(8, 6, generator=gen)
    grads = [torch.randn(8, 6, generator=gen) for _ in range(2)]
    runs = []
    for centered in (cwd, 0.0):
        p = torch.nn.Parameter(p0.clone())
        opt = ac.optim.SignSGD_adv([p], lr=lr, momentum=0.0, stochastic_sign=True, geometric_wd=True,
                                   weight_decay=0.5, centered_wd=centered, centered_wd_mode="full",
                                   stochastic_rounding=False)
        history = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            history.append(p.detach().clone())
        runs.append(history)
    (c1, c2), (n1, n2) = runs
    assert torch.equal(c1, n1)
    dist = c1 - p0
    target = (n2 - c2) / (lr * cwd)
    torch.testing.assert_close(target.abs(), torch.full_like(dist, dist.norm().item() / math.sqrt(dist.numel())),
                               atol=1e-4, rtol=0)
    agree = torch.sign(target) == torch.sign(dist)
    assert not agree.all() and agree.float().mean() > 0.5
