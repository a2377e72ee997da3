"""The fast SMMF codec paths (state_codecs: a 256-word table spreads packed bits, signs applied by
multiplying with +-1, both masks packed in one multiply, work buffers reused) give bit-identical
results to the straightforward formulation they replaced, for every shape, dtype and special value,
also when one ``Scratch`` serves slices of different shapes one after the other."""
from __future__ import annotations

import pytest
import torch

import adv_chain as ac
from adv_chain.transforms import state_codecs as sc
from adv_chain.transforms import state_slices as ss

SHAPES = [(1, 1), (1, 7), (7, 1), (1, 8), (3, 8), (5, 13), (64, 17), (33, 64), (2, 1001), (17, 24)]
_INT_MIN = -(1 << 31)


# -- the previous implementation (a (256, 8) int32 table OR-ed into the sign bit, separate packs) --------
def _old_pack01(b):
    d1, d2 = b.shape
    nbytes = (d2 + 7) // 8
    padded = torch.zeros((d1, nbytes * 8), dtype=torch.uint8)
    padded[:, :d2] = b
    return torch.mul(padded.view(torch.int64), sc._PACK_MAGIC).bitwise_right_shift_(56).to(torch.uint8)


def _old_unpack(packed, d2):
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return ((packed.unsqueeze(-1) & weights) != 0).view(packed.shape[0], -1)[:, :d2]


def _old_decompress_rows(out, row, col, sign=None, zero=None):
    torch.mul(row.unsqueeze(1), col, out=out)
    d2 = col.numel()
    if sign is not None:
        if out.dtype == torch.float32:
            table = torch.tensor([[0 if (v >> j) & 1 else _INT_MIN for j in range(8)] for v in range(256)],
                                 dtype=torch.int32)
            masks = torch.index_select(table, 0, sign.reshape(-1).to(torch.int64)).view(out.shape[0], -1)
            out.view(torch.int32).bitwise_or_(masks[:, :d2])
        else:
            torch.where(_old_unpack(sign, d2), out, -out, out=out)
    if zero is not None and zero.numel():
        out.masked_fill_(_old_unpack(zero, d2), 0.0)
    return out


def _old_compress_rows(x, signed, row_out, col_sum, sign_out=None, zero_out=None, nonzero=None, scratch=None):
    rows, d2 = x.shape
    ones = torch.ones(rows, dtype=x.dtype)
    if not signed:
        torch.sum(x, 1, out=row_out)
        col_sum.addmv_(x.t(), ones)
        return
    if x.dtype != torch.float32:
        mag = x.abs()
        torch.sum(mag, 1, out=row_out)
        col_sum.addmv_(mag.t(), ones)
        sign_out.copy_(_old_pack01((x > 0).to(torch.uint8)))
        zero_out.copy_(_old_pack01((mag == 0).to(torch.uint8)))
        nonzero.add_((mag != 0).sum())
        return
    bits = x.view(torch.int32)
    mag_bits = torch.bitwise_and(bits, 0x7FFFFFFF)
    mag = mag_bits.view(torch.float32)
    torch.sum(mag, 1, out=row_out)
    col_sum.addmv_(mag.t(), ones)
    sign_out.copy_(_old_pack01(torch.clamp(bits, 0, 1).to(torch.uint8)))
    nonzero.add_(mag_bits.clamp_(0, 1).sum(dtype=torch.int32))
    zero_out.copy_(_old_pack01(mag_bits.to(torch.uint8)).bitwise_not_())
    if d2 % 8:
        zero_out[:, -1].bitwise_and_((1 << (d2 % 8)) - 1)


# -- helpers ----------------------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits (signed zeros included); NaN where the other is NaN (the previous fp64 path
    negated a NaN, the new one multiplies by -1, which keeps the sign of ``0 * inf``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        view = torch.int32 if a.dtype == torch.float32 else torch.int64
        return torch.equal(a.masked_fill(nan, 0).view(view), b.masked_fill(nan, 0).view(view))
    return torch.equal(a, b)


