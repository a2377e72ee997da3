"""Bad input gives a clear error naming the argument, the value and the allowed range (or the fix).

Every assertion is on the message text: ``pytest.raises(..., match=...)`` searches the message with a
regular expression, so literal parts are escaped with ``re.escape`` where they hold brackets.
"""
import re

import pytest
import torch

import adv_chain as ac

LR_RANGE = re.escape("is outside the allowed range [0.0, inf]")
UNIT_RANGE = re.escape("is outside the allowed range [0.0, 1.0)")
NONNEG_RANGE = re.escape("is outside the allowed range [0.0, inf]")


def param(n: int = 3, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(n, dtype=dtype))


def one_step(opt: torch.optim.Optimizer, *params: torch.Tensor) -> None:
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()


# ---------------------------------------------------------------------------------------------------
# learning rate
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: ac.ChainOptimizer(ps, "adamw", lr=-1.0),
    lambda ps: ac.ChainOptimizer(ps, ac.chain(ac.momentum(0.9), ac.apply()), lr=-1.0),
    lambda ps: ac.optim.SGD(ps, lr=-1.0),
    lambda ps: ac.optim.Adam(ps, lr=-1.0),
    lambda ps: ac.optim.AdamW(ps, lr=-1.0),
    lambda ps: ac.optim.Lion(ps, lr=-1.0),
], ids=["preset", "chain", "SGD", "Adam", "AdamW", "Lion"])
def test_negative_lr_at_construction(make):
    with pytest.raises(ValueError, match="ChainOptimizer: lr=-1.0 " + LR_RANGE):
        make([param()])


def test_negative_lr_as_a_0d_tensor():
    # a 0-d tensor lr is accepted (for capturable training), but its value must still be in range
    with pytest.raises(ValueError, match=r"lr=tensor\(-1\.?\) " + LR_RANGE):
        ac.ChainOptimizer([param()], "adamw", lr=torch.tensor(-1.0))


def test_nan_lr():
    with pytest.raises(ValueError, match="ChainOptimizer: lr=nan must be a real number"):
        ac.ChainOptimizer([param()], "adamw", lr=float("nan"))


def test_negative_lr_in_a_param_group():
    with pytest.raises(ValueError, match="param group 1: lr=-1 " + LR_RANGE):
        ac.ChainOptimizer([{"params": [param()]}, {"params": [param()], "lr": -1}], "adamw", lr=1e-3)


def test_negative_lr_set_by_hand_before_step():
    p = param()
    opt = ac.ChainOptimizer([p], "adamw", lr=1e-3)
    opt.param_groups[0]["lr"] = -1.0
    before = p.detach().clone()
    with pytest.raises(ValueError, match="param group 0: lr=-1.0 " + LR_RANGE):
        one_step(opt, p)
    assert torch.equal(p, before)  # the failed step did not write the parameter


def test_a_failed_step_leaves_no_trace():
    # group 1 has a bad lr; group 0 is fine. The step raises; after fixing lr, the next step must
    # match an optimizer that never saw the failed step (same Adam step count, same bias correction).
    a, b = param(), param()
    opt = ac.ChainOptimizer([{"params": [a]}, {"params": [b]}], "adamw", lr=0.1)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1: lr=-1.0"):
        one_step(opt, a, b)
    opt.param_groups[1]["lr"] = 0.1
    one_step(opt, a, b)

    a_ref, b_ref = param(), param()
    ref = ac.ChainOptimizer([{"params": [a_ref]}, {"params": [b_ref]}], "adamw", lr=0.1)
    one_step(ref, a_ref, b_ref)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
    assert opt.state[a]["step"].item() == ref.state[a_ref]["step"].item() == 1


# ---------------------------------------------------------------------------------------------------
# betas, eps, weight decay, momentum, nesterov
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("betas, bad", [((1.0, 0.999), "betas[0]=1.0"), ((0.9, 1.0), "betas[1]=1.0"),
                                        ((-0.1, 0.999), "betas[0]=-0.1")])
def test_betas_outside_unit_interval(betas, bad):
    expected = re.escape(f"{bad} is outside the allowed range [0.0, 1.0)")
    with pytest.raises(ValueError, match="scale_by_adam: " + expected):
        ac.scale_by_adam(betas=betas)
    with pytest.raises(ValueError, match="scale_by_lion: " + expected):
        ac.scale_by_lion(betas=betas)
    with pytest.raises(ValueError, match="scale_by_adam: " + expected):
        ac.optim.AdamW([param()], betas=betas)
    with pytest.raises(ValueError, match=r"param group 0 \(adam\): " + expected):
        ac.ChainOptimizer([{"params": [param()], "betas": betas}], "adamw")


def test_betas_three_tuple():
    with pytest.raises(ValueError, match=re.escape(
            "scale_by_adam: betas=(0.9, 0.99, 0.999) must be a pair (beta1, beta2), each in [0, 1)")):
        ac.scale_by_adam(betas=(0.9, 0.99, 0.999))
    with pytest.raises(ValueError, match=r"betas=\(0\.9, 0\.99, 0\.999\) must be a pair"):
        ac.optim.Adam([param()], betas=(0.9, 0.99, 0.999))


