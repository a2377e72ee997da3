"""Built-in training tasks for ablations (no download, no extra dependency) and user task loading.

A task is a callable ``task(seed, steps, device, dtype) -> TaskRun``. ``seed`` fixes the model's
initialization and the order of the training batches, so two runs with the same seed see the same data
and start from the same weights: the only difference between variants is the optimizer.

* ``charlm`` - a byte-level causal transformer (2 layers, width 64, context 64, 0.2M parameters) on
  the Python standard library's own ``.py`` sources (present on every machine), next-byte
  cross-entropy; the last 10% of the bytes are the validation text.
* ``mlp`` - a 3-layer GELU classifier on a deterministic synthetic dataset (10 overlapping Gaussian
  clusters in 32 dimensions pushed through a fixed random nonlinear map, 5000 train / 1000
  validation points, label noise so that the loss does not collapse to zero).

Your own task is a function with the same signature, given as ``"module:function"`` on the command line
(the module must be importable: installed or in the current directory).
"""
from __future__ import annotations

import functools
import importlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .variants import AblationError


@dataclass
class TaskRun:
    """One training run's ingredients: ``train_loss(t)`` is the loss of batch ``t`` (a scalar tensor
    that is then back-propagated), ``val_loss()`` the validation loss (called under ``no_grad``), ``lr``
    the task's default peak learning rate."""

    model: torch.nn.Module
    train_loss: Callable[[int], torch.Tensor]
    val_loss: Callable[[], torch.Tensor]
    lr: float = 3e-3


@functools.lru_cache(maxsize=2)
def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if total < 10_000:
        raise RuntimeError(f"charlm: found only {total} bytes of Python sources under {root}; "
                           "use another task (e.g. --task mlp)")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class TinyCharLM(torch.nn.Module):
    """A small pre-norm causal transformer over bytes."""

    def __init__(self, d: int = 64, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.zeros(context, d))
        block = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        mask = self.mask[:n, :n].to(h.dtype)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def charlm(seed: int, steps: int, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> TaskRun:
    """Byte-level language model on the standard library's sources (see the module docstring)."""
    data = stdlib_bytes().to(device)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    context, batch = 64, 16
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - context - 1, (steps, batch), generator=gen).to(device)
    val_starts = torch.arange(0, len(val) - context - 1, (len(val) - context - 1) // 32)[:32].to(device)
    offsets = torch.arange(context + 1, device=device)
    torch.manual_seed(seed)
    model = TinyCharLM(context=context).to(device=device, dtype=dtype)

    def loss_on(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        windows = source[idx[:, None] + offsets]  # (batch, context + 1)
        logits = model(windows[:, :-1]).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))

    return TaskRun(model, lambda t: loss_on(train, starts[t]), lambda: loss_on(val, val_starts), lr=3e-3)


def mlp(seed: int, steps: int, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> TaskRun:
    """Classifier on a deterministic synthetic dataset (see the module docstring)."""
    gen = torch.Generator().manual_seed(1234)  # the dataset is the same for every seed
    n, dim, classes = 6000, 32, 10
    centers = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    x = torch.tanh((centers[labels] + 1.5 * torch.randn(n, dim, generator=gen)) @ mix)
    flip = torch.rand(n, generator=gen) < 0.1  # 10% label noise: the loss floor is well above zero
    labels = torch.where(flip, torch.randint(0, classes, (n,), generator=gen), labels)
    x, labels = x.to(device=device, dtype=dtype), labels.to(device)
    train_x, train_y, val_x, val_y = x[:5000], labels[:5000], x[5000:], labels[5000:]
    order = torch.randint(0, 5000, (steps, 128), generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, classes)).to(device=device, dtype=dtype)

    def loss_on(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(xs).float(), ys)

    return TaskRun(model, lambda t: loss_on(train_x[order[t]], train_y[order[t]]), lambda: loss_on(val_x, val_y),
                   lr=3e-3)


TASKS: dict[str, Callable[..., TaskRun]] = {"charlm": charlm, "mlp": mlp}


def resolve_task(task: "str | Callable[..., Any]") -> tuple[str, Callable[..., Any]]:
    """``(name, callable)`` for a built-in task name, a ``"module:function"`` string or a callable."""
    if callable(task):
        return getattr(task, "__name__", "custom"), task
    if not isinstance(task, str):
        raise AblationError(f"task must be a name, 'module:function' or a callable, got {type(task).__name__}")
    if task in TASKS:
        return task, TASKS[task]
    if ":" not in task:
        raise AblationError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}; "
                         "or give your own as 'module:function'")
    module_name, _, attr = task.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AblationError(f"task {task!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AblationError(f"task {task!r}: module {module_name!r} has no callable {attr!r}")
    return task, fn


def as_task_run(result: Any, task_name: str) -> TaskRun:
    """Accept a :class:`TaskRun` or a ``(model, train_loss, val_loss[, lr])`` tuple from a user task."""
    if isinstance(result, TaskRun):
        return result
    if isinstance(result, tuple) and len(result) in (3, 4) and isinstance(result[0], torch.nn.Module):
        return TaskRun(*result)
    raise AblationError(f"task {task_name!r} must return adv_chain.ablation.TaskRun(model, train_loss, val_loss, lr) "
                    f"or a (model, train_loss, val_loss[, lr]) tuple, got {type(result).__name__}")
