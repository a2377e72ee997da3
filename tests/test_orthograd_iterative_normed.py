"""orthograd(mode="iterative") and scale_by_adam(normed_momentum=...) against independent oracles.

* Oracles written here from adv_optm_spec.md §3.1 (iterative OrthoGrad: explicit Python loops over
  rows and columns, in fp64) and §4.2/§2.1 (normalization-then-momentum, per step by hand); they
  share no code with adv_chain.
* Parity of the drop-in classes with the installed adv-optm 2.5.16 over 50 fp32 steps.
* compile=True against eager, bf16 parameters with stochastic rounding, the user's ``p.grad`` never
  written, the chain's build-time rules and the argument checks.
"""
from __future__ import annotations

import math

import adv_optm
import pytest
import torch

import adv_chain as ac

# ---------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------


def oracle_flattened(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """§3.1 flattened: rho = <w,g>/(<w,w>+1e-30), o = g - rho w, g' = o ||g|| / (||o|| + 1e-30) (fp64)."""
    w, g = w.reshape(-1).double(), g.reshape(-1).double()
    rho = (w * g).sum() / ((w * w).sum() + 1e-30)
    o = g - rho * w
    return o * g.norm() / (o.norm() + 1e-30)


def oracle_iterative(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """§3.1 iterative, slice by slice with Python loops, in fp64, on the matrix view (rows x rest).

    A "column slice" is G[:, j] (reduced over rows, dim 0), a "row slice" is G[i, :] (dim 1). Tall
    matrices (m > n) start with the column slices."""
    shape = g.shape
    if w.dim() < 2:
        return oracle_flattened(w, g).reshape(shape)
    W = w.reshape(shape[0], -1).double()
    G = g.reshape(shape[0], -1).double().clone()
    m, n = G.shape

    def slices(dim: int) -> list[tuple]:
        # index tuples selecting each slice along the reduced dimension
        return [(slice(None), j) for j in range(n)] if dim == 0 else [(i, slice(None)) for i in range(m)]

    order = (0, 1) if m > n else (1, 0)
    size = {0: m, 1: n}
    # precomputed once from the original G and W
    power = {d: [float((W[s] * W[s]).sum()) + 1e-30 for s in slices(d)] for d in order}
    floor = {d: 1.0 / math.sqrt(size[d]) for d in order}
    target = {d: [max(float(G[s].norm()), floor[d]) for s in slices(d)] for d in order}
    for _ in range(3):
        for d in order:
            for k, s in enumerate(slices(d)):
                coef = float((W[s] * G[s]).sum()) / power[d][k]
                G[s] = G[s] - 1.01 * coef * W[s]
                G[s] = G[s] * (target[d][k] / max(float(G[s].norm()), floor[d]))
    return G.reshape(shape)


def orthograd_output(params: list[torch.nn.Parameter], grads: list[torch.Tensor],
                     mode: str = "iterative") -> list[torch.Tensor]:
    """The gradient-stage output, read exactly: momentum's first buffer is its input; lr = 0."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = ac.ChainOptimizer(params, ac.chain(ac.orthograd(mode=mode), ac.momentum(0.9), ac.apply()), lr=0.0)
    opt.step()
    return [opt.state[p]["momentum/momentum_buffer"] for p in params]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# iterative orthograd: formula
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (7,), (4, 4), (4, 3, 2, 2)], ids=str)
def test_iterative_matches_the_spec_pseudocode(shape):
    w, g = _randn(*shape, seed=1), _randn(*shape, seed=2) + 0.5 * _randn(*shape, seed=1)
    p = torch.nn.Parameter(w.clone())
    out, = orthograd_output([p], [g])
    expected = oracle_iterative(w, g).float()
    assert out.shape == g.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_iterative_hand_checked_vector_and_rank2_effect():
    # 1-D: the flattened formula. w = (1, 0), g = (1, 1): rho = 1, o = (0, 1) -> g' = (0, sqrt 2)
    p = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    out, = orthograd_output([p], [torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([0.0, math.sqrt(2.0)]), atol=1e-7, rtol=0)
    # 2 x 2, W = I, G = all ones (square: rows first). Row i: <w_i, g_i> = 1, P = 1, so
    # g_i - 1.01 e_i: row 0 -> (-0.01, 1), rescaled to its original norm sqrt 2 per row; the
    # columns then go the same way. Every slice keeps the norm it started with (sqrt 2) at the end.
    p = torch.nn.Parameter(torch.eye(2))
    out, = orthograd_output([p], [torch.ones(2, 2)])
    torch.testing.assert_close(out, oracle_iterative(torch.eye(2), torch.ones(2, 2)).float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.norm(dim=0), torch.full((2,), math.sqrt(2.0)), atol=1e-6, rtol=0)
    # the diagonal (the component along W = I) is driven to about zero
    assert out.diagonal().abs().max() < 1e-3


def test_iterative_rows_and_columns_end_nearly_orthogonal_to_the_weights():
    w, g = _randn(20, 12, seed=3), _randn(20, 12, seed=4) + 0.8 * _randn(20, 12, seed=3)
    out, = orthograd_output([torch.nn.Parameter(w.clone())], [g])

    def cos(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim))

    before = max(cos(g, w, 0).abs().max(), cos(g, w, 1).abs().max())
    after = max(cos(out, w, 0).abs().max(), cos(out, w, 1).abs().max())
    assert before > 0.3 and after < 0.05 * before, (before, after)


def test_iterative_batches_same_shapes_and_keeps_each_tensor_separate():
    """Three same-shaped matrices (stacked into one batch), a tall, a wide, two vectors, a 0-d one."""
    shapes = [(6, 4), (6, 4), (6, 4), (9, 2), (2, 9), (5,), (5,), ()]
    ws = [_randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    gs = [_randn(*s, seed=30 + i) for i, s in enumerate(shapes)]
    outs = orthograd_output([torch.nn.Parameter(w.clone()) for w in ws], gs)
    for w, g, out in zip(ws[:-1], gs[:-1], outs[:-1]):
        torch.testing.assert_close(out, oracle_iterative(w, g).float(), atol=1e-6, rtol=0)
    # 0-d: g is always parallel to w, o is rounding residue (spec §3.1 edge case): bounded by |g|
    assert outs[-1].shape == () and torch.isfinite(outs[-1]) and outs[-1].abs() <= gs[-1].abs() * (1 + 1e-6)


def test_iterative_vector_tag_falls_back_to_the_flattened_formula():
    w, g = _randn(4, 6, seed=5), _randn(4, 6, seed=6)
    tagged = torch.nn.Parameter(w.clone())
    tagged.is_vector = True
    dora = torch.nn.Parameter(w.clone())
    dora._is_dora_scale = True
    for p in (tagged, dora):
        out, = orthograd_output([p], [g])
        torch.testing.assert_close(out, oracle_flattened(w, g).float().view(4, 6), atol=1e-6, rtol=0)
    plain, = orthograd_output([torch.nn.Parameter(w.clone())], [g])
    assert not torch.allclose(plain, oracle_flattened(w, g).float().view(4, 6), atol=1e-3)


def test_iterative_edge_cases_zero_weight_and_zero_grad():
    # W = 0: every projection coefficient is 0 and norms are restored -> g' = g
    g = _randn(3, 5, seed=7)
    out, = orthograd_output([torch.nn.Parameter(torch.zeros(3, 5))], [g])
    torch.testing.assert_close(out, g, atol=1e-6, rtol=0)
    # G = 0: the slice norms are floored at 1/sqrt(size), the target is that floor: 0 stays 0
    out, = orthograd_output([torch.nn.Parameter(_randn(3, 5, seed=8))], [torch.zeros(3, 5)])
    assert torch.equal(out, torch.zeros(3, 5))


def test_iterative_bf16_weight_computes_in_fp32():
    w = _randn(5, 3, seed=9).to(torch.bfloat16)
    g = _randn(5, 3, seed=10).to(torch.bfloat16)
    out, = orthograd_output([torch.nn.Parameter(w.clone())], [g])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, oracle_iterative(w.float(), g.float()).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chain", ["iterative", "normed_eps", "normed_atan2"])
def test_the_users_grad_is_never_written(chain):
    """adv_optm normalizes (and orthogonalizes) p.grad in place (spec §1.4, §4.2); adv_chain does not."""
    make = {"iterative": lambda: ac.chain(ac.orthograd(mode="iterative"), ac.scale_by_adam(), ac.eps_divide(),
                                          ac.apply()),
            "normed_eps": lambda: ac.chain(ac.scale_by_adam(normed_momentum="eps"), ac.apply()),
            "normed_atan2": lambda: ac.chain(ac.scale_by_adam(normed_momentum="atan2", betas=(0.0, 0.99)),
                                             ac.apply())}[chain]
    params = [torch.nn.Parameter(_randn(4, 3, seed=11)), torch.nn.Parameter(_randn(3, seed=12))]
    opt = ac.ChainOptimizer(params, make(), lr=0.1)
    for step in range(3):
        grads = [_randn(4, 3, seed=20 + step), _randn(3, seed=40 + step)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "p.grad was modified"


def test_iterative_step_parameter_matches_step():
    """A tensor-scope transform needs no cross-parameter reduction: gradient release gives step()'s numbers."""
    def run(release: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        chain = ac.chain(ac.orthograd(mode="iterative"), ac.scale_by_adam(normed_momentum=True), ac.apply())
        opt = ac.ChainOptimizer(model.parameters(), chain, lr=1e-2)
        x = _randn(8, 5, seed=1)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            if release:
                for p in model.parameters():
                    opt.step_parameter(p, opt.param_groups[0])
            else:
                opt.step()
        return [p.detach().clone() for p in model.parameters()]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# normed momentum: hand formula
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eps", "atan2"])
def test_normed_momentum_first_step_is_a_sign_step(mode):
    # step 1 with bias correction: D = |g|; x = g/(|g| + eps) (~ sign g) or atan2(g, |g|) = pi/4 sign g;
    # m = (1 - b1) x; u = A m / (1 - b1) = sign(g) for both (A = 4/pi for atan2)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(normed_momentum=mode, eps=0.0), ac.apply()), lr=1.0)
    g = torch.tensor([0.3, -7.0, 1e-3, 2.0])
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(-p.detach(), torch.sign(g), atol=1e-6, rtol=0)
    x = g / g.abs() if mode == "eps" else torch.full((4,), math.pi / 4) * torch.sign(g)
    torch.testing.assert_close(opt.state[p]["adam/exp_avg"], 0.1 * x, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(normed_momentum="eps"), dict(normed_momentum=True, eps=1e-3),
                                dict(normed_momentum="atan2"), dict(normed_momentum="eps", nesterov=True),
                                dict(normed_momentum="atan2", nesterov=True, nesterov_coef=0.5),
                                dict(normed_momentum="eps", betas=(0.0, 0.95)),
                                dict(normed_momentum="atan2", bias_correction=False, betas=(0.8, 0.9)),
                                dict(normed_momentum="eps", amsgrad=True)], ids=str)
def test_normed_momentum_follows_the_hand_formula(kw):
    """Spec §2.1 with §4.2, per step: v first, D = sqrt(v)/sqrt(bc2) (+eps), x = g/D or atan2(g, D),
    m = EMA(m, x), u = A*m/bc1 (nesterov: A*(c m + (1-c) x)/bc1), p -= lr*u, decoupled decay."""
    b1, b2 = kw.get("betas", (0.9, 0.999))
    eps = kw.get("eps", 1e-8)
    atan2 = kw["normed_momentum"] == "atan2"
    correct = kw.get("bias_correction", True)
    c = kw.get("nesterov_coef") or b1
    lr, wd = 0.05, 0.1
    p = torch.nn.Parameter(_randn(6, seed=1))
    w = p.detach().double().clone()
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(**kw), ac.weight_decay(wd), ac.apply()), lr=lr)
    m, v, vmax = torch.zeros(6).double(), torch.zeros(6).double(), torch.zeros(6).double()
    for t in range(1, 7):
        g = _randn(6, seed=100 + t) * (1 + 5 * (t == 3))
        p.grad = g.clone()
        opt.step()
        g = g.double()
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if correct else (1.0, 1.0)
        v = b2 * v + (1 - b2) * g * g
        vmax = torch.maximum(vmax, v)
        D = (vmax if kw.get("amsgrad") else v).sqrt() / math.sqrt(bc2)
        x = torch.atan2(g, D) if atan2 else g / (D + eps)
        A = 4 / math.pi if atan2 else 1.0
        if b1 == 0:
            u = A * x
        else:
            m = b1 * m + (1 - b1) * x
            u = A * (c * m + (1 - c) * x) / bc1 if kw.get("nesterov") else A * m / bc1
        w = w * (1 - lr * wd) - lr * u
        torch.testing.assert_close(p.detach().double(), w, atol=1e-6, rtol=0, msg=lambda s: f"step {t}: {s}")
        if b1 != 0:
            torch.testing.assert_close(opt.state[p]["adam/exp_avg"].double(), m, atol=1e-6, rtol=0)
        torch.testing.assert_close(opt.state[p]["adam/exp_avg_sq"].double(), v, atol=1e-7, rtol=1e-6)


