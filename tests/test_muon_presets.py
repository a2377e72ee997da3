"""Presets muon_adv / adamuon_adv and the drop-ins Muon_adv / AdaMuon_adv (adv_chain/presets/muon.py):
routing as adv-optm 2.5.16 decides it, parity with adv-optm on a model with an embedding, 1-D
parameters and a thin head (so the auxiliary Adam is used), and the auxiliary-Adam bug fixes B4/B5
against oracles with the fix (adv-optm's own AdamW_adv, whose Kourkoutas-beta and Fisher decay work)."""
import math

import adv_optm
import pytest
import torch

import adv_chain as ac
from adv_chain.transforms.partition import suitable_for_muon


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(torch.nn.Module):
    """Embedding (20 x 16: the reference's shape test sends it to Muon), two hidden Linear layers with
    biases, a LayerNorm and a thin head (16 -> 3: to Adam)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.l1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.l2 = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l2(torch.tanh(self.norm(self.l1(self.embed(x))))))
        return self.head(h).mean(1)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


_GEN = torch.Generator().manual_seed(1)
_X = torch.randint(0, 20, (16, 6), generator=_GEN)
_Y = torch.randn(16, 3, generator=_GEN)

# adv-optm state key -> ours
STATE_MAP = {"momentum_buffer": "muon_momentum/momentum_buffer", "exp_avg": "adam/exp_avg",
             "exp_avg_sq": "adam/exp_avg_sq", "second_momentum_buffer": "adamuon/exp_avg_sq",
             "last_grad": "approx_mars/last_grad", "normuon_v": "normuon/v"}
MUON_KEYS = ("momentum_buffer", "second_momentum_buffer", "last_grad", "normuon_v")


def _loss(model: torch.nn.Module) -> torch.Tensor:
    return (model(_X) - _Y).square().mean()


def _lockstep(ref_opts, ref_model, ours, our_model, steps=20):
    """Step-by-step protocol (tests/test_muon.py): before each step our parameters, gradients and Muon
    state are set to the reference's, so every step is compared from identical inputs (bf16
    Newton-Schulz would otherwise amplify 1-ulp differences into drift). The auxiliary Adam's
    state is never copied: it evolves on its own from the same gradients. Returns the largest
    parameter difference after any step."""
    worst = 0.0
    for _ in range(steps):
        ref_model.zero_grad()
        _loss(ref_model).backward()
        with torch.no_grad():
            for p, q in zip(ref_model.parameters(), our_model.parameters()):
                q.copy_(p)
                q.grad = p.grad.clone()
                st = next((o.state[p] for o in ref_opts if p in o.state), {})
                for k in MUON_KEYS:
                    if k in st and STATE_MAP[k] in ours.state.get(q, {}):
                        ours.state[q][STATE_MAP[k]].copy_(st[k])
        for o in ref_opts:
            o.step()
        ours.step()
        worst = max(worst, max((p - q).abs().max().item()
                               for p, q in zip(ref_model.parameters(), our_model.parameters())))
    return worst


def _aux_state_diff(ref_opts, ref_model, ours, our_model):
    diff = 0.0
    for p, q in zip(ref_model.parameters(), our_model.parameters()):
        st = next((o.state[p] for o in ref_opts if p in o.state), {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st and "muon_momentum/momentum_buffer" not in ours.state[q]:
                diff = max(diff, (st[k] - ours.state[q][STATE_MAP[k]]).abs().max().item())
    return diff


# -- routing ------------------------------------------------------------------------------------------

def test_routing_follows_the_reference_shape_test():
    model = _net()
    ref = adv_optm.Muon_adv(model.parameters(), lr=1e-3)
    ours = ac.optim.Muon_adv(_net().parameters(), lr=1e-3)
    ours.init_state()
    ref_routes = [ref.state[p]["is_muon"] for p in model.parameters()]
    our_routes = ["muon_momentum/momentum_buffer" in ours.state[q] for q in ours.param_groups[0]["params"]]
    assert our_routes == ref_routes == [True, True, False, False, False, True, False, False, False]
    assert [suitable_for_muon(p) for p in model.parameters()] == ref_routes


@pytest.mark.parametrize("shape", [(4, 4), (3, 8), (8, 1, 3), (1, 8, 8), (600, 4), (512, 4), (2, 3, 4, 4), (7,),
                                   (16, 3, 3, 3), (8, 2, 1, 1)])
def test_shape_test_equals_the_reference(shape):
    from adv_optm.util.Muon_util import _is_suitable_for_muon
    assert suitable_for_muon(torch.zeros(shape)) == _is_suitable_for_muon(torch.zeros(shape))


def test_group_flags_and_constructor_use_muon():
    model = _net()
    hidden = [model.l1.weight, model.l2.weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    groups = [{"params": hidden, "optim_type": "muon"}, {"params": rest, "optim_type": "adam"}]
    opt = ac.optim.Muon_adv(groups, lr=1e-3)
    opt.init_state()
    assert all("muon_momentum/momentum_buffer" in opt.state[p] for p in hidden)
    assert all("adam/exp_avg" in opt.state[p] for p in rest)
    # group use_muon beats the constructor's, which beats optim_type and the shape test
    opt = ac.optim.Muon_adv([{"params": [model.embed.weight], "use_muon": False},
                             {"params": [model.l1.weight], "optim_type": "muon"}], lr=1e-3, use_muon=False)
    opt.init_state()
    assert "adam/exp_avg" in opt.state[model.embed.weight] and "adam/exp_avg" in opt.state[model.l1.weight]


def test_names_send_embeddings_and_heads_to_adam():
    model = _net()
    opt = ac.optim.AdaMuon_adv(model.named_parameters(), lr=1e-3)
    opt.init_state()
    muon = {n for n, p in model.named_parameters() if "muon_momentum/momentum_buffer" in opt.state[p]}
    assert muon == {"l1.weight", "l2.weight"}  # the embedding goes to Adam by name
    opt = ac.optim.AdaMuon_adv(model.named_parameters(), lr=1e-3, adam_names=None)
    opt.init_state()
    assert "muon_momentum/momentum_buffer" in opt.state[model.embed.weight]  # the reference's choice


def test_aux_adam_reads_the_reference_group_keys():
    model = _net()
    opt = ac.optim.Muon_adv(model.parameters(), lr=1e-3, adam_weight_decay=0.1, weight_decay=0.2)
    g = opt.param_groups[0]
    assert g["adam_weight_decay"] == 0.1 and g["weight_decay"] == 0.2 and g["adam_betas"] == (0.9, 0.99)
    g["adam_betas"] = (0.5, 0.6)
    hps = opt._resolve_all(g, 0)
    assert hps["adam"]["betas"] == (0.5, 0.6) and hps["adam_weight_decay"]["weight_decay"] == 0.1
    assert hps["weight_decay"]["weight_decay"] == 0.2


# -- parity with adv-optm 2.5.16 ------------------------------------------------------------------------

MUON_CASES = [
    {},
    {"weight_decay": 0.1, "adam_weight_decay": 0.05, "rms_rescaling": False, "beta1": 0.9},
    {"normuon_variant": True, "approx_mars": True, "adam_use_atan2": True, "adam_nesterov": True,
     "adam_betas": (0.8, 0.95)},
    {"orthogonal_gradient": "flattened", "adam_orthogonal_gradient": "flattened", "cautious_wd": True,
     "weight_decay": 0.1, "adam_weight_decay": 0.1, "adam_eps": None},
]


@pytest.mark.parametrize("kw", MUON_CASES, ids=str)
def test_muon_adv_parity_with_aux_adam(kw):
    lr = 1e-2
    ref_model, our_model = _net(), _net()
    ref = adv_optm.Muon_adv(ref_model.parameters(), lr=lr, **kw)
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=lr, **kw)
    worst = _lockstep([ref], ref_model, ours, our_model, steps=20)
    assert worst <= 1e-6, worst
    assert _aux_state_diff([ref], ref_model, ours, our_model) <= 1e-6


ADAMUON_CASES = [
    {},
    {"use_atan2": True, "weight_decay": 0.1, "adam_use_atan2": True},
    {"normuon_variant": True, "betas": (0.9, 0.99), "nesterov": False, "adam_use_bias_correction": False},
]


@pytest.mark.parametrize("kw", ADAMUON_CASES, ids=str)
def test_adamuon_adv_parity_with_aux_adam(kw):
    lr = 1e-2
    ref_model, our_model = _net(), _net()
    ref = adv_optm.AdaMuon_adv(ref_model.parameters(), lr=lr, **kw)
    ours = ac.optim.AdaMuon_adv(our_model.parameters(), lr=lr, **kw)
    worst = _lockstep([ref], ref_model, ours, our_model, steps=20)
    assert worst <= 1e-6, worst
    assert _aux_state_diff([ref], ref_model, ours, our_model) <= 1e-6


# -- B4 and B5: the auxiliary Adam against adv-optm's AdamW_adv, whose K-beta and Fisher decay work --------

def _fixed_oracle(model, lr, muon_kw, adamw_kw):
    """adv-optm's Muon path on the Muon parameters and its AdamW_adv (the same math as the auxiliary
    Adam, without the bugs) on the others."""
    muon = [p for p in model.parameters() if suitable_for_muon(p)]
    aux = [p for p in model.parameters() if not suitable_for_muon(p)]
    return [adv_optm.Muon_adv([{"params": muon, "use_muon": True}], lr=lr, **muon_kw),
            adv_optm.AdamW_adv(aux, lr=lr, betas=(0.9, 0.99), **adamw_kw)]


def test_b4_aux_kourkoutas_beta_uses_the_dynamic_beta2():
    """The reference's auxiliary Adam drops the dynamic beta2 (bias correction on, the default) and
    turns K-beta off in groups with a Muon parameter. Fixed: equal to AdamW_adv(kourkoutas_beta=True)
    with per-tensor layers on the auxiliary parameters; the buggy reference equals K-beta off."""
    lr = 1e-2
    kb = dict(adam_beta2_min=0.5, adam_ema_alpha=0.9, adam_k_warmup_steps=3)
    ref_model, our_model = _net(), _net()
    oracle = _fixed_oracle(ref_model, lr, {}, dict(kourkoutas_beta=True, beta2_min=0.5, ema_alpha=0.9,
                                                   k_warmup_steps=3, layer_key_fn=lambda p: id(p)))
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=lr, adam_kourkoutas_beta=True, **kb)
    assert _lockstep(oracle, ref_model, ours, our_model, steps=20) <= 1e-6
    assert _aux_state_diff(oracle, ref_model, ours, our_model) <= 1e-6
    # the fix matters: the reference with the bug ignores K-beta entirely
    plain_model, bug_model = _net(), _net()
    buggy = adv_optm.Muon_adv(bug_model.parameters(), lr=lr, adam_kourkoutas_beta=True, **kb)
    plain = ac.optim.Muon_adv(plain_model.parameters(), lr=lr)
    assert _lockstep([buggy], bug_model, plain, plain_model, steps=20) <= 1e-6
    assert _aux_state_diff(oracle, ref_model, plain, plain_model) > 1e-4


def test_b5_aux_fisher_wd_decays():
    """The reference's ``adam_fisher_wd`` is a no-op; fixed, it is AdamW_adv's ``fisher_wd``."""
    lr = 1e-2
    ref_model, our_model = _net(), _net()
    oracle = _fixed_oracle(ref_model, lr, {}, dict(fisher_wd=True, weight_decay=0.5))
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=lr, adam_fisher_wd=True, adam_weight_decay=0.5)
    assert _lockstep(oracle, ref_model, ours, our_model, steps=20) <= 1e-6
    plain_model, bug_model = _net(), _net()
    buggy = adv_optm.Muon_adv(bug_model.parameters(), lr=lr, adam_fisher_wd=True, adam_weight_decay=0.5)
    plain = ac.optim.Muon_adv(plain_model.parameters(), lr=lr, adam_weight_decay=0.5)
    assert _lockstep([buggy], bug_model, plain, plain_model, steps=5) <= 1e-6  # the bug: same as no Fisher
    fisher_model = _net()
    fisher = ac.optim.Muon_adv(fisher_model.parameters(), lr=lr, adam_fisher_wd=True, adam_weight_decay=0.5)
    plain_model = _net()
    plain = ac.optim.Muon_adv(plain_model.parameters(), lr=lr, adam_weight_decay=0.5)
    for model, opt in ((fisher_model, fisher), (plain_model, plain)):
        _loss(model).backward()
        opt.step()
    assert (fisher_model.head.bias - plain_model.head.bias).abs().max() > 1e-5


# -- refused keywords, free running, checkpoints --------------------------------------------------------

@pytest.mark.parametrize("cls", [ac.optim.Muon_adv, ac.optim.AdaMuon_adv])
@pytest.mark.parametrize("kw", ["low_rank_ortho", "spectral_normalization", "adam_spectral_normalization"])
def test_missing_features_are_refused_by_name(cls, kw):
    with pytest.raises(NotImplementedError, match=kw):
        cls(_net().parameters(), **{kw: True})


def test_free_running_stays_close_and_trains():
    """Not forced: the bf16 Newton-Schulz drifts, but far below the update size, and the loss falls."""
    ref_model, our_model = _net(), _net()
    ref = adv_optm.Muon_adv(ref_model.parameters(), lr=1e-2)
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad()
            loss = _loss(model)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    drift = max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), our_model.parameters()))
    assert drift < 0.2 * 1e-2 * 2 and losses[-1] < 0.9 * losses[0]


def test_state_dict_round_trip_with_names_and_bf16():
    model = _net().to(torch.bfloat16)
    opt = ac.optim.AdaMuon_adv(model.named_parameters(), lr=1e-2, adam_kourkoutas_beta=True)
    for _ in range(3):
        opt.zero_grad()
        (model(_X).float() - _Y).square().mean().backward()
        opt.step()
    other = _net().to(torch.bfloat16)
    other.load_state_dict(model.state_dict())
    opt2 = ac.optim.AdaMuon_adv(other.named_parameters(), lr=1e-2, adam_kourkoutas_beta=True)
    opt2.load_state_dict(opt.state_dict())
    for (model_, o) in ((model, opt), (other, opt2)):
        for _ in range(3):
            o.zero_grad()
            (model_(_X).float() - _Y).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert opt2.state[other.l1.weight]["muon_momentum/momentum_buffer"].dtype == torch.float32
    assert math.isfinite(float(opt2.state[other.head.bias]["adam_kourkoutas/r_ema"]))
