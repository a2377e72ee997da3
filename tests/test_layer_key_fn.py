"""Kourkoutas-beta layers chosen by a function (adv_optm's ``layer_key_fn``) and Kourkoutas-beta on
Simplified_AdEMAMix."""
import math

import adv_optm
import pytest
import torch

import adv_chain as ac
from test_parity_adv_optm import _train  # noqa: E402 - the same 50-step run with a scheduler


def layer_by_ndim(p):
    """A top-level function: the chain stores it as 'test_layer_key_fn:layer_by_ndim'."""
    return p.dim()


KEY_FNS = {"ndim": layer_by_ndim, "one_layer": lambda p: "all", "per_tensor": id}


@pytest.mark.parametrize("cls", ["AdamW_adv", "Adopt_adv", "Prodigy_adv"])
@pytest.mark.parametrize("fn", list(KEY_FNS), ids=str)
def test_layer_key_fn_matches_adv_optm_2_5_16(cls, fn):
    kw = {"kourkoutas_beta": True, "layer_key_fn": KEY_FNS[fn], "beta2_min": 0.8, "k_warmup_steps": 5}
    lr = 1.0 if cls == "Prodigy_adv" else 1e-2
    ref = _train(lambda p: getattr(adv_optm, cls)(p, lr=lr, **kw))
    ours = _train(lambda p: getattr(ac.optim, cls)(p, lr=lr, **kw))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_layer_key_fn_changes_the_layers():
    """Grouping differs from the default shape buckets: the model's three (32,) vectors and its two
    matrices of different shapes give other numbers when every tensor is one layer."""
    shape = _train(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, kourkoutas_beta=True))
    one = _train(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, kourkoutas_beta=True, layer_key_fn=lambda q: 0))
    assert max((a - b).abs().max().item() for a, b in zip(shape, one)) > 1e-6
    same = _train(lambda p: ac.optim.AdamW_adv(p, lr=1e-2, kourkoutas_beta=True,
                                               layer_key_fn=lambda q: tuple(q.shape)))
    for a, b in zip(shape, same):
        assert torch.equal(a, b)


def test_layer_key_as_module_path_serializes():
    t = ac.kourkoutas_beta(layer_key=layer_by_ndim)
    assert t.args["layer_key"] == f"{__name__}:layer_by_ndim"
    chain = ac.presets.adamw_adv(kourkoutas_beta=True, layer_key_fn=layer_by_ndim)
    assert "layer_by_ndim" in repr(chain)
    again = ac.chain_from_config(chain.to_config())
    assert again == chain and again["kourkoutas"]._layer_fn is layer_by_ndim


def test_layer_key_errors_name_the_argument():
    with pytest.raises(ValueError, match="layer_key='no_such_module_xyz:f' names no importable function"):
        ac.kourkoutas_beta(layer_key="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="layer_key='banana' is not one of"):
        ac.kourkoutas_beta(layer_key="banana")
    with pytest.raises(ValueError, match="cannot be saved in a config"):
        ac.kourkoutas_beta(layer_key=lambda p: 0).to_config()
    with pytest.raises(ValueError, match="adamw_adv: layer_key_fn=3 must be None, a function"):
        ac.presets.adamw_adv(kourkoutas_beta=True, layer_key_fn=3)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = ac.optim.AdamW_adv([p], kourkoutas_beta=True, layer_key_fn=lambda q: [1])
    with pytest.raises(TypeError, match=r"returned \[1\] .* must be hashable"):
        opt.step()


def _kbeta_reference(norms_sq_prev, r, b2min, b2max, alpha, tiny, t, warmup):
    """adv_optm's Kourkoutas-beta (spec §4.3): last step's squared norm, EMA first, ramp warm-up."""
    n = math.sqrt(norms_sq_prev)
    r = alpha * r + (1 - alpha) * n
    ratio = n / (r + tiny)
    target = b2max - (b2max - b2min) * ratio / (1 + ratio)
    w = min(1.0, (t - 1) / warmup) if warmup > 0 else 1.0
    return (1 - w) * b2max + w * target, r


@pytest.mark.parametrize("warmup", [0, 4])
def test_simplified_ademamix_kourkoutas_follows_the_spec(warmup):
    """Spec §9.4 with §4.3: v uses the layer's beta2 of the previous step's gradient norms; S2 keeps
    the static beta2. Two tensors of one shape share a layer (adv_optm's shape buckets)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20)) for _ in range(2)]
    w = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(20, generator=gen) * (1 + 3 * (t == 5)) for _ in params] for t in range(10)]
    lr, (b1, b2), eps, alpha_grad = 1e-2, (0.99, 0.999), 1e-8, 100.0
    b2min, ema, tiny = 0.8, 0.9, 1e-9
    opt = ac.optim.Simplified_AdEMAMix(params, lr=lr, stochastic_rounding=False, kourkoutas_beta=True,
                                       beta2_min=b2min, ema_alpha=ema, k_warmup_steps=warmup)
    m = [torch.zeros(20) for _ in params]
    v = [torch.zeros(20) for _ in params]
    s1 = s2 = 0.0
    r, prev_sq = 0.0, 0.0
    for t, step_grads in enumerate(grads, start=1):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        beta2, r = _kbeta_reference(prev_sq, r, b2min, b2, ema, tiny, t, warmup)
        prev_sq = sum(float(g.square().sum()) for g in step_grads)
        s1, s2 = b1 * s1 + 1, b2 * s2 + (1 - b2)
        eta = lr / ((1 - b1 ** t) / (1 - b1) + alpha_grad)
        for i, g in enumerate(step_grads):
            m[i] = b1 * m[i] + g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            w[i] = w[i] - (m[i] + alpha_grad * g) / (v[i].sqrt() + math.sqrt(s2) * eps) * eta * math.sqrt(s2 / s1)
    for p, e in zip(params, w):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
    assert "kourkoutas" in ac.presets.simplified_ademamix(kourkoutas_beta=True).names
