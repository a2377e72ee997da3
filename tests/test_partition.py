"""ac.partition (adv_chain/transforms/partition.py): routing rules, errors, state and checkpoints, group
overrides inside routes, config round trip, per-tensor reductions inside a route, compile == eager.
The oracle of a partitioned run is each route's chain run alone on its own parameters."""
import copy
import json

import pytest
import torch

import adv_chain as ac


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _muon():
    return ac.chain(ac.muon_momentum(), ac.newton_schulz(dtype="float32"), ac.muon_scale(), ac.weight_decay(0.1))


def _adam():
    return ac.chain(ac.scale_by_adam(), ac.eps_divide(1e-8), ac.named("adam_wd", ac.weight_decay(0.01)))


def _part(**kw):
    kw.setdefault("rules", [{"min_ndim": 2, "route": "muon"}])
    kw.setdefault("default", "adam")
    kw.setdefault("group_keys", {"adam": "adam_"})  # the routes' weight decays differ
    return ac.partition({"muon": _muon(), "adam": _adam()}, **kw)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.hidden = torch.nn.Linear(8, 12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(x)))).mean(1)


def _net():
    torch.manual_seed(0)
    return Net()


_X = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(1))
_Y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))


def _train(model, opt, steps=5):
    for _ in range(steps):
        opt.zero_grad()
        (model(_X) - _Y).square().mean().backward()
        opt.step()


def _routes(opt, model):
    return {n: ("muon" if "muon_momentum/momentum_buffer" in opt.state[p] else "adam")
            for n, p in model.named_parameters()}


# -- the oracle: each route alone ---------------------------------------------------------------------

