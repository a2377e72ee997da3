"""Low-memory state: factored_state (SMMF rank-1 factors + 1-bit signs), low_precision_state
(bf16 / fp16 / int8 blocks with stochastic rounding), memory_report, and the reference keywords."""
import io

import adv_optm
from test_parity_adv_optm import _train as _parity_train
import pytest
import torch

import adv_chain as ac
from adv_chain.transforms.state_compression import (compress, dequantize_blocks, matrix_shape, nnmf, pack_bits,
                                                    quantize_blocks, reconstruct, round_to, unpack_bits)


# -- the formulas, by hand ----------------------------------------------------------------------------
def test_matrix_shape_is_the_square_matricization():
    assert matrix_shape(6) == (3, 2)
    assert matrix_shape(320) == (20, 16)
    assert matrix_shape(7) == (7, 1)      # prime: N x 1, stored exactly
    assert matrix_shape(1) == (1, 1)      # 0-d tensors
    assert matrix_shape(4194304) == (2048, 2048)


def test_rank1_factors_of_a_2x3_matrix_by_hand():
    x = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    r, c = nnmf(x)
    # d1 = 2 < d2 = 3: the row factor is normalized by the total 21
    torch.testing.assert_close(r, torch.tensor([6 / 21, 15 / 21]))
    torch.testing.assert_close(c, torch.tensor([5., 7., 9.]))
    torch.testing.assert_close(reconstruct(r, c), torch.tensor([[30., 42., 54.], [75., 105., 135.]]) / 21)
    # d1 >= d2: the column factor is normalized
    r, c = nnmf(x.T.contiguous())
    torch.testing.assert_close(r, torch.tensor([5., 7., 9.]))
    torch.testing.assert_close(c, torch.tensor([6 / 21, 15 / 21]))
    # a rank-1 matrix comes back exactly
    y = torch.outer(torch.tensor([1., 2.]), torch.tensor([3., 0.5, 1.]))
    torch.testing.assert_close(reconstruct(*nnmf(y)), y)


def test_signed_2x3_by_hand_and_the_b18_fix():
    m = torch.tensor([[1., -2., 0.], [-4., 5., 6.]])
    parts = compress(m, signed=True)
    # |m| = [[1, 2, 0], [4, 5, 6]]: row sums 3, 15 (total 18), column sums 5, 7, 6
    torch.testing.assert_close(parts["row"], torch.tensor([3 / 18, 15 / 18]))
    torch.testing.assert_close(parts["col"], torch.tensor([5., 7., 6.]))
    assert parts["sign"].tolist() == [[0b001], [0b110]]          # m > 0, LSB first
    ours = reconstruct(parts["row"], parts["col"], parts["sign"], parts["zero"])
    expected = torch.tensor([[5 / 6, -7 / 6, 0.0], [-25 / 6, 35 / 6, 5.0]])
    torch.testing.assert_close(ours, expected)
    # adv_optm (bug B18) restores the exact zero as -r_0 c_2 = -1.0
    reference = reconstruct(parts["row"], parts["col"], parts["sign"])
    assert reference[0, 2].item() == pytest.approx(-1.0)
    # no stray zero (only whole zero rows/columns): the zero mask is empty and costs nothing
    assert compress(torch.tensor([[0., 0.], [1., -2.]]), signed=True)["zero"].numel() == 0


