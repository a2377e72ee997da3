"""The pointwise atan2 that compiled atan2_scale kernels use (normalize.atan2_pointwise), against
fp64 torch.atan2 as the oracle, and compiled atan2_scale against the eager step."""
from __future__ import annotations

import math

import pytest
import torch

import adv_chain as ac
from adv_chain.transforms.normalize import atan2_pointwise


def test_within_3e7_of_fp64_atan2_over_every_quadrant_and_scale():
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    scale = lambda: torch.exp2(torch.randint(-60, 60, (n,), generator=gen).float())  # noqa: E731
    y, x = torch.randn(n, generator=gen) * scale(), torch.randn(n, generator=gen) * scale()
    want = torch.atan2(y.double(), x.double())
    assert (atan2_pointwise(y, x).double() - want).abs().max() <= 3e-7
    # near the branch points |y| = |x| and t -> 0
    t = torch.linspace(0, 1, 100_001)[1:]  # (y = -0 is a documented exception)
    for yy, xx in ((t, torch.ones_like(t)), (torch.ones_like(t), t), (-t, -torch.ones_like(t))):
        assert (atan2_pointwise(yy, xx).double() - torch.atan2(yy.double(), xx.double())).abs().max() <= 3e-7


def test_special_values_match_torch_except_signed_zeros():
    values = torch.tensor([0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-38, 1e-45, 3e38])
    y, x = torch.meshgrid(values, values, indexing="ij")
    got, want = atan2_pointwise(y, x), torch.atan2(y, x)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert (got[finite] - want[finite]).abs().max() <= 3e-7
    # the documented exceptions: -0 counts as +0
    assert atan2_pointwise(torch.tensor(-0.0), torch.tensor(-1.0)) == pytest.approx(math.pi)
    assert atan2_pointwise(torch.tensor(0.0), torch.tensor(-0.0)) == 0.0


def test_compiled_atan2_scale_steps_like_eager():
    """compile=True uses the pointwise form (fused into the kernel); 20 AdamW_adv(use_atan2=True)
    steps stay within a few fp32 ulps of the eager run, which uses torch.atan2."""
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, use_atan2=True, compile=compile)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            x = torch.randn(8, 16, generator=gen)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
