"""compile=True: the stage kernels compile once and changing hyperparameters never recompiles."""
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