def test_sign_packing_round_trip():
    bits = torch.tensor([[True, False, True, False, False, False, False, False, True]])
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[5, 1]]
    assert torch.equal(unpack_bits(packed, 9), bits)
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 13), (1, 8), (7, 1), (3, 16)]:
        b = torch.rand(shape, generator=gen) > 0.5
        p = pack_bits(b)
        assert p.shape == (shape[0], (shape[1] + 7) // 8)
        assert torch.equal(unpack_bits(p, shape[1]), b)


# -- parity with adv_optm 2.5.16 ----------------------------------------------------------------------
def _train(make, steps=25):
    """The drop-in parity protocol of tests/test_parity_adv_optm.py, over 25 steps."""
    return _parity_train(make, steps=steps)


PARITY = [
    ("AdamW_adv", {"nnmf_factor": True}),
    ("AdamW_adv", {"state_precision": "factored", "vector_reshape": True, "use_atan2": True, "weight_decay": 0.1}),
    ("AdamW_adv", {"factored_2nd": True}),
    ("AdamW_adv", {"factored_2nd": True, "nesterov": True, "vector_reshape": True}),
    ("Lion_adv", {"nnmf_factor": True}),
    ("Lion_adv", {"nnmf_factor": True, "vector_reshape": True, "weight_decay": 0.1}),
    ("Adopt_adv", {"nnmf_factor": True}),
    ("Adopt_adv", {"factored_2nd": True}),
]


@pytest.mark.parametrize("cls,kwargs", PARITY, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_factored_drop_ins_match_adv_optm_2_5_16(cls, kwargs):
    lr = 1e-3 if cls == "Lion_adv" else 1e-2
    ref = _train(lambda p: getattr(adv_optm, cls)(p, lr=lr, **kwargs))
    ours = _train(lambda p: getattr(ac.optim, cls)(p, lr=lr, **kwargs))
    for a, b in zip(ref, ours):
        assert (a - b).abs().max().item() <= 1e-5


def test_b18_a_weight_whose_gradient_is_always_zero_stays_put():
    """adv_optm restores the zero first moment of a never-used weight as -r c and moves it; ours
    keeps the zero exact, as dense AdamW does."""
    def run(make):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 6))
        mask = torch.ones(4, 6)
        mask[1, 2] = 0.0  # this weight never gets a gradient
        opt = make([w])
        for _ in range(5):
            opt.zero_grad()
            (w * mask * torch.randn(4, 6)).sum().backward()
            opt.step()
        return w.detach()

    torch.manual_seed(0)
    start = torch.randn(4, 6)
    ref = run(lambda p: adv_optm.AdamW_adv(p, lr=1e-2, nnmf_factor=True))
    ours = run(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, nnmf_factor=True))
    dense = run(lambda p: ac.optim.AdamW_adv(p, lr=1e-2))
    assert ours[1, 2] == start[1, 2] == dense[1, 2]
    assert ref[1, 2] != start[1, 2]
    assert (ref[1, 2] - start[1, 2]).abs() > 1e-3


# -- the wrapper: keys, config, hyperparameters, signals, chunking ---------------------------------------
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3).to(dtype)


def _steps(model, opt, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 5, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def test_keys_repr_and_config_round_trip():
    c = ac.chain(ac.factored_state(ac.scale_by_adam()), ac.eps_divide(), ac.apply())
    assert c.names == ("adam", "eps_divide", "apply")
    assert repr(c["adam"]) == "factored_state(scale_by_adam())"
    assert ac.chain_from_config(c.to_json()) == c
    v = ac.factored_state(ac.scale_by_adam(betas=(0.8, 0.9)), vector_reshape=True, keys=("exp_avg_sq",))
    assert repr(v) == "factored_state(scale_by_adam(betas=(0.8, 0.9)), vector_reshape=True, keys=('exp_avg_sq',))"
    assert ac.chain_from_config(ac.chain(v, ac.eps_divide(), ac.apply()).to_config())["adam"] == v
    assert v.with_args(betas=(0.5, 0.9)).inner == ac.scale_by_adam(betas=(0.5, 0.9))
    assert ac.named("adam2", v).name == "adam2"
    lp = ac.low_precision_state(ac.scale_by_lion(), "int8")
    assert ac.chain_from_config(ac.chain(lp, ac.apply()).to_config())["lion"] == lp
    model = _model()
    opt = ac.ChainOptimizer(model.parameters(), c, lr=1e-2)
    _steps(model, opt, 1)
    assert set(opt.state[model.weight]) == {"step", "adam/exp_avg:row", "adam/exp_avg:col", "adam/exp_avg:sign",
                                            "adam/exp_avg:zero", "adam/exp_avg_sq:row", "adam/exp_avg_sq:col"}
    assert opt.state[model.weight]["adam/exp_avg:sign"].dtype == torch.uint8
    assert opt.state[model.weight]["adam/exp_avg:row"].shape == (5,)   # 15 elements -> 5 x 3
    # a 1-D bias keeps its dense state in ":row" (same keys for every parameter of a bucket)
    assert opt.state[model.bias]["adam/exp_avg:row"].shape == (3,)
    assert opt.state[model.bias]["adam/exp_avg:col"].numel() == 0


def test_group_hyperparameters_reach_the_inner_transform():
    def run(chain, groups):
        model = _model()
        opt = ac.ChainOptimizer(groups(model), chain, lr=1e-2)
        _steps(model, opt, 4)
        return [p.detach().clone() for p in model.parameters()]

    tail = (ac.eps_divide(), ac.apply())
    want = run(ac.chain(ac.factored_state(ac.scale_by_adam(betas=(0.5, 0.9))), *tail), lambda m: m.parameters())
    plain = run(ac.chain(ac.factored_state(ac.scale_by_adam()), *tail),
                lambda m: [{"params": list(m.parameters()), "betas": (0.5, 0.9)}])
    namespaced = run(ac.chain(ac.factored_state(ac.scale_by_adam()), *tail),
                     lambda m: [{"params": list(m.parameters()), "adam.betas": (0.5, 0.9)}])
    for a, b, c in zip(want, plain, namespaced):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_chunking_does_not_change_the_numbers():
    def run(chunk_bytes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 3))
        opt = ac.ChainOptimizer(model.parameters(), ac.chain(
            ac.factored_state(ac.scale_by_adam(), chunk_bytes=chunk_bytes), ac.atan2_scale(),
            ac.weight_decay(0.1), ac.apply()), lr=1e-2)
        x = torch.randn(8, 10)
        for _ in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(1), run(1 << 30)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("inner", ["adam+ademamix", "lion", "momentum", "adopt", "adam_amsgrad"])
