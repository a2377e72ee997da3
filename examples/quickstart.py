"""Train a small regression MLP with a hand-built chain and watch the loss fall.

    python examples/quickstart.py
"""
import torch

import adv_chain as ac


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    inputs = torch.randn(512, 16)
    targets = torch.sin(inputs[:, :4].sum(dim=1, keepdim=True))

    chain = ac.chain(
        ac.clip_by_global_norm(1.0),
        ac.scale_by_adam(betas=(0.9, 0.999)),  # moments; publishes the denominator
        ac.eps_divide(1e-8),
        ac.weight_decay(0.01),                 # decoupled, lr-coupled like torch AdamW
        ac.apply(),                            # terminal: p -= lr * u, one write
    )
    print(chain)
    opt = ac.ChainOptimizer(model.parameters(), chain, lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=300)
    for step in range(1, 301):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % 50 == 0:
            grad_norm = opt.step_info["clip_by_global_norm"]["total_norm"]
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {float(grad_norm):.3f}")


if __name__ == "__main__":
    main()
