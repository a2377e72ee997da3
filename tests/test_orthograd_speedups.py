"""orthograd(mode="flattened") after its CPU speedups, against an independent fp64 implementation of
the formula (docstring of ``ac.orthograd``)::

    rho = <w, g> / (<w, w> + 1e-30),   o = g - rho * w,   g' = o * ||g|| / (||o|| + 1e-30)

The reduce takes ``||o||`` from the dot products when g is far from parallel to w and from a pass
over the fp32 residue otherwise (and always on accelerators: here forced by making every dot product
a tensor); both must give the formula's numbers, and ``||g'|| <= ||g||`` even when the residue is
rounding noise."""
from __future__ import annotations

import pytest
import torch

import adv_chain as ac
from adv_chain._core import foreach as F
from adv_chain.transforms import gradient as gradient_module


def oracle(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The formula in fp64 (inputs upcast exactly), result in fp32."""
    w64, g64 = w.reshape(-1).double(), g.reshape(-1).double()
    rho = torch.dot(w64, g64) / (torch.dot(w64, w64) + 1e-30)
    o = g64 - rho * w64
    out = o * g64.norm() / (o.norm() + 1e-30)
    return out.float().view(g.shape)


def orthograd_output(params: list[torch.nn.Parameter], grads: list[torch.Tensor], compile: bool = False,
                     ) -> list[torch.Tensor]:
    """The gradient-stage output: the first step of a momentum buffer is its input (lr = 0)."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = ac.ChainOptimizer(params, ac.chain(ac.orthograd(), ac.momentum(0.9), ac.apply()), lr=0.0,
                            compile=compile)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b, g in zip(params, before, grads):
        assert torch.equal(p.detach(), b), "lr = 0 must not move the parameters"
        assert torch.equal(p.grad, g), "the user's gradient must stay intact"
    return [opt.state[p]["momentum/momentum_buffer"].clone() for p in params]


def cases(dtype: torch.dtype = torch.float32) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], list[str]]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    w_big = randn(300_000) * 0.02  # more than one 256K slice
    w_mat = randn(64, 48) * 0.02
    w_par = randn(1000)
    w_vec = randn(37)
    named = {
        "random_matrix": (w_mat, randn(64, 48) * 1e-2),
        "random_two_slices": (w_big, randn(300_000) * 2e-2 + 0.5 * w_big),       # cos^2 ~ 0.2: the analytic norm
        "nearly_parallel": (w_par, 0.3 * w_par + 1e-3 * randn(1000)),            # cos^2 ~ 1 - 1e-5: the residue pass
        "parallel_up_to_rounding": (w_vec, (0.1 * w_vec.double()).float()),      # o is rounding noise
        "zero_grad": (randn(5, 7), torch.zeros(5, 7)),
        "zero_weights": (torch.zeros(3, 11), randn(3, 11)),
        "one_element": (torch.tensor([0.7]), torch.tensor([-0.2])),
        "scalar": (torch.tensor(1.5), torch.tensor(0.25)),
        # cos^2 ~ 0.9: still the analytic norm, where its cancellation is largest
        "moderately_parallel": (w_vec, 0.5 * w_vec + randn(37) * (0.5 / 3) * w_vec.norm() / 37 ** 0.5),
    }
    params, grads = [], []
    for w, g in named.values():
        params.append(torch.nn.Parameter(w.to(dtype).clone()))
        grads.append(g.to(dtype))
    return params, grads, list(named)


# g parallel to w up to rounding (one element: always): g' is rescaled rounding noise (or 0)
ROUNDING_NOISE = ("parallel_up_to_rounding", "one_element", "scalar")


def check(params: list[torch.nn.Parameter], grads: list[torch.Tensor], names: list[str],
          outs: list[torch.Tensor]) -> None:
    for p, g, name, out in zip(params, grads, names, outs):
        assert out.dtype == torch.float32 and out.shape == g.shape, name
        assert torch.isfinite(out).all(), name
        g_norm = g.double().norm().item()
        # the formula bounds ||g'|| by ||g|| (up to the rounding of the scale)
        assert out.double().norm().item() <= g_norm * (1 + 1e-6) + 1e-30, name
        if name in ROUNDING_NOISE:
            continue  # o is rounding noise: its direction is arbitrary (tests/test_research_transforms.py)
        want = oracle(p.detach(), g)
        scale = max(want.abs().max().item(), 1e-30)
        # the fp32 errors of rho and of g - rho*w are relative to |g|; o is smaller by |o| / |g|
        w64, g64 = p.detach().reshape(-1).double(), g.reshape(-1).double()
        o_norm = (g64 - torch.dot(w64, g64) / (torch.dot(w64, w64) + 1e-30) * w64).norm().item()
        tol = 2e-6 * max(1.0, g_norm / max(o_norm, 1e-30))
        err = (out.double() - want.double()).abs().max().item() / scale
        assert err <= tol, f"{name}: max error {err:.3g} of the largest element (tolerance {tol})"
        if name != "zero_grad":
            torch.testing.assert_close(out.double().norm().item(), g_norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_formula(dtype):
    params, grads, names = cases(dtype)
    check(params, grads, names, orthograd_output(params, grads))
    outs = dict(zip(names, orthograd_output(*cases(dtype)[:2])))
    assert torch.equal(outs["zero_grad"], torch.zeros(5, 7))
    assert torch.equal(outs["zero_weights"], grads[names.index("zero_weights")].float())


def test_residue_pass_everywhere_gives_the_same_numbers(monkeypatch):
    """The analytic ||o|| (host numbers) against the residue pass on every tensor."""
    params, grads, names = cases()
    fast = orthograd_output(params, grads)
    monkeypatch.setattr(gradient_module, "_ANALYTIC_MIN", float("inf"))  # oo >= inf * gg never holds
    slow = orthograd_output(*cases()[:2])
    for name, a, b in zip(names, fast, slow):
        if name in ("nearly_parallel", *ROUNDING_NOISE):
            assert torch.equal(a, b), name  # these take the residue pass in both runs
        else:
            # the update rounds g - rho*w in one fused pass after the analytic norm: elements that
            # cancel differ in their last bits, relative to the tensor's scale
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=name)


def test_device_path_two_passes(monkeypatch):
    """The accelerator path (0-d fp64 tensors, residue pass always), run on the CPU by keeping every
    dot product a tensor."""
    monkeypatch.setattr(F, "host_number", lambda x: x)
    params, grads, names = cases()
    check(params, grads, names, orthograd_output(params, grads))


def test_parallel_up_to_rounding_keeps_the_norm_bound():
    """g = 0.1 * w rounded to fp32 from fp64: the residue g - rho*w is fp32 rounding noise (not 0);
    the update applies exactly the residue whose norm the reduce measured, so ||g'|| <= ||g||."""
    for seed in range(20):
        w = torch.randn(257, generator=torch.Generator().manual_seed(seed))
        g = (0.1 * w.double()).float()
        p = torch.nn.Parameter(w.clone())
        (out,) = orthograd_output([p], [g])
        assert torch.isfinite(out).all()
        assert out.double().norm().item() <= g.double().norm().item() * (1 + 1e-6)


def test_compiled_matches_eager():
    params, grads, names = cases()
    eager = orthograd_output(params, grads)
    compiled = orthograd_output(*cases()[:2], compile=True)
    for name, a, b in zip(names, eager, compiled):
        if name in ROUNDING_NOISE:
            assert b.double().norm().item() <= grads[names.index(name)].double().norm().item() * (1 + 1e-6)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item(), msg=name)
