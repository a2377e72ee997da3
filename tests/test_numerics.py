"""Stochastic rounding and Kahan-compensated writes for bf16/fp16 parameters.

Oracles:
* unbiasedness: stochastic rounding of x between neighbours lo < x < hi gives hi with probability
  p = (x - lo) / (hi - lo), so the mean of N independent roundings has expectation x and standard
  deviation (hi - lo) * sqrt(p * (1 - p) / N). We accept |mean - x| <= 5 such sigmas (a false
  alarm has probability ~6e-7 per case).
* optimizer tracking: an fp32 run of the same chain is the reference; plain round-to-nearest in
  bf16 loses every update smaller than half a bf16 ulp.
"""
import io
import math

import pytest
import torch

import adv_chain as ac
from adv_chain._core.numerics import stochastic_round

N = 200_000
SIGMAS = 5.0


def neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    """The two adjacent `dtype` values around fp32 `x` (lo < x < hi), computed with torch.nextafter."""
    x32 = torch.tensor([x], dtype=torch.float32)
    r = x32.to(dtype)
    if r.float().item() < x:
        lo, hi = r, torch.nextafter(r, torch.tensor([math.inf], dtype=dtype))
    else:
        lo, hi = torch.nextafter(r, torch.tensor([-math.inf], dtype=dtype)), r
    lo, hi = lo.float().item(), hi.float().item()
    assert lo < x < hi, "test setup: x must not be representable in dtype"
    return lo, hi


def fp32(x: float) -> float:
    """x as the fp32 value the rounding actually sees."""
    return torch.tensor(x, dtype=torch.float32).item()


# ---------------------------------------------------------------------------------------------------
# the rounding function
# ---------------------------------------------------------------------------------------------------

UNBIASED_CASES = [
    # bf16 has 8 significant bits: neighbours of 1 + k*2^-10 are 1 and 1 + 2^-7, so p = k/8
    (torch.bfloat16, 1 + 1 * 2 ** -10),
    (torch.bfloat16, 1 + 3 * 2 ** -10),
    (torch.bfloat16, 1 + 5 * 2 ** -10),
    (torch.bfloat16, -(1 + 2 ** -10)),
    (torch.bfloat16, 1000.3),
    (torch.bfloat16, -7.3e-6),
    (torch.bfloat16, 1e-30),
    # fp16 has 11 significant bits: neighbours of 1 + k*2^-13 are 1 and 1 + 2^-10, so p = k/8
    (torch.float16, 1 + 1 * 2 ** -13),
    (torch.float16, 1 + 3 * 2 ** -13),
    (torch.float16, -(1 + 5 * 2 ** -13)),
    (torch.float16, 1000.3),
    (torch.float16, -7.3e-6),          # fp16 subnormal range (< 6.1e-5)
    (torch.float16, 3e-7),             # a few subnormal ulps (5.96e-8)
]


@pytest.mark.parametrize("dtype, x", UNBIASED_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_stochastic_round_is_unbiased(dtype, x):
    x = fp32(x)
    lo, hi = neighbours(x, dtype)
    p = (x - lo) / (hi - lo)
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / N)

    rounded = stochastic_round(torch.full((N,), x), dtype, 0, 12345)

    assert rounded.dtype == dtype and rounded.shape == (N,)
    r = rounded.double()
    assert bool(((r == lo) | (r == hi)).all()), "every result is one of the two neighbours"
    assert abs(r.mean().item() - x) <= SIGMAS * sigma
    # the fraction rounded up is p: the same test, stated on the probability itself
    assert abs((r == hi).double().mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_representable_values_are_unchanged(dtype):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-6, 1e-3, 1.0, 1e3])[torch.randint(0, 4, (20_000,), generator=g)]
    values = (torch.randn(20_000, generator=g) * scales).to(dtype).float()
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -2.0, torch.finfo(dtype).max,
                             torch.finfo(dtype).tiny])
    x = torch.cat([values, specials])

    out = stochastic_round(x, dtype, 0, 777).float()

    assert torch.equal(out, x)
    assert torch.equal(torch.signbit(out), torch.signbit(x))  # -0.0 keeps its sign
    nan = stochastic_round(torch.tensor([math.nan]), dtype, 0, 777)
    assert torch.isnan(nan).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_same_offset_and_key_reproduce_exactly(dtype):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1))
    a = stochastic_round(x, dtype, 123, 999)
    b = stochastic_round(x.clone(), dtype, 123, 999)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, x", [(torch.bfloat16, 1 + 3 * 2 ** -10), (torch.float16, 1 + 3 * 2 ** -13)],
                         ids=["bf16", "fp16"])
