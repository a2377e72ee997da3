"""Pick an optimizer by name, as a config file or a trainer's option string would.

    python examples/preset_by_name.py

``ac.presets.names()`` lists the presets; names ignore case (OneTrainer writes ``ADAMW_ADV``), and a
preset's keywords are the same as the drop-in class's (``ac.presets.keywords(name)``).
"""
import torch

import adv_chain as ac


def main() -> None:
    config = {"optimizer": "ADAMW_ADV", "lr": 3e-3, "optimizer_args": {"use_atan2": True, "weight_decay": 0.01,
                                                                       "orthogonal_gradient": "flattened"}}
    print("presets:", ", ".join(ac.presets.names()))
    chain = ac.presets.get(config["optimizer"], **config["optimizer_args"])
    print(chain)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 8)
    y = x[:, :2].prod(dim=1, keepdim=True)
    # the same thing in one call: ac.ChainOptimizer(params, "adamw_adv", lr=..., use_atan2=True, ...)
    opt = ac.ChainOptimizer(model.parameters(), chain, lr=config["lr"])
    for step in range(1, 201):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
