"""OrthoGrad per LoRA rank / OFT block (parameter tags), against the formula per row or column in fp64."""
import adv_optm
import pytest
import torch

import adv_chain as ac


def _per_slice_orthograd(w, g, axis):
    """The flattened OrthoGrad formula applied to each row (axis 0) or column (axis 1), fp64."""
    w, g = w.double(), g.double()
    if axis == 1:
        return _per_slice_orthograd(w.t(), g.t(), 0).t()
    out = torch.empty_like(g)
    for i in range(w.shape[0]):
        rho = (w[i] @ g[i]) / (w[i] @ w[i] + 1e-30)
        o = g[i] - rho * w[i]
        out[i] = o * g[i].norm() / (o.norm() + 1e-30)
    return out


@pytest.mark.parametrize("tag,shape,axis", [("lora_A", (4, 40), 0), ("lora_B", (40, 4), 1), ("oft", (6, 15), 0),
                                            ("lora_A", (3, 100_000), 0)])  # the last runs on slices
def test_each_rank_gets_its_own_projection(tag, shape, axis):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    g = torch.randn(shape)
    p.grad = g.clone()
    w = p.detach().clone()
    opt = ac.ChainOptimizer([{"params": [p], "tags": [tag]}], ac.chain(ac.orthograd(), ac.scale(1.0), ac.apply()),
                            lr=0.1)
    opt.step()
    expected = w.double() - 0.1 * _per_slice_orthograd(w, g, axis)
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)
    # each rank's update is orthogonal to its own weights and keeps its gradient norm
    upd = (w - p.detach()) / 0.1
    dims = 1 - axis
    assert ((upd * w).sum(dims).abs() <= 1e-3 * (upd.norm(dim=dims) * w.norm(dim=dims))).all()
    torch.testing.assert_close(upd.norm(dim=dims), g.norm(dim=dims), rtol=1e-5, atol=0)


def test_untagged_and_per_rank_false_project_the_whole_tensor():
    torch.manual_seed(0)
    w, g = torch.randn(4, 40), torch.randn(4, 40)
    results = []
    for per_rank, tags in ((True, []), (False, ["lora_A"])):
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        opt = ac.ChainOptimizer([{"params": [p], "tags": tags}],
                                ac.chain(ac.orthograd(per_rank=per_rank), ac.scale(1.0), ac.apply()), lr=0.1)
        opt.step()
        results.append(p.detach().clone())
    whole = w.double() - 0.1 * _per_slice_orthograd(w.reshape(1, -1), g.reshape(1, -1), 0).reshape(4, 40)
    for r in results:
        torch.testing.assert_close(r.double(), whole, atol=1e-6, rtol=0)
    assert repr(ac.orthograd(per_rank=False)) == "orthograd(per_rank=False)"


def test_drop_in_keeps_adv_optm_whole_tensor_projection_on_lora_factors():
    def model():
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4, 12) * 0.1), torch.nn.Parameter(torch.randn(12, 4) * 0.1)
        a._is_lora_A, b._is_lora_B = True, True
        return [a, b]
    ref_p, our_p = model(), model()
    ref = adv_optm.AdamW_adv(ref_p, lr=1e-2, orthogonal_gradient="flattened")
    ours = ac.optim.AdamW_adv(our_p, lr=1e-2, orthogonal_gradient="flattened")
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=gen) for p in ref_p]
        for p, q, gr in zip(ref_p, our_p, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        ours.step()
    for p, q in zip(ref_p, our_p):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=0)
