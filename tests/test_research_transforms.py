"""Research transforms against independent oracles: orthograd (flattened and iterative), cautious,
grams, atan2_scale, ademamix, simplified_accumulator, scale_by_adam's normed momentum, fisher_wd,
centered_wd.

The oracle below is written from the formulas (papers and adv_optm_spec.md §3.1, §4.2, §5.1, §7.3, §7.4,
§9.1-9.4, §10.2), per tensor, in plain torch: elementwise math in fp32, per-tensor reductions (dot products,
norms, mask counts) in fp64. It shares no code with adv_chain.

* Trajectories: 10 steps of a chain against the oracle on a 1-D tensor, a small 2-D tensor and a
  300k-element 2-D tensor (split into several slices by the library's default chunking), every
  parameter and every state tensor compared after every step. fp32 runs follow their
  own trajectory; bf16 runs are teacher-forced (the oracle starts each step from the library's bf16
  parameter), the fp32 state must match tightly and the bf16 parameter must be the fp32 result
  rounded to nearest (within half a bf16 spacing).
* Hand-checkable cases and the spec's edge cases.
* eager vs compile=True, and every allowed pair of transforms composed into an AdamW-like chain.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import adv_chain as ac

BIG = (600, 500)                    # 300_000 elements: several slices with the default chunking (2^17 or 2^18)
SHAPES_FP32 = [(7,), (13, 9), BIG]
SHAPES_BF16 = [(7,), (13, 9), BIG]
STEPS = 10
LR = 1e-2


# ---------------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------------

def half_life(b: float) -> float:
    return math.log(0.5) / math.log(b) - 1.0


def beta3_at(t: int, beta3: float, warmup: int | None, beta_start: float) -> float:
    """AdEMAMix's beta3 schedule (arXiv 2409.03137): linear in half-life from beta_start to beta3."""
    if warmup is None or t >= warmup:
        return beta3
    frac = t / warmup
    return 0.5 ** (1.0 / (1.0 + (1.0 - frac) * half_life(beta_start) + frac * half_life(beta3)))


def alpha_at(t: int, alpha: float, warmup: int | None) -> float:
    return alpha if warmup is None else min(t / warmup, 1.0) * alpha


