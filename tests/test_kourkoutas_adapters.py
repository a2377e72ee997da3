"""Kourkoutas-beta on LoRA/OFT adapter parameters (spec §4.3, §7.7): each adapter is a layer of its
own, with one statistic (and one beta2) per row for OFT blocks and LoRA A factors and per column for
LoRA B factors. Checked against the formula in plain torch, against adv-optm 2.5.16, through the
executor's slices, checkpoints and bf16 parameters."""
import copy
import math

import adv_optm
import pytest
import torch

import adv_chain as ac

TAG_ATTR = {"lora_A": "_is_lora_A", "lora_B": "_is_lora_B", "oft": "_is_oft"}


def _param(shape, tag=None, seed=0, memory_format=None):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    p = torch.nn.Parameter(x)
    if tag is not None:
        setattr(p, TAG_ATTR[tag], True)
    return p


def _axis(shape, tag):
    if len(shape) < 2 or tag is None:
        return None
    return 1 if tag == "lora_B" else 0


def _oracle(spec, grads, *, b2min, b2max, alpha, tiny, warmup, mode, lag, lr, b1=0.9, eps=1e-8):
    """The formula written out: layers are the adapters (own, per row/column) and the untagged
    tensors grouped by shape; returns the final weights and each tensor's r."""
    w = [p.clone() for p, _ in spec]
    m = [torch.zeros_like(p) for p, _ in spec]
    v = [torch.zeros_like(p) for p, _ in spec]
    r = {}
    last = [None] * len(spec)
    for t, step_grads in enumerate(grads, start=1):
        sq = []
        for (p, tag), g in zip(spec, step_grads):
            axis = _axis(tuple(p.shape), tag)
            if axis is None:
                sq.append((g * g).sum())
            else:
                dims = [d for d in range(g.dim()) if d != axis]
                sq.append((g * g).sum(dim=dims, keepdim=True))
        if lag:  # the previous step's norms (none before the first step)
            used = [torch.zeros_like(x) if prev is None else prev for x, prev in zip(sq, last)]
        else:
            used = sq
        last = sq
        keys = [i if tag is not None else tuple(p.shape) for i, (p, tag) in enumerate(spec)]
        layer_sq = {}
        for k, x in zip(keys, used):
            layer_sq[k] = layer_sq.get(k, 0) + x
        beta2_of = {}
        for k, total in layer_sq.items():
            n = total.sqrt()
            r[k] = alpha * r.get(k, torch.zeros_like(n)) + (1 - alpha) * n
            ratio = n / (r[k] + tiny)
            target = b2max - (b2max - b2min) * ratio / (1 + ratio)
            if warmup and mode == "hold" and t <= warmup:
                target = torch.full_like(target, 0.5 * (b2min + b2max))
            elif warmup and mode == "ramp":
                wt = min(1.0, (t - 1) / warmup)
                target = (1 - wt) * b2max + wt * target
            beta2_of[k] = target
        for i, g in enumerate(step_grads):
            beta2 = beta2_of[keys[i]]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            w[i] = w[i] - lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2max ** t)).sqrt() + eps)
    return w, [r[k] for k in keys]


SPEC = [((5, 7), "lora_A"), ((9, 3), "lora_B"), ((4, 6), "oft"), ((5, 7), None), ((5, 7), None),
        ((9, 3), None), ((2, 3, 3, 3), "lora_A"), ((6, 2, 1, 1), "lora_B"), ((7,), "lora_A")]


