"""The storage formats of the state wrappers (:mod:`adv_chain.transforms.state_compression`): SMMF
rank-1 factors with packed 1-bit signs (adv_optm_spec.md §4.4, arXiv 2412.08894), here, and
stochastically rounded bf16/fp16 or block-quantized int8 (§1.5), in
:mod:`adv_chain.transforms.low_precision` (re-exported). Pure tensor functions, no optimizer state.

The wrappers call the row/range functions (``*_rows``, ``*_range``) on slices of a few hundred
thousand elements, so every temporary stays in cache; the whole-tensor functions (:func:`compress`,
:func:`reconstruct`, :func:`round_to`, :func:`quantize_blocks`) are the same formats in one call.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .low_precision import (  # noqa: F401 - the low-precision formats, re-exported
    _TINY, _noise_segments, _noisy, _table, dequantize_blocks, dequantize_range, quantize_blocks, quantize_range,
    round_into, round_to)
from .work_buffers import Scratch, scratch  # noqa: F401 - re-exported

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
#: dense fp32 state per call of the inner transform (a few cache-sized slices)
DEFAULT_CHUNK_BYTES = 1 << 21
LOW_PRECISION_DTYPES = ("bf16", "fp16", "int8")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PARTS = ("row", "col", "sign", "zero")
_PACK_MAGIC = 0x0102040810204080  # byte j (0 or 1) of an int64 lands in bit 56 + j of the product
_TABLES: dict[Any, torch.Tensor] = {}


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
    return normalize_factors(r, c)


def normalize_factors(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide the factor of the shorter side by its total (in place), as :func:`nnmf`."""
    if r.numel() < c.numel():
        r.div_(r.sum().clamp_min(_TINY))
    else:
        c.div_(c.sum().clamp_min(_TINY))
    return r, c


def _pack01(b: torch.Tensor) -> torch.Tensor:
    """Pack a uint8 matrix of 0/1 (d1 x d2) into (d1 x ceil(d2/8)) bytes, element ``8k + j`` of a
    row in bit ``j`` of byte ``k`` (one int64 multiply per 8 elements)."""
    d1, d2 = b.shape
    nbytes = (d2 + 7) // 8
    if d2 % 8 or not b.is_contiguous():
        padded = torch.zeros((d1, nbytes * 8), dtype=torch.uint8, device=b.device)
        padded[:, :d2] = b
        b = padded
    v = torch.mul(b.view(torch.int64), _PACK_MAGIC)
    return v.bitwise_right_shift_(56).to(torch.uint8)


def _byte_table(kind: str, device: torch.device) -> torch.Tensor:
    """256 int64 words, one per byte value ``v``: byte ``j`` of word ``v`` (little-endian, as
    :data:`_PACK_MAGIC`) holds bit ``j`` of ``v`` as a bool (``"01"``) or as an int8 sign, +1 where
    set and -1 where clear (``"pm"``)."""
    key = ("bytes", kind, device)
    t = _TABLES.get(key)
    if t is None:
        clear = 0 if kind == "01" else 0xFF
        words = [sum((1 if (v >> j) & 1 else clear) << (8 * j) for j in range(8)) for v in range(256)]
        t = torch.tensor([w - (1 << 64) if w >> 63 else w for w in words], dtype=torch.int64)
        t = _TABLES[key] = t.to(device)
    return t