def oracle_orthograd(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """OrthoGrad (arXiv 2501.04697), flattened: reductions in fp64, result in fp32."""
    w64, g64 = w.reshape(-1).double(), g.reshape(-1).double()
    rho = torch.dot(w64, g64) / (torch.dot(w64, w64) + 1e-30)
    o = g64 - rho * w64
    out = o * torch.linalg.vector_norm(g64) / (torch.linalg.vector_norm(o) + 1e-30)
    return out.float().view_as(g)


def oracle_orthograd_iterative(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """adv_optm's iterative OrthoGrad (spec §3.1) in fp64 on the matrix view (rows x rest); vectors
    take the flattened formula. Reduced dimension ``d``: 0 gives per-column values, 1 per-row."""
    if w.dim() < 2:
        return oracle_orthograd(w, g)
    W, G = w.reshape(w.shape[0], -1).double(), g.reshape(g.shape[0], -1).double()
    order = (0, 1) if G.shape[0] > G.shape[1] else (1, 0)
    P = {d: (W * W).sum(d, keepdim=True) + 1e-30 for d in order}
    lb = {d: G.shape[d] ** -0.5 for d in order}
    T = {d: G.norm(dim=d, keepdim=True).clamp(min=lb[d]) for d in order}
    for _ in range(3):
        for d in order:
            G = G - 1.01 * ((W * G).sum(d, keepdim=True) / P[d]) * W
            G = G * T[d] / G.norm(dim=d, keepdim=True).clamp(min=lb[d])
    return G.float().view_as(g)


@dataclass
class Spec:
    """What the chain does, for the oracle."""
    orthograd: bool = False
    ortho_mode: str = "flattened"                 # or "iterative"
    normed: bool = False                          # scale_by_adam(normed_momentum=...): normalize before m
    betas: tuple[float, float] = (0.9, 0.999)
    ademamix: dict[str, Any] | None = None        # beta3, alpha, alpha_warmup, beta3_warmup, beta_start
    simplified: tuple[float, float] | None = None  # (beta1, alpha_grad); adam then runs with beta1 = 0
    normalize: tuple = ("eps", 1e-8)              # ("eps", eps) or ("atan2", a, b); normed: how x = g/D is made
    mask: tuple | None = None                     # ("cautious", rescale) or ("grams",)
    wd: float = 0.0
    fisher: bool = False                          # fisher_wd before the normalizer (§7.4)
    centered: tuple[float, str] | None = None     # centered_wd (strength, anchor mode) after the decay (§7.3)


def oracle_anchor(w0: torch.Tensor, mode: str) -> torch.Tensor:
    """The anchor centered_wd decays toward, as §7.3 stores it, dequantized to fp32."""
    if mode == "full":
        return w0.clone()
    if mode == "float8":
        return w0.to(torch.float8_e4m3fn).float()
    block, q_min, q_max = {"int8": (128, -128, 127), "int4": (32, -8, 7)}[mode]
    flat = w0.reshape(-1)
    n = flat.numel()
    padded = torch.cat((flat, flat[-1].repeat((-n) % block))).view(-1, block)
    lo, hi = padded.min(dim=1, keepdim=True).values, padded.max(dim=1, keepdim=True).values
    scale = (hi - lo) / (q_max - q_min)
    scale[scale == 0] = 1.0
    q = torch.clamp(torch.round((padded - lo) / scale + q_min), q_min, q_max)
    return ((q - q_min) * scale + lo).reshape(-1)[:n].view_as(w0)


@dataclass
class Oracle:
    spec: Spec
    lr: float
    state: list[dict[str, torch.Tensor]] = field(default_factory=list)
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)

    def step(self, i: int, w: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
        """One step for tensor i: w (fp32 param before the step), g (fp32 grad) -> fp32 param after."""
        s, sp = self.state[i], self.spec
        if sp.centered is not None and i not in self.anchors:  # the weights at state creation
            self.anchors[i] = oracle_anchor(w, sp.centered[1])
        if sp.orthograd:
            g = (oracle_orthograd_iterative if sp.ortho_mode == "iterative" else oracle_orthograd)(w, g)
        b1, b2 = sp.betas
        v = s.setdefault("adam/exp_avg_sq", torch.zeros_like(g))
        v.mul_(b2).add_((1 - b2) * g * g)
        if sp.normed:
            # spec §4.2: x = g / (D + eps) or atan2(g, D) with the current D; m = EMA(m, x); u = A m / bc1
            assert sp.simplified is None and sp.normalize[0] == "atan2" and sp.normalize[1:] == (4 / math.pi, 1.0) \
                or sp.normalize[0] == "eps"
            denom = v.sqrt() / math.sqrt(1 - b2 ** t)
            x = torch.atan2(g, denom) if sp.normalize[0] == "atan2" else g / (denom + sp.normalize[1])
            m = s.setdefault("adam/exp_avg", torch.zeros_like(g))
            m.mul_(b1).add_((1 - b1) * x)
            u = (4 / math.pi if sp.normalize[0] == "atan2" else 1.0) * m / (1 - b1 ** t)
        elif sp.simplified is None:
            m = s.setdefault("adam/exp_avg", torch.zeros_like(g))
            m.mul_(b1).add_((1 - b1) * g)
            u = m / (1 - b1 ** t)
            denom = v.sqrt() / math.sqrt(1 - b2 ** t)
        wd_scale = 1.0  # fisher_wd (§7.4) from this step's denominator
        if sp.fisher and sp.normalize[0] == "eps":
            wd_scale = 1.0 / (denom + sp.normalize[1])
            wd_scale = wd_scale / max((w.double() * wd_scale.double()).square().mean().sqrt().item(), 1.0)
        elif sp.fisher:
            wd_scale = 4 / math.pi * torch.atan2(torch.ones_like(denom), denom)
        if sp.ademamix is not None:
            a = sp.ademamix
            b3 = beta3_at(t, a["beta3"], a.get("beta3_warmup"), a.get("beta_start", 0.9))
            m2 = s.setdefault("ademamix/exp_avg_slow", torch.zeros_like(g))
            m2.mul_(b3).add_((1 - b3) * g)
            u = u + alpha_at(t, a["alpha"], a.get("alpha_warmup")) * m2
        if sp.simplified is not None:
            # Simplified AdEMAMix (arXiv 2502.02431) in the paper's own form:
            # (alpha*g + m) / (sqrt(v) + eps*sqrt(S2)) * sqrt(S2), S2 = 1 - b2^t
            beta1, alpha_grad = sp.simplified
            assert sp.normalize[0] == "eps"
            acc = s.setdefault("simplified_accumulator/exp_avg", torch.zeros_like(g))
            acc.mul_(beta1).add_(g)
            s2 = 1 - b2 ** t
            u = (alpha_grad * g + acc) / (v.sqrt() + sp.normalize[1] * math.sqrt(s2)) * math.sqrt(s2)
        elif sp.normed:
            pass  # already normalized before the moment
        elif sp.normalize[0] == "eps":
            u = u / (denom + sp.normalize[1])
        else:
            _, a_, b_ = sp.normalize
            u = a_ * torch.atan2(u, b_ * denom)
        if sp.mask is not None and sp.mask[0] == "cautious":
            phi = (u * g > 0).float()
            n, nnz = phi.numel(), phi.double().sum().item()
            scale = {"paper": n / (nnz + 1), "mean": 1.0 / max(nnz / n, 1e-3), "none": 1.0}[sp.mask[1]]
            u = u * phi * scale
        elif sp.mask is not None:
            u = u.abs() * torch.sign(g)
        if not sp.fisher and sp.centered is None:
            return w * (1 - self.lr * sp.wd) - self.lr * u
        w = w - self.lr * sp.wd * wd_scale * w
        if sp.centered is not None:  # toward the anchor, from the already decayed weights
            w = w - self.lr * sp.centered[0] * wd_scale * (w - self.anchors[i])
        return w - self.lr * u


def build_chain(sp: Spec, terminal: Any = None) -> ac.Chain:
    """The adv_chain chain that Spec describes (written by hand, in the documented order)."""
    parts: list[Any] = []
    if sp.orthograd:
        parts.append(ac.orthograd() if sp.ortho_mode == "flattened" else ac.orthograd(mode=sp.ortho_mode))
    if sp.simplified is not None:
        parts += [ac.scale_by_adam(betas=(0.0, sp.betas[1])), ac.simplified_accumulator(*sp.simplified)]
    elif sp.normed:
        mode = sp.normalize[0]
        parts.append(ac.scale_by_adam(betas=sp.betas, normed_momentum=mode,
                                      **({"eps": sp.normalize[1]} if mode == "eps" else {})))
    else:
        parts.append(ac.scale_by_adam(betas=sp.betas))
    if sp.ademamix is not None:
        parts.append(ac.ademamix(**sp.ademamix))
    if sp.fisher:
        parts.append(ac.fisher_wd(eps=sp.normalize[1] if sp.normalize[0] == "eps" else 1e-8,
                                  atan2=sp.normalize[0] == "atan2"))
    if sp.normed:
        pass  # scale_by_adam normalized already: no normalizer may follow
    elif sp.normalize[0] == "eps":
        parts.append(ac.eps_divide(sp.normalize[1]))
    else:
        parts.append(ac.atan2_scale(a=sp.normalize[1], b=sp.normalize[2]))
    if sp.mask is not None:
        parts.append(ac.cautious(rescale=sp.mask[1]) if sp.mask[0] == "cautious" else ac.grams())
    if sp.wd:
        parts.append(ac.weight_decay(sp.wd))
    if sp.centered is not None:
        parts.append(ac.centered_wd(sp.centered[0], anchor=sp.centered[1]))
    parts.append(terminal if terminal is not None else ac.apply())
    return ac.chain(*parts)


# ---------------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------------

def make_params(shapes, dtype, seed=0) -> list[torch.nn.Parameter]:
    """Weights with random signs and magnitudes in [0.5, 1.5) (bounded away from zero, see make_grad)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        sign = torch.randint(0, 2, s, generator=gen) * 2.0 - 1.0
        out.append(torch.nn.Parameter((sign * (0.5 + torch.rand(s, generator=gen))).to(dtype)))
    return out


def make_grad(w0: torch.Tensor, t: int, i: int, seed=0) -> torch.Tensor:
    """Deterministic fp32 gradient for tensor i at step t: random signs times magnitudes in
    [0.5, 1.5), plus a component 0.3 * w0 along the initial weights (so orthograd has something to
    remove), with exact zeros at positions that move with t (a zero reference gradient: cautious
    masks it, grams zeroes it).

    Conditioning: orthograd's output g - rho*w stays bounded away from zero (about 0.1 or more) on
    every element, so the per-tensor fp32 dot products (relative error ~1e-6 over 300k elements,
    inherent to fp32) never flip the sign of a coordinate; a sign flip would move Adam's first,
    sign-like step by O(1) and no tolerance could tell a bug from rounding."""
    gen = torch.Generator().manual_seed(10_000 * seed + 100 * t + i)
    sign = torch.randint(0, 2, w0.shape, generator=gen) * 2.0 - 1.0
    g = sign * (0.5 + torch.rand(w0.shape, generator=gen)) + 0.3 * w0
    flat = g.view(-1)
    flat[(t + i) % 11::11] = 0.0
    return g


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol=1e-5, atol_rel=1e-6) -> None:
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_rel * scale, msg=lambda m: f"{what}: {m}")


def assert_rounded_to_nearest(actual_lp: torch.Tensor, expected32: torch.Tensor, what: str) -> None:
    """actual (bf16/fp16) is expected32 rounded to nearest, up to fp32-level differences in expected32.

    The slack also covers cautious's mask count at exact ties: with bf16 gradients m can be exactly
    0 in real arithmetic (g2 = -0.9 g1 on the bf16 grid), its fp32 sign depends on the order of
    operations, and the count N/(nnz+1) moves by a few in 10^5."""
    r = expected32.to(actual_lp.dtype)
    up = torch.nextafter(r, torch.full_like(r, math.inf)).float()
    down = torch.nextafter(r, torch.full_like(r, -math.inf)).float()
    spacing = torch.maximum(up - r.float(), r.float() - down)
    err = (actual_lp.float() - expected32).abs()
    # fp32-level slack relative to the tensor's magnitude (as assert_close's atol)
    bound = 0.5 * spacing * (1 + 1e-3) + 1e-6 * max(1.0, expected32.abs().max().item())
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements not rounded to nearest; worst err "
                           f"{(err - bound).max().item():.3g} beyond the bound")


def reduction_tol(p: torch.Tensor) -> float:
    """Tolerance (relative to the tensor's magnitude) for results that go through orthograd's
    per-tensor dot products: fp32 dot products over 300k elements carry ~1e-6 relative error
    (torch.dot measured up to 3.3e-6 against fp64 on this data), which reaches g' through rho. adv_chain
    accumulates them in fp64 today and meets 1e-6; 1e-5 also admits a plain fp32 reduction."""
    return 1e-6 if p.numel() < 10_000 else 1e-5


def run_against_oracle(sp: Spec, shapes, dtype=torch.float32, steps=STEPS, lr=LR, terminal=None) -> ac.ChainOptimizer:
    params = make_params(shapes, dtype)
    w0 = [p.detach().float().clone() for p in params]
    opt = ac.ChainOptimizer(params, build_chain(sp, terminal), lr=lr)
    oracle = Oracle(sp, lr, [{} for _ in params])
    w_oracle = [w.clone() for w in w0]
    for t in range(1, steps + 1):
        grads = [make_grad(w, t, i) for i, w in enumerate(w0)]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        # fp32: the oracle follows its own trajectory; low precision: it starts from the library's param
        w_in = w_oracle if dtype == torch.float32 else [p.detach().float().clone() for p in params]
        opt.step()
        w_oracle = [oracle.step(i, w, g.to(dtype).float(), t) for i, (w, g) in enumerate(zip(w_in, grads))]
        for i, p in enumerate(params):
            where = f"step {t}, tensor {i} {tuple(p.shape)} {dtype}"
            tol = reduction_tol(p) if sp.orthograd else 1e-6
            if dtype == torch.float32:
                assert_close(p.detach(), w_oracle[i], f"param, {where}", atol_rel=tol)
            else:
                assert_rounded_to_nearest(p.detach(), w_oracle[i], f"param, {where}")
            st = opt.state[p]
            anchor_keys = {k for k in st if k.startswith("centered_wd/")}
            assert bool(anchor_keys) == (sp.centered is not None), f"anchor keys, {where}"
            assert set(st) - anchor_keys == set(oracle.state[i]) | {"step"}, f"state keys, {where}"
            for key, ref in oracle.state[i].items():
                assert st[key].dtype == torch.float32, f"{key} dtype, {where}"
                assert_close(st[key], ref, f"{key}, {where}", atol_rel=tol)
    return opt


ADEMAMIX = dict(beta3=0.999, alpha=5.0)
TRAJECTORY_CASES = {
    "orthograd": Spec(orthograd=True),
    "cautious_paper": Spec(mask=("cautious", "paper")),
    "cautious_mean": Spec(mask=("cautious", "mean")),
    "cautious_none": Spec(mask=("cautious", "none")),
    "grams": Spec(mask=("grams",)),
    "atan2_default": Spec(normalize=("atan2", 4 / math.pi, 1.0)),
    "atan2_a1.27_b2": Spec(normalize=("atan2", 1.27, 2.0)),
    "ademamix": Spec(ademamix=dict(ADEMAMIX)),
    "ademamix_alpha_warmup": Spec(ademamix=dict(ADEMAMIX, alpha_warmup=6)),
    "ademamix_beta3_warmup": Spec(ademamix=dict(ADEMAMIX, beta3_warmup=6, beta_start=0.8)),
    "ademamix_both_warmups": Spec(ademamix=dict(ADEMAMIX, alpha_warmup=4, beta3_warmup=8)),
    "simplified_accumulator": Spec(betas=(0.0, 0.95), simplified=(0.99, 100.0)),
    "simplified_accumulator_small": Spec(betas=(0.0, 0.999), simplified=(0.9, 2.0), normalize=("eps", 1e-6)),
    "orthograd_iterative": Spec(orthograd=True, ortho_mode="iterative"),
    "normed_eps": Spec(normed=True, normalize=("eps", 1e-6)),
    "normed_atan2": Spec(normed=True, normalize=("atan2", 4 / math.pi, 1.0), betas=(0.8, 0.99)),
    "fisher_wd": Spec(fisher=True, wd=0.5),
    "fisher_wd_atan2": Spec(fisher=True, wd=0.5, normalize=("atan2", 4 / math.pi, 1.0)),
    "centered_wd_int8": Spec(centered=(0.5, "int8"), wd=0.1),
    "centered_wd_int4_fisher": Spec(centered=(0.5, "int4"), fisher=True, wd=0.1),
}


def test_big_tensor_is_split_into_several_slices():
    """The trajectories rely on BIG spanning several slices with the default chunking."""
    from adv_chain._core.optimizer import DEFAULT_PIECE
    assert math.prod(BIG) > DEFAULT_PIECE, f"BIG={BIG} fits in one slice of {DEFAULT_PIECE} elements"


@pytest.mark.parametrize("name", list(TRAJECTORY_CASES))
def test_trajectory_fp32(name):
    run_against_oracle(TRAJECTORY_CASES[name], SHAPES_FP32)


@pytest.mark.parametrize("name", ["orthograd", "cautious_paper", "cautious_mean", "grams", "atan2_default",
                                  "ademamix_both_warmups", "simplified_accumulator", "orthograd_iterative",
                                  "normed_atan2"])
def test_trajectory_bf16(name):
    run_against_oracle(TRAJECTORY_CASES[name], SHAPES_BF16, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# orthograd: the gradient-stage output seen directly (a momentum buffer's first step is the gradient)
# ---------------------------------------------------------------------------------------------------

def orthograd_output(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = ac.ChainOptimizer(params, ac.chain(ac.orthograd(), ac.momentum(0.9), ac.apply()), lr=0.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b), "lr = 0 must not move the parameters"
    return [opt.state[p]["momentum/momentum_buffer"] for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthograd_one_step_formula_and_invariants(dtype):
    params = make_params(SHAPES_FP32, dtype, seed=3)
    grads = [make_grad(p.detach().float(), 1, i).to(dtype) for i, p in enumerate(params)]
    outs = orthograd_output(params, grads)
    for p, g, out in zip(params, grads, outs):
        w, g32 = p.detach().float(), g.float()
        tol = reduction_tol(p)
        assert_close(out, oracle_orthograd(w, g32), f"orthograd {tuple(p.shape)} {dtype}", rtol=tol, atol_rel=tol)
        # orthogonal to the weights, same norm as the gradient
        cos = torch.dot(out.double().flatten(), w.double().flatten()) / (out.double().norm() * w.double().norm())
        assert abs(cos.item()) < 1e-5
        torch.testing.assert_close(out.double().norm(), g32.double().norm(), rtol=1e-5, atol=0)


def test_orthograd_hand_checked():
    # w = (1, 0), g = (1, 1): rho = 1, o = (0, 1), ||g|| = sqrt(2) -> g' = (0, sqrt(2))
    p = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    out, = orthograd_output([p], [torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([0.0, math.sqrt(2.0)]), atol=1e-7, rtol=0)


def test_orthograd_edge_cases():
    g = torch.tensor([0.5, -2.0, 3.0, 0.25])
    # p = 0  =>  rho = 0  =>  g' = g
    zero_p = torch.nn.Parameter(torch.zeros(4))
    # g = 0  =>  g' = 0
    zero_g_p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0, 4.0]))
    # g exactly parallel to p (rho = 2 exactly, o = 0 exactly)  =>  g' = 0
    par_p = torch.nn.Parameter(torch.ones(4))
    # bf16 weight, zero
    zero_p16 = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    outs = orthograd_output([zero_p, zero_g_p, par_p, zero_p16],
                            [g, torch.zeros(4), 2 * torch.ones(4), g.to(torch.bfloat16)])
    torch.testing.assert_close(outs[0], g, atol=0, rtol=1e-7)
    assert torch.equal(outs[1], torch.zeros(4))
    assert torch.equal(outs[2], torch.zeros(4))
    torch.testing.assert_close(outs[3], g, atol=0, rtol=1e-7)


@pytest.mark.parametrize("via_add_l2", [False, True], ids=["grad_parallel", "add_l2_with_zero_grad"])
def test_orthograd_parallel_up_to_rounding_keeps_the_norm_bound(via_add_l2):
    """g parallel to w up to fp32 rounding (g = fl(0.1 * w)): o = g - rho*w is rounding residue. The
    spec (§3.1): it is rescaled to norm ||g|| (a noise direction), or g' = 0 if o is exactly 0; in
    any case ||g'|| = ||o|| ||g|| / (||o|| + 1e-30) <= ||g||. The realistic way to get here:
    ``add_l2`` before ``orthograd`` on a parameter whose data gradient is zero (g = wd * p)."""
    w = torch.tensor([-0.640625, -0.640625, -0.15625])
    p = torch.nn.Parameter(w.clone())
    if via_add_l2:
        p.grad = torch.zeros(3)
        chain = ac.chain(ac.add_l2(0.1), ac.orthograd(), ac.momentum(0.9), ac.apply())
    else:
        p.grad = 0.1 * w
        chain = ac.chain(ac.orthograd(), ac.momentum(0.9), ac.apply())
    g = 0.1 * w
    opt = ac.ChainOptimizer([p], chain, lr=0.0)
    opt.step()
    out = opt.state[p]["momentum/momentum_buffer"]
    assert torch.isfinite(out).all()
    ratio = (out.double().norm() / g.double().norm()).item()
    assert ratio <= 1 + 1e-5, f"||g'|| / ||g|| = {ratio:.3g} (g' = {out.tolist()}); the formula bounds it by 1"


# ---------------------------------------------------------------------------------------------------
# cautious and grams: hand-checked steps
# ---------------------------------------------------------------------------------------------------

def two_steps(mask: Any, g1: torch.Tensor, g2: torch.Tensor, lr=0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """adam(0.9, 0.999) -> eps_divide(1e-8) -> mask -> apply from p = 0; returns (p0, p1, p2)."""
    p = torch.nn.Parameter(torch.zeros_like(g1))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), mask, ac.apply()), lr=lr)
    out = [p.detach().clone()]
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out[0], out[1], out[2]


def adam_u(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Adam's u = m_hat / (sqrt(v_hat) + eps) at step 2 (plain formula)."""
    m = 0.1 * (0.9 * g1 + g2)
    v = 0.001 * (0.999 * g1 * g1 + g2 * g2)
    return (m / (1 - 0.81)) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8)


@pytest.mark.parametrize("rescale,expected_scale", [("paper", 4 / (3 + 1)), ("mean", 1 / 0.75), ("none", 1.0)])
def test_cautious_hand_checked_partial_mask(rescale, expected_scale):
    # step 1: u = g/(|g| + eps) agrees everywhere -> phi = 1, N = nnz = 4
    # step 2: element 0 disagrees (m > 0, g < 0): nnz = 3, N = 4
    g1, g2 = torch.ones(4), torch.tensor([-0.01, 0.5, 0.5, 0.5])
    p0, p1, p2 = two_steps(ac.cautious(rescale=rescale), g1, g2)
    first_scale = {"paper": 4 / 5, "mean": 1.0, "none": 1.0}[rescale]
    torch.testing.assert_close(p1, -0.1 * first_scale * g1 / (g1 + 1e-8), atol=1e-7, rtol=1e-6)
    u = adam_u(g1, g2)
    assert u[0] > 0 > g2[0]
    phi = torch.tensor([0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(p2 - p1, -0.1 * u * phi * expected_scale, atol=1e-7, rtol=1e-5)
    assert p2[0] == p1[0], "the disagreeing coordinate must not move"


@pytest.mark.parametrize("rescale", ["paper", "mean", "none"])
def test_cautious_all_disagree_tensor_does_not_move_and_scale_is_per_tensor(rescale):
    # tensor A: every coordinate disagrees at step 2 (nnz = 0 -> u = 0 whatever the rescale);
    # tensor B (same step, same optimizer) agrees everywhere: its scale is its own N/(N+1) (or 1)
    a = torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(3, 2))
    opt = ac.ChainOptimizer([a, b], ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.cautious(rescale=rescale),
                                             ac.apply()), lr=0.1)
    ga1, ga2 = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]), torch.tensor([-0.01, 0.02, -0.03, 0.04, -0.05])
    gb1, gb2 = -torch.ones(3, 2), -0.5 * torch.ones(3, 2)
    a.grad, b.grad = ga1, gb1
    opt.step()
    a1, b1 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = ga2, gb2
    opt.step()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a.detach(), a1), "an all-disagree tensor must not move"
    scale_b = {"paper": 6 / 7, "mean": 1.0, "none": 1.0}[rescale]
    torch.testing.assert_close(b.detach() - b1, -0.1 * scale_b * adam_u(gb1, gb2), atol=1e-7, rtol=1e-5)


