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


def test_global_clipping_is_one_step_lagged_in_release_mode():
    """Oracle: plain SGD by hand, scaled by min(1, max_norm / ||g_{t-1}||) from step 2 on (step 1's
    gradients are too small to clip, whatever the order the parameters arrive in)."""
    released, oracle = _model(), _model()
    chain = ac.chain(ac.clip_by_global_norm(0.5), ac.apply())
    opt = ac.ChainOptimizer(released.parameters(), chain, lr=0.05)
    ac.enable_gradient_release(opt, released)
    previous_norm = None
    for t, (x, y) in enumerate(_batches(6)):
        scale = 1e-3 if t == 0 else 1.0
        (scale * torch.nn.functional.mse_loss(released(x), y)).backward()
        oracle.zero_grad()
        (scale * torch.nn.functional.mse_loss(oracle(x), y)).backward()
        grads = [p.grad for p in oracle.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = 1.0 if previous_norm is None else min(1.0, 0.5 / (previous_norm + 1e-6))
        with torch.no_grad():
            for p, g in zip(oracle.parameters(), grads):
                p -= 0.05 * coef * g
        if t > 1:
            assert coef < 1.0  # clipped by the previous step's norm (step 2 follows the tiny step 1)
        previous_norm = norm.item()
        for a, b in zip(released.parameters(), oracle.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    ac.disable_gradient_release(opt)
    opt.zero_grad()
    torch.nn.functional.mse_loss(released(x), y).backward()
    opt.step()  # back to exact, same-step clipping
    assert opt.supports_fused_back_pass()


def test_layer_statistics_of_kourkoutas_run_lagged_in_release_mode():
    model = _model()
    opt = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, kourkoutas_beta=True, stochastic_rounding=False)
    ac.enable_gradient_release(opt, model)
    for x, y in _batches(5):
        torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt._lag_rounds and all(len(r.current) == len(list(model.parameters())) for r in opt._lag_rounds.values())
    ac.disable_gradient_release(opt)


def test_enable_needs_a_chain_optimizer():
    model = _model()
    with pytest.raises(TypeError, match="ChainOptimizer"):
        ac.enable_gradient_release(torch.optim.SGD(model.parameters(), lr=0.1), model)


def _accumulate(model, opt, micro_batches, sched=None):
    """optimi's recipe: optimizer_accumulation on for all micro-batches but the last of each step."""
    for step_batches in micro_batches:
        for k, (x, y) in enumerate(step_batches):
            opt.optimizer_accumulation = k < len(step_batches) - 1
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()  # released: nothing left to do (as training loops still call it)
            opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("micro", [1, 4])
def test_optimizer_accumulation_matches_torch_optimi(micro):
    import optimi  # pinned in the test extra
    batches = _batches(12 * micro)
    micro_batches = [batches[i:i + micro] for i in range(0, len(batches), micro)]
    ours, theirs = _model(), _model()
    opt_a = ac.optim.AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    ac.enable_gradient_release(opt_a, ours)
    opt_b = optimi.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2,
                         gradient_release=True)
    optimi.prepare_for_gradient_release(theirs, opt_b)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 4, 0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 4, 0.5)
    _accumulate(ours, opt_a, micro_batches, sched_a)
    _accumulate(theirs, opt_b, micro_batches, sched_b)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(p.grad is None for p in ours.parameters())
    assert int(opt_a.state[next(ours.parameters())]["step"]) == 12 * micro  # each micro-batch is one EMA step


def test_optimizer_accumulation_works_with_step_too_and_leaves_params_alone():
    batches = _batches(8)
    micro_batches = [batches[i:i + 4] for i in range(0, 8, 4)]
    released, stepped = _model(), _model()
    opt_a = ac.optim.AdamW_adv(released.parameters(), lr=1e-2, weight_decay=0.1, cautious_wd=True,
                               stochastic_rounding=False)
    ac.enable_gradient_release(opt_a, released)
    opt_b = ac.optim.AdamW_adv(stepped.parameters(), lr=1e-2, weight_decay=0.1, cautious_wd=True,
                               stochastic_rounding=False)
    _accumulate(released, opt_a, micro_batches)
    _accumulate(stepped, opt_b, micro_batches)
    for a, b in zip(released.parameters(), stepped.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in stepped.parameters()]
    opt_b.optimizer_accumulation = True
    x, y = batches[0]
    torch.nn.functional.mse_loss(stepped(x), y).backward()
    opt_b.step()
    assert all(torch.equal(a, b) for a, b in zip(before, stepped.parameters()))
    assert opt_a._plans[True] and [t.name for seg in opt_a._plans[True] for t in seg.transforms] == ["adam"]
