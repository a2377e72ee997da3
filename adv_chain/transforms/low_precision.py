"""Low-precision storage of optimizer state (adv_optm_spec.md §1.5): stochastically rounded bf16/fp16
and block-quantized int8 with one fp32 scale per block, with counter-based noise. Pure tensor
functions on flat ranges (``round_into``, ``quantize_range``, ``dequantize_range``: what the state
wrappers call on cache-sized slices) and their whole-tensor forms (``round_to``,
``quantize_blocks``, ``dequantize_blocks``). Formats re-exported by
:mod:`adv_chain.transforms.state_codecs`.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from .._core.numerics import _mix32, _mix32_host, random_bits
from .work_buffers import Scratch

_TINY = 1e-12
_TABLES: dict[Any, torch.Tensor] = {}


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


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """The noise tables, built once per device: a fixed permutation of [0, 2^16), repeated (see
    :func:`_noise_segments`), as int32 (``"bits16"``) or as fp32 ``(k + 0.5) / 2^16`` (``"uniform"``)."""
    key = (kind, device)
    t = _TABLES.get(key)
    if t is None:
        perm = torch.argsort(random_bits(torch.empty(_PERIOD), 0, 0x2545F491), stable=True)
        t = perm.to(torch.int32) if kind == "bits16" else (perm.to(torch.float32) + 0.5) * (1.0 / _PERIOD)
        t = _TABLES[key] = t.repeat(_REPEAT).to(device)
    return t


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
        xs, dst = (x, out) if hi - lo == n else (x[lo:hi], out[lo:hi])  # (few ops: small slices pay per op)
        if noise.dim() > 1:
            xs, dst = xs.view(noise.shape), dst.view(noise.shape)
        op(xs, noise, out=dst)
    return out


# -- low precision --------------------------------------------------------------------------------
def round_into(dst: torch.Tensor, x: torch.Tensor, offset: Any, key: Any, scratch: Scratch | None = None,
               consume: bool = False) -> None:
    """``dst`` (bf16/fp16/fp32, flat) = flat fp32 ``x`` rounded stochastically (unbiased), with the
    noise of elements ``offset ..`` under ``key``. ``consume=True``: ``x`` is dead afterwards and
    bf16 rounding works in it (no scratch buffer; ``x`` is left holding garbage)."""
    if dst.dtype == torch.float32:
        dst.copy_(x)
        return
    if x.numel() == 0:
        return
    if dst.dtype == torch.bfloat16:  # bf16 is the upper half of fp32: add 16 random low bits, truncate
        bits = x.view(torch.int32)
        raw = bits if consume else (Scratch() if scratch is None else scratch).get("round", x.numel(), torch.int32, x.device)
        raw = _noisy(bits, offset, key, "bits16", torch.add, raw)
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


def _noisy_quotient(x: torch.Tensor, denom: torch.Tensor, offset: Any, key: Any, out: torch.Tensor) -> None:
    """``out = x / denom + u`` (``u`` the ``"uniform"`` noise of :func:`_noise_segments`) for rows
    ``x`` (rows x L, ``L`` dividing 2^16, starting at element ``offset``, a multiple of ``L``) and
    ``denom`` (rows x 1): one ``addcdiv`` per noise segment, bit for bit the division then the add
    (``u + 1 * (x / denom)``, both correctly rounded)."""
    rows, width = x.shape
    for lo, hi, noise in _noise_segments(rows * width, offset, key, "uniform", x.device):
        r0, r1 = lo // width, hi // width
        xs, d, dst = (x, denom, out) if r1 - r0 == rows else (x[r0:r1], denom[r0:r1], out[r0:r1])
        if noise.dim() == 1:
            noise = noise.view(r1 - r0, width)
        else:  # (count, 2^16) whole noise blocks: (count, 2^16 / L, L)
            shape = (noise.shape[0], -1, width)
            noise, xs, d, dst = noise.view(shape), xs.view(shape), d.view(noise.shape[0], -1, 1), dst.view(shape)
        torch.addcdiv(noise, xs, d, out=dst)


def _one_segment(n: int, block: int, offset: Any, key: Any) -> tuple | None:
    """The noise of ``n`` elements from element ``offset`` under host ``key`` (whole blocks of
    ``block``, or one short block) when :func:`_noise_segments` yields it as one segment: ``(shape,
    strides, start)`` of one strided view of the table, shaped ``(noise blocks, blocks in one,
    block)``, or flat for a single block. ``None`` otherwise (tensor keys, a short last block after
    whole ones, a range crossing a noise block)."""
    if type(offset) is not int or type(key) is not int or not n or (n % block and n > block):
        return None
    width = min(n, block)
    g, j = divmod(offset, _PERIOD)
    a, d = _noise_params(key)
    start = (a + g * d) % _PERIOD
    if n == width and j + n <= _PERIOD:  # one block (a small tensor): flat
        return (n,), (1,), start + j
    if j + n <= _PERIOD:  # inside one noise block: a window
        return (1, n // width, width), (n, width, 1), start + j
    if j == 0 and n % _PERIOD == 0 and n <= (_REPEAT - 2) * _PERIOD and _PERIOD % block == 0:
        return (n // _PERIOD, _PERIOD // block, block), (d, block, 1), start  # whole noise blocks, stride d
    return None


def quantize_range(x: torch.Tensor, signed: bool, block: int, offset: Any, key: Any,
                   q_out: torch.Tensor, scale_out: torch.Tensor, scratch: Scratch | None = None,
                   consume: bool = False) -> None:
    """Block-wise stochastic quantization of flat fp32 ``x`` (starting at element ``offset`` of
    its tensor, a multiple of ``block``; only its last block may be short) into ``q_out`` and one
    fp32 scale per block ``scale_out`` (see :func:`quantize_blocks`). ``x`` is not modified unless
    ``consume=True`` (``x`` is dead afterwards: it is used as the work buffer). The same bits as the
    plain formulas (max |x|, divide, add the noise, floor, clamp), except the NaN payload of the scale
    of a block holding a NaN."""
    n = x.numel()
    full = n // block
    top, lo, hi = (127.0, -127, 127) if signed else (255.0, 0, 255)
    scratch = Scratch() if scratch is None else scratch
    work = x if consume else scratch.get("quantize", n, torch.float32, x.device)
    plan = _one_segment(n, block, offset, key) if scale_out.numel() == -(-n // block) else None
    if plan is not None:  # the common case (a slice of whole blocks, one noise segment): fewest ops
        shape, strides, at = plan
        if len(shape) == 1:  # one block: no views at all
            xv, sv = x, scale_out if scale_out.dim() == 1 else scale_out.view(1)
        else:
            xv, sv = x.view(shape), scale_out.view(shape[0], shape[1], 1)
        dim = len(shape) - 1
        if signed:
            peak = torch.maximum(xv.amax(dim, keepdim=True), xv.amin(dim, keepdim=True).neg_(), out=sv)
            peak.abs_().div_(127.0)
        else:
            torch.amax(xv, dim, keepdim=True, out=sv).clamp_min_(0).div_(255.0)
            positive = torch.sign(x, out=scratch.get("positive", n, torch.float32, x.device))
        noise = _table("uniform", x.device).as_strided(shape, strides, at)
        torch.addcdiv(noise, xv, sv.clamp_min(_TINY), out=xv if consume else work.view(shape))
        if signed:
            q_out.copy_(work.floor_().clamp_(lo, hi))
        else:
            q16 = scratch.get("quantize16", n, torch.int16, x.device)
            q_out.copy_(q16.copy_(torch.maximum(work, positive, out=work)).clamp_(lo, hi))
        return
    fused = _PERIOD % block == 0  # noise segments start on block boundaries: x / scale + u in one op
    parts = [(0, full, full * block)] if full else []
    if n > full * block:
        parts.append((full, full + 1, n))
    for b0, b1, end in parts:  # (few ops: most calls are one part, and small slices pay per op)
        start = b0 * block
        xs, t, q = (x, work, q_out) if end - start == n else (x[start:end], work[start:end], q_out[start:end])
        blocks = xs.view(b1 - b0, -1)
        if signed:  # max |x| = max(max x, -min x) (abs_: +0.0 for an all-zero block, as max |x|)
            peak = torch.maximum(blocks.amax(1), blocks.amin(1).neg_()).abs_()
        else:
            peak = blocks.amax(1).clamp_min_(0)
        scale = torch.div(peak, top, out=scale_out if b0 == 0 and b1 == scale_out.numel() else scale_out[b0:b1])
        denom = scale.clamp_min(_TINY).unsqueeze(1)
        if not signed:
            # a positive value never becomes 0: a second moment read back as 0 turns m / (sqrt(v) + eps)
            # into m / eps (adv_optm's int8_sr does this and blows up: weights off by ~5 after 5 steps of
            # a small MLP); the smallest code keeps such a step small instead (biased up, never down):
            # y + u is raised to sign(x) = 1 where x > 0 (taken before t overwrites x)
            positive = torch.sign(xs, out=scratch.get("positive", end - start, torch.float32, x.device))
        if fused:
            _noisy_quotient(blocks, denom, offset + start, key, t.view(blocks.shape))  # t = y + u, u uniform in (0, 1)
        else:
            torch.div(blocks, denom, out=t.view(blocks.shape))
            _noisy(t, offset + start, key, "uniform", torch.add, t)
        if signed:
            q.copy_(t.floor_().clamp_(lo, hi))
        else:
            # floor then clamp to [0, 255] = truncate (the int conversion) then clamp: equal for t >= 0,
            # and both 0 for t < 0 (t >= -1 after the max, t < 257: |x| <= 255 scales); fp32 -> int16 ->
            # uint8 is much faster than fp32 -> uint8 on CPU, and an int16 clamp than an fp32 one
            q16 = scratch.get("quantize16", end - start, torch.int16, x.device)
            q.copy_(q16.copy_(torch.maximum(t, positive, out=t)).clamp_(lo, hi))


def dequantize_range(q: torch.Tensor, scale: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (flat fp32) = flat ``q`` times the scale of its block (converted, then multiplied in
    place: a mixed-dtype product is slow on CPU)."""
    n = q.numel()
    full = n // block
    out.copy_(q)
    if not full and scale.numel() == 1:  # one short block (a small tensor): one op
        return out.mul_(scale)
    if full:
        body = out if full * block == n else out[:full * block]
        body.view(full, block).mul_((scale if scale.numel() == full else scale[:full]).unsqueeze(1))
    if n > full * block:
        out[full * block:].mul_(scale[full])
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