def test_factored_state_composes_with_moment_transforms(inner):
    tails = {
        "adam+ademamix": (ac.factored_state(ac.scale_by_adam()), ac.factored_state(ac.ademamix(alpha=2.0)),
                          ac.eps_divide(), ac.apply()),
        "lion": (ac.factored_state(ac.scale_by_lion()), ac.weight_decay(0.01), ac.apply()),
        "momentum": (ac.factored_state(ac.momentum(0.9)), ac.apply()),
        "adopt": (ac.factored_state(ac.scale_by_adopt(), vector_reshape=True), ac.apply()),
        "adam_amsgrad": (ac.factored_state(ac.scale_by_adam(amsgrad=True)), ac.eps_divide(), ac.cautious(),
                         ac.apply()),
    }
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    w = torch.randn(8, 1)
    x = torch.randn(128, 8)
    y = x @ w
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(*tails[inner]), lr=3e-3 if inner == "lion" else 1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_zero_dim_parameter_and_dry_step():
    s = torch.nn.Parameter(torch.tensor(1.5))
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = ac.optim.AdamW_adv([s, w], lr=0.0, nnmf_factor=True)
    before = [s.detach().clone(), w.detach().clone()]
    for p in (s, w):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(s, before[0]) and torch.equal(w, before[1])
    assert opt.state[s]["adam/exp_avg:row"].shape == (1,)  # 0-d: 1 x 1


# -- checkpoints ----------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", [{"nnmf_factor": True}, {"factored_2nd": True, "state_precision": "bf16_sr"},
                                    {"state_precision": "int8_sr"}, {"state_precision": "fp16"}])
