"""The Muon family (adv_chain/transforms/muon.py): Newton-Schulz bands and batching, low-rank
orthogonalization (adv_chain/transforms/low_rank.py) against a plain-torch re-implementation with the
same sketch, each transform against formulas written here from the spec (§2.7, §2.8, §3.3, §5.6-§5.8),
parity with adv-optm 2.5.16's Muon_adv / AdaMuon_adv, the bug fixes B1/B6/B7, argument errors,
checkpoints and compile."""
import copy
import math

import adv_optm
import pytest
import torch

import adv_chain as ac
from adv_chain.transforms.low_rank import gaussian_sketch
from adv_chain.transforms.muon import QUINTIC, orthogonalize

A, B, C = QUINTIC


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is faster and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _poly_iterate(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What the quintic iteration does to one singular value (in float64)."""
    for _ in range(steps):
        s = A * s + B * s ** 3 + C * s ** 5
    return s


def _ns_oracle(g: torch.Tensor, steps=5, eps=1e-7) -> torch.Tensor:
    """Spec §5.6 for one matrix, fp64, unfused products."""
    x = g.double()
    t = x.shape[0] > x.shape[1]
    if t:
        x = x.T
    x = x / max(x.norm().item(), eps)
    for _ in range(steps):
        s = x @ x.T
        x = A * x + B * (s @ x) + C * (s @ s @ x)
    return (x.T if t else x).float()


def _params(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _run(params, chain, grads_per_step, lr=1.0, **kw):
    opt = ac.ChainOptimizer(params, chain, lr=lr, **kw)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
    return opt


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


# -- (1) singular values ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (8, 4, 3, 3)])
def test_ns_singular_values_follow_the_polynomial_and_stay_in_band(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    out, = orthogonalize([g.reshape(shape[0], -1)], dtype=torch.float32)
    sv_out = torch.linalg.svdvals(out.double())
    sv_in = torch.linalg.svdvals(g.reshape(shape[0], -1).double())
    expected = _poly_iterate(sv_in / sv_in.square().sum().sqrt())
    # the iteration maps each singular value through p^5 (order may change: p is not monotone)
    torch.testing.assert_close(sv_out.sort().values, expected.sort().values, atol=2e-5, rtol=0)
    grid = _poly_iterate(torch.linspace(sv_in.min().item() / sv_in.norm().item(), 1.0, 20001, dtype=torch.float64))
    lo, hi = grid.min().item(), grid.max().item()
    assert 0.6 < lo and hi < 1.21  # the band the quintic coefficients give on this input's range
    assert sv_out.min() >= lo - 1e-5 and sv_out.max() <= hi + 1e-5


def test_cans_singular_values_within_its_final_error_bound():
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    lower = 1e-3
    out, = orthogonalize([g], steps=10, method="cans", cans_lower_bound=lower, dtype=torch.float64)
    # the bound recursion of spec §5.6, written again here
    lo, hi, err = lower, 1.0, 1.0
    for _ in range(10):
        e2 = (lo * lo + lo * hi + hi * hi) / 3
        k, l_ = 2 * e2 ** 1.5, lo * hi * (lo + hi)
        err = (k - l_) / (k + l_)
        lo, hi = 1 - err, 1 + err
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() >= 1 - err - 1e-5 and sv.max() <= 1 + err + 1e-5 and err < 0.01


def test_ns_matches_the_formula_oracle_fp32():
    for shape in [(16, 40), (40, 16), (12, 12)]:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        out, = orthogonalize([g], dtype=torch.float32)
        torch.testing.assert_close(out, _ns_oracle(g), atol=2e-5, rtol=0)


# -- (2) batched by shape == a per-matrix loop --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_by_shape_equals_per_matrix_loop(dtype):
    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(s, generator=gen) for s in [(16, 32), (32, 16), (16, 32), (8, 8), (16, 32), (32, 16), (1, 7)]]
    batched = orthogonalize(mats, dtype=dtype)
    loop = [orthogonalize([m], dtype=dtype)[0] for m in mats]
    for x, y in zip(batched, loop):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_transform_on_a_bucket_equals_each_tensor_alone():
    shapes = [(16, 32), (16, 32), (32, 16), (4, 2, 3), (16, 32)]
    grads = _grads(shapes, 3)
    chain = lambda: ac.chain(ac.muon_momentum(), ac.newton_schulz(dtype="float32"), ac.muon_scale(), ac.apply())
    together = _params(*shapes)
    _run(together, chain(), grads, lr=0.01)
    for i, s in enumerate(shapes):
        alone = [_params(*shapes)[i]]
        _run(alone, chain(), [[g[i]] for g in grads], lr=0.01)
        torch.testing.assert_close(alone[0], together[i], atol=1e-6, rtol=0)


# -- (2b) low-rank orthogonalization (spec §5.6, arXiv 2509.11983) ---------------------------------------

def _low_rank_oracle(g: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Spec §5.6's last paragraph in fp64: Q = qr(G Omega).Q, result Q NS(Q^T G); the NS floor is the
    whole matrix's (eps=1e-7 here, so it never binds)."""
    q = torch.linalg.qr(g.double() @ omega.double()).Q
    return (q @ _ns_oracle(q.T @ g.double()).double()).float()


@pytest.mark.parametrize("shape,rank", [((16, 40), 3), ((40, 16), 5), ((12, 12), 12), ((6, 30), 6), ((1, 9), 4)])
def test_low_rank_matches_a_plain_reimplementation_with_the_same_sketch(shape, rank):
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(shape, generator=gen)
    omega = torch.randn(shape[1], min(rank, *shape), generator=gen)
    out, = orthogonalize([g], sketches=[omega], dtype=torch.float32)
    torch.testing.assert_close(out, _low_rank_oracle(g, omega), atol=3e-5, rtol=0)


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_low_rank_with_a_full_sketch_spans_the_same_space_as_full_rank(shape):
    """r = min(m, n): Q spans G's range and the iteration commutes with it, so Q NS(Q^T G) = NS(G)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    full, = orthogonalize([g], dtype=torch.float32)
    low, = orthogonalize([g], sketches=[gaussian_sketch(shape[1], min(shape), 5, g.device)], dtype=torch.float32)
    torch.testing.assert_close(low, full, atol=5e-5, rtol=0)
    big, = orthogonalize([g], dtype=torch.float32,  # a larger requested rank is cut to min(m, n) by the transform
                         sketches=[gaussian_sketch(shape[1], min(shape), 6, g.device)])
    torch.testing.assert_close(big, full, atol=5e-5, rtol=0)


def test_low_rank_output_has_rank_r_in_the_sketched_range():
    g = torch.randn(20, 30, generator=torch.Generator().manual_seed(10))
    for r in (1, 3, 7):
        omega = gaussian_sketch(30, r, 11 + r, g.device)
        out, = orthogonalize([g], sketches=[omega], dtype=torch.float32)
        sv = torch.linalg.svdvals(out.double())
        assert int((sv > 1e-4).sum()) == r and sv[:r].min() > 0.6 and sv[0] < 1.2  # orthogonal on r directions
        q = torch.linalg.qr(g.double() @ omega.double()).Q
        assert (out.double() - q @ (q.T @ out.double())).abs().max() < 1e-5  # columns in span(G Omega)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_batched_by_shape_equals_per_matrix_loop(dtype):
    gen = torch.Generator().manual_seed(12)
    mats = [torch.randn(s, generator=gen) for s in [(16, 32), (32, 16), (16, 32), (16, 32)]]
    sk = [torch.randn(m.shape[1], 4, generator=gen) for m in mats]
    batched = orthogonalize(mats, sketches=sk, dtype=dtype)
    for m, o, x in zip(mats, sk, batched):
        torch.testing.assert_close(x, orthogonalize([m], sketches=[o], dtype=dtype)[0], atol=1e-6, rtol=0)


def test_gaussian_sketch_is_standard_normal_a_pure_function_of_its_key_and_leaves_the_rng_alone():
    rng = torch.get_rng_state()
    z = gaussian_sketch(500, 200, 12345, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01 and abs((z ** 4).mean().item() - 3) < 0.05
    assert abs(torch.corrcoef(torch.stack([z[:, 0], z[:, 1]]))[0, 1].item()) < 0.15
    assert torch.equal(z, gaussian_sketch(500, 200, 12345, torch.device("cpu")))
    assert not torch.equal(z, gaussian_sketch(500, 200, 12346, torch.device("cpu")))
    assert torch.equal(gaussian_sketch(3, 2, torch.tensor(12345, dtype=torch.int32), torch.device("cpu")),
                       gaussian_sketch(3, 2, 12345, torch.device("cpu")))


def _low_rank_chain(seed=0):
    return ac.chain(ac.muon_momentum(), ac.newton_schulz(rank=4, seed=seed), ac.muon_scale(),
                    ac.stochastic_round_apply())


def test_low_rank_transform_is_seeded_and_uses_no_global_rng():
    shapes = [(8, 12), (8, 12), (12, 8)]
    grads = _grads(shapes, 3)
    rng = torch.get_rng_state()
    runs = [_params(*shapes) for _ in range(3)]
    for params, seed in zip(runs, (0, 0, 1)):
        _run(params, _low_rank_chain(seed), grads, lr=0.01)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))          # same seed, same run
    assert all(not torch.equal(x, y) for x, y in zip(runs[0], runs[2]))      # another seed, other sketches


def test_low_rank_sketch_is_new_for_every_tensor_and_step():
    """Rank 1 on the same gradient: the step is the sketched direction, so two equal steps would mean a
    repeated sketch. Two same-shaped tensors over two steps give four different steps."""
    g = torch.randn(8, 12, generator=torch.Generator().manual_seed(13))
    params = _params((8, 12), (8, 12))
    opt = ac.ChainOptimizer(params, ac.chain(ac.newton_schulz(rank=1, dtype="float32"), ac.apply()), lr=1.0)
    steps = []
    for _ in range(2):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = g.clone()
        opt.step()
        steps += [(b - p.detach()).flatten() for b, p in zip(before, params)]
    for i in range(len(steps)):
        assert torch.linalg.matrix_rank(steps[i].view(8, 12)) == 1
        for j in range(i + 1, len(steps)):
            assert not torch.allclose(steps[i], steps[j], atol=1e-4), (i, j)


# -- (3) every transform against the spec's formulas ---------------------------------------------------

def test_approx_mars_formula():
    gamma, beta = 0.05, 0.9
    shapes = [(3, 4), (5,)]
    grads = _grads(shapes, 4)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    _run(params, ac.chain(ac.approx_mars(gamma, beta), ac.apply()), grads, lr=0.1)
    for i in range(len(shapes)):
        expect, last = start[i].clone(), torch.zeros(shapes[i])
        for step in grads:
            g = step[i]
            expect -= 0.1 * (g + gamma * beta / (1 - beta) * (g - last))
            last = g
        torch.testing.assert_close(params[i].detach(), expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nesterov,coef", [(True, None), (True, 0.5), (False, None)])
def test_muon_momentum_formula(nesterov, coef):
    beta = 0.9
    shapes = [(3, 4), (6,)]
    grads = _grads(shapes, 4)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    _run(params, ac.chain(ac.muon_momentum(beta, nesterov, coef), ac.apply()), grads, lr=0.1)
    c = beta if coef is None else coef
    for i in range(len(shapes)):
        m, expect = torch.zeros(shapes[i]), start[i].clone()
        for step in grads:
            g = step[i]
            m = beta * m + (1 - beta) * g
            expect -= 0.1 * (c * m + (1 - c) * g if nesterov else m)
        torch.testing.assert_close(params[i].detach(), expect, atol=1e-6, rtol=0)


def test_normuon_formula():
    beta2, eps = 0.8, 1e-3
    shapes = [(4, 6), (3, 2, 2), (5,)]
    grads = _grads(shapes, 3)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    _run(params, ac.chain(ac.normuon(beta2, eps), ac.apply()), grads, lr=0.1)
    for i, s in enumerate(shapes):
        rows = s[0] if len(s) > 1 else 1
        v, expect = torch.zeros(rows), start[i].clone()
        for step in grads:
            o = step[i].reshape(rows, -1)
            v = beta2 * v + (1 - beta2) * (o ** 2).mean(1)
            expect -= 0.1 * (o / (v.sqrt()[:, None] + eps)).reshape(s)
        torch.testing.assert_close(params[i].detach(), expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kappa", ["auto", 1.0, 2.0, 1.5, 3.0])
def test_kappa_projection_formula(kappa):
    shapes = [(4, 6), (2, 3, 2, 2)]
    grads = _grads(shapes, 1)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    _run(params, ac.chain(ac.kappa_projection(kappa), ac.apply()), grads)
    for i, s in enumerate(shapes):
        x = grads[0][i]
        k = (2.0 if len(s) >= 4 else 1.0) if kappa == "auto" else kappa
        if k == 1.0:
            y = x.sign()
        elif k == 2.0:
            y = x
        else:
            y = x.sign() * x.abs() ** (k - 1) / max((x.abs() ** k).sum().item() ** ((k - 1) / k), 1e-12)
        torch.testing.assert_close(params[i].detach(), start[i] - y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["rms", "aspect"])
def test_muon_scale_formula(mode):
    shapes = [(8, 2), (2, 8), (6, 2, 3), (5,)]
    grads = _grads(shapes, 1)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    _run(params, ac.chain(ac.muon_scale(mode, rms_target=0.3), ac.apply()), grads)
    for i, s in enumerate(shapes):
        u = grads[0][i]
        rows = s[0] if len(s) > 1 else 1
        cols = u.numel() // rows
        f = 0.3 * math.sqrt(u.numel()) / max(u.norm().item(), 1e-8) if mode == "rms" else math.sqrt(max(1, rows / cols))
        torch.testing.assert_close(params[i].detach(), start[i] - f * u, atol=1e-6, rtol=0)


def test_full_muon_chain_matches_spec_oracle_fp32():
    """Spec §2.7 (nesterov, rms) + §3.3 + §5.7, written per tensor with the fp64 NS oracle."""
    shapes = [(8, 12), (12, 8), (6, 2, 3)]
    grads = _grads(shapes, 6)
    params = _params(*shapes)
    start = [p.detach().clone() for p in params]
    chain = ac.chain(ac.approx_mars(0.025, 0.9), ac.muon_momentum(0.9), ac.newton_schulz(dtype="float32"),
                     ac.normuon(0.95, 1e-8), ac.muon_scale(), ac.weight_decay(0.1), ac.apply())
    lr = 0.01
    _run(params, chain, grads, lr=lr)
    for i, s in enumerate(shapes):
        p, m, last, v = start[i].clone(), torch.zeros(s), torch.zeros(s), torch.zeros(s[0])
        for step in grads:
            g = step[i]
            c = g + 0.025 * 0.9 / 0.1 * (g - last)
            last = g
            m = 0.9 * m + 0.1 * c
            o = _ns_oracle((0.9 * m + 0.1 * c).reshape(s[0], -1))
            v = 0.95 * v + 0.05 * (o ** 2).mean(1)
            o = o / (v.sqrt()[:, None] + 1e-8)
            u = o * 0.2 * math.sqrt(o.numel()) / o.norm()
            p = p - lr * 0.1 * p - lr * u.reshape(s)
        torch.testing.assert_close(params[i].detach(), p, atol=2e-6, rtol=0)


# -- (4) parity with adv-optm 2.5.16 --------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)  # every parameter 2-D: all of them take the Muon path
    return torch.nn.Sequential(torch.nn.Linear(12, 32, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(32, 24, bias=False), torch.nn.Tanh(), torch.nn.Linear(24, 6, bias=False))


# adv-optm state key -> ours
_STATE_MAP = {"momentum_buffer": "muon_momentum/momentum_buffer", "last_grad": "approx_mars/last_grad",
              "normuon_v": "normuon/v", "second_momentum_buffer": "adam/exp_avg_sq"}


def _parity(make_ref, chain, steps=20, lr=1e-2, forced=True):
    """Both optimizers train the same model for ``steps``. ``forced``: before each step our params and
    state are set to the reference's, so each step is compared from identical inputs (the bf16
    Newton-Schulz otherwise amplifies 1-ulp fp32 differences of the scaling into visible drift)."""
    ref_model, our_model = _mlp(), _mlp()
    ref, ours = make_ref(ref_model.parameters(), lr), ac.ChainOptimizer(our_model.parameters(), chain, lr=lr)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=gen), torch.randn(64, 6, generator=gen)
    worst = 0.0
    for _ in range(steps):
        for model in (ref_model, our_model):
            model.zero_grad()
            (model(x) - y).square().mean().backward()
        if forced:
            with torch.no_grad():
                for p, q in zip(ref_model.parameters(), our_model.parameters()):
                    q.copy_(p)
                    q.grad.copy_(p.grad)
                    for k, ours_k in _STATE_MAP.items():
                        if k in ref.state[p] and ours_k in ours.state[q]:
                            ours.state[q][ours_k].copy_(ref.state[p][k])
        ref.step()
        ours.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), our_model.parameters())))
    for p, q in zip(ref_model.parameters(), our_model.parameters()):
        for k, ours_k in _STATE_MAP.items():
            if forced and k in ref.state[p]:
                torch.testing.assert_close(ours.state[q][ours_k], ref.state[p][k], atol=1e-6, rtol=0)
    return worst


MUON_CASES = [
    ({}, lambda: ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply())),
    ({"rms_rescaling": False, "weight_decay": 0.1, "beta1": 0.9},
     lambda: ac.chain(ac.muon_momentum(0.9), ac.newton_schulz(), ac.muon_scale("aspect"), ac.weight_decay(0.1), ac.apply())),
    ({"normuon_variant": True, "approx_mars": True, "nesterov_coef": 0.8, "ns_steps": 6},
     lambda: ac.chain(ac.approx_mars(), ac.muon_momentum(nesterov_coef=0.8), ac.newton_schulz(steps=6), ac.normuon(),
                      ac.muon_scale(), ac.apply())),
    ({"accelerated_ns": True, "nesterov": False, "ns_eps": None},
     lambda: ac.chain(ac.muon_momentum(nesterov=False), ac.newton_schulz(method="cans", eps=None), ac.muon_scale(), ac.apply())),
    ({"orthogonal_gradient": "flattened", "approx_mars": True, "mars_gamma": 0.1},
     lambda: ac.chain(ac.approx_mars(0.1), ac.orthograd(), ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply())),
]


@pytest.mark.parametrize("kw,chain", MUON_CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_muon_adv_parity(kw, chain):
    worst = _parity(lambda p, lr: adv_optm.Muon_adv(p, lr=lr, **kw), chain())
    assert worst <= 1e-6, worst


def _adamuon(eps=1e-8, b2=0.95, atan2=False, rms=True, **kw):
    tail = (ac.atan2_scale(), ac.muon_scale("rms", 0.2 * 4 / math.pi) if rms else ac.muon_scale("aspect")) if atan2 \
        else (ac.eps_divide(eps), ac.muon_scale("rms" if rms else "aspect"))
    return ac.chain(ac.muon_momentum(**kw), ac.kappa_projection(), ac.newton_schulz(),
                    ac.scale_by_adam(betas=(0.0, b2), bias_correction=False), *tail, ac.apply())


ADAMUON_CASES = [
    ({}, lambda: _adamuon()),
    ({"use_atan2": True}, lambda: _adamuon(atan2=True)),
    ({"use_atan2": True, "rms_rescaling": False}, lambda: _adamuon(atan2=True, rms=False)),
    ({"eps": None, "betas": (0.9, 0.99), "nesterov": False}, lambda: _adamuon(eps=None, b2=0.99, beta=0.9, nesterov=False)),
    ({"normuon_variant": True, "eps": 1e-6},
     lambda: ac.chain(ac.muon_momentum(), ac.kappa_projection(), ac.newton_schulz(), ac.normuon(0.95, 1e-6),
                      ac.muon_scale(), ac.apply())),
]


@pytest.mark.parametrize("kw,chain", ADAMUON_CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_adamuon_adv_parity(kw, chain):
    worst = _parity(lambda p, lr: adv_optm.AdaMuon_adv(p, lr=lr, **kw), chain())
    assert worst <= 1e-6, worst


def test_free_running_parity_without_teacher_forcing():
    """Not forced: AdaMuon's sign makes the run insensitive to 1-ulp differences (stays exact to
    fp32 rounding); Muon's bf16 Newton-Schulz drifts, but stays far below the update size."""
    assert _parity(lambda p, lr: adv_optm.AdaMuon_adv(p, lr=lr), _adamuon(), forced=False) <= 1e-6
    muon = ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply())
    assert _parity(lambda p, lr: adv_optm.Muon_adv(p, lr=lr), muon, forced=False, steps=20) <= 1e-2 * 0.2 * 2


