"""DDP, FSDP2 and DCP on 2 CPU processes (gloo), every registered preset: one spawn runs every case
(see _workers.suite), each test reads its case's outcome.

Oracles: the same chain trained in one process without any wrapper (fp32 within 1e-6; with DDP
each rank sees half of each batch and the single process averages the halves' gradients; with FSDP2
and the same batch on every rank the gradients are the single-process ones, so most cases agree
exactly), the other rank (DDP: bit-identical parameters), and the uninterrupted run (DCP resume:
bit-identical).
"""
from __future__ import annotations

import pytest
import torch

import _harness as H
import _workers as W

CASES = H.cases(options=True)
PLAN = {"ddp": CASES,
        "fsdp2": CASES + H.STORAGE_CASES + H.CHAIN_CASES,
        "fsdp2_bf16": H.BF16_CASES,
        "dcp_fsdp2": CASES + H.STORAGE_CASES,
        "errors": [("gradient-release", "adamw", {}), ("nonfinite", "adamw", {})]}


def ids(section: str) -> list[str]:
    return [c[0] for c in PLAN[section]]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    return H.spawn(W.suite, PLAN, str(tmp_path_factory.mktemp("dcp")), timeout=480)  # a hang guard: ~110 s idle


def outcome(results: list[dict[str, dict]], section: str, cid: str) -> list:
    out = [r[section][cid] for r in results]
    for rank, value in enumerate(out):
        assert not isinstance(value, str), f"rank {rank}: {value}"
    return out


@pytest.mark.parametrize("cid", ids("ddp"))
def test_ddp_ranks_agree_and_match_one_process(results, cid):
    """DDP over half batches: both ranks hold the same parameters, within 1e-6 of one process that
    averages the two halves' gradients (DDP's arithmetic; the full-batch gradient differs from it in
    the last bits, which sign-based masks such as cautious_wd amplify)."""
    (diff0, params0), (diff1, params1) = outcome(results, "ddp", cid)
    for name in params0:
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
    assert diff0 <= H.TOL, f"max |DDP - single process| = {diff0:.3e}"


@pytest.mark.parametrize("cid", ids("fsdp2"))
def test_fsdp2_matches_one_process(results, cid):
    """fully_shard (uneven and empty shards) with DTensor state: within 1e-6 of one process."""
    for rank, diff in enumerate(outcome(results, "fsdp2", cid)):
        assert diff <= H.TOL, f"rank {rank}: max |FSDP2 - single process| = {diff:.3e}"


@pytest.mark.parametrize("cid", ids("fsdp2_bf16"))
def test_fsdp2_bf16_writes_match_one_process(results, cid):
    """bf16 parameters with stochastic rounding / Kahan: each shard draws the noise of its own
    elements, so the sharded run writes exactly the single-process bits."""
    for rank, diff in enumerate(outcome(results, "fsdp2_bf16", cid)):
        assert diff == 0.0, f"rank {rank}: max |FSDP2 - single process| = {diff:.3e}"


@pytest.mark.parametrize("cid", ids("dcp_fsdp2"))
def test_dcp_fsdp2_resume_is_bit_identical(results, cid):
    """DCP save/load through get/set_optimizer_state_dict on sharded state: the dry step allocates
    every key and moves nothing; the resumed run equals the uninterrupted one bit for bit."""
    for rank, problem in enumerate(outcome(results, "dcp_fsdp2", cid)):
        assert problem is None, f"rank {rank}: {problem}"


def test_gradient_release_on_sharded_params_is_a_clear_error(results):
    """Per-parameter steps on DTensor parameters raise a NotImplementedError that says what to do."""
    for rank, message in enumerate(r["errors"]["gradient-release"] for r in results):
        assert "FSDP2" in message and "step_parameter" in message, f"rank {rank}: {message}"


def test_nonfinite_gradient_on_one_rank_stops_every_rank(results):
    """A NaN in one rank's shard: all ranks raise together (one all-reduce of the screen's count), the
    parameters stay as they were, and with nonfinite="skip" all ranks skip."""
    messages = [r["errors"]["nonfinite"] for r in results]
    assert "the gradient of parameter 0 (shape (16, 8)" in messages[0] and "holds NaN or inf" in messages[0], messages[0]
    assert "another rank" in messages[1], messages[1]