def test_save_load_continue_is_bit_identical_with_bf16_params(kwargs):
    model = _model(torch.bfloat16)
    opt = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    _steps(model, opt, 3)
    sd = _roundtrip(opt.state_dict())
    dtypes = {k: v.dtype for k, v in opt.state[model.weight].items()}
    twin = _model(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    opt2 = ac.optim.AdamW_adv(twin.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    opt2.load_state_dict(sd)
    assert {k: v.dtype for k, v in opt2.state[twin.weight].items()} == dtypes
    if "nnmf_factor" in kwargs:
        assert dtypes["adam/exp_avg:sign"] == torch.uint8 and dtypes["adam/exp_avg:row"] == torch.float32
    if kwargs.get("state_precision") == "int8_sr":
        assert dtypes["adam/exp_avg"] == torch.int8 and dtypes["adam/exp_avg_sq"] == torch.uint8
        assert dtypes["adam/exp_avg:scale"] == torch.float32
    if kwargs.get("state_precision") == "bf16_sr":
        assert dtypes["adam/exp_avg"] == torch.bfloat16 and dtypes["adam/exp_avg_sq:row"] == torch.float32
    _steps(model, opt, 3, seed=1)
    _steps(twin, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for key, value in opt.state[model.weight].items():
        assert torch.equal(value, opt2.state[twin.weight][key]), key


# -- low precision ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_of_state_is_unbiased(dtype):
    x = torch.tensor([1.0 + 1 / 3, -0.1234567, 3.14159e-3, 1e-4 + 1e-7], dtype=torch.float32)
    draws = torch.stack([round_to(x, dtype, key).float() for key in range(4000)])
    assert draws.dtype == torch.float32
    nearest = x.to(dtype).float()
    spacing = (torch.nextafter(x.to(dtype), torch.full_like(x, float("inf")).to(dtype)).float() - nearest).abs()
    # the mean is within a few standard errors of x, far closer than nearest rounding gets
    assert ((draws.mean(0) - x).abs() <= 0.05 * spacing).all()
    assert ((draws.mean(0) - x).abs() < (nearest - x).abs()).all()
    assert len(set(draws[:, 0].tolist())) == 2  # one of the two neighbours


def test_int8_block_quantization_is_unbiased_and_blockwise():
    x = torch.cat([torch.linspace(-1, 1, 300), torch.linspace(-1e-3, 1e-3, 212)])
    q, scale = quantize_blocks(x, signed=True, block=256, key=7)
    assert q.dtype == torch.int8 and scale.shape == (2,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.tensor([1 / 127, 1 / 127]))
    mean = torch.stack([dequantize_blocks(*quantize_blocks(x, True, 256, k), 256, torch.float32)
                        for k in range(3000)]).mean(0)
    assert ((mean - x).abs() <= 0.05 * scale.repeat_interleave(256)[:512]).all()
    v = torch.rand(100) * 5
    qv, sv = quantize_blocks(v, signed=False, block=64, key=1)
    assert qv.dtype == torch.uint8 and sv.shape == (2,)
    assert ((dequantize_blocks(qv, sv, 64, torch.float32) - v).abs() <= sv.repeat_interleave(64)[:100] + 1e-6).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_low_precision_state_still_trains(dtype):
    def run(wrap):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        x = torch.randn(256, 8)
        y = torch.sin(x.sum(1, keepdim=True))
        opt = ac.ChainOptimizer(model.parameters(), ac.chain(wrap(ac.scale_by_adam()), ac.eps_divide(1e-8),
                                                             ac.apply()), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
        return loss.item(), opt, model

    base, _, _ = run(lambda t: t)
    low, opt, model = run(lambda t: ac.low_precision_state(t, dtype))
    if dtype == "fp16":  # the noisiest format: judged by the mean over noise seeds (one seed ends near 0.1)
        low = sum([low] + [run(lambda t: ac.low_precision_state(t, dtype, seed=s))[0] for s in (1, 2, 3)]) / 4
    assert low < 0.1
    if dtype == "bf16":  # fp16's tiny second moments (below 6e-8) and int8's small ones (below a block's
        assert low < 2.0 * base + 0.01  # max / 255) round to 0 or a few steps: noisier, still converging
    want = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}[dtype]
    assert opt.state[model[0].weight]["adam/exp_avg"].dtype == want


# -- memory_report ---------------------------------------------------------------------------------------
def test_memory_report_counts_bytes_by_hand():
    model = _model()  # weight 3 x 5 (15 elements -> 5 x 3 matrix), bias 3 (left dense)
    opt = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, nnmf_factor=True)
    _steps(model, opt, 1)
    r = ac.memory_report(opt)
    assert r.per_key == {
        "adam/exp_avg_sq:row": 5 * 4 + 3 * 4, "adam/exp_avg_sq:col": 3 * 4,
        "adam/exp_avg:row": 5 * 4 + 3 * 4, "adam/exp_avg:col": 3 * 4,
        "adam/exp_avg:sign": 5 * 1, "adam/exp_avg:zero": 0}
    assert r.per_transform == {"adam": 93} and r.total == 93 and r.params == 18
    assert r.bytes_per_param == pytest.approx(93 / 18)
    assert r.ratio_to_adamw == pytest.approx(93 / 144)
    text = str(r)
    assert "adam/exp_avg:sign" in text and "93" in text and "0.6458" in text
    dense = ac.optim.AdamW_adv(model.parameters(), lr=1e-2)
    dense.init_state()
    assert ac.memory_report(dense).ratio_to_adamw == 1.0
    int8 = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, state_precision="int8_sr")
    int8.init_state()
    # 2 moments x (18 one-byte values + one fp32 scale per tensor: 2048-element blocks)
    assert ac.memory_report(int8).total == 2 * (18 + 2 * 4)


# -- arguments ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,words", [
    (lambda: ac.factored_state(ac.scale_by_adam(), rank=2), ["rank=2", "1"]),
    (lambda: ac.factored_state(ac.scale_by_adam(), vector_reshape="yes"), ["vector_reshape='yes'", "True or False"]),
    (lambda: ac.factored_state(ac.scale_by_adam(), keys=("nope",)), ["keys=('nope',)", "exp_avg_sq"]),
    (lambda: ac.factored_state(ac.scale_by_adam(), chunk_bytes=0), ["chunk_bytes=0", ">= 1"]),
    (lambda: ac.factored_state(ac.apply()), ["inner=apply()", "terminal"]),
    (lambda: ac.factored_state("adam"), ["inner='adam'", "transform"]),
    (lambda: ac.low_precision_state(ac.scale_by_adam(), "int4"), ["dtype='int4'", "'bf16', 'fp16', 'int8'"]),
    (lambda: ac.low_precision_state(ac.scale_by_adam(), "int8", block_size=0), ["block_size=0", ">= 1"]),
    (lambda: ac.presets.adamw_adv(state_precision="fp8"), ["state_precision='fp8'", "'bf16_sr'", "'factored'"]),
    (lambda: ac.presets.lion_adv(nnmf_factor="yes"), ["nnmf_factor"]),
])
def test_bad_arguments_are_value_errors_naming_argument_value_and_allowed(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value)


