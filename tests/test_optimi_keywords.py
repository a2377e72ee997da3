"""torch-optimi's extra keywords on the classic drop-ins (SGD, Adam, AdamW, Lion), against optimi 0.3.3."""
import optimi
import pytest
import torch

import adv_chain as ac

pytestmark = pytest.mark.filterwarnings("ignore:You are using weight_decay:UserWarning")  # optimi's advice


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(17, 9), (9,), (4, 3, 5)]]


def _grads(steps):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) for s in [(17, 9), (9,), (4, 3, 5)]] for _ in range(steps)]


def _run(make, steps=100):
    params = _params()
    opt = make(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10) * (0.5 if t > 60 else 1.0))
    for grads in _grads(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
    return params


CASES = {  # name -> (our class, optimi class, shared keywords)
    "adamw decouple_lr": (ac.optim.AdamW, optimi.AdamW, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-3,
                                                             decouple_lr=True)),
    "adamw decouple_lr max_lr": (ac.optim.AdamW, optimi.AdamW, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-3,
                                                                    decouple_lr=True, max_lr=2e-2)),
    "adamw": (ac.optim.AdamW, optimi.AdamW, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adam l2": (ac.optim.Adam, optimi.Adam, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adam decouple_wd": (ac.optim.Adam, optimi.Adam, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2,
                                                          decouple_wd=True)),
    "adam decouple_lr": (ac.optim.Adam, optimi.Adam, dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-3,
                                                          decouple_lr=True)),
    "sgd momentum l2": (ac.optim.SGD, optimi.SGD, dict(momentum=0.9, weight_decay=1e-2)),
    "sgd decouple_wd": (ac.optim.SGD, optimi.SGD, dict(momentum=0.9, weight_decay=1e-2, decouple_wd=True)),
    "sgd decouple_lr": (ac.optim.SGD, optimi.SGD, dict(momentum=0.9, weight_decay=1e-3, decouple_lr=True,
                                                       max_lr=0.05)),
    "lion decouple_lr": (ac.optim.Lion, optimi.Lion, dict(weight_decay=1e-2, decouple_lr=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_optimi_over_100_steps(case):
    ours_cls, theirs_cls, kw = CASES[case]
    lr = 1e-4 if ours_cls is ac.optim.Lion else 1e-2
    ours = _run(lambda ps: ours_cls(ps, lr=lr, **kw))
    theirs = _run(lambda ps: theirs_cls(ps, lr=lr, kahan_sum=False, **kw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_kahan_sum_none_follows_the_parameter_dtype():
    assert ac.optim.AdamW(_params(torch.bfloat16), kahan_sum=None).chain.transforms[-1].type_name == "kahan_apply"
    assert ac.optim.SGD(_params(torch.float16), kahan_sum=None).chain.transforms[-1].type_name == "kahan_apply"
    assert ac.optim.AdamW(_params(), kahan_sum=None).chain.transforms[-1].type_name == "apply"
    groups = [{"params": _params(torch.bfloat16)[:1]}, {"params": _params()[1:]}]
    assert ac.optim.Lion(groups, kahan_sum=None).chain.transforms[-1].type_name == "kahan_apply"
    assert ac.optim.AdamW(_params(torch.bfloat16)).chain.transforms[-1].type_name == "apply"  # torch's default


def test_bf16_kahan_tracks_fp32_better_than_plain_bf16():
    def final(dtype, kahan):
        params = _params(dtype)
        opt = ac.optim.AdamW(params, lr=1e-3, kahan_sum=kahan)
        for grads in _grads(100):
            for p, g in zip(params, grads):
                p.grad = g.to(dtype)
            opt.step()
        return torch.cat([p.float().flatten() for p in params])
    exact = final(torch.float32, False)
    err_kahan = (final(torch.bfloat16, None) - exact).abs().mean()
    err_plain = (final(torch.bfloat16, False) - exact).abs().mean()
    assert err_kahan < 0.5 * err_plain


def test_gradient_release_keyword_steps_inside_backward():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = ac.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = ac.optim.AdamW(b.parameters(), lr=1e-2, gradient_release=True)
    for _ in range(5):
        x = torch.randn(4, 5)
        a(x).square().mean().backward()
        opt_a.step()
        opt_a.zero_grad()
        b(x).square().mean().backward()
        assert b.weight.grad is None
    torch.testing.assert_close(b.weight, a.weight, atol=1e-6, rtol=0)
    ac.disable_gradient_release(opt_b)


@pytest.mark.parametrize("cls, kw, words", [
    (ac.optim.AdamW, {"decouple_lr": True, "max_lr": -1.0}, ["max_lr"]),
    (ac.optim.AdamW, {"decouple_lr": "yes"}, ["decouple_lr"]),
    (ac.optim.SGD, {"kahan_sum": "auto"}, ["kahan_sum"]),
    (ac.optim.Lion, {"gradient_release": 1.5}, ["gradient_release"]),
])
def test_bad_optimi_keywords(cls, kw, words):
    with pytest.raises(ValueError) as err:
        cls(_params(), **kw)
    assert all(w in str(err.value) for w in words)