@pytest.mark.parametrize("key, betas", [("betas", (0.9,)), ("adam.betas", (0.9, 0.99, 0.999))])
def test_betas_of_wrong_length_in_a_param_group(key, betas):
    # a param group override goes through the same checks as the constructor: a pair is required
    with pytest.raises(ValueError, match=r"betas.*must be a pair"):
        ac.ChainOptimizer([{"params": [param()], key: betas}], "adamw")


def test_negative_eps():
    expected = "eps=-1e-08 " + NONNEG_RANGE
    with pytest.raises(ValueError, match="eps_divide: " + expected):
        ac.eps_divide(-1e-8)
    with pytest.raises(ValueError, match="eps_divide: " + expected):
        ac.optim.Adam([param()], eps=-1e-8)
    with pytest.raises(ValueError, match=r"param group 0 \(eps_divide\): " + expected):
        ac.ChainOptimizer([{"params": [param()], "eps": -1e-8}], "adamw")


def test_negative_weight_decay():
    expected = "weight_decay=-0.1 " + NONNEG_RANGE
    with pytest.raises(ValueError, match="weight_decay: " + expected):
        ac.weight_decay(-0.1)
    with pytest.raises(ValueError, match="add_l2: " + expected):
        ac.add_l2(-0.1)
    with pytest.raises(ValueError, match="weight_decay: " + expected):
        ac.optim.AdamW([param()], weight_decay=-0.1)
    with pytest.raises(ValueError, match="add_l2: " + expected):
        ac.optim.SGD([param()], weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"param group 0 \(weight_decay\): " + expected):
        ac.ChainOptimizer([{"params": [param()], "weight_decay": -0.1}], "adamw")


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1])
def test_momentum_outside_unit_interval(momentum):
    expected = f"momentum={momentum} " + UNIT_RANGE
    with pytest.raises(ValueError, match="momentum: " + expected):
        ac.momentum(momentum)
    with pytest.raises(ValueError, match="momentum: " + expected):
        ac.optim.SGD([param()], momentum=momentum)
    with pytest.raises(ValueError, match=r"param group 0 \(momentum\): " + expected):
        ac.optim.SGD([{"params": [param()], "momentum": momentum}], momentum=0.9)


def test_nesterov_requires_momentum():
    expected = re.escape("momentum: nesterov=True requires momentum > 0 and dampening = 0 "
                         "(got momentum=0.0, dampening=0.0)")
    with pytest.raises(ValueError, match=expected):
        ac.momentum(0.0, nesterov=True)
    with pytest.raises(ValueError, match=expected):
        ac.optim.SGD([param()], nesterov=True)  # torch's default momentum is 0
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0 and dampening = 0 "
                                         r"\(got momentum=0\.9, dampening=0\.5\)"):
        ac.optim.SGD([param()], momentum=0.9, dampening=0.5, nesterov=True)


def test_nesterov_without_momentum_in_a_param_group():
    # the same combination reached through a param group must not be silently ignored
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        ac.optim.SGD([{"params": [param()], "nesterov": True}], momentum=0.0)


# ---------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------

def test_unknown_preset_lists_known_presets():
    expected = "unknown preset 'adamx'; known presets: " + ", ".join(ac.presets.names())
    with pytest.raises(ValueError, match=expected):
        ac.ChainOptimizer([param()], "adamx")
    with pytest.raises(ValueError, match=expected):
        ac.presets.get("adamx")
    assert {"adam", "adamw", "sgd", "lion"} <= set(ac.presets.names())


def test_preset_lookup_is_case_insensitive():
    opt = ac.ChainOptimizer([param()], "ADAMW", lr=1e-3)
    assert opt.chain == ac.presets.adamw()
    assert ac.presets.get("AdamW", weight_decay=0.1) == ac.presets.adamw(weight_decay=0.1)


def test_unknown_preset_keyword():
    expected = r"preset 'adamw' got unexpected keyword argument\(s\) \['foo'\]; it accepts \['betas', 'eps'"
    with pytest.raises(TypeError, match=expected):
        ac.ChainOptimizer([param()], "adamw", foo=1)
    with pytest.raises(TypeError, match=expected):
        ac.presets.get("adamw", foo=1)


def test_chain_with_preset_keywords():
    with pytest.raises(TypeError, match=r"ChainOptimizer got unexpected keyword argument\(s\) \['weight_decay'\]; "
                                        "keywords other than lr/compile/state_dtype/chunk_elems only apply to a preset"):
        ac.ChainOptimizer([param()], ac.presets.adamw(), weight_decay=0.1)


# ---------------------------------------------------------------------------------------------------
# param-group keys
# ---------------------------------------------------------------------------------------------------

