"""Swap a drop-in class into an existing training loop: only the import line changes.

    python examples/drop_in.py

``ac.optim.AdamW`` takes torch.optim.AdamW's keywords; ``ac.optim.AdamW_adv`` takes adv_optm's
(``use_atan2``, ``cautious_mask``, ``orthogonal_gradient``, ...). Schedulers, ``state_dict`` and
``zero_grad`` work as with any torch optimizer.
"""
import torch

import adv_chain as ac


def train(optimizer_class, **kwargs) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    x = torch.randn(512, 10)
    y = torch.cos(x[:, :3].sum(dim=1, keepdim=True))
    opt = optimizer_class(model.parameters(), lr=3e-3, **kwargs)       # <- the only line that differs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def main() -> None:
    runs = {
        "torch.optim.AdamW": (torch.optim.AdamW, {"weight_decay": 0.01}),
        "ac.optim.AdamW": (ac.optim.AdamW, {"weight_decay": 0.01}),
        "ac.optim.AdamW_adv cautious+atan2": (ac.optim.AdamW_adv, {"weight_decay": 0.01, "cautious_mask": True,
                                                                  "use_atan2": True}),
        "ac.optim.Lion": (ac.optim.Lion, {"weight_decay": 0.01}),
    }
    for name, (cls, kwargs) in runs.items():
        print(f"{name:36s} final loss {train(cls, **kwargs):.5f}")


if __name__ == "__main__":
    main()