def test_reference_keywords_build_the_wrappers():
    assert isinstance(ac.presets.adamw_adv(nnmf_factor=True)["adam"], type(ac.factored_state(ac.scale_by_adam())))
    assert ac.presets.adamw_adv(state_precision="FACTORED") == ac.presets.adamw_adv(nnmf_factor=True)
    assert ac.presets.adamw_adv(factored_2nd=True)["adam"].options["keys"] == ("exp_avg_sq",)
    assert ac.presets.adamw_adv(state_precision="fp32") == ac.presets.adamw_adv()
    assert ac.presets.adopt_adv(state_precision="int8_sr")["adopt"].options["block_size"] == 2048
    assert ac.presets.simplified_ademamix(nnmf_factor=True).names == ac.presets.simplified_ademamix().names
    assert ac.presets.lion_adv(nnmf_factor=True, vector_reshape=True)["lion"].options["vector_reshape"] is True


def test_int8_second_moment_never_reads_back_as_zero_and_training_stays_near_fp32():
    """adv_optm's int8_sr rounds small second moments of a block to 0, so m / (sqrt(v) + eps) becomes
    m / eps: 5 steps of a small MLP move a weight by ~5 (reference) where fp32 moves it by 1e-2.
    Here a positive non-negative value keeps the smallest code, and the run stays near fp32."""
    def run(cls, **kw):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        opt = cls(m.parameters(), lr=1e-2, **kw)
        x, y = torch.randn(16, 32), torch.randn(16, 4)
        for _ in range(5):
            opt.zero_grad()
            (m(x) - y).square().mean().backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])
    exact = run(ac.optim.AdamW_adv)
    ours = run(ac.optim.AdamW_adv, state_precision="int8_sr")
    ref = run(adv_optm.AdamW_adv, state_precision="int8_sr")
    assert (ours - exact).abs().max() < 0.1
    assert (ref - exact).abs().max() > 1.0  # the reference's blow-up, fixed here
    from adv_chain.transforms.state_compression import quantize_blocks
    x = torch.tensor([1.0, 1e-6, 0.0, 3e-7])
    q, scale = quantize_blocks(x, signed=False, block=4, key=123)
    assert q.tolist()[1] >= 1 and q.tolist()[3] >= 1 and q.tolist()[2] == 0


# -- slices, chunks and noise (the wrappers run the inner transform on cache-sized slices) ----------------
from adv_chain.transforms import state_slices  # noqa: E402
from adv_chain.transforms.state_codecs import _noise_segments, quantize_range, round_into  # noqa: E402