def test_unknown_namespaced_group_key_lists_known_ones():
    with pytest.raises(ValueError, match=re.escape(
            "param group 0: unknown hyperparameter 'adam.beta'; this chain's namespaced hyperparameters are "
            "['adam.amsgrad', 'adam.betas', 'eps_divide.eps', 'weight_decay.weight_decay']")):
        ac.ChainOptimizer([{"params": [param()], "adam.beta": (0.9, 0.99)}], "adamw")


def test_namespaced_override_with_bad_value():
    with pytest.raises(ValueError, match=re.escape(
            "param group 0 (adam): betas[0]=1.5 is outside the allowed range [0.0, 1.0)")):
        ac.ChainOptimizer([{"params": [param()], "adam.betas": (1.5, 0.9)}], "adamw")


def test_failed_add_param_group_leaves_optimizer_unchanged():
    p1, p2 = param(), param()
    opt = ac.ChainOptimizer([p1], "adamw", lr=0.1)
    groups_before = [dict(g) for g in opt.param_groups]

    bad_groups = [{"params": [p2], "lr": -1.0},
                  {"params": [p2], "adam.betas": (1.5, 0.9)},
                  {"params": [p2], "adam.beta": (0.9, 0.99)},
                  {"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]}]
    for bad in bad_groups:
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
        assert [dict(g) for g in opt.param_groups] == groups_before

    # it still steps exactly like an optimizer that never saw the failed calls
    ref_p = param()
    ref = ac.ChainOptimizer([ref_p], "adamw", lr=0.1)
    for _ in range(3):
        one_step(opt, p1)
        one_step(ref, ref_p)
    assert torch.equal(p1, ref_p)

    # and the rejected parameter can still join in a valid group (it is in no group yet)
    opt.add_param_group({"params": [p2], "lr": 0.05})
    one_step(opt, p1, p2)
    assert len(opt.param_groups) == 2 and not torch.equal(p2, torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# parameters and gradients the optimizer does not support
# ---------------------------------------------------------------------------------------------------

def test_sparse_gradient_raises_at_step():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ac.ChainOptimizer(emb.parameters(), "adamw", lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"parameter 0 \(shape \(10, 3\), group 0\) has a sparse gradient; "
                                           "adv_chain supports dense gradients only"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_complex_parameter_raises_at_construction():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"param group 0 holds a complex parameter of shape \(3,\); .*"
                                         r"optimize torch\.view_as_real\(p\) instead"):
        ac.ChainOptimizer([z], "adamw")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_parameter_raises_at_construction(dtype):
    with pytest.raises(ValueError, match=f"param group 0 holds a {dtype} parameter; parameters must be floating point"):
        ac.ChainOptimizer([torch.zeros(3, dtype=dtype)], "adamw")


# ---------------------------------------------------------------------------------------------------
# drop-in flags and optimizer options
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ac.optim.SGD, ac.optim.Adam, ac.optim.AdamW], ids=lambda c: c.__name__)
def test_differentiable_is_not_implemented(cls):
    with pytest.raises(NotImplementedError, match=f"{cls.__name__}: differentiable=True .* is not supported"):
        cls([param()], differentiable=True)


@pytest.mark.parametrize("make", [
    lambda: ac.optim.AdamW([param()], stochastic_rounding=True, kahan_sum=True),
    lambda: ac.optim.SGD([param()], stochastic_rounding=True, kahan_sum=True),
    lambda: ac.optim.Lion([param()], stochastic_rounding=True, kahan_sum=True),
    lambda: ac.ChainOptimizer([param()], "adam", stochastic_rounding=True, kahan_sum=True),
    lambda: ac.presets.get("signum", stochastic_rounding=True, kahan_sum=True),
], ids=["AdamW", "SGD", "Lion", "ChainOptimizer", "presets.get"])
def test_stochastic_rounding_and_kahan_are_exclusive(make):
    with pytest.raises(ValueError, match="stochastic_rounding=True and kahan_sum=True are alternatives .*; choose one"):
        make()


@pytest.mark.parametrize("bad", ["Bad Name", "Adam", "2adam", "adam-2", "adam.x", ""])
def test_invalid_transform_names(bad):
    with pytest.raises(ValueError, match=re.escape(f"momentum: name={bad!r} is not a valid transform name; "
                                                   "use lowercase letters, digits and '_' starting with a letter")):
        ac.named(bad, ac.momentum())
    with pytest.raises(ValueError, match=re.escape(f"name={bad!r} is not a valid transform name")):
        ac.momentum(name=bad)


def test_state_dtype_choice():
    with pytest.raises(ValueError, match=re.escape("ChainOptimizer: state_dtype='fp8' is not one of ('fp32', 'param')")):
        ac.ChainOptimizer([param()], "adamw", state_dtype="fp8")
    with pytest.raises(ValueError, match="state_dtype='fp8'"):
        ac.optim.AdamW([param()], state_dtype="fp8")


def test_compile_option_type():
    with pytest.raises(ValueError, match=re.escape(
            "ChainOptimizer: compile='yes' must be True, False or a dict of torch.compile options")):
        ac.ChainOptimizer([param()], "adamw", compile="yes")
