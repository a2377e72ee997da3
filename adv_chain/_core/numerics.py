"""Numerics of the terminal: counter-based noise, stochastic rounding and Kahan-compensated writes.

Noise is a pure function of (seed, step, parameter index, element index): two rounds of a 32-bit
integer mixing hash over the element counter. It needs no ``torch.Generator``, so it compiles,
reproduces exactly for a fixed seed, stores nothing in checkpoints and never touches the global RNG.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# multipliers of a 32-bit avalanche hash (written as signed int32 values)
_MUL_A = 0x7FEB352D
_MUL_B = 0x846CA68B - (1 << 32)


def _mix32_host(x: int) -> int:
    """The same 32-bit mixing on the host, for the per-(seed, step, param) key."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def noise_key(seed: int, step: int, param_index: int) -> int:
    """A well-mixed 31-bit key for one parameter at one step (kept positive for int32 tensors)."""
    k = _mix32_host(seed * 0x9E3779B1 + 0x632BE5AB)
    k = _mix32_host(k ^ (step * 0x85EBCA77))
    k = _mix32_host(k ^ (param_index * 0xC2B2AE3D + 0x27D4EB2F))
    return k & 0x7FFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche hash on int32 tensors (wrapping multiply, logical shifts via masks)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL_A
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL_B
    x = x ^ ((x >> 16) & 0xFFFF)
    return x


def random_bits(like: torch.Tensor, offset: "int | torch.Tensor", key: "int | torch.Tensor") -> torch.Tensor:
    """32 random bits (as int32) for each element of ``like`` (numbered in order from ``offset``)."""
    idx = torch.arange(like.numel(), device=like.device, dtype=torch.int32) + offset
    return _mix32(_mix32(idx ^ key) + key).view(like.shape)


def stochastic_round(x32: torch.Tensor, dtype: torch.dtype, offset: "int | torch.Tensor",
                     key: "int | torch.Tensor") -> torch.Tensor:
    """Round fp32 ``x32`` (flat) to ``dtype`` up or down with probability proportional to proximity,
    so that the result is unbiased: E[round(x)] = x."""
    bits = random_bits(x32, offset, key)
    if dtype == torch.bfloat16:
        # bf16 is the upper half of fp32: add 16 random low bits and truncate
        raw = x32.view(torch.int32) + (bits & 0xFFFF)
        return (raw & -65536).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float32:
        return x32
    nearest = x32.to(dtype)
    near32 = nearest.float()
    diff = x32 - near32
    toward = torch.where(diff > 0, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward)
    prob = diff / (other.float() - near32)
    uniform = ((bits >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
    take_other = (uniform < prob) & torch.isfinite(prob)
    return torch.where(take_other, other, nearest)
