"""The storage formats of the state wrappers (:mod:`adv_chain.transforms.state_compression`): SMMF
rank-1 factors with packed 1-bit signs (adv_optm_spec.md §4.4, arXiv 2412.08894), and stochastically
rounded bf16/fp16 or block-quantized int8 (§1.5). Pure tensor functions, no optimizer state."""
from __future__ import annotations

import math
from typing import Any

import torch

from .._core.numerics import random_bits, stochastic_round

_TINY = 1e-12
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_CHUNK_BYTES = 1 << 24
LOW_PRECISION_DTYPES = ("bf16", "fp16", "int8")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PARTS = ("row", "col", "sign", "zero")


def _bad(owner: str, arg: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}: {arg}={value!r} is not allowed; {arg} must be {allowed}")


# -- SMMF helpers (spec §4.4) -----------------------------------------------------------------------
def matrix_shape(numel: int) -> tuple[int, int]:
    """SMMF's square matricization: ``(numel // i, i)`` with ``i`` the largest divisor of ``numel``
    not above ``sqrt(numel)`` (so ``d1 >= d2``; a prime ``numel`` gives ``(numel, 1)``).

    >>> matrix_shape(12), matrix_shape(7), matrix_shape(1)
    ((4, 3), (7, 1), (1, 1))
    """
    if numel < 1:
        raise ValueError(f"matrix_shape: numel={numel!r} must be >= 1")
    for i in range(math.isqrt(numel), 0, -1):
        if numel % i == 0:
            return numel // i, i
    return numel, 1  # pragma: no cover - i = 1 always divides


