"""Lion_Prodigy_adv with ``nnmf_factor=True`` together with Lion-K (``kappa_p``, ``auto_kappa_p``) and the
cautious mask: the moment is stored as SMMF factors (spec §4.4) and ``factored_state`` rebuilds it dense,
read-only, for lion_prodigy's reduction (its per-tensor Lion-K norm and cautious count, spec §5.2, §9.2).

The numbers are checked against the spec's formulas in tests/test_lion_prodigy.py
(``test_factored_moment_with_lion_k_and_cautious_matches_spec_formulas``); against adv-optm 2.2.3
itself, installed apart (it cannot sit next to the pinned 2.5.16), by
``python benchmarks/legacy_parity.py --legacy-reference DIR`` (25 fp32 steps: within 3e-8, one ulp
of the weights; results in benchmarks/RESULTS.md). The tests here check how the state is stored,
rebuilt, saved and compiled.
"""
from __future__ import annotations

import importlib
import io
import math

import pytest
import torch

import adv_chain as ac

lp_module = importlib.import_module("adv_chain.transforms.lion_prodigy")
state_slices = importlib.import_module("adv_chain.transforms.state_slices")


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 4-D conv weight (auto_kappa_p), matrices of 72, 384 and 30 elements (factored as 9x8, 24x16,
    6x5) and 1-D biases (dense unless vector_reshape); tanh keeps every gradient non-zero."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).to(dtype)


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(t)
    return torch.randn(8, 2, 6, 6, generator=gen).to(dtype), torch.randn(8, 5, generator=gen).to(dtype)


def train(make_opt, steps: int = 25, dtype: torch.dtype = torch.float32, model=None, start: int = 0):
    model = make_model(dtype) if model is None else model
    opt = make_opt(model.parameters())
    ds = []
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
    return model, opt, ds


def max_diff(a, b) -> float:
    return max((p.detach().double() - q.detach().double()).abs().max().item()
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kw", [dict(kappa_p=2.0), dict(auto_kappa_p=True), dict(cautious_mask=True, kappa_p=1.5)],
                         ids=["kappa2", "auto_kappa", "cautious-kappa1.5"])
def test_state_stays_factored(kw):
    """Only factors are stored: ``:row`` (d1), ``:col`` (d2), ``:sign`` (d1 x ceil(d2/8) uint8) per
    matrix, no dense ``lion_prodigy/exp_avg``; a 1-D bias keeps its dense moment in ``:row`` (empty
    ``:col``/``:sign``); the per-tensor factor ``scale`` is one 0-d value."""
    model, opt, _ = train(lambda p: ac.optim.Lion_Prodigy_adv(p, lr=1.0, d0=1e-4, nnmf_factor=True, **kw), steps=3)
    sd = opt.state_dict()["state"]
    for i, p in enumerate(model.parameters()):
        state = sd[i]
        assert "lion_prodigy/exp_avg" not in state
        assert {"lion_prodigy/exp_avg:row", "lion_prodigy/exp_avg:col", "lion_prodigy/exp_avg:sign",
                "lion_prodigy/s", "lion_prodigy/p0", "lion_prodigy/scale"} <= set(state)
        assert state["lion_prodigy/scale"].dim() == 0 and float(state["lion_prodigy/scale"]) > 0
        assert ("lion_prodigy/kappa_exp" in state) == bool(kw.get("auto_kappa_p"))
        row, col, sign = (state[f"lion_prodigy/exp_avg:{k}"] for k in ("row", "col", "sign"))
        if p.dim() == 1:
            assert row.shape == p.shape and col.numel() == 0 and sign.numel() == 0
            continue
        d1, d2 = ac.transforms.state_codecs.matrix_shape(p.numel())
        assert row.shape == (d1,) and col.shape == (d2,) and row.dtype == col.dtype == torch.float32
        assert sign.shape == (d1, math.ceil(d2 / 8)) and sign.dtype == torch.uint8
        dense_bytes = 4 * p.numel()
        stored = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("lion_prodigy/exp_avg:"))
        assert stored < dense_bytes / 2


