"""Layer and global scope: reduce over every bucket, finalize once, per-layer results reach the
elementwise update of every slice of every tensor (eager, chunked, and compiled)."""
from typing import Any

import pytest
import torch

import adv_chain as ac


class LayerRmsNormalize(ac.Transform):
    """Test-only layer-scope transform: u <- u / rms(u over the layer), a layer being the parameters
    whose group carries the same "layer" tag (untagged parameters are their own layer)."""

    type_name = "test_layer_rms_normalize"
    default_name = "layer_rms"
    stage = "gradient"
    scope = "layer"

    def __init__(self, *, name=None):
        super().__init__(name=name)

    def layer_key(self, param, index, group):
        return group.get("layer", ("own", index))

    def reduce(self, b: Any) -> list[torch.Tensor]:
        return [torch.stack([x.float().square().sum(), torch.tensor(float(x.numel()))]) for x in b.u]

    def finalize(self, values, layer_keys, hp):
        totals: dict[Any, torch.Tensor] = {}
        for v, k in zip(values, layer_keys):
            totals[k] = totals[k] + v if k in totals else v.clone()
        return {"inv_rms": [torch.rsqrt(totals[k][0] / totals[k][1]) for k in layer_keys]}

    def update(self, b: Any) -> None:
        torch._foreach_mul_(b.own_u(), b.s("inv_rms"))


def _expected_update(grads, layers):
    out = []
    for g, layer in zip(grads, layers):
        members = [h for h, m in zip(grads, layers) if m == layer]
        rms = torch.sqrt(sum(h.square().sum() for h in members) / sum(h.numel() for h in members))
        out.append(g / rms)
    return out


@pytest.mark.parametrize("compile", [False, True])
def test_layer_scope_results_reach_every_slice(compile):
    torch.manual_seed(0)
    shapes = [(50, 100), (100,), (30, 40), (7,), (3000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    groups = [{"params": params[:2], "layer": "a"}, {"params": params[2:4], "layer": "b"}, {"params": params[4:]}]
    # chunk_elems=1024 splits the 5000- and 3000-element tensors into several slices
    opt = ac.ChainOptimizer(groups, ac.chain(LayerRmsNormalize(), ac.apply()), lr=0.1, chunk_elems=1024,
                            compile=compile)
    opt.step()
    expected = _expected_update(grads, ["a", "a", "b", "b", "own"])
    for p, b, e in zip(params, before, expected):
        torch.testing.assert_close(p.detach(), b - 0.1 * e, atol=1e-6, rtol=1e-6)


def test_global_scope_sees_every_group_and_dtype():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    a.grad, b.grad = torch.randn(64, 64), torch.randn(10).to(torch.bfloat16)
    opt = ac.ChainOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}],
                            ac.chain(ac.clip_by_global_norm(1.0), ac.apply()), lr=0.1)
    expected_norm = torch.sqrt(a.grad.square().sum() + b.grad.float().square().sum())
    opt.step()
    torch.testing.assert_close(opt.step_info["clip_by_global_norm"]["total_norm"], expected_norm)


@pytest.mark.parametrize("compile", [False, True])
def test_two_reductions_in_one_chain_match_a_direct_computation(compile):
    """orthograd (a reduce before the moments) and cautious (a reduce after them) split the chain into
    three segments; with many slices per tensor the result must equal the formulas applied directly."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(60, 100), (7,), (20, 30)]]
    gen = torch.Generator().manual_seed(123)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    expected = []
    for p in params:
        w, g = p.detach().flatten(), p.grad.flatten()
        rho = (w @ g) / (w @ w + 1e-30)
        o = g - rho * w
        g_orth = o * g.norm() / (o.norm() + 1e-30)
        u = g_orth / (g_orth.abs() + 1e-8)          # Adam's first step: m_hat / (sqrt(v_hat) + eps)
        phi = (u * g_orth > 0).float()
        u = u * phi * phi.numel() / (phi.sum() + 1)  # C-Optim rescale
        expected.append((w - 1e-2 * u).view_as(p))
    chain = ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(1e-8), ac.cautious(), ac.apply())
    ac.ChainOptimizer(params, chain, lr=1e-2, chunk_elems=1024, compile=compile).step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chain", [
    lambda: ac.presets.adamw_adv(cautious_mask=True, weight_decay=0.1),
    lambda: ac.presets.adamw_adv(orthogonal_gradient="flattened", cautious_mask=True, use_atan2=True),
    lambda: ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(), ac.cautious(), ac.apply()),
])
def test_a_pipelined_step_gives_the_numbers_of_a_whole_step(chain):
    """Per-tensor barriers only: the plan runs on parts of a few tensors (chunk_elems) with a pooled
    direction buffer; the numbers are those of one pass over all tensors, bit for bit."""
    runs = []
    for pipelined in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 48), (48,), (3000,), (7, 5, 3), (2048,)]]
        opt = ac.ChainOptimizer(params, chain(), lr=1e-2, chunk_elems=2048)
        if not pipelined:
            opt._pipelined[opt._plan] = False
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        assert opt._pipelined[opt._plan] is pipelined
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chain", [
    lambda: ac.presets.adamw_adv(cautious_mask=True, weight_decay=0.1),
    lambda: ac.chain(ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(), ac.cautious(), ac.apply()),
])
def test_a_compiled_pipelined_step_writes_the_direction_in_place_and_counts_in_the_kernel(chain):
    """compile=True: the kernel before cautious's barrier writes the direction into buffers kept
    across steps (one storage per tensor) and returns the count itself; the numbers are the eager
    step's."""
    runs, kept = [], None
    for compile in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 48), (48,), (3000,), (7, 5, 3), (2048,)]]
        opt = ac.ChainOptimizer(params, chain(), lr=1e-2, chunk_elems=2048, compile=compile)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            if compile:
                buffers = {k: v.data_ptr() for k, v in opt._kernel_buffers.items()}
                assert buffers, "the compiled kernel did not write into kept buffers"
                assert len({v.untyped_storage().data_ptr() for v in opt._kernel_buffers.values()}) == len(buffers)
                if step > 0:
                    assert buffers == kept, "the kept direction buffers changed between steps"
                kept = buffers
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
