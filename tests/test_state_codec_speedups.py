"""The fast paths of the low-precision state codecs (``round_into`` working in place, the fused
``x / scale + u`` of ``quantize_range``, ``dequantize_range`` converting then scaling) give the same
bits as straightforward re-implementations of the original formulas, on edge-case inputs."""
from __future__ import annotations

import pytest
import torch

import adv_chain as ac
from adv_chain.transforms import state_slices
from adv_chain.transforms.state_codecs import (Scratch, _noise_segments, dequantize_blocks, dequantize_range,
                                               quantize_blocks, quantize_range, round_into, round_to)

LENGTHS = [1, 7, 255, 256, 1000, 65536, 2 * 65536 + 333, 300000]
OFFSETS = [0, 12345, 3 * 65536 + 7, 2 * 65536, 256 * 777]
KEYS = [0, 0x12345678, 0x7FFFFFFF, 987654321]


def _noise(n, offset, key, kind):
    return torch.cat([v.reshape(-1) for _, _, v in _noise_segments(n, offset, key, kind, torch.device("cpu"))])


def _inputs(n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    specials = [0.0, -0.0, 1e-40, -1e-40, 1e-45, 3.3e38, -3.3e38, 3.39e38, 1e-38, 65504.0, 65520.0, 1e-8, 6e-8]
    if kind == "nonfinite":
        specials += [float("inf"), -float("inf"), float("nan")]
    if kind == "nonneg":
        x = x.abs()
        x[::7] = 0.0
        specials = [abs(v) for v in specials]
    k = min(n, len(specials))
    x[torch.randperm(n, generator=g)[:k]] = torch.tensor(specials[:k])
    if n > 5000:
        x[1000:1600] = 0.0  # whole zero blocks
    return x


def _ref_round_bf16(x, offset, key):
    raw = x.view(torch.int32) + _noise(x.numel(), offset, key, "bits16")
    return raw.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def _ref_quantize(x, signed, block, offset, key):
    n = x.numel()
    top, lo, hi = (127.0, -127, 127) if signed else (255.0, 0, 255)
    nb = -(-n // block)
    padded = torch.zeros(nb * block)
    padded[:n] = x
    blocks = padded.view(nb, block)
    peak = blocks.abs().amax(1) if signed else blocks.amax(1).clamp_min(0)  # zero padding changes neither
    scale = peak / top
    y = (blocks / scale.clamp_min(1e-12).unsqueeze(1)).reshape(-1)[:n]
    t = y + _noise(n, offset, key, "uniform")
    if not signed:
        t = torch.maximum(t, torch.sign(x))
    q = t.floor().clamp(lo, hi).to(torch.int8 if signed else torch.uint8)
    return q, scale


def _ref_dequantize(q, scale, block):
    return q.float() * scale.repeat_interleave(block)[:q.numel()]


def _same_float_bits(a, b):
    """Bit-equal, except that NaNs only need to be NaNs (their payload is not a format property)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("consume", [False, True])
def test_round_into_bf16_bits(n, consume):
    for oi, offset in enumerate(OFFSETS):
        key = KEYS[(n + oi) % len(KEYS)]
        x = _inputs(n, n * 10 + oi, "nonfinite")
        ref = _ref_round_bf16(x.clone(), offset, key)
        dst = torch.empty(n, dtype=torch.bfloat16)
        work = x.clone()
        round_into(dst, work, offset, key, Scratch(), consume=consume)
        assert torch.equal(dst.view(torch.int16), ref.view(torch.int16))  # NaNs included: same ops
        if not consume:
            assert torch.equal(work.view(torch.int32), x.view(torch.int32))
        if n <= 70000:  # the compiled path's tensor key: same noise, gathered
            dst_t = torch.empty(n, dtype=torch.bfloat16)
            round_into(dst_t, x.clone(), offset, torch.tensor(key, dtype=torch.int32), consume=consume)
            assert torch.equal(dst_t.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block", [256, 2048, 100, 64])
def test_quantize_range_bits(n, signed, block):
    for oi, raw_offset in enumerate(OFFSETS[:3]):
        offset = raw_offset // block * block
        key = KEYS[(n + oi) % len(KEYS)]
        for kind in ("signed" if signed else "nonneg", "nonfinite"):
            x = _inputs(n, n * 10 + oi, kind)
            if not signed:
                x = x.abs()
            ref_q, ref_scale = _ref_quantize(x, signed, block, offset, key)
            for consume in (False, True):
                q = torch.empty(n, dtype=torch.int8 if signed else torch.uint8)
                scale = torch.empty(-(-n // block))
                work = x.clone()
                quantize_range(work, signed, block, offset, key, q, scale, Scratch(), consume=consume)
                assert torch.equal(q, ref_q), (kind, consume, offset)
                assert _same_float_bits(scale, ref_scale), (kind, consume, offset)
                if not consume:
                    assert torch.equal(work.view(torch.int32), x.view(torch.int32))
            if kind != "nonfinite":
                out = torch.empty(n)
                dequantize_range(ref_q, ref_scale, block, out)
                assert torch.equal(out.view(torch.int32), _ref_dequantize(ref_q, ref_scale, block).view(torch.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_range_tensor_key(signed):
    n, block, offset, key = 3000, 256, 256 * 300, 0x2468ACE
    x = _inputs(n, 5, "signed" if signed else "nonneg")
    ref_q, ref_scale = _ref_quantize(x, signed, block, offset, key)
    q = torch.empty(n, dtype=torch.int8 if signed else torch.uint8)
    scale = torch.empty(-(-n // block))
    quantize_range(x, signed, block, offset, torch.tensor(key, dtype=torch.int32), q, scale)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_whole_tensor_functions_match_reference():
    x = _inputs(5000, 3, "signed").view(50, 100)
    q, scale = quantize_blocks(x, True, 256, 17)
    ref_q, ref_scale = _ref_quantize(x.reshape(-1), True, 256, 0, 17)
    assert torch.equal(q.reshape(-1), ref_q) and torch.equal(scale, ref_scale)
    back = dequantize_blocks(q, scale, 256, torch.float64)
    assert torch.equal(back.reshape(-1), ref_q.double() * scale.double().repeat_interleave(256)[:5000])
    y = _inputs(4097, 4, "nonfinite")
    assert torch.equal(round_to(y, torch.bfloat16, 9, offset=70000).view(torch.int16),
                       _ref_round_bf16(y.clone(), 70000, 9).view(torch.int16))


def _train(make, consume: bool, steps: int = 4):
    torch.manual_seed(0)
    shapes = [(700, 600), (3000,), (70000, 5), (513, 257), (4,)]  # sliced tensors, short blocks, tiny ones
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = make(params)
    dead = state_slices.LowPrecisionCodec._dead
    if not consume:
        state_slices.LowPrecisionCodec._dead = lambda self, x: False
    try:
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape) * 10.0 ** (step - 2)
                p.grad.view(-1)[::5] = 0
            opt.step()
    finally:
        state_slices.LowPrecisionCodec._dead = dead
    state = [v for st in opt.state.values() for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    return [p.detach() for p in params] + state


@pytest.mark.parametrize("make", [
    lambda ps: ac.optim.AdamW_adv(ps, lr=1e-2, state_precision="bf16_sr"),
    lambda ps: ac.optim.AdamW_adv(ps, lr=1e-2, state_precision="int8_sr"),
    # the direction points into Adam's first moment: the chunk buffer is handed on, never consumed
    lambda ps: ac.ChainOptimizer(ps, ac.chain(ac.low_precision_state(ac.scale_by_adam(), "bf16"), ac.eps_divide(),
                                              ac.stochastic_sign(), ac.apply()), lr=1e-2),
    lambda ps: ac.ChainOptimizer(ps, ac.chain(ac.low_precision_state(ac.scale_by_adam(), "int8", block_size=64),
                                              ac.eps_divide(), ac.geometric_wd(), ac.apply()), lr=1e-2),
])
def test_codec_working_in_chunk_buffers_changes_nothing(make):
    fast, slow = _train(make, True), _train(make, False)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and torch.equal(a, b)


# -- the one-segment fast path of quantize_range (whole blocks, or one short block, inside one noise
# segment: the slices the wrappers cut) against the general path, which it must match bit for bit:
# codes, scales, and even the NaN payload and the sign of a zero scale ------------------------------
from adv_chain.transforms import low_precision  # noqa: E402
from adv_chain.transforms.work_buffers import scratch  # noqa: E402

_P = 65536


def _hard_inputs(n, seed, kind):
    if kind != "zeros":
        return _inputs(n, seed, kind)
    g = torch.Generator().manual_seed(seed)  # blocks of +-0 and negatives: the sign of a zero max
    x = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    x[torch.rand(n, generator=g) < 0.2] = -1.0
    nan = torch.tensor([0x7FC00001, -0x003FFFFF, 0x7F800001], dtype=torch.int32).view(torch.float32)
    x[min(n - 1, 3)] = nan[seed % 3]  # a NaN with a payload (and with the sign bit) in the first block
    return x


def _quantize_both(x, signed, block, offset, key, consume, monkeypatch):
    runs = []
    for general in (False, True):
        if general:
            monkeypatch.setattr(low_precision, "_one_segment", lambda *a: None)
        q = torch.empty(x.numel(), dtype=torch.int8 if signed else torch.uint8)
        scale = torch.empty(-(-x.numel() // block))
        quantize_range(x.clone(), signed, block, offset, key, q, scale, Scratch(), consume=consume)
        runs.append((q, scale))
        monkeypatch.undo()
    return runs


@pytest.mark.parametrize("n,block,offset", [
    (4 * _P, 2048, 0), (4 * _P, 2048, 3 * _P), (4 * _P, 256, 8 * _P), (2 * _P, 64, _P), (_P, 2048, 0),
    (3 * 2048, 2048, 2048 * 5), (_P - 256, 256, 256), (2048, 2048, 0), (512, 2048, 4096), (1536, 2048, 0),
    (1, 64, 64 * 3), (300, 100, 100 * 7),
])
@pytest.mark.parametrize("signed", [True, False])
def test_one_segment_fast_path_matches_the_general_path(n, block, offset, signed, monkeypatch):
    key = 0x5EED0000 + n % 977 + offset % 1013
    assert low_precision._one_segment(n, block, offset, key) is not None  # these take the fast path
    for ki, kind in enumerate(("signed" if signed else "nonneg", "nonfinite", "zeros")):
        x = _hard_inputs(n, n + ki, kind)
        if not signed and kind != "zeros":
            x = x.abs()
        ref_q, ref_scale = _ref_quantize(x, signed, block, offset, key)
        for consume in (False, True):
            (q, scale), (q_gen, scale_gen) = _quantize_both(x, signed, block, offset, key, consume, monkeypatch)
            assert torch.equal(q, q_gen) and torch.equal(q, ref_q), (kind, consume)
            assert torch.equal(scale.view(torch.int32), scale_gen.view(torch.int32)), (kind, consume)  # all bits
            assert _same_float_bits(scale, ref_scale), (kind, consume)


def test_one_segment_leaves_the_other_ranges_to_the_general_path():
    assert low_precision._one_segment(5 * _P, 2048, 0, 7) is None  # more noise blocks than one view holds
    assert low_precision._one_segment(2 * _P, 2048, 1024 * 2048 + 2048, 7) is None  # crosses noise blocks
    assert low_precision._one_segment(2048 + 512, 2048, 0, 7) is None  # a short last block after whole ones
    assert low_precision._one_segment(3 * 100 * 700, 100, 0, 7) is None  # blocks across noise blocks
    assert low_precision._one_segment(4096, 2048, 0, torch.tensor(7, dtype=torch.int32)) is None  # compile's keys
    assert low_precision._one_segment(0, 2048, 0, 7) is None


def test_dequantize_one_short_block():
    q = torch.tensor([-127, 0, 5, 127], dtype=torch.int8)
    scale = torch.tensor([0.37])
    out = torch.empty(4)
    dequantize_range(q, scale, 2048, out)
    assert torch.equal(out, q.float() * 0.37)


def test_int8_state_fast_path_changes_nothing_in_a_run(monkeypatch):
    """The benchmark's shapes (slices of 4 noise blocks, whole 512 x 512 tensors, small vectors):
    AdamW_adv(int8_sr) with and without the fast path, bit for bit."""
    def run():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(1024, 640), (512, 512), (512,), (1536,), (7, 3)]]
        opt = ac.optim.AdamW_adv(params, lr=1e-2, state_precision="int8_sr")
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape) * 10.0 ** (step - 1)
            opt.step()
        return [p.detach() for p in params] + [v for st in opt.state.values() for _, v in sorted(st.items())
                                               if isinstance(v, torch.Tensor)]
    fast = run()
    monkeypatch.setattr(low_precision, "_one_segment", lambda *a: None)
    general = run()
    for a, b in zip(fast, general, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_scratch_hands_out_the_buffer_and_knows_what_it_holds():
    s, dev = Scratch(), torch.device("cpu")
    a = s.get("state:x", 100, torch.float32, dev)
    assert s.get("state:x", 100, torch.float32, dev) is a  # the whole buffer: no slicing op
    part = s.get("state:x", 40, torch.float32, dev)
    assert part.numel() == 40 and part.data_ptr() == a.data_ptr()
    other = s.get("work", 50, torch.float32, dev)
    assert s.holds("state:", a[10:20]) and s.holds("state:", part) and not s.holds("state:", other)
    assert s.holds("wo", other[3:]) and not s.holds("state:", torch.empty(100))
    grown = s.get("state:x", 500, torch.float32, dev)  # grown: the old buffer is no longer the pool's
    assert s.holds("state:", grown) and not s.holds("state:", a)
    s.drop("state:x", torch.float32, dev)
    assert not s.holds("state:", grown) and s.holds("wo", other)
    empty = s.get("state:e", 0, torch.float32, dev)  # a zero-size buffer (no address: the scan)
    assert s.holds("state:", empty)
    assert scratch() is scratch()
