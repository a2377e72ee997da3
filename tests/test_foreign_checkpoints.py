"""A drop-in loads the checkpoint its peer wrote (issue 9): train the peer, save, load the state_dict
into the drop-in, and both continue on the same gradients to the same parameters. Checkpoints whose
keys do not map unambiguously, or whose numbers mean something else, are refused and load nothing."""
import copy

import adv_optm
import lion_pytorch
import optimi
import prodigyopt
import pytest
import torch

import adv_chain as ac

CASES = [
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
     lambda p: ac.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: ac.optim.Adam(p, lr=1e-2)),
    ("adamw-amsgrad", lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
     lambda p: ac.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("lion-pytorch", lambda p: lion_pytorch.Lion(p, lr=1e-3, weight_decay=0.1),
     lambda p: ac.optim.Lion(p, lr=1e-3, weight_decay=0.1)),
    ("AdamW_adv", lambda p: adv_optm.AdamW_adv(p, lr=1e-2, weight_decay=0.1),
     lambda p: ac.optim.AdamW_adv(p, lr=1e-2, weight_decay=0.1)),
    ("Adopt_adv", lambda p: adv_optm.Adopt_adv(p, lr=1e-2), lambda p: ac.optim.Adopt_adv(p, lr=1e-2)),
    ("Lion_adv", lambda p: adv_optm.Lion_adv(p, lr=1e-3), lambda p: ac.optim.Lion_adv(p, lr=1e-3)),
    ("Prodigy_adv", lambda p: adv_optm.Prodigy_adv(p, lr=1.0), lambda p: ac.optim.Prodigy_adv(p, lr=1.0)),
    ("prodigyopt", lambda p: prodigyopt.Prodigy(p, lr=1.0, weight_decay=0.01),
     lambda p: ac.optim.Prodigy(p, lr=1.0, weight_decay=0.01)),
    ("SignSGD_adv", lambda p: adv_optm.SignSGD_adv(p, lr=1e-3), lambda p: ac.optim.SignSGD_adv(p, lr=1e-3)),
]


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]


def _grads(step):
    torch.manual_seed(100 + step)
    return [torch.randn(6, 5), torch.randn(5)]


def _run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, _grads(s)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name,peer,ours", CASES, ids=[c[0] for c in CASES])
def test_drop_in_continues_from_its_peers_checkpoint(name, peer, ours):
    params = _params()
    reference = peer(params)
    _run(reference, params, 6)
    saved = copy.deepcopy(reference.state_dict())
    mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ours(mine)
    opt.load_state_dict(saved)
    assert saved == saved  # the caller's dict is not consumed
    _run(reference, params, 6, start=6)
    _run(opt, mine, 6, start=6)
    for a, b in zip(params, mine):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=0)
    if name == "prodigyopt":
        assert opt.param_groups[0]["d"] == pytest.approx(reference.param_groups[0]["d"], rel=1e-5)


def test_optimi_checkpoint_is_refused_naming_the_writer():
    params = _params()
    peer = optimi.AdamW(params, lr=1e-2)
    _run(peer, params, 2)
    opt = ac.optim.AdamW(_params(), lr=1e-2)
    with pytest.raises(ValueError, match="written by torch-optimi .*debiased moments.*AdamW converts checkpoints of torch.optim"):
        opt.load_state_dict(peer.state_dict())
    assert len(opt.state) == 0


def test_another_libraries_checkpoint_is_refused():
    params = _params()
    peer = torch.optim.AdamW(params, lr=1e-2)
    _run(peer, params, 2)
    opt = ac.optim.AdamW_adv(_params(), lr=1e-2)
    with pytest.raises(ValueError, match="looks written by torch.optim; AdamW_adv converts checkpoints of adv_optm"):
        opt.load_state_dict(peer.state_dict())


def test_factored_adv_optm_state_is_refused():
    params = _params()
    peer = adv_optm.AdamW_adv(params, lr=1e-2, nnmf_factor=True)
    _run(peer, params, 2)
    opt = ac.optim.AdamW_adv(_params(), lr=1e-2)
    with pytest.raises(ValueError, match="factored=True by adv_optm"):
        opt.load_state_dict(peer.state_dict())


def test_keys_this_chain_lacks_are_refused():
    params = _params()
    peer = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    _run(peer, params, 2)
    opt = ac.optim.AdamW(_params(), lr=1e-2)
    opt.param_groups[0]["amsgrad"] = False
    saved = peer.state_dict()
    saved["param_groups"][0]["amsgrad"] = False  # the options disagree with the stored state
    with pytest.raises(ValueError, match="'max_exp_avg_sq' has no counterpart"):
        opt.load_state_dict(saved)


def test_chain_optimizer_itself_refuses_a_foreign_checkpoint():
    params = _params()
    peer = torch.optim.AdamW(params, lr=1e-2)
    _run(peer, params, 2)
    opt = ac.ChainOptimizer(_params(), "adamw", lr=1e-2)
    with pytest.raises(ValueError, match="different chain"):
        opt.load_state_dict(peer.state_dict())