# -- bug fixes -----------------------------------------------------------------------------------------

def test_b1_factored_momentum_keeps_lr_and_the_weight_matrix_geometry():
    """adv_optm's factored Muon subtracts the raw orthogonal matrix (no lr, update RMS 0.23 at lr=1e-6)
    and orthogonalizes a square-ish (32, 32) reshape of a (16, 64) weight. Here lr applies and the
    update is orthogonal on the weight's own (16, 64) view."""
    lr = 1e-6
    p = torch.nn.Parameter(torch.zeros(16, 64))  # zero weights: a 1e-6 step is exact in fp32
    start = p.detach().clone()
    chain = ac.chain(ac.factored_state(ac.muon_momentum()), ac.newton_schulz(dtype="float32"), ac.muon_scale(), ac.apply())
    _run([p], chain, _grads([(16, 64)], 1), lr=lr)
    delta = (start - p.detach()).double()
    assert abs(delta.square().mean().sqrt().item() - 0.2 * lr) < 1e-3 * 0.2 * lr
    sv = torch.linalg.svdvals(delta / delta.norm() * math.sqrt(16))  # unit mean-square singular value
    assert sv.max() / sv.min() < 1.7  # orthogonal up to the quintic band (about 0.68..1.13)
    sv_square = torch.linalg.svdvals(delta.reshape(32, 32))
    assert sv_square.max() / sv_square.min() > 3  # not orthogonal on the reshape adv_optm would use


