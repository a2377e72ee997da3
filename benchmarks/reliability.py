"""Reliability table: every registered preset x {save/load bit-exact, DCP, DDP, FSDP2, bf16 dtype
restore, NaN handling}, pass/fail, printed as markdown.

A preset passes a column when its default build and every main-option variant of
tests/test_presets_suite.py pass (``fail k/n`` otherwise; the first problem is listed below the
table). The checks are the test suite's own (tests/test_presets_suite.py, tests/distributed/):

* save/load bit-exact - fp32: train 10 steps, ``torch.save``/``torch.load(weights_only=True)`` the
  optimizer state, resume: 10 more steps bit-identical to the uninterrupted run;
* DCP - ``torch.distributed.checkpoint`` through ``get/set_optimizer_state_dict``, in one process and
  on 2 FSDP2 processes: the dry step allocates every key and moves nothing, the resumed run is
  bit-identical;
* DDP - 2 processes, half batches each: ranks identical, within 1e-6 of one process averaging the
  halves' gradients;
* FSDP2 - 2 processes, ``fully_shard`` with uneven and empty shards: within 1e-6 of one process;
* bf16 dtype restore - bf16 weights: after save/load the state keeps its dtypes (fp32 moments) and
  the resumed run is bit-identical;
* NaN handling - with ``ChainOptimizer(nonfinite=...)``: ``"raise"`` raises and ``"skip"`` leaves
  parameters and state untouched. Without that keyword: a NaN gradient must raise an error that
  says so, or leave the parameters untouched.

Usage (from the repository root; about 2 minutes on 2 cores):
    python benchmarks/reliability.py [--defaults-only]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # the distributed harness (adds tests/ too)

import _harness as H  # noqa: E402
import _workers as W  # noqa: E402
from test_presets_suite import checkpoint_roundtrip  # noqa: E402

import adv_chain as ac  # noqa: E402

COLUMNS = ("save/load bit-exact", "DCP", "DDP", "FSDP2", "bf16 dtype restore", "NaN handling")


def _check(fn: Callable[[], Any]) -> str | None:
    """None if ``fn`` passes (returns None / raises nothing), else the problem."""
    try:
        problem = fn()
    except Exception as ex:  # noqa: BLE001 - a failing check is a table entry
        return f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
    return problem


def _nan_check(name: str, kw: dict[str, Any]) -> str | None:
    def run(**opt_kw: Any) -> tuple[torch.nn.Module, Any, list[torch.Tensor], dict, Exception | None]:
        model = H.make_net()
        opt = H.make_opt(model.parameters(), name, {**kw, **opt_kw})
        H.train(model, opt, 2)
        before = [p.detach().clone() for p in model.parameters()]
        state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
                 if isinstance(v, torch.Tensor)}
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(H.X), H.Y).backward()
        model.fc1.weight.grad[0, 0] = float("nan")
        try:
            opt.step()
            error = None
        except Exception as ex:  # noqa: BLE001
            error = ex
        return model, opt, before, state, error

    def untouched(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
        return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    if "nonfinite" in inspect.signature(ac.ChainOptimizer.__init__).parameters:
        model, _, before, _, error = run(nonfinite="raise")
        if error is None:
            return 'nonfinite="raise" did not raise on a NaN gradient'
        if not untouched(model, before):
            return 'nonfinite="raise" raised after moving parameters'
        model, opt, before, state, error = run(nonfinite="skip")
        if error is not None:
            return f'nonfinite="skip" raised {type(error).__name__}: {error}'
        if not untouched(model, before):
            return 'nonfinite="skip" moved parameters on a NaN gradient'
        changed = [k for k, v in state.items() if k[1] != "step" and not torch.equal(
            opt.state[list(model.parameters())[k[0]]][k[1]], v)]
        return f'nonfinite="skip" changed state {changed[:3]}' if changed else None
    model, _, before, _, error = run()
    if error is not None:
        text = str(error).lower()
        clear = any(w in text for w in ("nan", "finite", "inf"))
        if not clear:
            return f"a NaN gradient raised an unclear {type(error).__name__}: {error}"
        return None if untouched(model, before) else "raised after moving parameters"
    if untouched(model, before):
        return None
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    return f"no nonfinite option; a NaN gradient was applied (non-finite parameters: {bad})" if bad else \
        "no nonfinite option; a NaN gradient step moved the parameters"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defaults-only", action="store_true", help="only each preset's default build")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = H.cases(options=not args.defaults_only)
    start = time.perf_counter()
    problems: dict[tuple[str, str], list[tuple[str, str]]] = {}

    def record(column: str, cid: str, name: str, problem: str | None) -> None:
        problems.setdefault((name, column), [])
        if problem is not None:
            problems[(name, column)].append((cid, problem))

    with tempfile.TemporaryDirectory() as root:
        plan = {"ddp": cases, "fsdp2": cases, "dcp_fsdp2": cases}
        try:
            dist = H.spawn(W.suite, plan, root, timeout=600)
        except Exception as ex:  # noqa: BLE001 - every distributed cell fails with the reason
            dist = [{s: {cid: f"{type(ex).__name__}: {ex}" for cid, _, _ in cases} for s in plan}] * H.WORLD
        for cid, name, kw in cases:
            record("save/load bit-exact", cid, name, _check(lambda: checkpoint_roundtrip(name, kw, torch.float32)))
            record("bf16 dtype restore", cid, name, _check(lambda: checkpoint_roundtrip(name, kw, torch.bfloat16)))
            one = _check(lambda: W.dcp_roundtrip(name, kw, f"{root}/one-{cid}", sharded=False))
            two = next((r["dcp_fsdp2"][cid] for r in dist if r["dcp_fsdp2"][cid] is not None), None)
            record("DCP", cid, name, one and f"one process: {one}" or two and f"FSDP2: {two.splitlines()[0]}")
            ddp = [r["ddp"][cid] for r in dist]
            ddp_problem = next((v.splitlines()[0] for v in ddp if isinstance(v, str)), None)
            if ddp_problem is None:
                if not all(torch.equal(ddp[0][1][k], v) for r in ddp[1:] for k, v in r[1].items()):
                    ddp_problem = "ranks differ"
                elif ddp[0][0] > H.TOL:
                    ddp_problem = f"max diff {ddp[0][0]:.2e}"
            record("DDP", cid, name, ddp_problem)
            fsdp = [r["fsdp2"][cid] for r in dist]
            fsdp_problem = next((v.splitlines()[0] for v in fsdp if isinstance(v, str)), None)
            if fsdp_problem is None and max(fsdp) > H.TOL:
                fsdp_problem = f"max diff {max(fsdp):.2e}"
            record("FSDP2", cid, name, fsdp_problem)
            record("NaN handling", cid, name, _check(lambda: _nan_check(name, kw)))

    counts = {name: sum(1 for _, n, _ in cases if n == name) for name in ac.presets.names()}
    lines = ["| preset | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    notes = []
    for name in ac.presets.names():
        cells = []
        for column in COLUMNS:
            bad = problems.get((name, column), [])
            cells.append("pass" if not bad else f"**fail** {len(bad)}/{counts[name]}")
            if bad:
                notes.append(f"- {name} / {column}: `{bad[0][0]}`: {bad[0][1][:200]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    variants = "default build only" if args.defaults_only else "default build and every main-option variant"
    print(f"Reliability ({variants}; {len(cases)} configurations, torch {torch.__version__}, "
          f"{time.perf_counter() - start:.0f} s)\n")
    print("\n".join(lines))
    if notes:
        print("\nFirst problem per failing cell:\n")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