def _spread(packed: torch.Tensor, kind: str, scratch: "Scratch") -> torch.Tensor:
    """The bits of ``packed`` (d1 x nbytes uint8), one byte per element (d1 x 8 nbytes): bool
    (``kind="01"``) or int8 +-1 (``"pm"``); one gather of 8 bytes per packed byte, into a work
    buffer."""
    n = packed.numel()
    idx = scratch.get("smmf:index", n, torch.int64, packed.device)
    idx.copy_(packed.reshape(-1))
    words = scratch.get(f"smmf:{kind}", n, torch.int64, packed.device)
    torch.index_select(_byte_table(kind, packed.device), 0, idx, out=words)
    return words.view(torch.bool if kind == "01" else torch.int8).view(packed.shape[0], packed.shape[1] * 8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean matrix (d1 x d2) into uint8 (d1 x ceil(d2/8)): element ``8k + j`` of a row
    is bit ``j`` (value ``2**j``) of byte ``k``; padding bits are 0."""
    return _pack01(bits.to(torch.uint8))


def unpack_bits(packed: torch.Tensor, d2: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the boolean matrix (d1 x d2)."""
    return _spread(packed, "01", Scratch())[:, :d2]


def decompress_rows(out: torch.Tensor, row: torch.Tensor, col: torch.Tensor, sign: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None, scratch: "Scratch | None" = None) -> torch.Tensor:
    """Write rows of the dense matrix into ``out`` (rows x d2): ``outer(row, col)``, negative where
    the packed ``sign`` bit is 0, exactly 0 where the packed ``zero`` mask (empty: none) is set.
    ``scratch``: work buffers (default: fresh ones)."""
    d2 = col.numel()
    if sign is None:
        torch.mul(row.unsqueeze(1), col, out=out)
    else:  # (+-1 * col) * row: exactly +-(row * col), the sign of each element from one gather per byte
        scratch = Scratch() if scratch is None else scratch
        signs = _spread(sign, "pm", scratch)
        out.copy_(signs if signs.shape[1] == d2 else signs[:, :d2])  # (a mixed-dtype mul would copy too)
        out.mul_(col).mul_(row.unsqueeze(1))
    if zero is not None and zero.numel():
        scratch = Scratch() if scratch is None else scratch
        out.masked_fill_(_spread(zero, "01", scratch)[:, :d2], 0.0)
    return out


def compress_rows(x: torch.Tensor, signed: bool, row_out: torch.Tensor, col_sum: torch.Tensor,
                  sign_out: torch.Tensor | None = None, zero_out: torch.Tensor | None = None,
                  nonzero: torch.Tensor | None = None, scratch: Scratch | None = None) -> None:
    """Factor rows ``x`` (rows x d2) of a matrix: their sums of ``|x|`` into ``row_out``, the
    column sums added to ``col_sum`` (the caller normalizes when every row is done, see
    :func:`normalize_factors`); for signed state ``sign_out = pack(x > 0)``, ``zero_out =
    pack(x == 0)`` and the count of non-zeros added to ``nonzero`` (0-d int64). ``x`` is not
    modified."""
    rows, d2 = x.shape
    ones = _ones(rows, x.dtype, x.device)
    if not signed:  # non-negative state: |x| = x
        torch.sum(x, 1, out=row_out)
        col_sum.addmv_(x.t(), ones)
        return
    scratch = Scratch() if scratch is None else scratch
    if x.dtype != torch.float32:
        mag = x.abs()
        torch.sum(mag, 1, out=row_out)
        col_sum.addmv_(mag.t(), ones)
        sign_out.copy_(pack_bits(x > 0))
        zero_out.copy_(pack_bits(mag == 0))
        nonzero.add_((mag != 0).sum())
        return
    # two int32 planes, [x != 0 | x > 0] (0/1), packed together: one conversion, one multiply
    n = x.numel()
    planes = scratch.get("smmf:planes", 2 * n, torch.int32, x.device)
    bits = x.view(torch.int32)
    torch.clamp(bits, 0, 1, out=planes[n:].view(x.shape))  # x > 0: as an int, x > 0
    mag_bits = torch.bitwise_and(bits, 0x7FFFFFFF, out=planes[:n].view(x.shape))
    mag = mag_bits.view(torch.float32)  # |x| without a float op
    torch.sum(mag, 1, out=row_out)
    col_sum.addmv_(mag.t(), ones)
    nonzero.add_(mag_bits.clamp_max_(1).sum(dtype=torch.int32))  # |x| as an int: x != 0
    nbytes = sign_out.shape[1]
    plane8 = scratch.get("smmf:plane8", 2 * rows * nbytes * 8, torch.uint8, x.device).view(2 * rows, nbytes * 8)
    if d2 % 8:  # whole groups of 8 elements per row, the padding 0
        plane8[:, d2:].zero_()
        plane8[:, :d2].copy_(planes.view(2 * rows, d2))
    else:
        plane8.copy_(planes.view(2 * rows, d2))
    packed = scratch.get("smmf:pack", 2 * rows * nbytes, torch.int64, x.device).view(2 * rows, nbytes)
    torch.mul(plane8.view(torch.int64), _PACK_MAGIC, out=packed).bitwise_right_shift_(56)
    sign_out.copy_(packed[rows:])
    zero_out.copy_(packed[:rows]).bitwise_not_()
    if d2 % 8:  # padding bits of the zero mask stay 0
        zero_out[:, -1].bitwise_and_((1 << (d2 % 8)) - 1)


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _TABLES.get(("ones", dtype, device))
    if t is None or t.numel() < n:
        t = _TABLES[("ones", dtype, device)] = torch.ones(max(n, 1024), dtype=dtype, device=device)
    return t[:n]


def reconstruct(row: torch.Tensor, col: torch.Tensor, sign: torch.Tensor | None = None,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix ``outer(row, col)``, negated where the packed sign bit is 0, and exactly 0
    where the packed ``zero`` mask (possibly empty: no exact zeros) is set."""
    out = torch.empty((row.numel(), col.numel()), dtype=torch.promote_types(row.dtype, col.dtype), device=row.device)
    return decompress_rows(out, row, col, sign, zero)


def stray_zeros(r: torch.Tensor, c: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    """Whether some exact zero lies in a row and a column with non-zero mass (raw sums ``r``,
    ``c``; ``nonzero`` the count of non-zeros): a row with mass holds a zero of every empty
    column, and an empty row is all zeros, so a stray zero exists iff there are more zeros than
    ``empty rows * d2 + rows with mass * empty columns``. A 0-d bool tensor."""
    empty_rows = (r == 0).sum()
    empty_cols = (c == 0).sum()
    zeros = r.numel() * c.numel() - nonzero
    return zeros > empty_rows * c.numel() + (r.numel() - empty_rows) * empty_cols


def compress(x: torch.Tensor, signed: bool) -> dict[str, torch.Tensor]:
    """Factors of matrix ``x`` (the inverse of :func:`reconstruct` up to the rank-1 error).

    Signed state keeps ``sign = pack(x > 0)`` and factors ``|x|``. An exact zero is a third sign the
    bit cannot hold: adv_optm (bug B18) restores it as ``-r_i c_j``, a made-up negative value that
    keeps moving a weight whose gradient was always zero. Here, when some exact zero lies in a row
    and a column with non-zero mass (elsewhere the rank-1 value is 0 anyway), a packed 1-bit
    ``zero`` mask is kept for that step and zeros come back as zeros; otherwise ``zero`` is empty
    and costs nothing. (Deciding this reads one flag from the device per tensor and step.)
    """
    d1, d2 = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype).contiguous()
    r = torch.empty(d1, dtype=dtype, device=x.device)
    c = torch.zeros(d2, dtype=dtype, device=x.device)
    if not signed:
        compress_rows(x.abs(), False, r, c)
        return dict(zip(("row", "col"), normalize_factors(r, c)))
    nb = (d2 + 7) // 8
    sign = torch.empty((d1, nb), dtype=torch.uint8, device=x.device)
    zero = torch.empty_like(sign)
    nonzero = torch.zeros((), dtype=torch.int64, device=x.device)
    compress_rows(x, True, r, c, sign, zero, nonzero)
    stray = bool(stray_zeros(r, c, nonzero))
    r, c = normalize_factors(r, c)
    return {"row": r, "col": c, "sign": sign,
            "zero": zero if stray else torch.empty(0, dtype=torch.uint8, device=x.device)}


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
