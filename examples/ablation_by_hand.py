"""Swap one transform at a time: a baseline preset and three variants, trained on the same data.

    python examples/ablation_by_hand.py
"""
import torch

import adv_chain as ac


def train(chain: ac.Chain, steps: int = 150, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    data = torch.randn(512, 20)
    target = torch.sin(data[:, :5].sum(dim=1, keepdim=True))
    opt = ac.ChainOptimizer(model.parameters(), chain, lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(data), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    base = ac.presets.adamw_adv(weight_decay=0.01, stochastic_rounding=False)
    variants = {
        "baseline": base,
        "+ orthograd": base.insert_before("adam", ac.orthograd()),
        "+ cautious": base.insert_after("eps_divide", ac.cautious()),
        "atan2 instead of eps": base.replace("eps_divide", ac.atan2_scale()),
    }
    for name, chain in variants.items():
        print(f"{name:22s} final loss {train(chain):.4f}   chain: {' -> '.join(chain.names)}")


if __name__ == "__main__":
    main()
