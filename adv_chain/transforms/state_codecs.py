"""The storage formats of the state wrappers (:mod:`adv_chain.transforms.state_compression`): SMMF
rank-1 factors with packed 1-bit signs (adv_optm_spec.md §4.4, arXiv 2412.08894), and stochastically
rounded bf16/fp16 or block-quantized int8 (§1.5). Pure tensor functions, no optimizer state.

The wrappers call the row/range functions (``*_rows``, ``*_range``) on slices of a few hundred
thousand elements, so every temporary stays in cache; the whole-tensor functions (:func:`compress`,
:func:`reconstruct`, :func:`round_to`, :func:`quantize_blocks`) are the same formats in one call.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Iterator

import torch

from .._core.numerics import _mix32, _mix32_host, random_bits

_TINY = 1e-12
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
#: dense fp32 state per call of the inner transform (a few cache-sized slices)
DEFAULT_CHUNK_BYTES = 1 << 21
LOW_PRECISION_DTYPES = ("bf16", "fp16", "int8")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PARTS = ("row", "col", "sign", "zero")
_INT_MIN = -(1 << 31)
_PACK_MAGIC = 0x0102040810204080  # byte j (0 or 1) of an int64 lands in bit 56 + j of the product
_TABLES: dict[Any, torch.Tensor] = {}


def _bad(owner: str, arg: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}: {arg}={value!r} is not allowed; {arg} must be {allowed}")


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Constant lookup tables, built once per device."""
    key = (kind, device)
    t = _TABLES.get(key)
    if t is None:
        if kind == "sign":  # (256, 8) int32: 0 where bit j of the byte is set, the fp32 sign bit where clear
            t = torch.tensor([[0 if (v >> j) & 1 else _INT_MIN for j in range(8)] for v in range(256)],
                             dtype=torch.int32)
        else:  # noise: a fixed permutation of [0, 2^16), repeated (see _noise_segments)
            perm = torch.argsort(random_bits(torch.empty(_PERIOD), 0, 0x2545F491), stable=True)
            t = perm.to(torch.int32) if kind == "bits16" else (perm.to(torch.float32) + 0.5) * (1.0 / _PERIOD)
            t = t.repeat(_REPEAT)
        t = _TABLES[key] = t.to(device)
    return t


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


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean matrix (d1 x d2) into uint8 (d1 x ceil(d2/8)): element ``8k + j`` of a row
    is bit ``j`` (value ``2**j``) of byte ``k``; padding bits are 0."""
    return _pack01(bits.to(torch.uint8))


def unpack_bits(packed: torch.Tensor, d2: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the boolean matrix (d1 x d2)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.view(packed.shape[0], -1)[:, :d2]


def decompress_rows(out: torch.Tensor, row: torch.Tensor, col: torch.Tensor, sign: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> torch.Tensor:
    """Write rows of the dense matrix into ``out`` (rows x d2): ``outer(row, col)``, negative where
    the packed ``sign`` bit is 0, exactly 0 where the packed ``zero`` mask (empty: none) is set."""
    torch.mul(row.unsqueeze(1), col, out=out)
    d2 = col.numel()
    if sign is not None:
        if out.dtype == torch.float32:  # set the sign bit from a 256-entry table: one gather, one OR
            masks = torch.index_select(_table("sign", out.device), 0, sign.reshape(-1).to(torch.int64))
            masks = masks.view(out.shape[0], -1)
            out.view(torch.int32).bitwise_or_(masks if masks.shape[1] == d2 else masks[:, :d2])
        else:
            torch.where(unpack_bits(sign, d2), out, -out, out=out)
    if zero is not None and zero.numel():
        out.masked_fill_(unpack_bits(zero, d2), 0.0)
    return out


class Scratch:
    """Reusable work buffers (one per name, grown as needed): an op writing into memory that is
    still in cache costs a fraction of one writing a fresh allocation (and a fresh allocation of a
    few MB costs page faults). :func:`scratch` keeps one per thread; a buffer handed on (to the
    direction) is :meth:`drop`-ped."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            self._bufs.pop(key, None)
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def drop(self, name: str, dtype: torch.dtype, device: torch.device) -> None:
        self._bufs.pop((name, dtype, device), None)


_LOCAL = threading.local()


