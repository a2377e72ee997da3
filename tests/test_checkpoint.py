"""state_dict / load_state_dict: flat stable keys, declared dtypes survive torch's casting, clear
errors for a checkpoint from another chain, partial loads with strict=False."""
import io
from typing import Any

import pytest
import torch

import adv_chain as ac


class SignBits(ac.Transform):
    """Test-only transform with a uint8 state: counts sign flips of the update (saturating)."""

    type_name = "test_sign_bits"
    default_name = "sign_bits"
    stage = "scale"

    def __init__(self, *, name=None):
        super().__init__(name=name)

    def state_specs(self, param, hp):
        return {"last_sign": ac.StateSpec(dtype=torch.uint8)}

    def update(self, b: Any) -> None:
        bits = b.state("last_sign")
        torch._foreach_copy_(bits, [(x > 0).to(torch.uint8) * 200 + 3 for x in b.u])


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _chain():
    return ac.chain(ac.scale_by_adam(), ac.eps_divide(), SignBits(), ac.weight_decay(0.01), ac.apply())


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3).to(dtype)


def test_state_keys_are_flat_and_namespaced():
    model = _model()
    opt = ac.ChainOptimizer(model.parameters(), _chain(), lr=1e-2)
    _train(model, opt, 1)
    keys = set(opt.state[model.weight])
    assert keys == {"step", "adam/exp_avg", "adam/exp_avg_sq", "sign_bits/last_sign"}
    assert opt.state[model.weight]["step"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_declared_dtypes_survive_save_load_and_resume_is_bit_identical(dtype):
    model = _model(dtype)
    opt = ac.ChainOptimizer(model.parameters(), _chain(), lr=1e-2)
    _train(model, opt, 5)
    sd = _roundtrip(opt.state_dict())
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    _train(model, opt, 5, seed=7)  # uninterrupted run

    resumed = _model(dtype)
    resumed.load_state_dict(saved_weights)
    opt2 = ac.ChainOptimizer(resumed.parameters(), _chain(), lr=1e-2)
    opt2.load_state_dict(sd)
    st = opt2.state[resumed.weight]
    assert st["adam/exp_avg"].dtype == torch.float32  # torch alone would cast these to bf16
    assert st["adam/exp_avg_sq"].dtype == torch.float32
    assert st["sign_bits/last_sign"].dtype == torch.uint8
    assert set(st["sign_bits/last_sign"].unique().tolist()) <= {3, 203}
    _train(resumed, opt2, 5, seed=7)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_loading_does_not_mutate_the_callers_state_dict():
    model = _model()
    opt = ac.ChainOptimizer(model.parameters(), "adamw", lr=1e-2)
    _train(model, opt, 3)
    sd = opt.state_dict()
    snapshot = {k: v.clone() for k, v in sd["state"][0].items()}
    opt.load_state_dict(sd)
    _train(model, opt, 3)
    for k, v in snapshot.items():
        assert torch.equal(sd["state"][0][k], v), k


def test_checkpoint_from_another_chain_is_a_clear_error_and_strict_false_loads_shared_keys():
    model = _model()
    base = ac.ChainOptimizer(model.parameters(), ac.presets.adamw(), lr=1e-2)
    _train(model, base, 3)
    sd = base.state_dict()
    variant_chain = ac.presets.adamw().insert_after("eps_divide", SignBits())
    variant = ac.ChainOptimizer(model.parameters(), variant_chain, lr=1e-2)
    with pytest.raises(ValueError, match="different chain.*sign_bits/last_sign.*strict=False"):
        variant.load_state_dict(sd)
    variant.load_state_dict(sd, strict=False)
    st = variant.state[model.weight]
    assert torch.equal(st["adam/exp_avg"], base.state[model.weight]["adam/exp_avg"])
    assert "sign_bits/last_sign" not in st
    _train(model, variant, 1)  # the missing namespace is initialized on the next step
    assert variant.state[model.weight]["sign_bits/last_sign"].dtype == torch.uint8
    assert float(variant.state[model.weight]["step"]) == 4


def test_lr_zero_dry_step_allocates_everything_and_moves_nothing():
    model = _model(torch.bfloat16)
    opt = ac.ChainOptimizer(model.parameters(), _chain().replace("apply", ac.stochastic_round_apply()), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert set(opt.state[model.weight]) == {"step", "adam/exp_avg", "adam/exp_avg_sq", "sign_bits/last_sign"}
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_param_group_hyperparameters_are_saved_and_restored():
    model = _model()
    opt = ac.ChainOptimizer([{"params": [model.weight], "adam.betas": (0.8, 0.99)},
                             {"params": [model.bias], "lr": 0.5}], "adamw", lr=1e-2)
    _train(model, opt, 2)
    sd = _roundtrip(opt.state_dict())
    opt2 = ac.ChainOptimizer([{"params": [model.weight]}, {"params": [model.bias]}], "adamw", lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["adam.betas"] == (0.8, 0.99) or list(opt2.param_groups[0]["adam.betas"]) == [0.8, 0.99]
    assert opt2.param_groups[1]["lr"] == 0.5


def test_one_group_may_mix_dtypes_and_each_bucket_matches_a_separate_run():
    torch.manual_seed(0)
    a32 = torch.nn.Parameter(torch.randn(8, 4))
    b16 = torch.nn.Parameter(torch.randn(6).to(torch.bfloat16))
    twins = [torch.nn.Parameter(a32.detach().clone()), torch.nn.Parameter(b16.detach().clone())]
    mixed = ac.ChainOptimizer([a32, b16], "adamw", lr=1e-2)
    separate = [ac.ChainOptimizer([t], "adamw", lr=1e-2) for t in twins]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(8, 4, generator=gen), torch.randn(6, generator=gen).to(torch.bfloat16)]
        for p, t, g in zip((a32, b16), twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        mixed.step()
        for o in separate:
            o.step()
    assert torch.equal(a32, twins[0]) and torch.equal(b16, twins[1])
    assert b16.dtype == torch.bfloat16 and mixed.state[b16]["adam/exp_avg"].dtype == torch.float32