def test_grams_hand_checked():
    g1, g2 = torch.ones(4), torch.tensor([-0.01, 0.5, 0.0, 0.5])
    p0, p1, p2 = two_steps(ac.grams(), g1, g2)
    torch.testing.assert_close(p1, -0.1 * g1 / (g1 + 1e-8), atol=1e-7, rtol=1e-6)   # signs agree: no-op
    u = adam_u(g1, g2)
    expected = torch.stack([-u[0].abs(), u[1].abs(), torch.tensor(0.0), u[3].abs()])  # sign(0) = 0
    torch.testing.assert_close(p2 - p1, -0.1 * expected, atol=1e-7, rtol=1e-5)
    assert p2[0] > p1[0], "grams follows the gradient's sign where the momentum disagrees"


def test_grams_and_cautious_together_is_a_build_error_naming_both():
    for pair in ((ac.cautious(), ac.grams()), (ac.grams(), ac.cautious())):
        with pytest.raises(ValueError) as err:
            ac.chain(ac.scale_by_adam(), ac.eps_divide(), *pair, ac.apply())
        assert "grams" in str(err.value) and "cautious" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# atan2_scale
# ---------------------------------------------------------------------------------------------------

def atan2_steps(grads: list[torch.Tensor], a: float = 4 / math.pi, b: float = 1.0) -> list[torch.Tensor]:
    """u of each step, read exactly: p reset to 0 before each step, lr = 1, so p = -u."""
    p = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(), ac.atan2_scale(a=a, b=b), ac.apply()), lr=1.0)
    us = []
    for g in grads:
        with torch.no_grad():
            p.zero_()
        p.grad = g.clone()
        opt.step()
        us.append(-p.detach().clone())
    return us