def test_reduce_rebuilds_a_chunk_of_whole_tensors_at_a_time_and_stores_nothing(monkeypatch):
    """With ``chunk_bytes=400`` (100 fp32 elements of the one rebuilt key) every call of the inner
    reduce sees whole tensors of at most 100 elements together, or one larger tensor alone, each
    tensor once per step; the rebuilt moment is never stored back (the factors are written once per
    tensor and step, by the update); and the numbers are those of the default chunk size, bit for bit."""
    calls: list[list[int]] = []
    stores: list[int] = []
    real_reduce, real_store = lp_module.LionProdigy.reduce, state_slices.FactoredCodec.store

    def reduce(self, b):
        calls.append([m.numel() for m in b.state("exp_avg")])
        return real_reduce(self, b)

    def store(self, i, cut, x):
        stores.append(i)
        return real_store(self, i, cut, x)

    def make(chunk_bytes):
        inner = ac.lion_prodigy(kappa_p=2.0, cautious=True, d0=1e-4)
        return lambda p: ac.ChainOptimizer(p, ac.chain(ac.factored_state(inner, chunk_bytes=chunk_bytes),
                                                       ac.weight_decay(0.1), ac.apply()), lr=1.0)

    monkeypatch.setattr(lp_module.LionProdigy, "reduce", reduce)
    monkeypatch.setattr(state_slices.FactoredCodec, "store", store)
    small, _, _ = train(make(400), steps=4)
    sizes = [p.numel() for p in small.parameters()]
    assert sum(len(c) for c in calls) == 4 * len(sizes) and [n for c in calls[:len(calls) // 4] for n in c] == sizes
    assert all(len(c) == 1 or sum(c) <= 100 for c in calls) and any(len(c) > 1 for c in calls)
    assert len(stores) == 4 * sum(p.dim() > 1 for p in small.parameters())
    monkeypatch.undo()
    default, _, _ = train(make(ac.transforms.state_codecs.DEFAULT_CHUNK_BYTES), steps=4)
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), default.parameters()))