def scratch() -> Scratch:
    """This thread's work buffers (a few MB at most: slices, never whole tensors)."""
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = Scratch()
    return s


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
    bits = x.view(torch.int32)
    mag_bits = torch.bitwise_and(bits, 0x7FFFFFFF, out=scratch.get("mag", x.numel(), torch.int32, x.device).view(x.shape))
    mag = mag_bits.view(torch.float32)  # |x| without a float op
    torch.sum(mag, 1, out=row_out)
    col_sum.addmv_(mag.t(), ones)
    plane = scratch.get("plane", x.numel(), torch.int32, x.device).view(x.shape)
    plane8 = scratch.get("plane8", x.numel(), torch.uint8, x.device).view(x.shape)
    sign_out.copy_(_pack01(plane8.copy_(torch.clamp(bits, 0, 1, out=plane))))  # x > 0: as an int, x > 0
    nonzero.add_(mag_bits.clamp_(0, 1).sum(dtype=torch.int32))
    zero_out.copy_(_pack01(plane8.copy_(mag_bits)).bitwise_not_())
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


# -- counter-based noise ----------------------------------------------------------------------------
# Element g of a tensor (its index in the flattened tensor, so any slicing draws the same noise)
# gets entry (a + (g >> 16) * d + (g & 0xFFFF)) mod 2^16 of a fixed permutation of [0, 2^16), where
# a (uniform) and the odd stride d come from the 31-bit key of (seed, step, tensor, state key).
# Over keys every element's noise is exactly uniform (a is), so rounding is unbiased; within one
# draw the 2^16 elements of a block get distinct values and successive blocks are shifted
# differently. Host keys read windows of the repeated table (no per-element integer work, one add
# per element); tensor keys (compile=True) gather the same entries.
_PERIOD = 1 << 16
_REPEAT = 6  # table copies: windows of up to _REPEAT - 2 whole blocks fit


def _noise_params(key: Any) -> tuple[Any, Any]:
    if isinstance(key, torch.Tensor):
        h = _mix32(key.to(torch.int32))
        return h & 0xFFFF, ((h >> 16) & 0x7FFF) | 1
    h = _mix32_host(int(key))
    return h & 0xFFFF, ((h >> 16) & 0x7FFF) | 1


