"""The immutable Chain value: composition, printing, equality, editing, config round trip and the
build-time validation rules (each violation a ValueError naming the transforms and the fix)."""
import json
import math
import re

import pytest
import torch

import adv_chain as ac


def adamw_chain() -> ac.Chain:
    """A fresh AdamW chain, built by hand (not from a preset) so tests compare against known parts."""
    return ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01), ac.apply())


def is_plain_json(value) -> bool:
    """True for values made only of dict (str keys), list, str, int, float (finite), bool and None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_plain_json(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


# ---------------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------------

def test_chain_flattens_nested_chains():
    adam, eps, wd, apply = ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.1), ac.apply()
    nested = ac.chain(ac.chain(ac.chain(adam), eps), ac.chain(wd), apply)
    assert nested.transforms == (adam, eps, wd, apply)
    assert nested == ac.chain(adam, eps, wd, apply)
    assert len(nested) == 4
    assert list(nested) == [adam, eps, wd, apply]


def test_names_and_lookup_by_name():
    c = adamw_chain()
    assert c.names == ("adam", "eps_divide", "weight_decay", "apply")
    assert c["eps_divide"] == ac.eps_divide(1e-8)
    assert "adam" in c and "lion" not in c


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match=r"chain\(\) takes transforms or chains, got str"):
        ac.chain(ac.momentum(), "apply")


def test_partial_chains_are_building_blocks_and_compose():
    # a partial chain (no terminal) skips the signal rules: adam's denom is consumed later
    adam_only = ac.chain(ac.scale_by_adam())
    assert not adam_only.is_complete
    eps_only = ac.chain(ac.eps_divide())  # reads a denom nobody published yet: fine while partial
    assert not eps_only.is_complete

    direction = ac.chain(ac.scale_by_adam(), ac.eps_divide())
    full = ac.chain(direction, ac.apply())
    assert full.is_complete
    assert full == ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.apply())
    assert ac.chain(adam_only, eps_only, ac.apply()) == full


# ---------------------------------------------------------------------------------------------------
# repr
# ---------------------------------------------------------------------------------------------------

def test_repr_one_line_per_transform_only_non_default_args_and_named():
    c = ac.chain(
        ac.scale_by_adam(betas=(0.9, 0.95)),     # betas differs from the default (0.9, 0.999)
        ac.eps_divide(1e-8),                     # default eps: not shown
        ac.weight_decay(0.01),                   # default weight_decay: not shown
        ac.named("wd2", ac.weight_decay(0.1)),   # renamed and non-default
        ac.apply(),
    )
    expected = (
        "chain(\n"
        "    scale_by_adam(betas=(0.9, 0.95)),\n"
        "    eps_divide(),\n"
        "    weight_decay(),\n"
        "    named('wd2', weight_decay(weight_decay=0.1)),\n"
        "    apply(),\n"
        ")"
    )
    assert repr(c) == expected
    assert len(repr(c).splitlines()) == len(c) + 2
    assert repr(ac.chain()) == "chain()"


def test_repr_evaluates_back_to_an_equal_chain():
    c = ac.chain(ac.clip_by_global_norm(0.5), ac.scale_by_adam(betas=(0.8, 0.9), amsgrad=True),
                 ac.eps_divide(1e-6), ac.named("wd2", ac.weight_decay(0.1)), ac.stochastic_round_apply(seed=4))
    namespace = {"chain": ac.chain, "named": ac.named, "clip_by_global_norm": ac.clip_by_global_norm,
                 "scale_by_adam": ac.scale_by_adam, "eps_divide": ac.eps_divide,
                 "weight_decay": ac.weight_decay, "stochastic_round_apply": ac.stochastic_round_apply}
    assert eval(repr(c), namespace) == c


# ---------------------------------------------------------------------------------------------------
# equality and hashing
# ---------------------------------------------------------------------------------------------------

def test_equal_chains_are_equal_and_hash_equal():
    a, b = adamw_chain(), adamw_chain()
    assert a is not b
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: "x"}[b] == "x"


@pytest.mark.parametrize("other", [
    ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-6), ac.weight_decay(0.01), ac.apply()),      # one arg
    ac.chain(ac.scale_by_adam(), ac.weight_decay(0.01), ac.eps_divide(1e-8), ac.apply()),      # order
    ac.chain(ac.named("adam2", ac.scale_by_adam()), ac.eps_divide(1e-8), ac.weight_decay(0.01),
             ac.apply()),                                                                          # a name
    ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01), ac.kahan_apply()),  # type
    ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.apply()),                              # length
], ids=["arg", "order", "name", "type", "length"])
def test_chains_differing_in_anything_are_unequal(other):
    assert adamw_chain() != other


def test_chain_is_not_equal_to_its_tuple_of_transforms():
    c = adamw_chain()
    assert c != c.transforms


@pytest.mark.parametrize("a, b", [
    (ac.scale_by_adam(betas=[0.9, 0.999]), ac.scale_by_adam()),   # list normalized to the tuple default
    (ac.eps_divide(1), ac.eps_divide(1.0)),                       # int normalized to float
    (ac.add_l2(-0.0), ac.add_l2(0.0)),                            # -0.0 == 0.0 in Python
], ids=["list-vs-tuple", "int-vs-float", "negative-zero"])
def test_equal_transforms_have_equal_hashes(a, b):
    # the data model requires a == b  =>  hash(a) == hash(b), for transforms and for chains
    assert a == b
    assert hash(a) == hash(b)
    assert hash(ac.chain(a)) == hash(ac.chain(b))


# ---------------------------------------------------------------------------------------------------
# editing: every edit returns a new chain and leaves the original untouched
# ---------------------------------------------------------------------------------------------------

def test_replace_returns_new_chain_and_leaves_original():
    base = adamw_chain()
    new = base.replace("eps_divide", ac.eps_divide(1e-6))
    assert new.names == base.names
    assert new["eps_divide"].args["eps"] == 1e-6
    assert base["eps_divide"].args["eps"] == 1e-8
    assert base == adamw_chain()


def test_replace_with_a_chain_splices_it_in():
    base = adamw_chain()
    new = base.replace("apply", ac.chain(ac.clip_by_value(0.5), ac.kahan_apply()))
    assert new.names == ("adam", "eps_divide", "weight_decay", "clip_by_value", "apply")
    assert isinstance(new["apply"], type(ac.kahan_apply()))
    assert base == adamw_chain()


def test_without_returns_new_chain_and_leaves_original():
    base = adamw_chain()
    new = base.without("weight_decay")
    assert new.names == ("adam", "eps_divide", "apply")
    assert base.names == ("adam", "eps_divide", "weight_decay", "apply")
    # removing the terminal leaves a valid partial chain
    assert not base.without("apply").is_complete


def test_insert_before_and_after_return_new_chains_and_leave_original():
    base = adamw_chain()
    before = base.insert_before("adam", ac.clip_by_global_norm(1.0))
    after = base.insert_after("eps_divide", ac.clip_by_value(1.0))
    assert before.names == ("clip_by_global_norm", "adam", "eps_divide", "weight_decay", "apply")
    assert after.names == ("adam", "eps_divide", "clip_by_value", "weight_decay", "apply")
    assert base == adamw_chain()
    assert base.names == ("adam", "eps_divide", "weight_decay", "apply")


def test_edits_are_validated():
    base = adamw_chain()
    with pytest.raises(ValueError, match=r"scale_by_adam \('adam'\) publishes 'denom' but no later transform"):
        base.without("eps_divide")
    with pytest.raises(ValueError, match=r"gradient-stage transform add_l2 \('add_l2'\) comes after"):
        base.insert_after("adam", ac.add_l2(1e-4))
    with pytest.raises(ValueError, match=r"two transforms are named 'adam'"):
        base.insert_before("apply", ac.scale_by_adam())


@pytest.mark.parametrize("edit", [
    lambda c: c["nope"],
    lambda c: c.replace("nope", ac.eps_divide()),
    lambda c: c.without("nope"),
    lambda c: c.insert_before("nope", ac.clip_by_global_norm()),
    lambda c: c.insert_after("nope", ac.clip_by_value()),
], ids=["getitem", "replace", "without", "insert_before", "insert_after"])
def test_unknown_name_raises_keyerror_listing_known_names(edit):
    with pytest.raises(KeyError, match=re.escape(
            "no transform named 'nope' in the chain; names are ['adam', 'eps_divide', 'weight_decay', 'apply']")):
        edit(adamw_chain())


# ---------------------------------------------------------------------------------------------------
# immutability
# ---------------------------------------------------------------------------------------------------

def test_transform_is_immutable():
    t = ac.eps_divide(1e-8)
    with pytest.raises(AttributeError, match="immutable"):
        t.name = "other"
    with pytest.raises(AttributeError, match="immutable"):
        t.args = {"eps": 1.0}
    with pytest.raises(AttributeError, match="immutable"):
        t.eps = 1.0
    assert t == ac.eps_divide(1e-8)


def test_transform_args_cannot_be_mutated_in_place():
    # `args` is part of the value (it defines == and hash); mutating it in place would change a
    # transform that is already in a chain, a set, or a running optimizer.
    t = ac.eps_divide(1e-8)
    h = hash(t)
    with pytest.raises(TypeError):
        t.args["eps"] = 5.0
    assert t.args["eps"] == 1e-8 and hash(t) == h


def test_chain_is_immutable():
    c = adamw_chain()
    with pytest.raises(AttributeError, match="immutable"):
        c._transforms = ()
    with pytest.raises(AttributeError, match="immutable"):
        c.extra = 1
    assert isinstance(c.transforms, tuple)
    assert c == adamw_chain()


# ---------------------------------------------------------------------------------------------------
# named copies
# ---------------------------------------------------------------------------------------------------

def test_named_lets_a_second_copy_coexist():
    original = ac.momentum(0.5)
    second = ac.named("momentum2", original)
    assert original.name == "momentum" and second.name == "momentum2"
    assert second.args == original.args
    c = ac.chain(ac.momentum(0.9), second, ac.apply())
    assert c.names == ("momentum", "momentum2", "apply")

    # each copy owns its own state namespace in the optimizer
    p = torch.nn.Parameter(torch.ones(3))
    opt = ac.ChainOptimizer([p], c, lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert {"momentum/momentum_buffer", "momentum2/momentum_buffer"} <= set(opt.state[p])


def test_named_requires_a_transform():
    with pytest.raises(TypeError, match="named\\(\\) takes a transform, got Chain"):
        ac.named("x", adamw_chain())


# ---------------------------------------------------------------------------------------------------
# config round trip
# ---------------------------------------------------------------------------------------------------

def test_to_config_is_plain_json():
    c = ac.chain(ac.clip_by_value(float("inf")), ac.scale_by_adam(betas=(0.8, 0.95)), ac.eps_divide(),
                 ac.named("wd2", ac.weight_decay(0.1, max_lr=1e-3)), ac.stochastic_round_apply(seed=5))
    cfg = c.to_config()
    assert is_plain_json(cfg)
    text = json.dumps(cfg, allow_nan=False)       # no Infinity/NaN tokens: strict JSON
    assert json.loads(text) == cfg                # no tuples or other non-JSON types hiding inside
    assert c.to_json() == text


def test_config_round_trip_dict_and_json_string():
    c = ac.chain(ac.clip_by_global_norm(0.5), ac.scale_by_adam(betas=(0.8, 0.95), amsgrad=True),
                 ac.eps_divide(1e-6), ac.weight_decay(0.01), ac.named("wd2", ac.weight_decay(0.1)),
                 ac.kahan_apply())
    from_dict = ac.chain_from_config(c.to_config())
    from_json = ac.chain_from_config(json.dumps(c.to_config()))
    assert from_dict == c and from_json == c
    assert hash(from_json) == hash(c)
    assert repr(from_json) == repr(c)
    assert from_json.names == c.names


def test_config_round_trip_keeps_inf_and_tuples():
    c = ac.chain(ac.clip_by_value(float("inf")), ac.scale_by_adam(betas=(0.9, 0.95)), ac.eps_divide(),
                 ac.apply())
    back = ac.chain_from_config(json.dumps(c.to_config()))
    assert back == c
    max_abs = back["clip_by_value"].args["max_abs"]
    assert isinstance(max_abs, float) and max_abs == float("inf")
    betas = back["adam"].args["betas"]
    assert isinstance(betas, tuple) and betas == (0.9, 0.95)


@pytest.mark.parametrize("name", ac.presets.names())
def test_every_preset_round_trips(name):
    c = ac.presets.get(name)
    assert ac.chain_from_config(c.to_json()) == c


def test_chain_from_config_rejects_foreign_configs():
    with pytest.raises(ValueError, match="not an adv_chain chain config"):
        ac.chain_from_config({"format": "something/else", "transforms": []})
    cfg = adamw_chain().to_config()
    cfg["transforms"][0]["type"] = "scale_by_adamz"
    with pytest.raises(ValueError, match=r"unknown transform type 'scale_by_adamz'; known: .*'scale_by_adam'"):
        ac.chain_from_config(cfg)


# ---------------------------------------------------------------------------------------------------
# build-time validation: ValueError naming the transforms involved and the fix
# ---------------------------------------------------------------------------------------------------

def test_duplicate_names():
    with pytest.raises(ValueError, match=re.escape(
            "two transforms are named 'momentum': momentum ('momentum') and momentum ('momentum'); "
            "give the second its own name with ac.named('momentum2', ...)")):
        ac.chain(ac.momentum(0.9), ac.momentum(0.5), ac.apply())


def test_duplicate_names_across_nested_chains():
    with pytest.raises(ValueError, match="two transforms are named 'adam'"):
        ac.chain(ac.chain(ac.scale_by_adam(), ac.eps_divide()), ac.chain(ac.scale_by_adam()))


def test_terminal_not_last():
    with pytest.raises(ValueError, match=re.escape(
            "terminal apply ('apply') must be the last transform, but momentum ('momentum') follows it")):
        ac.chain(ac.apply(), ac.momentum(0.9))


def test_two_terminals_renamed():
    with pytest.raises(ValueError, match=r"terminal apply \('apply'\) must be the last transform, but "
                                         r"stochastic_round_apply \('sr'\) follows it; a chain has exactly one terminal"):
        ac.chain(ac.momentum(0.9), ac.apply(), ac.named("sr", ac.stochastic_round_apply()))


def test_two_terminals_default_names_explain_the_real_problem():
    # Every terminal's default name is 'apply'. The error must say what is wrong (two terminals) and
    # the fix (keep one), not suggest renaming the second (which only leads to another error).
    with pytest.raises(ValueError) as info:
        ac.chain(ac.momentum(0.9), ac.apply(), ac.kahan_apply())
    message = str(info.value)
    assert "apply" in message and "kahan_apply" in message
    assert "one terminal" in message


@pytest.mark.parametrize("late", [ac.add_l2(1e-4), ac.clip_by_global_norm(1.0), ac.negate()],
                         ids=lambda t: t.type_name)
def test_gradient_stage_after_moment(late):
    with pytest.raises(ValueError, match=(
            rf"gradient-stage transform {late.type_name} \('{late.name}'\) comes after scale_by_adam \('adam'\) "
            r"\(stage 'moment'\).*must come first: move it to the front")):
        ac.chain(ac.scale_by_adam(), late)  # already a build-time error in a partial chain
    with pytest.raises(ValueError, match=f"gradient-stage transform {late.type_name}"):
        ac.chain(ac.scale_by_adam(), ac.eps_divide(), late, ac.apply())


def test_gradient_stage_after_position_free_clip_by_value_is_allowed():
    # clip_by_value has stage "any" ("position-free: before the moments it clips gradients"), so it
    # must not end the gradient stage: clipping values, then the norm, then L2 is a valid gradient stage.
    c = ac.chain(ac.clip_by_value(1.0), ac.clip_by_global_norm(1.0), ac.add_l2(1e-4), ac.momentum(0.9), ac.apply())
    assert c.names == ("clip_by_value", "clip_by_global_norm", "add_l2", "momentum", "apply")


def test_eps_divide_without_a_denom_publisher():
    with pytest.raises(ValueError, match=re.escape(
            "eps_divide ('eps_divide') reads signal 'denom' but no earlier transform publishes it; put a transform "
            "that publishes it (e.g. ac.scale_by_adam() for 'denom') before 'eps_divide'")):
        ac.chain(ac.momentum(0.9), ac.eps_divide(), ac.apply())
    with pytest.raises(ValueError, match="eps_divide .* reads signal 'denom' but no earlier transform publishes it"):
        ac.chain(ac.eps_divide(), ac.scale_by_adam(), ac.apply())  # publisher after the consumer


def test_adam_denom_without_consumer():
    with pytest.raises(ValueError, match=re.escape(
            "scale_by_adam ('adam') publishes 'denom' but no later transform consumes it; add a consumer after it "
            "(ac.eps_divide(1e-8)")):
        ac.chain(ac.scale_by_adam(), ac.apply())


def test_suggested_fixes_exist():
    # every `ac.<name>(` a validation message recommends must be a real adv_chain function
    bad_chains = [
        lambda: ac.chain(ac.scale_by_adam(), ac.apply()),
        lambda: ac.chain(ac.eps_divide(), ac.apply()),
        lambda: ac.chain(ac.momentum(), ac.momentum(), ac.apply()),
    ]
    for build in bad_chains:
        with pytest.raises(ValueError) as info:
            build()
        for fn in re.findall(r"ac\.(\w+)\(", str(info.value)):
            assert hasattr(ac, fn), f"message suggests ac.{fn}(), which does not exist: {info.value}"


def test_chain_optimizer_requires_a_terminal():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=re.escape(
            "ChainOptimizer: the chain has no terminal; end it with ac.apply(), ac.stochastic_round_apply() "
            "or ac.kahan_apply()")):
        ac.ChainOptimizer([p], ac.chain(ac.scale_by_adam(), ac.eps_divide()))
    with pytest.raises(ValueError, match="the chain has no terminal"):
        ac.ChainOptimizer([p], ac.chain())


def test_with_args_changes_one_argument_and_checks_names():
    t = ac.scale_by_adam(betas=(0.9, 0.95))
    assert t.with_args(amsgrad=True) == ac.scale_by_adam(betas=(0.9, 0.95), amsgrad=True)
    assert ac.named("adam2", t).with_args(amsgrad=True).name == "adam2"
    with pytest.raises(TypeError, match="no argument"):
        t.with_args(beta=0.5)


def test_init_state_allocates_every_key_up_front():
    model = torch.nn.Linear(3, 2)
    opt = ac.ChainOptimizer(model.parameters(), "adamw")
    opt.init_state()
    assert set(opt.state[model.weight]) == {"step", "adam/exp_avg", "adam/exp_avg_sq"}
    assert float(opt.state[model.weight]["step"]) == 0


def test_a_decay_term_before_a_whole_tensor_reduction_is_a_build_error():
    """A decay term lives in its segment: a layer-scope transform after it would drop the decay
    silently (it did before this check: weight_decay then cautious trained as if weight_decay=0)."""
    import pytest
    with pytest.raises(ValueError, match="weight_decay .* writes a decay term, but cautious .* decay terms do not "
                                         "cross it; move 'cautious' before 'weight_decay'"):
        ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.1), ac.cautious(), ac.apply())
    ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.cautious(), ac.weight_decay(0.1), ac.apply())


def test_cautious_whole_tensors_gives_the_layer_scope_numbers():
    import pytest
    import torch
    runs = []
    for whole in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
        chain = ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.cautious(rescale="mean", whole_tensors=whole),
                         ac.weight_decay(0.1), ac.apply())
        opt = ac.ChainOptimizer(ps, chain, lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="whole_tensors=True is for a rescale"):
        ac.cautious(rescale="none", whole_tensors=True)