def _noise(n, offset, key, kind="bits16", pieces=1):
    """The noise of elements offset .. offset + n - 1, drawn in ``pieces`` consecutive ranges."""
    out, cuts = [], [round(n * k / pieces) for k in range(pieces + 1)]
    for lo, hi in zip(cuts, cuts[1:]):
        seg = torch.empty(hi - lo, dtype=torch.int32 if kind == "bits16" else torch.float32)
        for a, b, values in _noise_segments(hi - lo, offset + lo, key, kind, seg.device):
            seg[a:b] = values.reshape(-1)
        out.append(seg)
    return torch.cat(out)


def test_noise_does_not_depend_on_slicing_or_on_the_key_being_a_tensor():
    n, offset = 3 * 65536 + 1234, 70000
    whole = _noise(n, offset, 12345)
    assert torch.equal(whole, _noise(n, offset, 12345, pieces=7))
    assert torch.equal(whole[5000:], _noise(n - 5000, offset + 5000, 12345))
    as_tensor = torch.cat([v.reshape(-1) for _, _, v in _noise_segments(n, offset, torch.tensor(12345, dtype=torch.int32),
                                                                         "bits16", torch.device("cpu"))])
    assert torch.equal(whole, as_tensor)  # compile=True passes int32 0-d keys: the same draws
    assert not torch.equal(whole, _noise(n, offset, 12346))


