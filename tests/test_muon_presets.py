"""Presets muon_adv / adamuon_adv and the drop-ins Muon_adv / AdaMuon_adv (adv_chain/presets/muon.py):
routing as adv-optm 2.5.16 decides it, parity with adv-optm on a model with an embedding, 1-D
parameters and a thin head (so the auxiliary Adam is used), and the auxiliary-Adam bug fixes B4/B5
against oracles with the fix (adv-optm's own AdamW_adv, whose Kourkoutas-beta and Fisher decay work).
Low-rank orthogonalization and spectral normalization: parity with adv-optm with its random draws
(the Gaussian sketch, the power-iteration start) made identical by injection, and the fixes B6, B13."""
import math
import sys
import warnings

import adv_optm
import pytest
import torch

import adv_chain as ac
import adv_chain.transforms.low_rank as low_rank
from adv_chain.presets.muon import _AUX_KEYWORDS
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

# -- low-rank orthogonalization (spec §5.6) ----------------------------------------------------------------

def _reference_stream(monkeypatch):
    """Our sketches drawn from adv-optm's stream instead: its shared generator (re-seeded to 42 here)
    draws ``randn(n, r)`` per Muon parameter in stepping order; a generator seeded 42 does the same for
    ours, which steps the Muon parameters of one bucket in the same order. (Identical sketches by
    construction are impossible: adv-optm's draws are a stateful stream shared with stochastic rounding
    and spectral initialisation; ours are counter-based, keyed by seed, step and parameter.)"""
    from adv_optm.util import param_update
    gen = torch.Generator().manual_seed(42)
    monkeypatch.setattr(low_rank, "gaussian_sketch",
                        lambda rows, cols, key, device: torch.randn(rows, cols, generator=gen, device=device))
    param_update.set_seed(torch.device("cpu"))


LOW_RANK_CASES = [
    ("Muon_adv", {"ortho_rank": 5}),
    ("Muon_adv", {"ortho_rank": 12, "normuon_variant": True, "accelerated_ns": True, "ns_eps": None}),
    ("AdaMuon_adv", {"ortho_rank": 6, "use_atan2": True}),
]


@pytest.mark.parametrize("cls,kw", LOW_RANK_CASES, ids=str)
def test_low_rank_ortho_parity_with_the_reference_sketches(monkeypatch, cls, kw):
    _reference_stream(monkeypatch)
    lr = 1e-2
    ref_model, our_model = _net(), _net()
    ref = getattr(adv_optm, cls)(ref_model.parameters(), lr=lr, low_rank_ortho=True, **kw)
    ours = getattr(ac.optim, cls)(our_model.parameters(), lr=lr, low_rank_ortho=True, **kw)
    assert _lockstep([ref], ref_model, ours, our_model, steps=20) <= 1e-6
    # the run was low-rank: a rank-5 sketch leaves the 20 x 16 embedding's step with rank <= 5
    if kw["ortho_rank"] == 5:
        before = our_model.embed.weight.detach().clone()
        ours.zero_grad()
        _loss(our_model).backward()
        ours.step()
        assert torch.linalg.matrix_rank(before - our_model.embed.weight.detach(), atol=1e-5) <= 5


@pytest.mark.parametrize("value", [0, -3, 2.0, "8", True, None])
def test_ortho_rank_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=rf"ortho_rank={value!r} must be a positive int"):
        ac.presets.adamuon_adv(low_rank_ortho=True, ortho_rank=value)
    with pytest.raises(ValueError, match=r"low_rank_ortho=1 must be True or False"):
        ac.presets.muon_adv(low_rank_ortho=1)


# -- spectral normalization (spec §6) ----------------------------------------------------------------------

def _spectral_pair(cls, kw, lr=1e-2):
    """Both optimizers on a fresh Net, adv-optm starting its power iterations (Muon and auxiliary Adam)
    from our initial vectors (each draws its own: ours from the seed and shape, adv-optm's from its
    shared generator)."""
    ref_model, our_model = _net(), _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = getattr(ac.optim, cls)(our_model.parameters(), lr=lr, **kw)
        ours.init_state()
        start = {}
        for p, q in zip(ref_model.parameters(), our_model.parameters()):
            for prefix in ("spectral/", "adam_spectral/"):
                if ours.state[q].get(prefix + "spectral_u", torch.zeros(0)).numel():
                    start[p] = tuple(ours.state[q][prefix + k].clone() for k in ("spectral_u", "spectral_v"))

        def init(state, p):
            state["spectral_u"], state["spectral_v"] = (x.clone() for x in start[p])

        modules = [sys.modules["adv_optm.optim." + cls], sys.modules["adv_optm.util.Muon_AuxAdam"]]
        saved = [m.init_spectral_norm for m in modules]
        for m in modules:
            m.init_spectral_norm = init
        try:
            ref = getattr(adv_optm, cls)(ref_model.parameters(), lr=lr, **kw)
            worst = _lockstep([ref], ref_model, ours, our_model, steps=20)
        finally:
            for m, f in zip(modules, saved):
                m.init_spectral_norm = f
    return worst, ref_model, our_model