def _state(d1: int, d2: int, dtype: torch.dtype, seed: int, special: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d1, d2, generator=g, dtype=torch.float64).to(dtype) * 1e-3
    if special:
        flat = x.view(-1)
        picks = torch.randperm(flat.numel(), generator=g)
        values = [0.0, -0.0, 1e-40, -1e-40, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e30]
        for k, v in zip(picks.tolist(), values):
            flat[k] = v
        x[torch.rand(d1, d2, generator=g) < 0.15] = 0.0
        x[torch.rand(d1, d2, generator=g) < 0.05] = -0.0
        if d1 > 2:
            x[1] = 0.0
        if d2 > 2:
            x[:, 2] = -0.0
    return x


def _compress(fn, x, signed, scratch=None):
    d1, d2 = x.shape
    nb = (d2 + 7) // 8
    r = torch.full((d1,), 7.0, dtype=x.dtype)
    c = torch.full((d2,), 0.5, dtype=x.dtype)  # accumulated into
    s = torch.full((d1, nb), 0xA5, dtype=torch.uint8)
    z = torch.full((d1, nb), 0x5A, dtype=torch.uint8)
    nz = torch.full((), 3, dtype=torch.int64)
    if scratch is None:
        fn(x, signed, r, c, s if signed else None, z if signed else None, nz if signed else None)
    else:
        fn(x, signed, r, c, s if signed else None, z if signed else None, nz if signed else None, scratch)
    return (r, c, s, z, nz) if signed else (r, c)


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_compress_rows_matches_previous(shape, dtype):
    x = _state(*shape, dtype, seed=shape[0] * 1000 + shape[1])
    keep = x.clone()
    for signed in (True, False):
        y = x if signed else x.abs()
        new = _compress(sc.compress_rows, y, signed, sc.Scratch())
        old = _compress(_old_compress_rows, y.clone(), signed)
        assert all(_same(a, b) for a, b in zip(new, old)), (shape, dtype, signed)
    assert _same(x, keep)  # x is not modified


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_decompress_rows_matches_previous(shape, dtype):
    d1, d2 = shape
    nb = (d2 + 7) // 8
    g = torch.Generator().manual_seed(d1 * 31 + d2)
    row = torch.rand(d1, generator=g, dtype=dtype)
    col = torch.rand(d2, generator=g, dtype=dtype)
    row[0] = 0.0
    if d2 > 1:
        col[-1] = 0.0
    if d1 > 2:
        row[2] = float("inf")
    sign = torch.randint(0, 256, (d1, nb), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 256, (d1, nb), generator=g, dtype=torch.uint8)
    for s, z in [(None, None), (sign, None), (sign, zero), (sign, torch.empty(0, dtype=torch.uint8)), (None, zero)]:
        new = sc.decompress_rows(torch.full((d1, d2), 9.0, dtype=dtype), row, col, s, z, sc.Scratch())
        old = _old_decompress_rows(torch.full((d1, d2), 9.0, dtype=dtype), row, col, s, z)
        assert _same(new, old), (shape, dtype, s is None, z is None)
        assert _same(sc.decompress_rows(torch.empty(d1, d2, dtype=dtype), row, col, s, z), old)  # no scratch


def test_one_scratch_for_slices_of_every_shape():
    """Stale contents of the shared work buffers (padding bytes, longer earlier slices) never leak."""
    work = sc.Scratch()
    order = SHAPES[::-1] + SHAPES + [(300, 301), (1, 3), (300, 301), (2, 9)]
    for k, (d1, d2) in enumerate(order):
        x = _state(d1, d2, torch.float32, seed=k)
        assert all(_same(a, b) for a, b in zip(_compress(sc.compress_rows, x, True, work),
                                                _compress(_old_compress_rows, x.clone(), True)))
        nb = (d2 + 7) // 8
        g = torch.Generator().manual_seed(k)
        row, col = torch.rand(d1, generator=g), torch.rand(d2, generator=g)
        sign = torch.randint(0, 256, (d1, nb), generator=g, dtype=torch.uint8)
        zero = torch.randint(0, 256, (d1, nb), generator=g, dtype=torch.uint8)
        new = sc.decompress_rows(torch.empty(d1, d2), row, col, sign, zero, work)
        assert _same(new, _old_decompress_rows(torch.empty(d1, d2), row, col, sign, zero))


