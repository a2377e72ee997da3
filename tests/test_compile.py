"""compile=True: the stage kernels compile once and changing hyperparameters never recompiles."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import adv_chain as ac


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, sched=None) -> None:
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_changing_lr_and_betas_does_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = _model()
    opt = ac.ChainOptimizer(model.parameters(), "adamw", lr=1e-2, compile={"backend": counter})
    # OneCycleLR changes lr and cycles betas[0] at every step
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=40)
    _train(opt, model, 1, sched)
    after_first = counter.frame_count
    assert after_first >= 1
    _train(opt, model, 20, sched)
    assert counter.frame_count == after_first, "a changing lr/betas caused a recompilation"


def test_compiled_matches_eager_with_scheduler():
    models = [_model(), _model()]
    opts = [ac.ChainOptimizer(m.parameters(), "adamw", lr=1e-2, weight_decay=0.1, compile=c)
            for m, c in zip(models, (False, True))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in opts]
    for m, o, s in zip(models, opts, scheds):
        _train(o, m, 15, s)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_segment_the_compiler_fails_on_runs_eagerly_with_a_warning():
    """torch 2.13's inductor fails on sinkhorn -> cautious_wd -> centered_wd (``KeyError: 'bufN'`` in
    its CPU codegen). That segment runs eagerly, with one RuntimeWarning naming it, and the run
    equals the eager one; nothing was written before the failure (it happens before the graph runs)."""
    import warnings

    def chain():
        return ac.chain(ac.sinkhorn(), ac.cautious_wd(0.1), ac.centered_wd(0.1), ac.apply())

    torch._dynamo.reset()
    models = [_model(), _model()]
    opts = [ac.ChainOptimizer(m.parameters(), chain(), lr=1e-2, compile=c) for m, c in zip(models, (False, True))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m, o in zip(models, opts):
            _train(o, m, 5)
    ours = [w for w in caught if "torch.compile failed on the segment" in str(w.message)]
    assert len(ours) <= 1 and all("sinkhorn" in str(w.message) for w in ours)  # (0: a torch that compiles it)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_compiler_failure_falls_back_without_double_writes(monkeypatch):
    """The fallback itself, whatever torch version: a backend that always fails; every step is then
    the eager body (with 0-d tensor scalars, so within rounding of the eager optimizer's steps; a
    step written twice would be far off)."""
    from torch._dynamo.exc import BackendCompilerFailed

    def failing_backend(gm, example_inputs):
        raise BackendCompilerFailed(failing_backend, RuntimeError("synthetic compiler failure"))

    torch._dynamo.reset()
    models = [_model(), _model()]
    opts = [ac.ChainOptimizer(models[0].parameters(), "adamw", lr=1e-2),
            ac.ChainOptimizer(models[1].parameters(), "adamw", lr=1e-2, compile={"backend": failing_backend})]
    with pytest.warns(RuntimeWarning, match="torch.compile failed on the segment"):
        for m, o in zip(models, opts):
            _train(o, m, 5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