def test_normed_momentum_eps_is_fed_by_the_param_group():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(normed_momentum=True), ac.apply()), lr=1.0)
    assert opt.param_groups[0]["eps"] == 1e-8
    opt.param_groups[0]["eps"] = 1.0
    p.grad = torch.tensor([1.0, -3.0])
    opt.step()
    # D = |g|, x = g / (|g| + 1), m = 0.1 x, u = x
    torch.testing.assert_close(-p.detach(), torch.tensor([0.5, -0.75]), atol=1e-6, rtol=0)
    # without normed momentum, adam has no eps: group["eps"] belongs to eps_divide alone
    opt2 = ac.ChainOptimizer([torch.nn.Parameter(torch.zeros(2))],
                             ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-6), ac.apply()), lr=1.0)
    assert opt2.param_groups[0]["eps"] == 1e-6


# ---------------------------------------------------------------------------------------------------
# chain rules, arguments, config
# ---------------------------------------------------------------------------------------------------

def test_a_normalizer_after_normed_momentum_is_a_build_error():
    for norm in (ac.eps_divide(), ac.atan2_scale()):
        with pytest.raises(ValueError, match="denom"):
            ac.chain(ac.scale_by_adam(normed_momentum=True), norm, ac.apply())
    # and a plain adam still needs its normalizer
    with pytest.raises(ValueError, match="denom"):
        ac.chain(ac.scale_by_adam(), ac.apply())