@pytest.mark.parametrize("a,b", [(4 / math.pi, 1.0), (1.27, 1.0), (2.0, 3.0)])
def test_atan2_first_step_is_bias_corrected_inside(a, b):
    # step 1: m_hat = g, denom = |g|  =>  u = a * atan2(g, b|g|) = a * atan(1/b) * sign(g)
    g = torch.tensor([0.3, -7.0, 1e-3, 0.0])
    u, = atan2_steps([g], a, b)
    expected = a * math.atan(1 / b) * torch.sign(g)
    torch.testing.assert_close(u, expected, atol=1e-6, rtol=1e-6)
    if (a, b) == (4 / math.pi, 1.0):
        torch.testing.assert_close(u, torch.sign(g), atol=1e-6, rtol=0)  # the paper's step 1 = 1.0 * lr


@pytest.mark.parametrize("a", [4 / math.pi, 1.27])
def test_atan2_zero_denominator_is_bounded_without_nan(a):
    # g = +-1e-30: g^2 underflows in fp32, so v = 0 and denom = 0 while m != 0 -> u = +-a*pi/2;
    # g = 0: m = v = 0 -> atan2(0, 0) = 0; a regular coordinate for comparison
    g = torch.tensor([1e-30, -1e-30, 0.0, 1.0])
    us = atan2_steps([g] * 6, a)
    bound = a * math.pi / 2
    for t, u in enumerate(us, 1):
        assert torch.isfinite(u).all(), f"step {t}: {u}"
        assert (u.abs() <= bound * (1 + 1e-6)).all(), f"step {t}: |u| > a*pi/2: {u}"
        torch.testing.assert_close(u[:3], torch.tensor([bound, -bound, 0.0]), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(u[3], torch.tensor(a * math.pi / 4), atol=1e-6, rtol=1e-6)  # m_hat = sqrt(v_hat) = 1


# ---------------------------------------------------------------------------------------------------
# ademamix: the warm-up schedules step by step
# ---------------------------------------------------------------------------------------------------

def test_ademamix_schedule_values_of_the_oracle():
    """Sanity of the test's own schedule: beta3(0) = beta_start, beta3(T) = beta3, half-life linear."""
    assert beta3_at(0, 0.999, 10, 0.9) == pytest.approx(0.9, rel=1e-12)
    assert beta3_at(10, 0.999, 10, 0.9) == 0.999
    mid = beta3_at(5, 0.999, 10, 0.9)
    assert half_life(mid) == pytest.approx(0.5 * (half_life(0.9) + half_life(0.999)), rel=1e-9)


@pytest.mark.parametrize("warmups", [(10, None), (None, 10), (10, 10), (4, 12)])
def test_ademamix_warmups_step_by_step(warmups):
    """g = 1 at every step: m_hat = v_hat = 1, so with eps = 0 and lr = 1 the update from p = 0 is
    exactly u = 1 + alpha_t * m2_t, and m2_t = beta3_t * m2_{t-1} + (1 - beta3_t)."""
    alpha_warmup, beta3_warmup = warmups
    alpha, beta3, beta_start = 5.0, 0.999, 0.9
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ac.ChainOptimizer([p], ac.chain(
        ac.scale_by_adam(), ac.ademamix(beta3=beta3, alpha=alpha, alpha_warmup=alpha_warmup,
                                        beta3_warmup=beta3_warmup, beta_start=beta_start),
        ac.eps_divide(0.0), ac.apply()), lr=1.0)
    m2_prev = torch.zeros(3)
    last = max(w for w in warmups if w is not None)
    for t in range(1, last + 3):
        with torch.no_grad():
            p.zero_()
        p.grad = torch.ones(3)
        opt.step()
        b3 = beta3_at(t, beta3, beta3_warmup, beta_start)
        a_t = alpha_at(t, alpha, alpha_warmup)
        m2 = b3 * m2_prev + (1 - b3)
        torch.testing.assert_close(opt.state[p]["ademamix/exp_avg_slow"], m2, atol=1e-7, rtol=1e-6,
                                   msg=lambda m: f"m2 at t={t}: {m}")
        torch.testing.assert_close(-p.detach(), 1 + a_t * m2, atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"u at t={t}: {m}")
        m2_prev = opt.state[p]["ademamix/exp_avg_slow"].clone()
        # hand values at t = 1, T/2, T
        if alpha_warmup is not None:
            hand = {1: alpha / alpha_warmup, alpha_warmup // 2: alpha / 2, alpha_warmup: alpha}
            if t in hand:
                assert a_t == pytest.approx(hand[t])
        if beta3_warmup is not None:
            T = beta3_warmup
            hand = {1: 0.5 ** (1 / (1 + (1 - 1 / T) * half_life(beta_start) + (1 / T) * half_life(beta3))),
                    T // 2: 0.5 ** (1 / (1 + 0.5 * half_life(beta_start) + 0.5 * half_life(beta3))),
                    T: beta3}
            if t in hand:
                assert b3 == pytest.approx(hand[t], rel=1e-12)
        if t == 1:  # m2 after one step from 0 is 1 - beta3(1): the schedule's first value, observed
            expected_b3 = beta3 if beta3_warmup is None else hand[1]
            torch.testing.assert_close(opt.state[p]["ademamix/exp_avg_slow"], torch.full((3,), 1 - expected_b3),
                                       atol=1e-7, rtol=1e-6)


def test_ademamix_slow_ema_is_not_bias_corrected():
    # step 1, beta3 = 0.9999, alpha = 5: m2 = 1e-4 * g (not g), so u = (g + 5e-4 g) / |g|
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(), ac.ademamix(), ac.eps_divide(0.0), ac.apply()), lr=1.0)
    p.grad = torch.tensor([2.0, -0.5])
    opt.step()
    torch.testing.assert_close(opt.state[p]["ademamix/exp_avg_slow"], torch.tensor([2e-4, -5e-5]), rtol=1e-4, atol=0)
    torch.testing.assert_close(-p.detach(), torch.tensor([1.0005, -1.0005]), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------
# simplified_accumulator
# ---------------------------------------------------------------------------------------------------

def test_simplified_accumulator_state_and_first_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(betas=(0.0, 0.95)), ac.simplified_accumulator(0.99, 100.0),
                                          ac.eps_divide(1e-8), ac.apply()), lr=1.0)
    g = torch.tensor([0.5, -2.0, 0.0])
    p.grad = g.clone()
    opt.step()
    # beta1 = 0: no exp_avg in scale_by_adam; the accumulator is the first moment
    assert set(opt.state[p]) == {"step", "adam/exp_avg_sq", "simplified_accumulator/exp_avg"}
    torch.testing.assert_close(opt.state[p]["simplified_accumulator/exp_avg"], g)  # m = g (no 1 - beta1)
    # step 1: (100 g + g) / (sqrt(0.05) |g| + 1e-8 sqrt(0.05)) * sqrt(0.05) = 101 g / (|g| + 1e-8)
    torch.testing.assert_close(-p.detach(), 101 * g / (g.abs() + 1e-8), rtol=1e-6, atol=0)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["simplified_accumulator/exp_avg"], 1.99 * g)


