"""Gradient release: stepping each parameter inside backward gives the numbers of step()."""
import pytest
import torch

import adv_chain as ac


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3))


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)]


CHAINS = {
    "adamw": lambda: ac.presets.adamw(weight_decay=0.1),
    "adamw_adv_orthograd_cautious": lambda: ac.presets.adamw_adv(orthogonal_gradient="flattened", cautious_mask=True,
                                                                 weight_decay=0.1, stochastic_rounding=False),
    "sgd_nesterov": lambda: ac.presets.sgd(momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", CHAINS)
def test_release_matches_step_over_20_steps(name):
    stepped, released = _model(), _model()
    opt_a = ac.ChainOptimizer(stepped.parameters(), CHAINS[name](), lr=1e-2)
    opt_b = ac.ChainOptimizer(released.parameters(), CHAINS[name](), lr=1e-2)
    ac.enable_gradient_release(opt_b, released)
    for x, y in _batches(20):
        opt_a.zero_grad()
        torch.nn.functional.mse_loss(stepped(x), y).backward()
        opt_a.step()
        torch.nn.functional.mse_loss(released(x), y).backward()  # steps inside backward
        assert all(p.grad is None for p in released.parameters()), "gradients must be freed"
        opt_b.step()  # what training loops still call: nothing left to do
    for a, b in zip(stepped.parameters(), released.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert opt_a.state_dict()["state"][0]["step"] == opt_b.state_dict()["state"][0]["step"] == 20


def test_global_reductions_are_refused_in_release_mode_and_disable_restores_step():
    model = _model()
    opt = ac.ChainOptimizer(model.parameters(), ac.presets.adamw().insert_before("adam", ac.clip_by_global_norm(1.0)),
                            lr=1e-2)
    ac.enable_gradient_release(opt, model)
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="clip_by_global_norm.*step\\(\\)"):
        torch.nn.functional.mse_loss(model(x), y).backward()
    ac.disable_gradient_release(opt)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.supports_fused_back_pass()


def test_enable_needs_a_chain_optimizer():
    model = _model()
    with pytest.raises(TypeError, match="ChainOptimizer"):
        ac.enable_gradient_release(torch.optim.SGD(model.parameters(), lr=0.1), model)