@pytest.mark.parametrize("bad", [dict(mode="rank2"), dict(mode=None), dict(mode=True)])
def test_orthograd_bad_mode_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"orthograd: mode=.*'flattened', 'iterative'"):
        ac.orthograd(**bad)


@pytest.mark.parametrize("bad", [dict(normed_momentum="sign"), dict(normed_momentum=1), dict(eps=-1.0),
                                 dict(normed_momentum=True, eps=float("nan"))], ids=str)
def test_scale_by_adam_bad_normed_arguments_name_the_argument(bad):
    arg = "eps" if "eps" in bad else "normed_momentum"
    with pytest.raises(ValueError, match=f"scale_by_adam: {arg}="):
        ac.scale_by_adam(**bad)


def test_repr_config_round_trip_and_presets():
    c = ac.chain(ac.orthograd(mode="iterative"), ac.scale_by_adam(normed_momentum=True, eps=1e-6), ac.apply())
    assert "orthograd(mode='iterative')" in repr(c) and "normed_momentum='eps'" in repr(c)
    assert ac.chain_from_config(c.to_config()) == c
    assert ac.scale_by_adam(normed_momentum=False) == ac.scale_by_adam()
    assert ac.scale_by_adam(normed_momentum=True) == ac.scale_by_adam(normed_momentum="eps")
    assert ac.orthograd(mode="iterative").scope == "tensor" and ac.orthograd().scope == "layer"
    assert ac.presets.adamw_adv(orthogonal_gradient="iterative").transforms[0] == ac.orthograd(mode="iterative")
    assert ac.presets.adamw_adv(normed_momentum=True, use_atan2=True).names == ("adam", "weight_decay", "apply")
    assert ac.presets.adamw_adv(normed_momentum=True, use_atan2=True).transforms[0] == \
        ac.scale_by_adam(normed_momentum="atan2")
    assert ac.presets.adamw_adv(normed_momentum=True, eps=1e-6).transforms[0] == \
        ac.scale_by_adam(normed_momentum="eps", eps=1e-6)
    for preset in ("lion_adv", "adopt_adv", "simplified_ademamix"):
        assert ac.presets.get(preset, orthogonal_gradient="iterative").transforms[0] == ac.orthograd(mode="iterative")
    with pytest.raises(ValueError, match="normed_momentum.*use_AdEMAMix"):
        ac.presets.adamw_adv(normed_momentum=True, use_AdEMAMix=True)
    with pytest.raises(ValueError, match="normed_momentum"):
        ac.presets.adamw_adv(normed_momentum="yes")