# ---------------------------------------------------------------------------------------------------
# eager vs compile=True
# ---------------------------------------------------------------------------------------------------

COMPILE_CHAINS = {
    "orthograd_ademamix_atan2_cautious": lambda: ac.chain(
        ac.orthograd(), ac.scale_by_adam(), ac.ademamix(beta3=0.999, alpha=5.0, alpha_warmup=3, beta3_warmup=3),
        ac.atan2_scale(), ac.cautious(), ac.weight_decay(0.1), ac.apply()),
    "simplified_grams": lambda: ac.chain(
        ac.scale_by_adam(betas=(0.0, 0.99)), ac.simplified_accumulator(0.9, 10.0), ac.eps_divide(1e-8), ac.grams(),
        ac.apply()),
    "orthograd_iterative_normed_atan2_grams": lambda: ac.chain(
        ac.orthograd(mode="iterative"), ac.scale_by_adam(normed_momentum="atan2", nesterov=True), ac.grams(),
        ac.weight_decay(0.1), ac.apply()),
    "fisher_cautious_wd_centered_int4": lambda: ac.chain(
        ac.scale_by_adam(), ac.fisher_wd(), ac.eps_divide(1e-8), ac.cautious_wd(0.1),
        ac.centered_wd(0.5, anchor="int4", cautious=True), ac.apply()),
    "fisher_atan2_centered_float8": lambda: ac.chain(
        ac.scale_by_adam(), ac.fisher_wd(atan2=True), ac.atan2_scale(), ac.weight_decay(0.1),
        ac.centered_wd(0.5, anchor="float8"), ac.apply()),
}