def test_different_keys_give_independent_roundings(dtype, x):
    # x rounds up with p = 3/8. Two independent roundings disagree with probability 2p(1-p).
    x = fp32(x)
    lo, hi = neighbours(x, dtype)
    p = (x - lo) / (hi - lo)
    xs = torch.full((N,), x)
    a = stochastic_round(xs, dtype, 0, 1)
    b = stochastic_round(xs, dtype, 0, 2)
    c = stochastic_round(xs, dtype, N, 1)  # same key, another range of element indices
    q = 2 * p * (1 - p)
    tol = SIGMAS * math.sqrt(q * (1 - q) / N)
    for other in (b, c):
        disagree = (a != other).double().mean().item()
        assert abs(disagree - q) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_offset_numbers_elements_so_slices_agree_with_the_whole(dtype):
    # element i of a slice starting at `start` is rounded with the noise of element start + i,
    # which is what lets the optimizer round a tensor chunk by chunk
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2))
    whole = stochastic_round(x, dtype, 0, 4242)
    start = 3_337
    part = stochastic_round(x[start:], dtype, start, 4242)
    assert torch.equal(part, whole[start:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_does_not_consume_the_global_rng(dtype):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    stochastic_round(torch.full((10_000,), 1.001), dtype, 0, 5)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------
# optimizer level: updates far below bf16 resolution
# ---------------------------------------------------------------------------------------------------

STEPS, LR = 1000, 1e-4
ELEMS = 4096
ULP_BELOW_ONE = 2.0 ** -8   # bf16 spacing in [0.5, 1): every value the run visits


def sgd_constant_grad(dtype: torch.dtype, terminal: ac.Transform):
    """Plain SGD (momentum 0) on ELEMS parameters starting at 1.0 with gradient 1.0:
    each step subtracts LR = 1e-4, far below half a bf16 ulp (2^-9 ~ 0.00195)."""
    p = torch.nn.Parameter(torch.ones(ELEMS, dtype=dtype))
    opt = ac.ChainOptimizer([p], ac.chain(ac.momentum(0.0), terminal), lr=LR)
    grad = torch.ones(ELEMS, dtype=dtype)
    for _ in range(STEPS):
        p.grad = grad
        opt.step()
    return p.detach(), opt


def test_small_updates_plain_stalls_sr_and_kahan_track_fp32():
    ref, _ = sgd_constant_grad(torch.float32, ac.apply())
    plain, _ = sgd_constant_grad(torch.bfloat16, ac.apply())
    sr, _ = sgd_constant_grad(torch.bfloat16, ac.stochastic_round_apply(seed=3))
    kahan, kahan_opt = sgd_constant_grad(torch.bfloat16, ac.kahan_apply())

    # the fp32 reference moves by STEPS * LR = 0.1
    assert ref.max().item() == pytest.approx(0.9, abs=1e-4) and ref.min().item() == pytest.approx(0.9, abs=1e-4)
    target = ref[0].item()

    # round to nearest: 1 - 1e-4 rounds back to 1.0 at every step
    assert bool((plain == 1.0).all())

    # SR: each step starts on the bf16 grid and rounds down with probability q = LR / ulp, a
    # martingale whose variance grows by ulp^2 q (1 - q) per step. Elements get independent noise.
    q = LR / ULP_BELOW_ONE
    per_element_std = ULP_BELOW_ONE * math.sqrt(STEPS * q * (1 - q))       # ~0.0195
    sr32 = sr.double()
    assert abs(sr32.mean().item() - target) <= SIGMAS * per_element_std / math.sqrt(ELEMS)  # 1.5% of 0.1
    assert abs(sr32.mean().item() - target) <= 0.02 * (1.0 - target)        # "a few percent" of the move
    assert 0.8 * per_element_std <= sr32.std().item() <= 1.2 * per_element_std

    # Kahan: deterministic; the bf16 param is within one ulp of the fp32 value
    kahan32 = kahan.double()
    assert bool(((kahan32 - target).abs() <= ULP_BELOW_ONE).all())
    # param + compensation is the fp32 value up to the compensation's own bf16 roundings: |comp| <
    # 2^-8, so each write of it errs by at most half its ulp, 2^-17; worst case over STEPS writes
    comp = kahan_opt.state[kahan_opt.param_groups[0]["params"][0]]["apply/kahan_comp"].double()
    assert bool(((kahan32 + comp - target).abs() <= STEPS * 2.0 ** -17).all())
    # even closer than SR: its worst element beats SR's typical (RMS) element error
    sr_rms = (sr32 - target).square().mean().sqrt().item()
    assert (kahan32 - target).abs().max().item() < sr_rms


def test_bf16_linear_regression_sr_and_kahan_match_fp32_plain_is_worse():
    # y = X w* + noise with weights around 2 (bf16 ulp 2^-7..2^-6 there): near the optimum the SGD
    # steps lr * grad fall below half an ulp, so round-to-nearest stops short of the optimum.
    g = torch.Generator().manual_seed(0)
    dim, rows, steps, lr = 16, 512, 600, 0.01
    X = torch.randn(rows, dim, generator=g)
    w_star = torch.randn(dim, generator=g) + 2.0
    noise_std = 0.1
    y = X @ w_star + noise_std * torch.randn(rows, generator=g)

    def train(dtype, terminal):
        w = torch.nn.Parameter(torch.zeros(dim, dtype=dtype))
        opt = ac.ChainOptimizer([w], ac.chain(ac.momentum(0.0), terminal), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(X @ w.float(), y).backward()
            opt.step()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(X @ w.float(), y).item()

    fp32_loss = train(torch.float32, ac.apply())
    plain = train(torch.bfloat16, ac.apply())
    sr = train(torch.bfloat16, ac.stochastic_round_apply(seed=1))
    kahan = train(torch.bfloat16, ac.kahan_apply())

    # fp32 reaches the noise floor (noise_std^2 = 0.01); bf16 weights near 2 cost at most
    # ~dim * ulp^2 / 4 ~ 2e-3 more, so 10% above fp32 is the tolerance for SR and Kahan
    assert fp32_loss == pytest.approx(noise_std ** 2, rel=0.1)
    assert sr <= 1.1 * fp32_loss
    assert kahan <= 1.1 * fp32_loss
    # round-to-nearest stalls far from the optimum: at least 10x the fp32 loss
    assert plain >= 10 * fp32_loss


# ---------------------------------------------------------------------------------------------------
# SR reproducibility: the noise is a function of (seed, step, param index, element)
# ---------------------------------------------------------------------------------------------------

def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(torch.bfloat16))
            for shape in [(64, 32), (32,), (7, 5, 3)]]


def sr_adam(params, seed: int, **kw) -> ac.ChainOptimizer:
    return ac.ChainOptimizer(params, ac.chain(ac.scale_by_adam(), ac.eps_divide(),
                                              ac.stochastic_round_apply(seed=seed)), lr=1e-3, **kw)


def train_steps(opt: ac.ChainOptimizer, params, start: int, stop: int) -> None:
    """Deterministic gradients that depend on the step number and the current params."""
    for step in range(start, stop):
        for i, p in enumerate(params):
            p.grad = (p.detach().float() * 0.1 + math.sin(step + i)).to(p.dtype)
        opt.step()


def run_sr(seed: int, steps: int = 20, **kw) -> list[torch.Tensor]:
    params = make_params()
    train_steps(sr_adam(params, seed, **kw), params, 0, steps)
    return [p.detach().clone() for p in params]


def test_same_seed_is_bit_identical():
    a, b = run_sr(seed=3), run_sr(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_different_seeds_differ():
    a, b = run_sr(seed=3), run_sr(seed=4)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_dict_round_trip_continues_bit_identically():
    uninterrupted = run_sr(seed=3, steps=20)

    params = make_params()
    opt = sr_adam(params, 3)
    train_steps(opt, params, 0, 10)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    # the SR terminal itself keeps no state: no generator to save
    assert all(not k.startswith("apply/") for st in opt.state.values() for k in st)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = sr_adam(resumed, 3)
    opt2.load_state_dict(saved["opt"])
    torch.manual_seed(999)  # the global RNG plays no part
    train_steps(opt2, resumed, 10, 20)

    assert all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted))