@pytest.mark.parametrize("lag", [False, True])
@pytest.mark.parametrize("warmup, mode", [(0, "hold"), (3, "ramp"), (2, "hold")])
def test_per_row_and_per_column_statistics_follow_the_formula(lag, warmup, mode):
    params = [_param(s, tag, seed=i) for i, (s, tag) in enumerate(SPEC)]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=gen) * (1 + 6 * (t == 4)) for p in params] for t in range(9)]
    hp = dict(b2min=0.8, b2max=0.999, alpha=0.9, tiny=1e-9, warmup=warmup, mode=mode, lag=lag, lr=1e-2)
    chain = ac.chain(ac.kourkoutas_beta(beta2_min=0.8, beta2_max=0.999, ema_alpha=0.9, warmup=warmup,
                                        warmup_mode=mode, layer_key="shape", lag=lag),
                     ac.scale_by_adam(betas=(0.9, 0.999)), ac.eps_divide(1e-8), ac.apply())
    opt = ac.ChainOptimizer(params, chain, lr=1e-2)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    want, want_r = _oracle(list(zip(start, [t for _, t in SPEC])), grads, **hp)
    for p, e in zip(params, want):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=0)
    for p, e in zip(params, want_r):
        got = opt.state[p]["kourkoutas/r_ema"]
        assert got.dtype == torch.float32 and got.shape == e.shape
        torch.testing.assert_close(got, e, atol=1e-6, rtol=1e-6)
    assert opt.state[params[0]]["kourkoutas/r_ema"].shape == (5, 1)
    assert opt.state[params[1]]["kourkoutas/r_ema"].shape == (1, 3)
    assert opt.state[params[7]]["kourkoutas/r_ema"].shape == (1, 2, 1, 1)
    assert opt.state[params[8]]["kourkoutas/r_ema"].shape == ()  # a 1-D adapter: one value


