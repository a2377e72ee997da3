"""torch.distributed.checkpoint in one process (no process group), every registered preset: DCP's
dry step (zero grads, lr=0) allocates every state key and moves nothing, and training resumed from
dcp.save / dcp.load through get/set_optimizer_state_dict is bit-identical to the uninterrupted run
(the oracle), with the state dtypes kept (fp32 moments of bf16 weights)."""
from __future__ import annotations

import pytest
import torch

import _harness as H
import _workers as W

CASES = H.cases(options=True) + H.STORAGE_CASES


@pytest.mark.parametrize("cid, name, kw", CASES, ids=[c[0] for c in CASES])
def test_dcp_resume_is_bit_identical(tmp_path, cid, name, kw):
    torch.set_num_threads(1)
    assert W.dcp_roundtrip(name, kw, str(tmp_path / "ckpt"), sharded=False) is None


@pytest.mark.parametrize("cid, name, kw", H.cases(options=False), ids=[c[0] for c in H.cases(options=False)])
def test_dcp_resume_bf16_keeps_state_dtypes(tmp_path, cid, name, kw):
    assert W.dcp_roundtrip(name, kw, str(tmp_path / "ckpt"), sharded=False, dtype=torch.bfloat16) is None