@pytest.mark.parametrize("name", list(COMPILE_CHAINS))
def test_compiled_matches_eager(name):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    models = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = ac.ChainOptimizer(model.parameters(), COMPILE_CHAINS[name](), lr=1e-2, compile=compile)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        models.append(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "compile=True compiled nothing"
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# every allowed pair, composed into an AdamW-like chain
# ---------------------------------------------------------------------------------------------------

FEATURES = ["orthograd", "orthograd_iterative", "cautious", "grams", "atan2_scale", "ademamix", "normed_momentum",
            "fisher_wd", "centered_wd"]
PAIRS = list(itertools.combinations(FEATURES, 2))
# one mask and one orthograd per chain; normed_momentum + atan2_scale is the normed atan2 mode
# fisher_wd reads the denominator, which normed momentum does not publish; its wd_scale signal does not
# cross cautious's per-tensor rescale (a reduction) on the way to the decay (a build error, tested below)
ALLOWED = [pair for pair in PAIRS if set(pair) not in ({"cautious", "grams"}, {"orthograd", "orthograd_iterative"},
                                                       {"fisher_wd", "normed_momentum"}, {"cautious", "fisher_wd"})]


def pair_spec(pair: tuple[str, ...]) -> Spec:
    return Spec(orthograd="orthograd" in pair or "orthograd_iterative" in pair,
                ortho_mode="iterative" if "orthograd_iterative" in pair else "flattened",
                normed="normed_momentum" in pair,
                ademamix=dict(beta3=0.99, alpha=3.0) if "ademamix" in pair else None,
                normalize=("atan2", 4 / math.pi, 1.0) if "atan2_scale" in pair else ("eps", 1e-8),
                mask=("cautious", "paper") if "cautious" in pair else ("grams",) if "grams" in pair else None,
                wd=0.1, fisher="fisher_wd" in pair, centered=(0.5, "int8") if "centered_wd" in pair else None)


def test_pair_list_is_complete():
    assert len(PAIRS) == 36 and len(ALLOWED) == 32


def test_fisher_wd_signal_across_cautious_rescale_is_a_build_error():
    with pytest.raises(ValueError, match="wd_scale.*fisher_wd.*cautious"):
        build_chain(pair_spec(("cautious", "fisher_wd")))
    build_chain(Spec(fisher=True, mask=("cautious", "none"), wd=0.1))  # no rescale: no reduction, fine


@pytest.mark.parametrize("pair", ALLOWED, ids=["+".join(p) for p in ALLOWED])
def test_pair_fp32_matches_oracle(pair):
    sp = pair_spec(pair)
    chain = build_chain(sp)
    names = chain.names
    # documented order: orthograd first, then adam, ademamix, the normalizer, the mask, decay, apply
    order = [n for n in ("orthograd", "adam", "ademamix", "fisher_wd", "eps_divide", "atan2_scale", "cautious",
                         "grams", "weight_decay", "centered_wd", "apply") if n in names]
    assert list(names) == order
    opt = run_against_oracle(sp, [(7,), (13, 9), (40, 30)], steps=3)
    for group in opt.param_groups:
        for p in group["params"]:
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("pair", ALLOWED, ids=["+".join(p) for p in ALLOWED])
def test_pair_bf16_stochastic_round_runs_finite(pair):
    params = make_params([(7,), (13, 9), (40, 30)], torch.bfloat16, seed=5)
    before = [p.detach().clone() for p in params]
    opt = ac.ChainOptimizer(params, build_chain(pair_spec(pair), ac.stochastic_round_apply(seed=1)), lr=LR)
    for t in range(1, 4):
        for i, p in enumerate(params):
            p.grad = make_grad(before[i].float(), t, i).to(torch.bfloat16)
        opt.step()
    for p, b in zip(params, before):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b), "three steps moved nothing"
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k not in ("step", "centered_wd/anchor"))