def test_b6_scale_reaches_bf16_params_with_fp32_state():
    """adv_optm's Muon drops its (spectral) scaling when the update's dtype differs from the param's;
    here the direction is fp32 and every scale reaches the bf16 parameter."""
    lr = 0.05
    p = torch.nn.Parameter((torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 0.01).bfloat16())
    start = p.detach().float().clone()
    opt = _run([p], ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply()),
               _grads([(32, 48)], 1), lr=lr)
    assert opt.state[p]["muon_momentum/momentum_buffer"].dtype == torch.float32
    rms = (p.detach().float() - start).square().mean().sqrt().item()
    assert abs(rms - 0.2 * lr) < 0.05 * 0.2 * lr


def test_b7_vectors_and_scalars_are_orthogonalized_as_rows():
    """adv_optm crashes on 1-D params forced into the Muon path; here a vector is a 1 x n matrix whose
    orthogonalization is u / ||u||, so the rms-scaled step is -lr * 0.2 * sqrt(n) * g / ||g||."""
    params = _params((7,), ())
    start = [p.detach().clone() for p in params]
    grads = _grads([(7,), ()], 1)
    _run(params, ac.chain(ac.muon_momentum(), ac.newton_schulz(dtype="float32"), ac.normuon(), ac.muon_scale(), ac.apply()),
         grads, lr=0.1)
    for p, s, g in zip(params, start, grads[0]):
        expect = s - 0.1 * 0.2 * math.sqrt(g.numel()) * g / g.norm()
        torch.testing.assert_close(p.detach(), expect, atol=1e-6, rtol=0)


