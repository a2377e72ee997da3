"""Synthetic GPT-shaped parameter sets shared by the benchmarks.

No model is built and no forward pass runs: each set is a list of fp32
``nn.Parameter`` tensors with the shapes of a GPT-style transformer and with
deterministic random gradients already attached, which is all an optimizer
step needs.
"""

from dataclasses import dataclass

import torch
from torch.nn import Parameter


@dataclass(frozen=True)
class GPTShape:
    """Tensor layout of a GPT-style model with an untied output head."""

    vocab: int
    context: int
    d_model: int
    layers: int
    expected_tensors: int
    expected_params: tuple[int, int]  # inclusive (low, high) sanity range
    mlp_ratio: int = 4

    def tensor_shapes(self) -> list[tuple[int, ...]]:
        d, hidden = self.d_model, self.mlp_ratio * self.d_model
        # ln1 w/b, fused qkv w/b, attn out w/b, ln2 w/b, MLP up w/b, MLP down w/b
        block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                 (d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,)]
        embeddings = [(self.vocab, d), (self.context, d)]  # token, position
        head = [(d,), (d,), (self.vocab, d)]               # final ln, untied head
        return embeddings + block * self.layers + head


PARAM_SETS = {
    # 2 + 12 * 6 + 3 = 77 tensors, 27,828,224 parameters.
    "gpt27m": GPTShape(vocab=8192, context=1024, d_model=512, layers=6,
                       expected_tensors=77, expected_params=(27_700_000, 27_900_000)),
    # 2 + 12 * 12 + 3 = 149 tensors, 2,707,200 parameters.
    "small149": GPTShape(vocab=1024, context=512, d_model=128, layers=12,
                         expected_tensors=149, expected_params=(2_650_000, 2_750_000)),
}


def count_params(params: list[Parameter]) -> int:
    return sum(p.numel() for p in params)


def make_params(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: torch.device | str = "cpu") -> list[Parameter]:
    """Set ``name`` with weights ``randn * 0.02`` and grads ``randn * 1e-2``, drawn
    on the CPU from a seeded generator (same values on every device)."""
    shape = PARAM_SETS[name]
    generator = torch.Generator().manual_seed(seed)
    params = []
    for tensor_shape in shape.tensor_shapes():
        weight = torch.randn(tensor_shape, generator=generator).mul_(0.02)
        grad = torch.randn(tensor_shape, generator=generator).mul_(1e-2)
        param = Parameter(weight.to(device=device, dtype=dtype))
        param.grad = grad.to(device=device, dtype=dtype)
        params.append(param)
    low, high = shape.expected_params
    assert len(params) == shape.expected_tensors, (name, len(params))
    assert low <= count_params(params) <= high, (name, count_params(params))
    return params


def clone_params(params: list[Parameter]) -> list[Parameter]:
    """Independent copies of ``params`` and their grads, for a separate optimizer."""
    clones = []
    for param in params:
        clone = Parameter(param.detach().clone())
        clone.grad = param.grad.detach().clone()
        clones.append(clone)
    return clones
