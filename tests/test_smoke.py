import torch

import adv_chain as ac


def test_quickstart_chain_trains():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(
        ac.clip_by_global_norm(1.0), ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01), ac.apply()),
        lr=1e-2)
    first = None
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
