"""bf16 weights: round-to-nearest loses small updates, stochastic rounding and Kahan keep them.

    python examples/bf16_stochastic_rounding.py
"""
import torch

import adv_chain as ac


def train(dtype: torch.dtype, terminal: ac.Transform, steps: int = 600) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 1).to(dtype)
    data = torch.randn(1024, 32)
    target = data @ torch.linspace(-1, 1, 32).unsqueeze(1)
    chain = ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), terminal)
    opt = ac.ChainOptimizer(model.parameters(), chain, lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(data.to(dtype)).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    print(f"fp32 weights                 final loss {train(torch.float32, ac.apply()):.2e}")
    print(f"bf16, round to nearest       final loss {train(torch.bfloat16, ac.apply()):.2e}")
    print(f"bf16, stochastic rounding    final loss {train(torch.bfloat16, ac.stochastic_round_apply(seed=0)):.2e}")
    print(f"bf16, Kahan summation        final loss {train(torch.bfloat16, ac.kahan_apply()):.2e}")


if __name__ == "__main__":
    main()