def test_sr_noise_does_not_depend_on_chunking():
    # one parameter larger than a slice (2^17 elements) is rounded slice by slice; with element
    # offsets the noise is per element, so any chunk size gives the same bits
    def run(chunk_elems):
        p = torch.nn.Parameter(torch.ones(300_000, dtype=torch.bfloat16))
        opt = ac.ChainOptimizer([p], ac.chain(ac.momentum(0.0), ac.stochastic_round_apply(seed=9)), lr=LR,
                                chunk_elems=chunk_elems)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().clone()

    a, b = run(1 << 20), run(50_000)
    assert torch.equal(a, b)
    assert not bool((a == 1.0).all())  # the rounding did move some elements


def test_sr_does_not_touch_the_global_rng():
    params = make_params()
    opt = sr_adam(params, 3)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    train_steps(opt, params, 0, 3)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------
# Kahan state
# ---------------------------------------------------------------------------------------------------

def test_kahan_compensation_state_only_for_low_precision_params():
    bf16 = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    fp16 = torch.nn.Parameter(torch.ones(5, dtype=torch.float16))
    full = torch.nn.Parameter(torch.ones(5, dtype=torch.float32))
    opt = ac.ChainOptimizer([bf16, fp16, full], ac.chain(ac.momentum(0.9), ac.kahan_apply()), lr=1e-3)
    for p in (bf16, fp16, full):
        p.grad = torch.ones_like(p)
    opt.step()

    for p in (bf16, fp16):
        comp = opt.state[p]["apply/kahan_comp"]
        assert comp.dtype == p.dtype and comp.shape == p.shape
        # momentum state follows the default fp32 state policy; only the compensation is param dtype
        assert opt.state[p]["momentum/momentum_buffer"].dtype == torch.float32
    assert "apply/kahan_comp" not in opt.state[full]
    assert set(opt.state[full]) == {"step", "momentum/momentum_buffer"}


def test_kahan_compensation_survives_state_dict_in_param_dtype():
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    opt = ac.ChainOptimizer([p], ac.chain(ac.momentum(0.0), ac.kahan_apply()), lr=LR)
    p.grad = torch.ones_like(p)
    opt.step()
    comp = opt.state[p]["apply/kahan_comp"].clone()
    assert bool((comp != 0).any())  # 1 - 1e-4 is not a bf16 value: there is an error to carry

    q = torch.nn.Parameter(p.detach().clone())
    opt2 = ac.ChainOptimizer([q], ac.chain(ac.momentum(0.0), ac.kahan_apply()), lr=LR)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["apply/kahan_comp"].dtype == torch.bfloat16
    assert torch.equal(opt2.state[q]["apply/kahan_comp"], comp)