WRAPPERS = {
    "factored": lambda t: ac.factored_state(t),
    "factored-vector_reshape": lambda t: ac.factored_state(t, vector_reshape=True),
    "int8": lambda t: ac.low_precision_state(t, "int8", block_size=16),
    "bf16": lambda t: ac.low_precision_state(t, "bf16"),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_reduce_sees_the_state_the_update_uses(wrap):
    """Any state wrapper: the per-tensor factors the reduction computes come from the same moment the
    update then uses, so at step 4 (the moment is no longer zero) each tensor's Lion-K step
    (``kappa_p=2``) has norm exactly ``d sqrt(N)`` and each cautious sign step sums to ``d N`` in
    absolute value. (When the reduction read the stored state, the int8 wrapper took its raw codes
    for the moment - steps 1e-6 of the right size - the bf16 one was 0.4% off, and factored_state
    could not run this at all.)"""
    for inner, measure in ((ac.lion_prodigy(kappa_p=2.0, d0=1e-2), lambda dp: dp.norm() / math.sqrt(dp.numel())),
                           (ac.lion_prodigy(cautious=True, d0=1e-2), lambda dp: dp.abs().sum() / dp.numel())):
        model = make_model()
        opt = ac.ChainOptimizer(model.parameters(), ac.chain(wrap(inner), ac.apply()), lr=1.0)
        train(lambda p: opt, steps=3, model=model)
        d = float(opt.param_groups[0]["d"])
        before = [p.detach().double().clone() for p in model.parameters()]
        train(lambda p: opt, steps=1, model=model, start=3)
        for p, q in zip(model.parameters(), before):
            ratio = float(measure(p.detach().double() - q)) / d
            assert ratio == pytest.approx(1.0, rel=1e-5), (tuple(p.shape), ratio)  # measured <= 7e-7


@pytest.mark.parametrize("kw", [dict(kappa_p=2.0), dict(auto_kappa_p=True, weight_decay=0.1),
                                dict(cautious_mask=True, kappa_p=1.5, weight_decay=0.1, cautious_wd=True)],
                         ids=["kappa2", "auto_kappa-wd", "cautious-kappa1.5-cwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_continue_is_bit_identical(kw, dtype):
    """Oracle: the uninterrupted run. 10 steps, state_dict through torch.save/load into a fresh
    optimizer, 10 more steps on both: parameters, d and every state tensor (dtype included: fp32
    factors and uint8 signs also for bf16 parameters) equal bit for bit."""
    make = lambda p: ac.optim.Lion_Prodigy_adv(p, lr=1.0, d0=1e-4, nnmf_factor=True, **kw)  # noqa: E731
    model, opt, _ = train(make, steps=10, dtype=dtype)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = make_model(dtype)
    twin.load_state_dict(model.state_dict())
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(torch.load(buf, weights_only=True))
    train(lambda p: opt, steps=10, dtype=dtype, model=model, start=10)
    train(lambda p: twin_opt, steps=10, dtype=dtype, model=twin, start=10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert torch.equal(opt.param_groups[0]["d"], twin_opt.param_groups[0]["d"])
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[a].items():
            other = twin_opt.state[b][key]
            assert value.dtype == other.dtype and torch.equal(value, other), key
        assert opt.state[a]["lion_prodigy/exp_avg:sign"].dtype == torch.uint8
        assert opt.state[a]["lion_prodigy/exp_avg:row"].dtype == torch.float32


def test_bf16_params_stochastic_rounding():
    """bf16 weights with Lion-K and the cautious mask, factored: the weights stay bf16 and finite, the
    factors fp32, two runs are identical (counter-based noise), and the 20-step displacement follows
    the fp32 run's (cosine > 0.95, total within 30%: unbiased rounding keeps steps of a fraction of
    a bf16 spacing)."""
    kw = dict(lr=1.0, d0=1e-3, nnmf_factor=True, kappa_p=1.5, cautious_mask=True, weight_decay=0.01)
    runs = []
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float32):
        start = [p.detach().float().clone() for p in make_model(dtype).parameters()]
        model, opt, _ = train(lambda p: ac.optim.Lion_Prodigy_adv(p, **kw), steps=20, dtype=dtype)
        for p in model.parameters():
            assert p.dtype == dtype and torch.isfinite(p).all()
            assert opt.state[p]["lion_prodigy/exp_avg:row"].dtype == torch.float32
        runs.append(torch.cat([(p.detach().float() - s).flatten() for p, s in zip(model.parameters(), start)]))
    assert torch.equal(runs[0], runs[1])
    bf16, fp32 = runs[0], runs[2]
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=0) > 0.95
    assert 0.7 < (bf16.abs().sum() / fp32.abs().sum()).item() < 1.3


@pytest.mark.parametrize("kw", [dict(kappa_p=2.0), dict(auto_kappa_p=True),
                                dict(cautious_mask=True, weight_decay=0.1, cautious_wd=True)],
                         ids=["kappa2", "auto_kappa", "cautious-cwd"])
def test_compile_matches_eager(kw):
    """``compile=True`` (the wrapper's segment runs eagerly, the rest compiled): 8 steps within 1e-6
    of the eager run (measured: equal), d within 1e-6 relative."""
    make = lambda c: lambda p: ac.optim.Lion_Prodigy_adv(p, lr=1.0, d0=1e-4, nnmf_factor=True,  # noqa: E731
                                                         compile=c, **kw)
    eager, _, eds = train(make(False), steps=8)
    compiled, opt, cds = train(make(True), steps=8)
    assert cds == pytest.approx(eds, rel=1e-6)
    assert max_diff(eager, compiled) <= 1e-6
    assert "lion_prodigy/exp_avg" not in opt.state[next(compiled.parameters())]


def test_gradient_release_first_step_matches_step():
    """Per-parameter stepping: the Lion-K norm and the cautious count come from the parameter's own
    whole (rebuilt) tensor, so the first step is the ``step()`` one bit for bit."""
    kw = dict(d0=1e-4, nnmf_factor=True, kappa_p=1.5, cautious_mask=True, weight_decay=0.1)
    a, b = make_model(), make_model()
    opt_a = ac.optim.Lion_Prodigy_adv(a.parameters(), **kw)
    opt_b = ac.optim.Lion_Prodigy_adv(b.parameters(), **kw)
    x, y = batch(0)
    for m in (a, b):
        torch.nn.functional.mse_loss(m(x), y).backward()
    opt_a.step()
    group = opt_b.param_groups[0]
    for i, p in enumerate(b.parameters()):
        opt_b.step_parameter(p, group, i)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_an_undeclared_read_of_compressed_state_is_a_clear_error(monkeypatch):
    """A reduce that reads state its wrapper stores compressed without declaring it in
    ``reduce_reads_state`` gets an error naming the key and the fix, never the compressed codes."""
    monkeypatch.setattr(lp_module.LionProdigy, "reduce_reads_state", property(lambda self: frozenset()))
    for wrap in (WRAPPERS["factored"], WRAPPERS["int8"]):
        model = make_model()
        opt = ac.ChainOptimizer(model.parameters(), ac.chain(wrap(ac.lion_prodigy(kappa_p=2.0)), ac.apply()), lr=1.0)
        with pytest.raises(KeyError, match="'exp_avg'.*reduce_reads_state"):
            train(lambda p: opt, steps=1, model=model)
