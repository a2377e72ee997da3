"""Kourkoutas-beta's per-row/per-column beta2 of LoRA factors on FSDP2 shards (2 CPU ranks, gloo):
equal to one process averaging the ranks' gradients. With only adapters the segment runs on the
local row shards (each shard takes its rows of beta2); next to per-tensor statistics it runs on
gathered full tensors."""
import pytest

import adv_chain as ac

from _harness import TOL, full_params, make_net, max_diff, shard, spawn, train, train_averaged

MODES = ("adapters_only", "mixed")


def _groups(m, mode):
    if mode == "adapters_only":  # fc2's 5 rows split 3/2, fc3's single row leaves rank 1 an empty shard
        return [{"params": [m.fc1.weight, m.fc3.weight], "tags": ["lora_A"]},
                {"params": [m.fc2.weight], "tags": ["lora_B"]}]
    return [{"params": [m.fc1.weight], "tags": ["lora_A"]}, {"params": [m.fc2.weight], "tags": ["oft"]},
            {"params": [m.fc3.weight, m.fc1.bias, m.fc2.bias, m.fc3.bias, m.norm.weight, m.norm.bias]}]


def _chain():
    return ac.chain(ac.kourkoutas_beta(lag=True, layer_key="shape", beta2_min=0.8, warmup=2, warmup_mode="ramp"),
                    ac.scale_by_adam(), ac.eps_divide(), ac.apply())


def _worker(rank, world):
    out = {}
    for mode in MODES:
        model = shard(make_net())
        opt = ac.ChainOptimizer(_groups(model, mode), _chain(), lr=1e-2, chunk_elems=1024)
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