# ---------------------------------------------------------------------------------------------------
# parity with adv-optm 2.5.16
# ---------------------------------------------------------------------------------------------------

def _train(make, steps=50, lr=1e-2, first_step_grad=None):
    """As tests/test_parity_adv_optm.py: a tiny MLP (tall, wide and 1-D tensors), OneCycle schedule.
    ``first_step_grad(p, g)`` replaces each gradient of the first step (for Adopt_adv's v0, below)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3))
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, cycle_momentum=False)
    x, y = torch.randn(64, 10), torch.randn(64, 3)
    for t in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if t == 0 and first_step_grad is not None:
            for p in model.parameters():
                p.grad = first_step_grad(p.detach(), p.grad)
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _assert_parity(cls: str, kwargs: dict, lr: float, **train_kw) -> None:
    ref = _train(lambda p: getattr(adv_optm, cls)(p, lr=lr, **kwargs), lr=lr, **train_kw)
    ours = _train(lambda p: getattr(ac.optim, cls)(p, lr=lr, **kwargs), lr=lr)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


ADAMW_CASES = [
    {"orthogonal_gradient": "iterative"},
    {"orthogonal_gradient": "iterative", "use_atan2": True, "weight_decay": 0.1, "cautious_wd": True},
    {"orthogonal_gradient": "iterative", "kourkoutas_beta": True, "weight_decay": 0.1},
    {"orthogonal_gradient": "iterative", "nesterov": True, "nesterov_coef": 0.5},
    {"normed_momentum": True},
    {"normed_momentum": True, "use_atan2": True},
    {"normed_momentum": True, "nesterov": True, "weight_decay": 0.1},
    {"normed_momentum": True, "use_atan2": True, "nesterov": True, "nesterov_coef": 0.5},
    {"normed_momentum": True, "betas": (0.0, 0.99)},
    {"normed_momentum": True, "use_atan2": True, "betas": (0.0, 0.99)},
    {"normed_momentum": True, "use_bias_correction": False, "eps": 1e-6},
    {"normed_momentum": True, "kourkoutas_beta": True, "k_warmup_steps": 5},
    {"normed_momentum": True, "use_atan2": True, "orthogonal_gradient": "iterative", "weight_decay": 0.1},
]


@pytest.mark.parametrize("kwargs", ADAMW_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_adamw_adv_matches_adv_optm_2_5_16(kwargs):
    _assert_parity("AdamW_adv", kwargs, 1e-2)


@pytest.mark.parametrize("kwargs", [{"orthogonal_gradient": "iterative"},
                                    {"orthogonal_gradient": "iterative", "weight_decay": 0.1, "cautious_wd": True}],
                         ids=str)
def test_lion_adv_iterative_matches_adv_optm_2_5_16(kwargs):
    _assert_parity("Lion_adv", kwargs, 1e-3)


def test_adopt_adv_iterative_matches_adv_optm_2_5_16_with_v0_from_the_orthogonalized_gradient():
    """adv-optm's Adopt_adv initializes v from the *raw* p.grad on its first (skipped) call and
    orthogonalizes only later (spec §2.2); adv_chain's scale_by_adopt sees the gradient stage's output
    at every step, so its v0 is the orthogonalized gradient squared (a documented deviation that
    predates the iterative mode). Handing the reference the orthogonalized gradient on the first call
    (where it only initializes v) makes the two comparable from then on."""
    from adv_optm.util.OrthoGrad import iterative_ortho_project
    _assert_parity("Adopt_adv", {"orthogonal_gradient": "iterative"}, 1e-2,
                   first_step_grad=lambda p, g: iterative_ortho_project(p, g.clone()))


# ---------------------------------------------------------------------------------------------------
# compile, bf16
# ---------------------------------------------------------------------------------------------------

def _mlp_run(make_opt, dtype=torch.float32, steps=4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2), torch.nn.LayerNorm(2)).to(dtype)
    opt = make_opt(model.parameters())
    x, y = _randn(16, 6, seed=1).to(dtype), _randn(16, 2, seed=2).to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kwargs", [dict(orthogonal_gradient="iterative", normed_momentum=True, weight_decay=0.1),
                                    dict(orthogonal_gradient="iterative", use_atan2=True, cautious_mask=True),
                                    dict(normed_momentum=True, use_atan2=True, nesterov=True)], ids=str)
def test_compiled_matches_eager(kwargs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _mlp_run(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, **kwargs))
    compiled = _mlp_run(lambda p: ac.ChainOptimizer(p, "adamw_adv", lr=1e-2, compile=True, **kwargs))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "compile=True compiled nothing"
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(orthogonal_gradient="iterative"),
                                    dict(normed_momentum=True, weight_decay=0.1),
                                    dict(orthogonal_gradient="iterative", normed_momentum=True, use_atan2=True)],
                         ids=str)
def test_bf16_with_stochastic_rounding_runs(kwargs):
    opts = []

    def make(params):
        opts.append(ac.optim.AdamW_adv(params, lr=1e-2, stochastic_rounding=True, **kwargs))
        return opts[-1]

    before = _mlp_run(make, torch.bfloat16, steps=0)
    after = _mlp_run(make, torch.bfloat16)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "nothing moved"
    assert all(a.dtype == torch.bfloat16 and torch.isfinite(a).all() for a in after)
    state = opts[-1].state
    assert state and all(v.dtype == torch.float32 for st in state.values() for k, v in st.items()
                         if isinstance(v, torch.Tensor) and k != "step")