# -- (5) argument errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make,words", [
    (lambda: ac.newton_schulz(steps=-1), ["steps=-1", ">= 0"]),
    (lambda: ac.newton_schulz(steps=2.5), ["steps=2.5", "int"]),
    (lambda: ac.newton_schulz(coefficients=(1.0, 2.0)), ["coefficients=(1.0, 2.0)", "three"]),
    (lambda: ac.newton_schulz(coefficients=(1.0, "x", 2.0)), ["coefficients[1]", "'x'"]),
    (lambda: ac.newton_schulz(eps=0.0), ["eps=0.0", "(0.0, inf]"]),
    (lambda: ac.newton_schulz(method="cubic"), ["method='cubic'", "quintic", "cans"]),
    (lambda: ac.newton_schulz(dtype="float16"), ["dtype='float16'", "bfloat16", "float32"]),
    (lambda: ac.newton_schulz(cans_lower_bound=2.0), ["cans_lower_bound=2.0", "(0.0, 1.0]"]),
    (lambda: ac.newton_schulz(rank=0), ["rank=0", "positive int >= 1"]),
    (lambda: ac.newton_schulz(rank=2.5), ["rank=2.5", "positive int"]),
    (lambda: ac.newton_schulz(rank=True), ["rank=True", "positive int"]),
    (lambda: ac.newton_schulz(rank=4, seed=-1), ["seed=-1", "int >= 0"]),
    (lambda: ac.muon_momentum(beta=1.0), ["beta=1.0", "[0.0, 1.0)"]),
    (lambda: ac.muon_momentum(nesterov_coef=1.5), ["nesterov_coef=1.5", "[0.0, 1.0]"]),
    (lambda: ac.muon_momentum(nesterov="yes"), ["nesterov='yes'", "True or False"]),
    (lambda: ac.approx_mars(gamma=-0.1), ["gamma=-0.1", "[0.0, inf]"]),
    (lambda: ac.approx_mars(beta=1.0), ["beta=1.0", "[0.0, 1.0)"]),
    (lambda: ac.normuon(beta2=-0.5), ["beta2=-0.5", "[0.0, 1.0)"]),
    (lambda: ac.normuon(eps=-1.0), ["eps=-1.0", "[0.0, inf]"]),
    (lambda: ac.muon_scale(mode="spectral"), ["mode='spectral'", "rms", "aspect"]),
    (lambda: ac.muon_scale(rms_target=0.0), ["rms_target=0.0", "(0.0, inf]"]),
    (lambda: ac.kappa_projection(0.5), ["kappa=0.5", "[1.0, inf]"]),
    (lambda: ac.kappa_projection("sign"), ["kappa='sign'", "'auto'"]),
])
def test_bad_arguments_name_argument_value_and_range(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_chain_checker_places_the_stages():
    assert [t.stage for t in (ac.approx_mars(), ac.muon_momentum(), ac.kappa_projection(), ac.newton_schulz(),
                              ac.normuon(), ac.muon_scale())] == [
        "gradient", "moment", "normalize", "normalize", "normalize", "scale"]
    with pytest.raises(ValueError, match=r"gradient-stage transform approx_mars.*after muon_momentum"):
        ac.chain(ac.muon_momentum(), ac.approx_mars(), ac.newton_schulz(), ac.apply())


def test_bad_param_group_override_is_named():
    p, = _params((4, 4))
    chain = ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply())
    with pytest.raises(ValueError, match=r"muon_momentum.*beta=1\.5.*\[0\.0, 1\.0\)"):
        ac.ChainOptimizer([{"params": [p], "muon_momentum.beta": 1.5}], chain, lr=0.1)