def test_grams_with_cautious_pair_is_rejected():
    for mask_pair in ((ac.cautious(), ac.grams()), (ac.grams(), ac.cautious())):
        for norm in (ac.eps_divide(), ac.atan2_scale()):
            with pytest.raises(ValueError) as err:
                ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.ademamix(), norm, *mask_pair,
                         ac.weight_decay(0.1), ac.apply())
            assert "grams" in str(err.value) and "cautious" in str(err.value)


def test_eps_none_is_one_over_sqrt_numel_per_tensor_and_survives_a_checkpoint():
    """eps=None: u = m_hat / (sqrt(v_hat) + 1/sqrt(N)), N the tensor's element count (spec §4.5)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 4)), torch.nn.Parameter(torch.randn(9))]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opt = ac.ChainOptimizer(params, ac.chain(ac.scale_by_adam(), ac.eps_divide(None), ac.apply()), lr=0.1)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, p0, g in zip(params, start, grads):
        expected = p0 - 0.1 * g / (g.abs() + 1 / p.numel() ** 0.5)  # step 1: m_hat = g, sqrt(v_hat) = |g|
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=0)
    again = ac.ChainOptimizer(params, ac.chain(ac.scale_by_adam(), ac.eps_divide(None), ac.apply()), lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert float(again.state[params[1]]["eps_divide/auto_eps"]) == pytest.approx(1 / 3)
    compiled = ac.ChainOptimizer([torch.nn.Parameter(s.clone()) for s in start],
                                 ac.chain(ac.scale_by_adam(), ac.eps_divide(None), ac.apply()), lr=0.1, compile=True)
    for p, g in zip(compiled.param_groups[0]["params"], grads):
        p.grad = g.clone()
    compiled.step()
    for a, b in zip(compiled.param_groups[0]["params"], params):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="eps"):
        ac.eps_divide(-1.0)


def test_simplified_accumulator_bias_sum_is_constant_work_at_any_step():
    """S1_t of the warmed-up accumulator: the memoized warm-up prefix, then the closed form (a
    10,000-step run once grew 24 MB and slowed 3x from recomputing the whole sequence each step)."""
    from adv_chain.transforms.mixing import _warmed_beta, _warmed_beta_sum, _warmup_sums

    s1 = 0.0
    for t in range(1, 2001):
        s1 = _warmed_beta(0.99, 100, 0.9, t) * s1 + 1.0
        assert abs(_warmed_beta_sum(0.99, 100, 0.9, t) - s1) <= 1e-12 * s1
    assert abs(_warmed_beta_sum(0.99, 100, 0.9, 10**9) - 100.0) < 1e-9
    assert len(_warmup_sums(0.99, 100, 0.9)) == 100