def test_partitioned_run_equals_each_route_alone():
    """With fixed gradients (no coupling through the loss), the partitioned optimizer equals the Muon
    chain on the matrices and the Adam chain on the vectors, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 8), (8,), (4, 6), (3,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]

    def run(indices, chain):
        params = [torch.nn.Parameter(start[i].clone()) for i in indices]
        opt = ac.ChainOptimizer(params, chain, lr=0.02)
        for step in grads:
            for p, i in zip(params, indices):
                p.grad = step[i].clone()
            opt.step()
        return params, opt

    together, opt = run([0, 1, 2, 3], ac.chain(_part(), ac.apply()))
    muon, _ = run([0, 2], ac.chain(_muon(), ac.apply()))
    adam, _ = run([1, 3], ac.chain(_adam(), ac.apply()))
    for a, b in zip([together[0], together[2], together[1], together[3]], muon + adam):
        assert torch.equal(a, b)
    assert set(opt.state[together[0]]) == {"step", "muon_momentum/momentum_buffer"}
    assert set(opt.state[together[1]]) == {"step", "adam/exp_avg", "adam/exp_avg_sq"}


# -- rules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rules,default,expected", [
    ([{"ndim": 2, "route": "muon"}], "adam", ("muon", "muon", "adam", "muon", "adam")),
    ([{"name": "embed|head", "route": "adam"}, {"min_ndim": 2, "route": "muon"}], "adam",
     ("adam", "muon", "adam", "adam", "adam")),
    ([{"shape": [12, 8], "route": "muon"}], "adam", ("adam", "muon", "adam", "adam", "adam")),
    ([{"matrix": True, "route": "muon"}], "adam", ("muon", "muon", "adam", "adam", "adam")),
    ([{"max_ndim": 1, "route": "adam"}], "muon", ("muon", "muon", "adam", "muon", "adam")),
    ([{"min_ndim": 2, "name": r"^hidden\.", "route": "muon"}], "adam", ("adam", "muon", "adam", "adam", "adam")),
])
def test_rules_route_each_parameter_once(rules, default, expected):
    model = _net()
    opt = ac.ChainOptimizer(model.named_parameters(), ac.chain(_part(rules=rules, default=default), ac.apply()),
                            lr=0.01)
    _train(model, opt, 2)
    assert tuple(_routes(opt, model).values()) == expected


def test_group_and_tag_rules():
    model = _net()
    rules = [{"group": "optim", "value": "muon", "route": "muon"}, {"tag": "vector", "route": "adam"},
             {"group": "force_muon", "route": "muon"}]
    model.head.weight.is_vector = True  # an adv_optm tag attribute
    groups = [{"params": [model.embed.weight], "optim": "muon"},
              {"params": [model.head.weight, model.hidden.weight], "force_muon": True},
              {"params": [model.hidden.bias, model.head.bias]}]
    opt = ac.ChainOptimizer(groups, ac.chain(_part(rules=rules), ac.apply()), lr=0.01)
    _train(model, opt, 1)
    assert _routes(opt, model) == {"embed.weight": "muon", "hidden.weight": "muon", "hidden.bias": "adam",
                                   "head.weight": "adam", "head.bias": "adam"}


def test_unmatched_parameter_is_an_error_naming_it_and_nothing_moves():
    model = _net()
    before = copy.deepcopy(model)
    opt = ac.ChainOptimizer(model.named_parameters(), ac.chain(_part(default=None), ac.apply()), lr=0.01)
    with pytest.raises(ValueError, match=r"parameter 'hidden.bias' .*matches no rule.*no default route"):
        _train(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    assert all(len(opt.state[p]) == 0 for p in model.parameters())
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(_part(default=None), ac.apply()), lr=0.01)
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \(12,\).*named_parameters"):
        _train(model, opt, 1)


def test_name_rule_without_names_is_a_clear_error_unless_skipped():
    model = _net()
    part = _part(rules=[{"name": "embed", "route": "adam"}])
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(part, ac.apply()), lr=0.01)
    with pytest.raises(ValueError, match=r"routes by name.*the optimizer got no names.*named_parameters"):
        _train(model, opt, 1)
    part = _part(rules=[{"name": "embed", "missing_name": "skip", "route": "adam"}, {"min_ndim": 2, "route": "muon"}])
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(part, ac.apply()), lr=0.01)
    _train(model, opt, 1)
    assert _routes(opt, model)["embed.weight"] == "muon"


@pytest.mark.parametrize("make,words", [
    (lambda: ac.partition({}), ["routes={}", "non-empty"]),
    (lambda: ac.partition({"Muon": _muon()}), ["route name 'Muon'"]),
    (lambda: _part(rules=[{"min_ndim": 2, "route": "sgd"}]), ["route='sgd'", "['muon', 'adam']"]),
    (lambda: _part(rules=[{"dims": 2, "route": "muon"}]), ["unknown key(s) ['dims']"]),
    (lambda: _part(rules=[{"name": "(", "route": "adam"}]), ["not a valid regular expression"]),
    (lambda: _part(rules=[{"tag": "lora", "route": "adam"}]), ["tag='lora'", "lora_A"]),
    (lambda: _part(rules=[{"matrix": {"size": 2}, "route": "adam"}]), ["matrix="]),
    (lambda: _part(default="sgd"), ["default='sgd'"]),
    (lambda: _part(group_keys={"sgd": "x_"}), ["unknown route(s) ['sgd']"]),
    (lambda: ac.partition({"a": [ac.scale_by_adam()], "b": [ac.scale_by_adam()]}),
     ["two transforms are named 'adam'", "ac.named"]),
    (lambda: ac.partition({"a": ac.chain(ac.scale_by_adam(), ac.eps_divide()), "b": [ac.apply()]}),
     ["terminal apply", "after the partition"]),
    (lambda: ac.partition({"a": [ac.clip_by_global_norm(1.0)], "b": []}), ["clip_by_global_norm", "global scope"]),
    (lambda: ac.partition({"a": [ac.kourkoutas_beta(layer_key="shape"), ac.scale_by_adam(), ac.eps_divide()],
                           "b": []}), ["kourkoutas_beta", "layer scope"]),
    (lambda: ac.partition({"a": [ac.scale_by_adam(), ac.orthograd()]}), ["route 'a'", "gradient-stage"]),
    (lambda: ac.partition({"a": [ac.scale_by_adam()], "b": [ac.momentum()]}), ["leave different signals", "denom"]),
    (lambda: ac.chain(ac.scale_by_adam(), ac.eps_divide(), _part(), ac.apply()), ["two transforms are named 'adam'"]),
    (lambda: _part(group_keys=None), ["routes 'muon' (weight_decay.weight_decay=0.1) and 'adam' "
                                      "(adam_wd.weight_decay=0.01)", "'weight_decay'", "group_keys={'adam': 'adam_'}"]),
    (lambda: ac.chain(ac.momentum(), ac.partition({"a": [ac.orthograd()]}), ac.apply()),
     ["gradient-stage transform partition"]),
])
def test_build_errors_name_the_problem(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# -- state, checkpoints, overrides, config ----------------------------------------------------------------

def test_state_dict_round_trip_continues_bit_identically():
    a = _net()
    opt_a = ac.ChainOptimizer(a.named_parameters(), ac.chain(_part(), ac.apply()), lr=0.01)
    _train(a, opt_a, 3)
    b = _net()
    b.load_state_dict(a.state_dict())
    opt_b = ac.ChainOptimizer(b.named_parameters(), ac.chain(_part(), ac.apply()), lr=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # a checkpoint of another routing is a different chain's
    other = ac.ChainOptimizer(_net().named_parameters(), ac.chain(_part(rules=[]), ac.apply()), lr=0.01)
    with pytest.raises(ValueError, match="different chain"):
        other.load_state_dict(opt_a.state_dict())


def test_group_overrides_reach_transforms_inside_routes():
    model = _net()
    groups = [{"params": [model.hidden.weight], "muon_momentum.beta": 0.5, "weight_decay": 0.3},
              {"params": [p for n, p in model.named_parameters() if n != "hidden.weight"], "adam.betas": (0.5, 0.6)}]
    opt = ac.ChainOptimizer(groups, ac.chain(_part(), ac.apply()), lr=0.01)
    hp0, hp1 = opt._resolve_all(opt.param_groups[0], 0), opt._resolve_all(opt.param_groups[1], 1)
    assert hp0["muon_momentum"]["beta"] == 0.5 and hp0["weight_decay"]["weight_decay"] == 0.3
    assert hp1["adam"]["betas"] == (0.5, 0.6) and hp1["adam_wd"]["weight_decay"] == 0.01
    assert opt.param_groups[1]["adam_weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.1
    # ... and change the step: muon_momentum.beta = 0 is a plain orthogonalized gradient
    p = torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    ac.ChainOptimizer([{"params": [p], "muon_momentum.beta": 0.0}], ac.chain(_part(), ac.apply()), lr=0.01)
    o1 = ac.ChainOptimizer([{"params": [p], "muon_momentum.beta": 0.0}], ac.chain(_part(), ac.apply()), lr=0.01)
    o2 = ac.ChainOptimizer([q], ac.chain(ac.muon_momentum(0.0), ac.newton_schulz(dtype="float32"), ac.muon_scale(),
                                         ac.weight_decay(0.1), ac.apply()), lr=0.01)
    for opt, x in ((o1, p), (o2, q)):
        x.grad = g.clone()
        opt.step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'newton_schulz.beta'"):
        ac.ChainOptimizer([{"params": [p], "newton_schulz.beta": 0.1}], ac.chain(_part(), ac.apply()))


def test_group_keys_remap_plain_keys_per_route():
    part = _part(group_keys={"adam": "adam_", "muon": {"weight_decay": None}})
    model = _net()
    opt = ac.ChainOptimizer(model.parameters(), ac.chain(part, ac.apply()), lr=0.01)
    g = opt.param_groups[0]
    assert g["adam_weight_decay"] == 0.01 and g["adam_betas"] == (0.9, 0.999) and "weight_decay" not in g
    g["adam_weight_decay"] = 0.5
    g["weight_decay"] = 0.7  # read by no transform now
    hps = opt._resolve_all(g, 0)
    assert hps["adam_wd"]["weight_decay"] == 0.5 and hps["weight_decay"]["weight_decay"] == 0.1


def test_config_repr_and_equality_round_trip():
    part = _part(rules=[{"name": "embed", "missing_name": "skip", "route": "adam"}, {"matrix": True, "route": "muon"},
                        {"group": "g", "value": [1, 2], "route": "adam"}],
                 group_keys={"adam": "adam_"})
    c = ac.chain(ac.clip_by_global_norm(1.0), part, ac.apply())
    assert ac.chain_from_config(json.loads(c.to_json())) == c
    assert ac.chain_from_config(c.to_json()) == c and hash(ac.chain_from_config(c.to_json())) == hash(c)
    assert "\n" not in repr(part) and repr(ac.chain_from_config(c.to_json())) == repr(c)
    assert part != _part() and part.with_args(default="muon") != part
    renamed = ac.named("route", part)
    assert repr(renamed).startswith("named('route', partition(") and ac.chain_from_config(
        ac.chain(renamed, ac.apply()).to_config()) == ac.chain(renamed, ac.apply())
    assert c.names == ("clip_by_global_norm", "partition", "apply")
    assert [t.name for t in c.all_transforms] == ["clip_by_global_norm", "partition", "muon_momentum", "newton_schulz",
                                                 "muon_scale", "weight_decay", "adam", "eps_divide", "adam_wd", "apply"]


def test_stages_of_a_partition():
    part = ac.partition({"a": [ac.orthograd(), ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.1)],
                         "b": [ac.momentum()]}, default="b")
    assert (part.stage, part.exit_stage, part.scope) == ("gradient", "decay", "tensor")
    ac.chain(ac.clip_by_global_norm(1.0), part, ac.apply())  # a global transform before it: fine
    only_moments = ac.partition({"a": [ac.scale_by_adam(), ac.eps_divide()], "b": [ac.momentum()]})
    assert (only_moments.stage, only_moments.scope) == ("moment", "elementwise")


# -- per-tensor reductions inside a route, and global ones around the partition ---------------------------------

def test_per_tensor_reductions_run_inside_a_route_exactly():
    """orthograd and kourkoutas_beta(layer_key='tensor') inside a route equal the route alone."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(5,), (6, 4), (3,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    route = lambda: ac.chain(ac.orthograd(), ac.kourkoutas_beta(layer_key="tensor", lag=True),  # noqa: E731
                             ac.scale_by_adam(), ac.eps_divide(), ac.cautious(rescale="mean"))
    part = ac.partition({"adam": route(), "muon": _muon()}, rules=[{"min_ndim": 2, "route": "muon"}],
                        default="adam")
    together = [torch.nn.Parameter(x.clone()) for x in start]
    alone = [torch.nn.Parameter(start[i].clone()) for i in (0, 2)]
    o1 = ac.ChainOptimizer(together, ac.chain(ac.clip_by_global_norm(5.0), part, ac.apply()), lr=0.01)
    o2 = ac.ChainOptimizer(alone, ac.chain(route(), ac.apply()), lr=0.01)
    for step in grads:
        # the global clip before the partition sees every tensor: give the lone run the clipped grads
        total = torch.sqrt(sum(g.square().sum() for g in step))
        clip = min(1.0, 5.0 / (total.item() + 1e-6))
        for p, g in zip(together, step):
            p.grad = g.clone()
        for p, i in zip(alone, (0, 2)):
            p.grad = step[i] * clip
        o1.step()
        o2.step()
    for i, j in ((0, 0), (2, 1)):
        torch.testing.assert_close(together[i], alone[j], atol=1e-7, rtol=0)
    assert "kourkoutas/r_ema" in o1.state[together[0]] and "kourkoutas/r_ema" not in o1.state[together[1]]