# -- (6) checkpoints, config and compile -------------------------------------------------------------------

def _full_chain(dtype="float32"):
    return ac.chain(ac.approx_mars(), ac.muon_momentum(), ac.newton_schulz(dtype=dtype), ac.normuon(),
                    ac.muon_scale(), ac.weight_decay(0.01), ac.apply())


def test_config_round_trip():
    c = ac.chain(ac.approx_mars(0.1, 0.9), ac.muon_momentum(0.9, nesterov_coef=0.5),
                 ac.newton_schulz(steps=4, coefficients=(3.0, -4.0, 2.0), eps=None, method="cans", cans_lower_bound=0.01),
                 ac.kappa_projection(1.5), ac.normuon(0.9, 1e-6), ac.muon_scale("aspect", 0.3), ac.apply())
    assert ac.chain_from_config(c.to_json()) == c
    low = ac.chain(ac.newton_schulz(rank=16, seed=3), ac.apply())
    assert ac.chain_from_config(low.to_json()) == low and "rank=16, seed=3" in repr(low)


def test_state_dict_round_trip_continues_identically():
    shapes = [(8, 12), (12, 8), (5,)]
    grads = _grads(shapes, 8)
    a = _params(*shapes)
    opt_a = _run(a, _full_chain(), grads[:4], lr=0.01)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = ac.ChainOptimizer(b, _full_chain(), lr=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for opt, ps in ((opt_a, a), (opt_b, b)):
        for step in grads[4:]:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_low_rank_resumes_identically_after_a_checkpoint():
    """The sketch is a function of (seed, step, parameter): a run resumed from a state_dict draws the
    same sketches as the uninterrupted one, with nothing about them in the checkpoint."""
    shapes = [(8, 12), (12, 8), (8, 12)]
    grads = _grads(shapes, 6)
    a = _params(*shapes)
    opt_a = _run(a, _low_rank_chain(5), grads[:3], lr=0.01)
    assert not any("newton_schulz" in k for k in opt_a.state[a[0]])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = ac.ChainOptimizer(b, _low_rank_chain(5), lr=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for opt, ps in ((opt_a, a), (opt_b, b)):
        for step in grads[3:]:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_dtypes_survive_a_bf16_checkpoint():
    a = _params((8, 12), dtype=torch.bfloat16)
    opt = _run(a, _full_chain("bfloat16"), _grads([(8, 12)], 2), lr=0.01)
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt_b = ac.ChainOptimizer(b, _full_chain("bfloat16"), lr=0.01)
    opt_b.load_state_dict(opt.state_dict())
    state = opt_b.state[b[0]]
    for key in ("approx_mars/last_grad", "muon_momentum/momentum_buffer", "normuon/v"):
        assert state[key].dtype == torch.float32, key
    assert state["normuon/v"].shape == (8,)


def test_compiled_matches_eager():
    shapes = [(8, 12), (8, 12), (12, 8)]
    grads = _grads(shapes, 4)
    eager, compiled = _params(*shapes), _params(*shapes)
    _run(eager, _full_chain(), grads, lr=0.01)
    torch._dynamo.reset()
    _run(compiled, _full_chain(), grads, lr=0.01, compile=True)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