SPECTRAL_CASES = [
    ("Muon_adv", {"spectral_normalization": True}),
    ("Muon_adv", {"spectral_normalization": True, "rms_rescaling": False, "normuon_variant": True,
                  "weight_decay": 0.1}),
    # (with approx_mars too, one of the 60 bf16 Newton-Schulz calls of this run differs by 1-2 bf16 ulps:
    # batched baddbmm vs adv-optm's addmm on identical input, amplified to 8e-5; not a low-rank matter)
    ("Muon_adv", {"spectral_normalization": True, "low_rank_ortho": True, "ortho_rank": 6}),
    ("Muon_adv", {"adam_spectral_normalization": True, "adam_use_bias_correction": False}),
    ("Muon_adv", {"spectral_normalization": True, "adam_spectral_normalization": True, "adam_use_atan2": True,
                  "adam_use_bias_correction": False, "adam_weight_decay": 0.1}),
    ("AdaMuon_adv", {"spectral_normalization": True}),
    ("AdaMuon_adv", {"spectral_normalization": True, "use_atan2": True, "adam_spectral_normalization": True,
                     "adam_use_atan2": True, "adam_use_bias_correction": False}),
    ("AdaMuon_adv", {"spectral_normalization": True, "normuon_variant": True, "rms_rescaling": False}),
]


@pytest.mark.parametrize("cls,kw", SPECTRAL_CASES, ids=str)
def test_spectral_normalization_parity(monkeypatch, cls, kw):
    _reference_stream(monkeypatch)  # for the low-rank case
    worst, ref_model, _ = _spectral_pair(cls, kw)
    assert worst <= 1e-5, worst
    assert max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), _net().parameters())) > 0.1


def test_spectral_normalization_turns_rms_rescaling_off_with_a_warning():
    for preset in (ac.presets.muon_adv, ac.presets.adamuon_adv):
        with pytest.warns(UserWarning, match="rms_rescaling is turned off"):
            c = preset(spectral_normalization=True)
        assert "muon_scale" not in c["partition"].routes["muon"].names
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert c == preset(spectral_normalization=True, rms_rescaling=False)


def test_b6_spectral_scale_reaches_a_bf16_parameter_with_fp32_state():
    """adv-optm scales a bf16 copy of the fp32 update and applies the unscaled orthogonal matrix (B6):
    a step of spectral norm ~1 at lr=1e-3. Here the step is the fp32 run's, about lr*sqrt(d_out/d_in)."""
    lr, g = 1e-3, torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    kw = dict(lr=lr, spectral_normalization=True, rms_rescaling=False, state_precision="fp32")

    def first_step(make, dtype):
        p = torch.nn.Parameter(torch.zeros(32, 48, dtype=dtype))
        opt = make([p])
        p.grad = g.to(dtype)
        opt.step()
        return -p.detach().float()

    ref = first_step(lambda ps: adv_optm.Muon_adv(ps, **kw), torch.bfloat16)
    ours = first_step(lambda ps: ac.optim.Muon_adv(ps, **kw), torch.bfloat16)
    ours32 = first_step(lambda ps: ac.optim.Muon_adv(ps, **kw), torch.float32)
    spectral = lambda x: torch.linalg.matrix_norm(x, 2).item()  # noqa: E731
    assert spectral(ref) > 0.9                                     # the bug: the raw orthogonal matrix
    target = lr * math.sqrt(32 / 48)
    assert 0.9 * target < spectral(ours) < 1.5 * target             # one power-iteration step from random
    torch.testing.assert_close(ours, ours32, atol=2e-5, rtol=0.01)  # bf16 rounding of the fp32 step