@pytest.mark.parametrize("chain", [
    lambda: ac.chain(_part(), ac.apply()),
    lambda: ac.chain(ac.partition({"muon": _muon(), "adam": ac.chain(ac.orthograd(), *_adam())},
                                  rules=[{"min_ndim": 2, "route": "muon"}], default="adam",
                                  group_keys={"adam": "adam_"}), ac.apply()),
], ids=["plain", "with_orthograd"])
def test_compiled_equals_eager(chain):
    torch._dynamo.reset()
    eager, compiled = _net(), _net()
    _train(eager, ac.ChainOptimizer(eager.named_parameters(), chain(), lr=0.01), 6)
    _train(compiled, ac.ChainOptimizer(compiled.named_parameters(), chain(), lr=0.01, compile=True), 6)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_gradient_release_equals_step():
    a, b = _net(), _net()
    oa = ac.ChainOptimizer(a.named_parameters(), ac.chain(_part(), ac.apply()), lr=0.01)
    ob = ac.ChainOptimizer(b.named_parameters(), ac.chain(_part(), ac.apply()), lr=0.01)
    ac.enable_gradient_release(ob, list(b.parameters()))
    for _ in range(3):
        oa.zero_grad()
        (a(_X) - _Y).square().mean().backward()
        oa.step()
        (b(_X) - _Y).square().mean().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)
    ac.disable_gradient_release(ob)