def nnmf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 non-negative factors of a non-negative matrix ``x`` (d1 x d2): row sums ``r`` and
    column sums ``c``; the factor of the shorter side is divided by its total (at least 1e-12), so
    ``outer(r, c) = outer(row sums, column sums) / total``.

    >>> r, c = nnmf(torch.tensor([[1., 2., 3.], [4., 5., 6.]]))
    >>> r.tolist(), c.tolist()
    ([0.2857142984867096, 0.7142857313156128], [5.0, 7.0, 9.0])
    """
    r = x.sum(dim=1, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    c = x.sum(dim=0, dtype=r.dtype)
    if x.shape[0] < x.shape[1]:
        r = r / r.sum().clamp_min(_TINY)
    else:
        c = c / c.sum().clamp_min(_TINY)
    return r, c


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean matrix (d1 x d2) into uint8 (d1 x ceil(d2/8)): element ``8k + j`` of a row
    is bit ``j`` (value ``2**j``) of byte ``k``; padding bits are 0."""
    d1, d2 = bits.shape
    nbytes = (d2 + 7) // 8
    padded = torch.zeros((d1, nbytes * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :d2] = bits
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (padded.view(d1, nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, d2: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the boolean matrix (d1 x d2)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.view(packed.shape[0], -1)[:, :d2]


def reconstruct(row: torch.Tensor, col: torch.Tensor, sign: torch.Tensor | None = None,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix ``outer(row, col)``, negated where the packed sign bit is 0, and exactly 0
    where the packed ``zero`` mask (possibly empty: no exact zeros) is set."""
    x = torch.outer(row, col)
    d2 = col.numel()
    if sign is not None:
        x = torch.where(unpack_bits(sign, d2), x, -x)
    if zero is not None and zero.numel():
        x.masked_fill_(unpack_bits(zero, d2), 0.0)
    return x


def compress(x: torch.Tensor, signed: bool) -> dict[str, torch.Tensor]:
    """Factors of matrix ``x`` (the inverse of :func:`reconstruct` up to the rank-1 error).

    Signed state keeps ``sign = pack(x > 0)`` and factors ``|x|``. An exact zero is a third sign the
    bit cannot hold: adv_optm (bug B18) restores it as ``-r_i c_j``, a made-up negative value that
    keeps moving a weight whose gradient was always zero. Here, when some exact zero lies in a row
    and a column with non-zero mass (elsewhere the rank-1 value is 0 anyway), a packed 1-bit
    ``zero`` mask is kept for that step and zeros come back as zeros; otherwise ``zero`` is empty
    and costs nothing. (Deciding this reads one flag from the device per tensor and step.)
    """
    if not signed:
        r, c = nnmf(x.abs())
        return {"row": r, "col": c}
    mag = x.abs()
    r, c = nnmf(mag)
    zeros = mag == 0
    out = {"row": r, "col": c, "sign": pack_bits(x > 0)}
    stray = zeros & (r > 0).unsqueeze(1) & (c > 0).unsqueeze(0)
    out["zero"] = pack_bits(zeros) if bool(stray.any()) else torch.empty(0, dtype=torch.uint8, device=x.device)
    return out


def _state_float(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _factored_layout(p: torch.Tensor, vector_reshape: bool) -> tuple[int, int] | None:
    """The matrix view of ``p``'s state, or ``None`` when it stays dense (empty, or 1-D without
    ``vector_reshape``, as adv_optm; 0-d tensors are 1 x 1)."""
    if p.numel() == 0 or (p.dim() == 1 and not vector_reshape):
        return None
    return matrix_shape(p.numel())


def _build_part(part: str, vector_reshape: bool, p: torch.Tensor) -> torch.Tensor:
    """Initial (zero) storage of one part of a factored key. A tensor left dense keeps its full state
    in ``:row`` (shaped like the parameter) and empty other parts, so every parameter of a bucket
    has the same keys."""
    layout = _factored_layout(p, vector_reshape)
    dtype = _state_float(p)
    if layout is None:
        if part == "row":
            return torch.zeros(p.shape, dtype=dtype, device=p.device)
        return torch.empty(0, dtype=dtype if part == "col" else torch.uint8, device=p.device)
    d1, d2 = layout
    if part == "row":
        return torch.zeros(d1, dtype=dtype, device=p.device)
    if part == "col":
        return torch.zeros(d2, dtype=dtype, device=p.device)
    if part == "sign":
        return torch.zeros((d1, (d2 + 7) // 8), dtype=torch.uint8, device=p.device)
    return torch.empty(0, dtype=torch.uint8, device=p.device)  # zero mask: none yet


# -- low precision --------------------------------------------------------------------------------
def _noise(x32: torch.Tensor, key: int) -> torch.Tensor:
    """Per-element int32 noise keys for ``x32`` (flat fp32): the host key mixed with each value's
    bits, so that different tensors (and states) at the same step draw different noise."""
    return x32.view(torch.int32) ^ key


def _tensor_key(b: Any, i: int) -> Any:
    """Per-tensor part of the noise key: the terminal's (seed, step, parameter index) key when the
    executor provides one (a Python int, or the same value as an int32 0-d tensor under
    ``compile=True``: eager and compiled runs draw the same noise), else the tensor's position in
    the bucket."""
    keys = b.noise_keys
    if keys is not None:
        return keys[i]
    return (i * 0x9E3779B1 + 0x7F4A7C15) & 0x7FFFFFFF


def round_to(x: torch.Tensor, dtype: torch.dtype, key: int) -> torch.Tensor:
    """``x`` (any float) stochastically rounded to bf16/fp16 (unbiased), counter-based noise."""
    flat = x.reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        return flat.to(dtype).view(x.shape)
    return stochastic_round(flat.contiguous(), dtype, 0, _noise(flat.contiguous(), key)).view(x.shape)


def quantize_blocks(x: torch.Tensor, signed: bool, block: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise stochastic quantization: per block of ``block`` elements (of the flat tensor; the
    last one zero-padded) ``scale = max|x| / 127`` (int8) or, for non-negative state,
    ``max x / 255`` (uint8); ``q = floor(x / scale + u)`` with ``u`` uniform in [0, 1), so
    ``E[q * scale] = x`` - except that a positive non-negative-state value is never stored as 0
    (``q >= 1``: a zero second moment would divide the step by ``eps`` alone). Returns ``q`` (shaped
    like ``x``) and the fp32 scales."""
    flat = x.reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    nblocks = max(1, -(-n // block))
    padded = torch.zeros(nblocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    blocks = padded.view(nblocks, block)
    top, lo, hi, dtype = (127.0, -127.0, 127.0, torch.int8) if signed else (255.0, 0.0, 255.0, torch.uint8)
    scale = (blocks.abs() if signed else blocks.clamp_min(0)).amax(dim=1) / top
    y = blocks / scale.clamp_min(_TINY).unsqueeze(1)
    bits = random_bits(padded, 0, _noise(padded, key))
    uniform = ((bits >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
    q = torch.floor(y + uniform.view_as(y)).clamp_(lo, hi)
    if not signed:
        # a positive value never becomes 0: a second moment read back as 0 turns m / (sqrt(v) + eps)
        # into m / eps (adv_optm's int8_sr does this and blows up: weights off by ~5 after 5 steps of
        # a small MLP); the smallest code keeps such a step small instead (biased up, never down)
        q = torch.where(blocks > 0, q.clamp_min(1.0), q)
    q = q.to(dtype)
    return q.view(-1)[:n].view(x.shape), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    n = q.numel()
    padded = torch.zeros(scale.numel() * block, dtype=dtype, device=q.device)
    padded[:n] = q.reshape(-1).to(dtype)
    return (padded.view(scale.numel(), block) * scale.to(dtype).unsqueeze(1)).view(-1)[:n].view(q.shape)