class _AdapterNet(torch.nn.Module):
    """LoRA A/B factors, an OFT block, a DoRA scale, and untagged twins of the same shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(10, 12)
        self.lora_a, self.lora_b = torch.nn.Linear(10, 4, bias=False), torch.nn.Linear(4, 12, bias=False)
        self.twin_a, self.twin_b = torch.nn.Linear(10, 4, bias=False), torch.nn.Linear(4, 12, bias=False)
        self.dora = torch.nn.Parameter(torch.ones(12))
        self.oft, self.mix = torch.nn.Linear(12, 12, bias=False), torch.nn.Linear(12, 12, bias=False)
        self.head = torch.nn.Linear(12, 3)
        self.lora_a.weight._is_lora_A = True
        self.lora_b.weight._is_lora_B = True
        self.oft.weight._is_oft = True
        self.dora._is_dora_scale = True

    def forward(self, x):
        h = self.base(x) + self.lora_b(self.lora_a(x)) + 0.5 * self.twin_b(self.twin_a(x))
        h = torch.tanh(h) * self.dora
        return self.head(torch.tanh(self.oft(h)) + torch.tanh(self.mix(h)))


def _train(make, steps=20, lr=1e-2):
    model = _AdapterNet()
    opt = make(model.parameters(), lr)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=gen), torch.randn(32, 3, generator=gen)
    for t in range(steps):
        opt.zero_grad()
        ((model(x) - y).square().mean() * (1 + 5 * (t == 7))).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls, kwargs", [
    ("AdamW_adv", {}),
    ("AdamW_adv", {"k_warmup_steps": 6, "beta2_min": 0.8, "ema_alpha": 0.9, "nnmf_factor": True}),
    ("Adopt_adv", {}),
    ("Adopt_adv", {"k_warmup_steps": 6, "beta2_min": 0.8, "use_atan2": True}),
])
def test_adapters_match_adv_optm_2_5_16(cls, kwargs):
    """20 steps, fp32, a loss spike at step 8 (spec §4.3: per-row/per-column r, beta2 broadcast)."""
    ref, ref_opt = _train(lambda ps, lr: getattr(adv_optm, cls)(ps, lr=lr, kourkoutas_beta=True, **kwargs))
    ours, opt = _train(lambda ps, lr: getattr(ac.optim, cls)(ps, lr=lr, kourkoutas_beta=True, **kwargs))
    worst = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), ours.parameters()))
    assert worst <= 1e-5, worst
    for name in ("lora_a", "lora_b", "oft"):
        want = ref_opt.state[getattr(ref, name).weight]["kourkoutas_r_ema"]
        got = opt.state[getattr(ours, name).weight]["kourkoutas/r_ema"]
        assert got.shape == want.shape == ((4, 1) if name == "lora_a" else (1, 4) if name == "lora_b" else (12, 1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if not kwargs:  # the adapter rule matters here: without the tags the steps drift far from the reference
        plain, _ = _train(lambda ps, lr: getattr(ac.optim, cls)(
            [{"params": list(ps), "tags": {"lora_A": False, "lora_B": False, "oft": False}}], lr=lr,
            kourkoutas_beta=True))
        drift = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), plain.parameters()))
        assert drift > 100 * max(worst, 1e-7), (drift, worst)


def test_group_tags_give_the_same_steps_as_attributes():
    def run(by_group):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(4, 9)), torch.nn.Parameter(torch.randn(9, 4)),
                   torch.nn.Parameter(torch.randn(4, 9)))
        if by_group:
            groups = [{"params": [a], "tags": ["lora_A"]}, {"params": [b], "tags": {"lora_B": True}}, {"params": [c]}]
        else:
            a._is_lora_A, b._is_lora_B = True, True
            groups = [{"params": [a, b, c]}]
        opt = ac.optim.AdamW_adv(groups, lr=1e-2, kourkoutas_beta=True)
        gen = torch.Generator().manual_seed(2)
        for _ in range(6):
            for p in (a, b, c):
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [a.detach(), b.detach(), c.detach(), opt.state[a]["kourkoutas/r_ema"]]
    for x, y in zip(run(True), run(False)):
        assert torch.equal(x, y)


def _slice_params(memory_format=None):
    shapes = [((37, 50), "lora_A"), ((300, 7), "lora_B"), ((13, 91), "oft"), ((40, 40), None),
              ((6, 8, 3, 3), "lora_A"), ((20, 6, 3, 3), "lora_B")]
    return [_param(s, tag, seed=i, memory_format=memory_format if len(s) == 4 else None)
            for i, (s, tag) in enumerate(shapes)]


@pytest.mark.parametrize("lag", [False, True])
def test_sliced_execution_equals_whole_tensors(lag):
    """chunk_elems=1024 makes the executor run 1024-element slices, cut in the middle of rows; a
    channels_last LoRA B conv is sliced in memory order, where its columns are innermost."""
    def run(chunk, memory_format=None):
        params = _slice_params(memory_format)
        chain = ac.chain(ac.kourkoutas_beta(beta2_min=0.8, layer_key="shape", lag=lag, warmup=2, warmup_mode="ramp"),
                         ac.scale_by_adam(), ac.eps_divide(1e-8), ac.apply())
        opt = ac.ChainOptimizer(params, chain, lr=1e-2, chunk_elems=chunk)
        gen = torch.Generator().manual_seed(3)
        for t in range(6):
            for p in params:
                g = torch.randn(p.shape, generator=gen) * (1 + 3 * (t == 3))
                p.grad = g if memory_format is None or p.dim() < 4 else g.contiguous(memory_format=memory_format)
            opt.step()
        return [p.detach() for p in params]
    whole = run(1 << 18)
    for other in (run(1024), run(1024, torch.channels_last)):
        for a, b in zip(whole, other):
            assert torch.equal(a, b)


def test_tensors_above_the_slice_threshold_follow_the_formula():
    """Tensors larger than the executor's 2**18-element pieces are run slice by slice (cuts in the
    middle of rows); the result is the whole-tensor formula."""
    spec = [((70001, 5), "lora_B"), ((5, 60013), "lora_A")]
    params = [_param(s, tag, seed=i) for i, (s, tag) in enumerate(spec)]
    assert all(p.numel() > (1 << 18) for p in params)
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=gen) * (1 + 4 * (t == 2)) for p in params] for t in range(4)]
    opt = ac.ChainOptimizer(params, ac.chain(ac.kourkoutas_beta(beta2_min=0.8, ema_alpha=0.9), ac.scale_by_adam(),
                                             ac.eps_divide(1e-8), ac.apply()), lr=1e-2)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    want, _ = _oracle(list(zip(start, [t for _, t in spec])), grads, b2min=0.8, b2max=0.999, alpha=0.9, tiny=1e-9,
                      warmup=0, mode="hold", lag=False, lr=1e-2)
    for p, e in zip(params, want):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=0)


def test_a_slicing_state_wrapper_matches_adv_optm():
    """nnmf_factor=True: the factored-state wrapper runs Adam on row-aligned slices of tensors above
    2**18 elements, each with its cut of the (rows, 1)/(1, cols) beta2."""
    def run(lib):
        a, b = _param((5, 52501), "lora_A", seed=0), _param((52501, 5), "lora_B", seed=1)
        opt = lib.AdamW_adv([a, b], lr=1e-2, kourkoutas_beta=True, nnmf_factor=True, beta2_min=0.8)
        gen = torch.Generator().manual_seed(1)
        for t in range(3):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = torch.randn(b.shape, generator=gen) * (1 + 3 * (t == 1))
            opt.step()
        return a.detach(), b.detach()
    for x, y in zip(run(adv_optm), run(ac.optim)):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def _adapter_params(dtype):
    return [_param(s, tag, seed=i).to(dtype).detach().requires_grad_() for i, (s, tag) in
            enumerate([((6, 11), "lora_A"), ((11, 6), "lora_B"), ((5, 15), "oft"), ((6, 11), None)])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip_continues_bit_identically(dtype):
    def make(params):
        for p, (_, tag) in zip(params, [(0, "lora_A"), (0, "lora_B"), (0, "oft"), (0, None)]):
            if tag is not None:
                setattr(p, TAG_ATTR[tag], True)
        return ac.optim.AdamW_adv(params, lr=1e-2, kourkoutas_beta=True, k_warmup_steps=3)

    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in _adapter_params(dtype)] for _ in range(10)]

    def steps(opt, params, which):
        for t in which:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    straight = _adapter_params(dtype)
    opt = make(straight)
    steps(opt, straight, range(10))

    first = _adapter_params(dtype)
    opt1 = make(first)
    steps(opt1, first, range(5))
    saved = copy.deepcopy(opt1.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for p, q in zip(resumed, first):
        r = opt2.state[p]["kourkoutas/r_ema"]
        assert r.dtype == torch.float32 and torch.equal(r, opt1.state[q]["kourkoutas/r_ema"])
    assert opt2.state[resumed[0]]["kourkoutas/r_ema"].shape == (6, 1)
    assert opt2.state[resumed[1]]["kourkoutas/r_ema"].shape == (1, 6)
    assert opt2.state[resumed[1]]["kourkoutas/sq_norm"].shape == (1, 6)
    steps(opt2, resumed, range(5, 10))
    for a, b in zip(straight, resumed):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(straight, resumed):
        assert torch.equal(opt.state[a]["kourkoutas/r_ema"], opt2.state[b]["kourkoutas/r_ema"])


def test_per_parameter_steps_are_exact_for_adapters():
    """Gradient release (step_parameter): adapters are layers of their own, so nothing is lagged."""
    def run(per_param):
        params = _adapter_params(torch.float32)[:3]
        for p, tag in zip(params, ("lora_A", "lora_B", "oft")):
            setattr(p, TAG_ATTR[tag], True)
        opt = ac.optim.AdamW_adv(params, lr=1e-2, kourkoutas_beta=True)
        gen = torch.Generator().manual_seed(6)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if per_param:
                for p in params:
                    opt.step_parameter(p, opt.param_groups[0])
            else:
                opt.step()
        return [p.detach() for p in params]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_adapter_beta2_is_one_per_row(monkeypatch):
    """The beta2 a LoRA A factor publishes is (rows, 1): a spike in one row lowers only that row's."""
    from adv_chain.transforms import moments
    seen = []
    real = moments.signal_ema_

    def spy(v, g, beta2):
        seen.append([x.clone() for x in beta2])
        real(v, g, beta2)

    monkeypatch.setattr(moments, "signal_ema_", spy)
    a = _param((3, 8), "lora_A")
    opt = ac.ChainOptimizer([a], ac.chain(ac.kourkoutas_beta(), ac.scale_by_adam(), ac.eps_divide(), ac.apply()),
                            lr=1e-2)
    for t in range(3):
        g = torch.ones(3, 8)
        g[1] *= 10.0 ** t  # a spike in row 1 only
        a.grad = g
        opt.step()
    beta2 = seen[-1][0]
    assert beta2.shape == (3, 1)
    assert beta2[1, 0] < beta2[0, 0] and math.isclose(float(beta2[0, 0]), float(beta2[2, 0]))
