"""Parameter tags (adv_chain._core.tags): read from tensor attributes or a param group's "tags"."""
import adv_optm
import pytest
import torch

import adv_chain as ac
from adv_chain._core.tags import param_tags


def _p(*shape, **attrs):
    p = torch.nn.Parameter(torch.randn(*shape))
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def test_tags_from_attributes_and_groups():
    assert param_tags(_p(3)) == {"hidden"}
    assert param_tags(_p(3, 4, _is_lora_A=True)) == {"hidden", "lora_A"}
    assert param_tags(_p(3, is_hidden=False, is_vector=True)) == {"vector"}
    assert param_tags(_p(3), {"tags": ["oft", "dora_scale"]}) == {"hidden", "oft", "dora_scale"}
    assert param_tags(_p(3, _is_lora_B=True), {"tags": {"lora_B": False, "hidden": False}}) == frozenset()


@pytest.mark.parametrize("tags, words", [("lora_A", ["list of tag names"]), (["lora_C"], ["lora_C", "lora_A"]),
                                         (7, ["tags"])])
def test_bad_group_tags_are_clear_errors_before_any_state_changes(tags, words):
    p = _p(4, 3)
    opt = ac.ChainOptimizer([{"params": [p], "tags": tags}], "adamw", lr=0.1)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError) as err:
        opt.step()
    assert all(w in str(err.value) for w in words)
    assert torch.equal(p.detach(), before) and not opt.state[p]


def _tagged_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2))
    model[0].weight._is_lora_A = True    # adapter factors: no centered decay
    model[2].weight._is_lora_B = True
    model[4].weight._is_dora_scale = True  # keeps it (as adv_optm)
    return model


def _train(make, steps=40):
    model = _tagged_model()
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 2, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls", ["AdamW_adv", "Adopt_adv", "Lion_adv"])
@pytest.mark.parametrize("mode", ["full", "int8"])
def test_centered_wd_skips_lora_factors_like_adv_optm(cls, mode):
    kw = dict(lr=1e-2 if cls != "Lion_adv" else 1e-3, weight_decay=0.1, centered_wd=0.5, centered_wd_mode=mode)
    ours, opt = _train(lambda ps: getattr(ac.optim, cls)(ps, stochastic_rounding=False, **kw))
    ref, _ = _train(lambda ps: getattr(adv_optm, cls)(ps, **kw))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=0)
    assert not any(k.startswith("centered_wd/") for k in opt.state[ours[0].weight])
    assert any(k.startswith("centered_wd/") for k in opt.state[ours[4].weight])


def test_group_tags_equal_attribute_tags():
    def run(use_group):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(5, 4))
        if use_group:
            groups = [{"params": [a], "tags": ["lora_A"]}, {"params": [b]}]
        else:
            a._is_lora_A = True
            groups = [{"params": [a]}, {"params": [b]}]
        opt = ac.optim.AdamW_adv(groups, lr=1e-2, centered_wd=1.0, centered_wd_mode="full",
                                 stochastic_rounding=False)
        for _ in range(5):
            a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
            opt.step()
        return a.detach(), b.detach()
    for x, y in zip(run(True), run(False)):
        assert torch.equal(x, y)


def test_kourkoutas_gives_adapters_and_dora_scales_their_own_layer():
    """Per-row/per-column statistics of adapters: tests/test_kourkoutas_adapters.py."""
    model = _tagged_model()
    opt = ac.optim.AdamW_adv(model.parameters(), lr=1e-2, kourkoutas_beta=True)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["kourkoutas/r_ema"].shape == (8, 1)  # lora_A (8, 6): per row
    assert opt.state[model[2].weight]["kourkoutas/r_ema"].shape == (1, 8)  # lora_B (8, 8): per column
    assert opt.state[model[4].weight]["kourkoutas/r_ema"].shape == ()      # dora_scale: one value
    k = ac.kourkoutas_beta(layer_key="shape")
    for i, attr in enumerate(["_is_dora_scale", "_is_lora_A", "_is_lora_B", "_is_oft"]):
        assert k.layer_key(_p(8, 8, **{attr: True}), i, {}) == i
    assert k.layer_key(_p(8, 8), 9, {}) == (8, 8)
    assert k.layer_key(_p(8, 8), 9, {"tags": ["oft"]}) == 9


def test_iterative_orthograd_treats_group_tagged_vectors_as_vectors():
    torch.manual_seed(0)
    w0, g = torch.randn(4, 6), torch.randn(4, 6)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    b.is_vector = True
    chain = ac.chain(ac.orthograd(mode="iterative"), ac.apply())
    opt_a = ac.ChainOptimizer([{"params": [a], "tags": ["vector"]}], chain, lr=0.1)
    opt_b = ac.ChainOptimizer([b], chain, lr=0.1)
    a.grad, b.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a.detach(), b.detach())
    flat = g.flatten() - (w0.flatten() @ g.flatten()) / (w0.flatten() @ w0.flatten()) * w0.flatten()
    flat = flat * g.norm() / flat.norm()
    torch.testing.assert_close(a.detach(), w0 - 0.1 * flat.view(4, 6), atol=1e-6, rtol=0)