def _noise_segments(n: int, offset: int, key: Any, kind: str,
                    device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Noise for elements ``offset .. offset + n - 1`` of a tensor, as ``(lo, hi, values)`` for
    local positions ``lo:hi`` (``values`` 1-D, or ``(blocks, 2^16)`` for whole blocks). ``kind``:
    ``"bits16"`` int32 in [0, 2^16), ``"uniform"`` fp32 ``(k + 0.5) / 2^16``."""
    table = _table(kind, device)
    a, d = _noise_params(key)
    if isinstance(a, torch.Tensor) or isinstance(offset, torch.Tensor):
        g = torch.arange(n, device=device, dtype=torch.int64) + offset
        pos = (a + (g >> 16) * d + (g & 0xFFFF)) & 0xFFFF
        yield 0, n, table[pos]
        return
    lo = 0
    while lo < n:
        g = offset + lo
        block, j = divmod(g, _PERIOD)
        start = (a + block * d) % _PERIOD
        if j == 0 and n - lo >= _PERIOD:  # whole blocks: one strided view
            count = min((n - lo) // _PERIOD, _REPEAT - 2)
            yield lo, lo + count * _PERIOD, table.as_strided((count, _PERIOD), (d, 1), start)
            lo += count * _PERIOD
        else:
            hi = min(n, lo + _PERIOD - j)
            yield lo, hi, table[start + j:start + j + hi - lo]
            lo = hi


def _noisy(x: torch.Tensor, offset: int, key: Any, kind: str, op: Any, out: torch.Tensor) -> torch.Tensor:
    """``out = op(x, noise)`` over flat ``x`` (noise of :func:`_noise_segments`)."""
    n = x.numel()
    for lo, hi, noise in _noise_segments(n, offset, key, kind, x.device):
        op(x[lo:hi].view(noise.shape), noise, out=out[lo:hi].view(noise.shape))
    return out


# -- low precision --------------------------------------------------------------------------------
def round_into(dst: torch.Tensor, x: torch.Tensor, offset: Any, key: Any, scratch: Scratch | None = None) -> None:
    """``dst`` (bf16/fp16/fp32, flat) = flat fp32 ``x`` rounded stochastically (unbiased), with the
    noise of elements ``offset ..`` under ``key``."""
    if dst.dtype == torch.float32:
        dst.copy_(x)
        return
    if x.numel() == 0:
        return
    if dst.dtype == torch.bfloat16:  # bf16 is the upper half of fp32: add 16 random low bits, truncate
        raw = (Scratch() if scratch is None else scratch).get("round", x.numel(), torch.int32, x.device)
        raw = _noisy(x.view(torch.int32), offset, key, "bits16", torch.add, raw)
        dst.copy_(raw.bitwise_and_(-65536).view(torch.float32))
        return
    nearest = x.to(dst.dtype)
    near32 = nearest.float()
    diff = x - near32
    toward = torch.where(diff > 0, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward)
    prob = diff / (other.float() - near32)
    # u with 32 random bits (two draws): fp16's tiny values round up with probabilities far below 2^-16
    u = _noisy(torch.zeros_like(prob), offset, key ^ 0x5BD1E995, "uniform", torch.add, torch.empty_like(prob))
    u = _noisy(u.mul_(1.0 / _PERIOD), offset, key, "bits16", torch.add, u).mul_(1.0 / _PERIOD)
    dst.copy_(torch.where((u < prob) & torch.isfinite(prob), other, nearest))


def round_to(x: torch.Tensor, dtype: torch.dtype, key: Any, offset: Any = 0) -> torch.Tensor:
    """``x`` (any float) stochastically rounded to bf16/fp16 (unbiased), counter-based noise."""
    flat = x.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    round_into(out, flat, offset, key)
    return out.view(x.shape)


def quantize_range(x: torch.Tensor, signed: bool, block: int, offset: Any, key: Any,
                   q_out: torch.Tensor, scale_out: torch.Tensor, scratch: Scratch | None = None) -> None:
    """Block-wise stochastic quantization of flat fp32 ``x`` (starting at element ``offset`` of
    its tensor, a multiple of ``block``; only its last block may be short) into ``q_out`` and one
    fp32 scale per block ``scale_out`` (see :func:`quantize_blocks`). ``x`` is not modified."""
    n = x.numel()
    full = n // block
    top, lo, hi = (127.0, -127, 127) if signed else (255.0, 0, 255)
    scratch = Scratch() if scratch is None else scratch
    work = scratch.get("quantize", n, torch.float32, x.device)
    parts = [(0, full, full * block)] if full else []
    if n > full * block:
        parts.append((full, full + 1, n))
    for b0, b1, end in parts:
        start = b0 * block
        blocks = x[start:end].view(b1 - b0, -1)
        y = work[start:end].view(blocks.shape)
        if signed:  # max |x|: the bits of |x| (as ints, same order), a max over the block
            peak = torch.bitwise_and(blocks.view(torch.int32), 0x7FFFFFFF, out=y.view(torch.int32)).view(y.dtype)
            peak = peak.amax(dim=1)
        else:
            peak = blocks.amax(dim=1).clamp_min_(0)
        scale = torch.div(peak, top, out=scale_out[b0:b1])
        torch.div(blocks, scale.clamp_min(_TINY).unsqueeze(1), out=y)
        t = _noisy(y.view(-1), offset + start, key, "uniform", torch.add, y.view(-1))  # y + u, u uniform in (0, 1)
        if not signed:
            # a positive value never becomes 0: a second moment read back as 0 turns m / (sqrt(v) + eps)
            # into m / eps (adv_optm's int8_sr does this and blows up: weights off by ~5 after 5 steps of
            # a small MLP); the smallest code keeps such a step small instead (biased up, never down):
            # y + u is raised to sign(x) = 1 where x > 0
            positive = torch.sign(blocks, out=scratch.get("positive", end - start, torch.float32, x.device).view(blocks.shape))
            t = torch.maximum(t, positive.view(-1), out=t)
        q = t.floor_().clamp_(lo, hi)
        q_out[start:end].copy_(q)


def dequantize_range(q: torch.Tensor, scale: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (flat fp32) = flat ``q`` times the scale of its block."""
    n = q.numel()
    full = n // block
    if full:
        torch.mul(q[:full * block].view(full, block), scale[:full].unsqueeze(1), out=out[:full * block].view(full, block))
    if n > full * block:
        torch.mul(q[full * block:], scale[full], out=out[full * block:])
    return out


def quantize_blocks(x: torch.Tensor, signed: bool, block: int, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise stochastic quantization: per block of ``block`` elements (of the flat tensor; the
    last one zero-padded) ``scale = max|x| / 127`` (int8) or, for non-negative state,
    ``max x / 255`` (uint8); ``q = floor(x / scale + u)`` with ``u`` uniform in [0, 1), so
    ``E[q * scale] = x`` - except that a positive non-negative-state value is never stored as 0
    (``q >= 1``: a zero second moment would divide the step by ``eps`` alone). Returns ``q`` (shaped
    like ``x``) and the fp32 scales."""
    flat = x.reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    q = torch.empty(n, dtype=torch.int8 if signed else torch.uint8, device=x.device)
    scale = torch.zeros(max(1, -(-n // block)), dtype=torch.float32, device=x.device)
    if n:
        quantize_range(flat, signed, block, 0, key, q, scale)
    return q.view(x.shape), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.numel(), dtype=dtype, device=q.device)
    return dequantize_range(q.reshape(-1), scale.to(dtype), block, out).view(q.shape)