def test_packed_format_and_unpack():
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    packed = sc.pack_bits(bits)
    assert packed.tolist() == [[0x81, 0x01], [0x02, 0x00]]  # element 8k + j is bit j of byte k
    a = sc.unpack_bits(packed, 9)
    b = sc.unpack_bits(packed, 9)
    assert a.dtype == torch.bool and torch.equal(a, bits)
    a[0, 0] = False  # fresh memory per call
    assert bool(b[0, 0])
    g = torch.Generator().manual_seed(0)
    for d1, d2 in SHAPES:
        m = torch.rand(d1, d2, generator=g) < 0.5
        p = sc.pack_bits(m)
        assert torch.equal(p, _old_pack01(m.to(torch.uint8)))
        assert torch.equal(sc.unpack_bits(p, d2), _old_unpack(p, d2))
        assert torch.equal(sc.unpack_bits(p, d2), m)


def test_whole_tensor_round_trip_keeps_zeros_and_signs():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, 2.0, -4.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    c = sc.compress(x, True)
    y = sc.reconstruct(c["row"], c["col"], c["sign"], c["zero"])
    assert torch.equal(torch.sign(y), torch.sign(x))
    assert y[0, 2].item() == 0.0 and not torch.signbit(y[0, 2])  # the stray zero comes back as +0


def _run(make, steps=20):
    torch.manual_seed(1)
    shapes = [(64, 48), (37,), (13, 1), (1, 29), (128,), (31, 17), (5, 3, 7), (300, 260), (700, 801)]
    ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    opt = make(ps)
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for i, p in enumerate(ps):
            grad = torch.randn(p.shape, generator=g) * 1e-2
            if i == 0:
                grad[3] = 0
                grad[:, 5] = 0
            if i == 5 and t % 3:
                grad[2, 2] = 0
            p.grad = grad
        opt.step()
    return [p.detach().clone() for p in ps], opt.state_dict()["state"]


@pytest.mark.parametrize("make", [
    lambda ps: ac.optim.AdamW_adv(ps, lr=1e-3, nnmf_factor=True),
    lambda ps: ac.optim.AdamW_adv(ps, lr=1e-3, nnmf_factor=True, vector_reshape=True),
    lambda ps: ac.optim.AdamW_adv(ps, lr=1e-3, factored_2nd=True),
    lambda ps: ac.optim.Lion_adv(ps, lr=1e-4, nnmf_factor=True),
], ids=["adamw_nnmf", "adamw_nnmf_vr", "adamw_factored_2nd", "lion_nnmf"])
def test_optimizer_steps_match_previous_codec(make, monkeypatch):
    new_params, new_state = _run(make)
    monkeypatch.setattr(ss, "compress_rows", _old_compress_rows)
    monkeypatch.setattr(ss, "decompress_rows", lambda out, row, col, sign=None, zero=None, scratch=None:
                        _old_decompress_rows(out, row, col, sign, zero))
    old_params, old_state = _run(make)
    assert all(_same(a, b) for a, b in zip(new_params, old_params))
    for i in old_state:
        for key, value in old_state[i].items():
            if isinstance(value, torch.Tensor):
                assert _same(new_state[i][key], value), (i, key)


def test_pooled_denominator_gives_the_same_bits(monkeypatch):
    """In a state wrapper's chunk that runs the terminal, Adam's sqrt(v) goes into a reused work
    buffer (adv_chain._core.foreach.sqrt with a pool); the numbers are those of fresh tensors."""
    from adv_chain._core import foreach

    def run():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 1000), (64,), (17, 5)]]
        opt = ac.optim.AdamW_adv(ps, lr=1e-2, factored_2nd=True, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in ps]

    pooled = run()
    monkeypatch.setattr(foreach, "sqrt", lambda xs, pool=None, name="": torch._foreach_sqrt(xs))
    fresh = run()
    for a, b in zip(pooled, fresh):
        assert torch.equal(a, b)