def test_b13_aux_spectral_step_is_not_divided_by_the_bias_correction():
    """With its bias correction on, adv-optm's auxiliary Adam multiplies the normalized step by
    1/(1 - beta1^t): 10x at step 1 for beta1 = 0.9. Ours is the same step without that factor."""
    kw = {"adam_spectral_normalization": True, "adam_use_atan2": True}
    ref_model, our_model = _net(), _net()
    for model in (ref_model, our_model):
        _loss(model).backward()
    start = [p.detach().clone() for p in ref_model.parameters()]
    ref = adv_optm.Muon_adv(ref_model.parameters(), lr=1e-3, **kw)
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=1e-3, **kw)
    ref.step()
    ours.step()
    bias = ref_model.head.bias  # a vector: L-infinity normalized, no random start involved
    ref_step = (start[-1] - bias.detach()).abs().max().item()
    our_step = (start[-1] - our_model.head.bias.detach()).abs().max().item()
    assert ref_step / our_step == pytest.approx(1 / (1 - 0.9), rel=1e-4)
    assert our_step == pytest.approx(1e-3 * 4 / math.pi, rel=1e-5)  # lr * atan2's 4/pi, as the reference


# -- the auxiliary Adam's keywords: one helper for both presets ----------------------------------------------

def test_aux_adam_keywords_are_forwarded_from_one_list():
    for preset in ("muon_adv", "adamuon_adv"):
        adam = {k for k in ac.presets.keywords(preset) if k.startswith("adam_")} - {"adam_names"}
        assert adam <= set(_AUX_KEYWORDS), adam - set(_AUX_KEYWORDS)
        assert set(_AUX_KEYWORDS) <= set(ac.presets.keywords(preset))
    on = ac.presets.adamuon_adv(adam_spectral_normalization=True, adam_weight_decay=0.1)["partition"].routes["adam"]
    assert on.names == ("adam", "adam_eps_divide", "adam_spectral", "adam_weight_decay")


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


@pytest.mark.parametrize("cls", ["Muon_adv", "AdaMuon_adv"])
def test_low_rank_and_spectral_resume_identically_and_a_dry_step_moves_nothing(cls):
    """Checkpointed halfway (bf16 model, fp32 state), the run continues bit-identically: the sketches
    are keyed by (seed, step, parameter) and the power-iteration vectors are in the state. A dry step
    (zero grads, lr=0, as distributed checkpoint loading does) creates every key and moves nothing."""
    kw = dict(lr=1e-2, low_rank_ortho=True, ortho_rank=4, spectral_normalization=True, rms_rescaling=False,
              adam_spectral_normalization=True, seed=3)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (model(_X).float() - _Y).square().mean().backward()
            opt.step()

    model = _net().to(torch.bfloat16)
    opt = getattr(ac.optim, cls)(model.named_parameters(), **kw)
    dry = _net().to(torch.bfloat16)
    dry_opt = getattr(ac.optim, cls)(dry.named_parameters(), **{**kw, "lr": 0.0})
    for p in dry.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in dry.parameters()]
    dry_opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, dry.parameters()))
    assert "spectral/spectral_u" in dry_opt.state[dry.l1.weight]
    assert "adam_spectral/spectral_u" in dry_opt.state[dry.head.weight]
    train(model, opt, 3)
    other = _net().to(torch.bfloat16)
    other.load_state_dict(model.state_dict())
    opt2 = getattr(ac.optim, cls)(other.named_parameters(), **kw)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[other.l1.weight]["spectral/spectral_u"].dtype == torch.float32
    train(model, opt, 3)
    train(other, opt2, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_aux_kourkoutas_beta_with_iterative_orthograd():
    """Both on the auxiliary Adam: equal to adv-optm's AdamW_adv with the same two features and
    per-tensor layers (the auxiliary route's K-beta layers, B4 fixed)."""
    lr = 1e-2
    kb = dict(adam_beta2_min=0.5, adam_ema_alpha=0.9, adam_k_warmup_steps=3)
    ref_model, our_model = _net(), _net()
    oracle = _fixed_oracle(ref_model, lr, {}, dict(kourkoutas_beta=True, beta2_min=0.5, ema_alpha=0.9,
                                                   k_warmup_steps=3, orthogonal_gradient="iterative",
                                                   layer_key_fn=lambda p: id(p)))
    ours = ac.optim.Muon_adv(our_model.parameters(), lr=lr, adam_kourkoutas_beta=True,
                             adam_orthogonal_gradient="iterative", **kb)
    assert _lockstep(oracle, ref_model, ours, our_model, steps=20) <= 1e-6
    assert _aux_state_diff(oracle, ref_model, ours, our_model) <= 1e-6


def test_normuon_eps_none_is_the_scale_invariant_epsilon():
    """adv-optm's NorMuon crashes on eps=None; ours uses 1/sqrt(N) per tensor, as its other paths."""
    import math
    runs = []
    for eps in (None, 1 / math.sqrt(12 * 10)):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(12, 10))
        opt = ac.optim.AdaMuon_adv([{"params": [p], "use_muon": True}], lr=1e-2, normuon_variant=True, eps=eps)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            p.grad = torch.randn(12, 10, generator=gen)
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])