def test_noise_is_uniform_over_keys_and_a_permutation_within_a_block():
    block = _noise(65536, 0, 7)
    assert torch.equal(block.sort().values, torch.arange(65536, dtype=torch.int32))  # every 16-bit value once
    assert not torch.equal(_noise(65536, 65536, 7), block)  # the next block is shifted differently
    # one element over 8192 keys: its 16-bit noise is uniform (16 bins of 4096 values: chi-square, 15 dof)
    draws = torch.stack([_noise(1, 100003, key) for key in range(8192)]).view(-1)
    counts = torch.bincount(draws // 4096, minlength=16).float()
    chi2 = ((counts - 512) ** 2 / 512).sum().item()
    assert chi2 < 40  # p ~ 5e-4 for 15 degrees of freedom
    assert abs(draws.float().mean().item() / 65535 - 0.5) < 0.02
    u = _noise(4096, 0, 3, kind="uniform")
    assert 0 < u.min() and u.max() < 1


def test_rounding_is_unbiased_for_any_offset_and_chunking_free():
    x = torch.full((300,), 1.0 + 1 / 3)
    spacing = 2.0 ** -7  # bf16 near 1.33
    draws = torch.stack([round_to(x, torch.bfloat16, key, offset=99991).float() for key in range(2000)])
    assert ((draws.mean(0) - x).abs() <= 0.05 * spacing).all()
    out = torch.empty(300, dtype=torch.bfloat16)
    round_into(out[:100], x[:100], 500, 9)
    round_into(out[100:], x[100:], 600, 9)
    assert torch.equal(out, round_to(x, torch.bfloat16, 9, offset=500))
    q1, s1 = torch.empty(600, dtype=torch.int8), torch.empty(3)
    y = torch.linspace(-1, 1, 600)
    quantize_range(y, True, 256, 0, 5, q1, s1)
    q2, s2 = torch.empty(600, dtype=torch.int8), torch.empty(3)
    quantize_range(y[:256], True, 256, 0, 5, q2[:256], s2[:1])
    quantize_range(y[256:], True, 256, 256, 5, q2[256:], s2[1:])
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


def _big_model_run(chain, chunk_elems=1 << 18, steps=4, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)).to(dtype)
    opt = ac.ChainOptimizer(model.parameters(), chain, lr=1e-2, chunk_elems=chunk_elems)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 40, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        model[0].weight.grad[7] = 0.0  # a row of exact zeros among non-zero rows (the zero mask)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt, model


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 1024 elements: the 40 x 300 and 300 x 3 tensors run in several slices."""
    monkeypatch.setattr(state_slices, "SLICE_ELEMS", 1024)


@pytest.mark.parametrize("wrap", [
    lambda t, cb: ac.factored_state(t, chunk_bytes=cb),
    lambda t, cb: ac.factored_state(t, vector_reshape=True, chunk_bytes=cb),
    lambda t, cb: ac.low_precision_state(t, "bf16", chunk_bytes=cb),
    lambda t, cb: ac.low_precision_state(t, "int8", block_size=64, chunk_bytes=cb),
    lambda t, cb: ac.low_precision_state(ac.factored_state(t, keys=("exp_avg_sq",), chunk_bytes=cb), "bf16",
                                         chunk_bytes=cb),
], ids=["factored", "factored_vectors", "bf16", "int8", "factored_2nd+bf16"])
def test_sliced_wrappers_do_not_depend_on_chunk_sizes(small_slices, wrap):
    def chain(cb):  # stochastic_round_apply: the executor hands out per-parameter noise keys (with ac.apply()
        # the noise key of a tensor is its position in the bucket, which the executor's chunk_elems moves)
        return ac.chain(wrap(ac.scale_by_adam(), cb), ac.eps_divide(), ac.weight_decay(0.1),
                        ac.stochastic_round_apply())

    ref, _, _ = _big_model_run(chain(1 << 30))
    for cb, chunk_elems in [(1, 1 << 18), (5000, 1024), (1 << 30, 4096)]:
        got, _, _ = _big_model_run(chain(cb), chunk_elems=chunk_elems)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_low_precision_slices_give_the_same_numbers_as_whole_tensors(monkeypatch, dtype):
    chain = ac.chain(ac.low_precision_state(ac.scale_by_adam(), dtype, block_size=64), ac.eps_divide(), ac.apply())
    whole, _, _ = _big_model_run(chain)
    monkeypatch.setattr(state_slices, "SLICE_ELEMS", 640)
    sliced, _, _ = _big_model_run(chain)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)  # the noise of an element depends on its index in the tensor only


def test_row_slices_of_the_factors_match_whole_tensors_and_keep_exact_zeros(monkeypatch):
    chain = ac.chain(ac.factored_state(ac.scale_by_adam()), ac.eps_divide(), ac.apply())
    whole, _, model = _big_model_run(chain)
    monkeypatch.setattr(state_slices, "SLICE_ELEMS", 1024)
    sliced, opt, model = _big_model_run(chain)
    for a, b in zip(whole, sliced):  # only the order of the column sums differs
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    start = torch.nn.Linear(40, 300).weight.detach()
    assert torch.equal(model[0].weight[7], start[7])  # never a gradient: stays put (B18), also in slices
    assert opt.state[model[0].weight]["adam/exp_avg:zero"].numel() > 0


def test_the_direction_points_into_the_rebuilt_state_without_a_copy(small_slices):
    """Adam's direction stays pending (m * scale, divided by the terminal) through the wrapper:
    the bucket's pending numerator is one parameter-sized tensor per parameter."""
    seen = {}
    from adv_chain._core.bucket import Bucket
    chain = ac.chain(ac.factored_state(ac.scale_by_adam()), ac.eps_divide(), ac.apply())
    original = Bucket.divide_u_by_denom_

    def spy(self, eps):
        seen["lazy"] = self.lazy_u
        seen["shapes"] = [p.shape for p in self.params]
        return original(self, eps)

    Bucket.divide_u_by_denom_ = spy
    try:
        _big_model_run(chain, steps=2)
    finally:
        Bucket.divide_u_by_denom_ = original
    num, den, scale = seen["lazy"]
    assert den is None and [x.shape for x in num] == seen["shapes"]


@pytest.mark.parametrize("kw", [dict(nnmf_factor=True, cautious_mask=True),
                                dict(state_precision="int8_sr", orthogonal_gradient="flattened", weight_decay=0.1),
                                dict(state_precision="bf16_sr", cautious_wd=True, weight_decay=0.1, centered_wd=0.1),
                                dict(nnmf_factor=True, kourkoutas_beta=True, use_atan2=True)])
def test_rest_of_segment_per_chunk_equals_whole_tensors(kw, monkeypatch):
    """A state wrapper runs the elementwise rest of its segment (eps_divide, masks, decay, the
    terminal) on each chunk it decompresses; with that switched off the same transforms run once on
    whole tensors after the wrapper. Both give the same parameters (to the rounding of where the
    pending division is folded), with tensors big enough to be cut into several chunks."""
    from adv_chain.transforms.state_compression import _StateWrapper

    def run(per_chunk: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(_StateWrapper, "runs_rest", per_chunk)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 700), (1000,), (64, 3, 3, 3), (5,)]]
        opt = ac.optim.AdamW_adv(params, lr=1e-2, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
