"""Gradient release: step each parameter inside backward and free its gradient at once.

    python examples/gradient_release.py

Trains the same MLP twice, with ``opt.step()`` and with ``ac.enable_gradient_release``, and prints
the peak memory of the training steps (Linux: the process's peak RSS, reset before each run) and the
final loss: same numbers, less memory (every gradient alive at once vs one at a time).
"""
import os

import torch

import adv_chain as ac


def peak_mb_since_reset():
    """Peak RSS in MB since the last reset (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_peak() -> float:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def train(release: bool, steps: int = 6):
    torch.manual_seed(0)
    width = 1536  # a few large layers: gradients dominate the step's memory
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(6)])
    x, y = torch.randn(8, width), torch.randn(8, width)
    opt = ac.optim.AdamW(model.parameters(), lr=1e-4)
    if release:
        ac.enable_gradient_release(opt, model)
    opt.init_state()
    for p in model.parameters():  # touch the state so it counts as resident before the reset
        for value in opt.state[p].values():
            value.add_(0)
    start = reset_peak()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()  # with release: nothing left to do
        opt.zero_grad(set_to_none=True)
    peak = peak_mb_since_reset()
    grads_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    return loss.item(), (None if peak is None else peak - start), grads_mb


def main() -> None:
    for release in (False, True):
        loss, growth, grads_mb = train(release)
        label = "gradient release" if release else "opt.step()      "
        mem = "n/a (no /proc)" if growth is None else f"{growth:6.1f} MB above model+state"
        print(f"{label}  final loss {loss:.6f}  peak {mem}  (all gradients: {grads_mb:.1f} MB)")


if __name__ == "__main__":
    main()
