"""Per-rank statistics of LoRA/OFT factors on FSDP2 shards (2 CPU ranks, gloo), equal to one process
averaging the ranks' gradients:

* Kourkoutas-beta's per-row/per-column beta2. With only adapters the segment runs on the local row
  shards (each shard takes its rows of beta2); next to per-tensor statistics it runs on gathered
  full tensors.
* OrthoGrad's per-rank projection (``per_rank=True``): each row of a ``lora_A``/``oft`` factor and
  each column of a ``lora_B`` factor projected off its own weights. FSDP2 shards rows, so a
  ``lora_B`` column spans both ranks: its sums come from the gathered full tensor, and each shard
  applies its rows of the per-column values.
"""
import pytest

import adv_chain as ac

from _harness import TOL, full_params, make_net, max_diff, shard, spawn, train, train_averaged

MODES = ("adapters_only", "mixed")
ORTHO_MODES = ("orthograd_adapters", "orthograd_mixed")


def _groups(m, mode):
    if mode == "adapters_only":  # fc2's 5 rows split 3/2, fc3's single row leaves rank 1 an empty shard
        return [{"params": [m.fc1.weight, m.fc3.weight], "tags": ["lora_A"]},
                {"params": [m.fc2.weight], "tags": ["lora_B"]}]
    return [{"params": [m.fc1.weight], "tags": ["lora_A"]}, {"params": [m.fc2.weight], "tags": ["oft"]},
            {"params": [m.fc3.weight, m.fc1.bias, m.fc2.bias, m.fc3.bias, m.norm.weight, m.norm.bias]}]


def _chain():
    return ac.chain(ac.kourkoutas_beta(lag=True, layer_key="shape", beta2_min=0.8, warmup=2, warmup_mode="ramp"),
                    ac.scale_by_adam(), ac.eps_divide(), ac.apply())


def _ortho_chain():
    return ac.chain(ac.orthograd(per_rank=True), ac.scale_by_adam(), ac.eps_divide(), ac.apply())


def _ortho_groups(m, mode):
    if mode == "orthograd_adapters":
        return _groups(m, "adapters_only")
    # not fc3's 1-element bias: a 1-element g is parallel to w, so OrthoGrad's residue is rounding noise
    # and g' = |g| * residue / |residue| comes out with an arbitrary sign in any implementation
    return [{"params": [m.fc1.weight], "tags": ["lora_A"]}, {"params": [m.fc2.weight], "tags": ["oft"]},
            {"params": [m.fc3.weight, m.fc1.bias, m.fc2.bias, m.norm.weight, m.norm.bias]}]


def _worker(rank, world):
    out = {}
    for mode in MODES:
        model = shard(make_net())
        opt = ac.ChainOptimizer(_groups(model, mode), _chain(), lr=1e-2, chunk_elems=1024)
        train(model, opt, 6, rank=rank)
        out[mode] = full_params(model)
    for mode in ORTHO_MODES:
        model = shard(make_net())
        opt = ac.ChainOptimizer(_ortho_groups(model, mode), _ortho_chain(), lr=1e-2, chunk_elems=1024)
        train(model, opt, 6, rank=rank)
        out[mode] = full_params(model)
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_adapter_beta2_matches_one_process(results, mode):
    model = make_net()
    opt = ac.ChainOptimizer(_groups(model, mode), _chain(), lr=1e-2)
    train_averaged(model, opt, 6)
    want = full_params(model)
    assert opt.state[model.fc1.weight]["kourkoutas/r_ema"].shape == (16, 1)
    for got in results:
        assert max_diff(want, got[mode]) <= TOL


@pytest.mark.parametrize("mode", ORTHO_MODES)
def test_fsdp2_per_rank_orthograd_matches_one_process(results, mode):
    """Per-rank OrthoGrad on sharded LoRA A/B and OFT factors (fc2's lora_B columns span both
    ranks; fc3's single row leaves rank 1 an empty shard) equals one process; and the per-rank
    projection is not the whole-tensor one here (the comparison is not vacuous)."""
    model = make_net()
    opt = ac.ChainOptimizer(_ortho_groups(model, mode), _ortho_chain(), lr=1e-2)
    train_averaged(model, opt, 6)
    want = full_params(model)
    for got in results:
        assert max_diff(want, got[mode]) <= TOL
    flat = make_net()
    flat_opt = ac.ChainOptimizer(_ortho_groups(flat, mode), ac.chain(ac.orthograd(per_rank=False), ac.scale_by_adam(),
                                                                     ac.eps_divide(), ac.apply()), lr=1e-2)
    train_averaged(flat, flat_opt, 6)
    assert max_diff(want, full_params(flat)) > 100 * TOL
