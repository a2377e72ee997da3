"""Optimizer accumulation (optimi's): accumulate micro-batches into the optimizer state, no gradient buffer.

    python examples/optimizer_accumulation.py

With gradient release the gradients are freed inside backward, so they cannot be summed over
micro-batches. Instead, ``opt.optimizer_accumulation = True`` makes each micro-batch's backward
update only the moments (one EMA step each); the last micro-batch of a step (``False``) runs the whole
chain and writes the weights. This approximates gradient accumulation (it is not identical: each
micro-batch is its own EMA step) at no memory cost.
"""
import torch

import adv_chain as ac


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    data = torch.randn(1024, 16)
    target = torch.sin(data[:, :4].sum(dim=1, keepdim=True))
    opt = ac.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ac.enable_gradient_release(opt, model)
    micro_batches, micro_size = 4, 32
    for step in range(1, 151):
        idx = torch.randint(0, 1024, (micro_batches, micro_size))
        for k in range(micro_batches):
            opt.optimizer_accumulation = k < micro_batches - 1   # the last micro-batch takes the step
            loss = torch.nn.functional.mse_loss(model(data[idx[k]]), target[idx[k]])
            loss.backward()                                     # stepped (or accumulated) inside backward
        if step % 50 == 0:
            with torch.no_grad():
                full = torch.nn.functional.mse_loss(model(data), target).item()
            print(f"step {step:3d}  loss on all data {full:.4f}")
    ac.disable_gradient_release(opt)


if __name__ == "__main__":
    main()
