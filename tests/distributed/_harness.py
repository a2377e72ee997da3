"""Multi-process harness for the distributed suite (also used by benchmarks/reliability.py).

:func:`spawn` starts ``world`` CPU processes (gloo, a free port, one thread each), runs
``fn(rank, world, *args)`` in each and returns every rank's return value. A worker that raises
fails the call with its traceback; a run that outlives ``timeout`` seconds is killed and fails, so a
hang never blocks the suite. Workers run many cases per spawn (starting processes is the slow part)
and report each case's outcome as data, so that one failing preset does not hide the others.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the per-preset configuration lives in tests/test_presets_suite.py
    sys.path.insert(0, str(TESTS))

from test_presets_suite import MAIN_OPTIONS, PRESET_LR  # noqa: E402

import adv_chain as ac  # noqa: E402

WORLD = 2
#: fp32 tolerance against the single-process run (partial sums are added in another order)
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = Path(out) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            result = ("ok", fn(rank, world, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(result, f)


class RankCrashed(RuntimeError):
    """A rank died by a signal before it wrote its report (no Python traceback exists)."""


def spawn(fn: Callable[..., Any], *args: Any, world: int = WORLD, timeout: float = 150.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; their return values by rank.

    A rank killed by a signal before it reports (seen twice in ~10 full CI-sized runs: glibc
    aborting a gloo worker with "free(): invalid pointer" / "malloc(): unaligned tcache chunk
    detected", never reproduced alone) is run again once, with a warning on stderr; a second crash,
    a Python error in a rank or a hang fails as before."""
    try:
        return _spawn_once(fn, *args, world=world, timeout=timeout)
    except RankCrashed as crash:
        print(f"warning: {crash}; running {fn.__name__} once more", file=sys.stderr, flush=True)
        return _spawn_once(fn, *args, world=world, timeout=timeout)


def _spawn_once(fn: Callable[..., Any], *args: Any, world: int, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, out, fn, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if hung:
            raise TimeoutError(f"distributed run of {fn.__name__} did not finish in {timeout:.0f}s (ranks {hung} hung)")
        results = []
        for r, p in enumerate(procs):
            path = Path(out) / f"rank{r}.pkl"
            if not path.exists():
                error = RankCrashed if p.exitcode is not None and p.exitcode < 0 else RuntimeError
                raise error(f"rank {r} of {fn.__name__} died with exit code {p.exitcode} and no report")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{value}")
            results.append(value)
        return results


# -- what every case trains ------------------------------------------------------------------------
def cases(options: bool = True) -> list[tuple[str, str, dict[str, Any]]]:
    """``(case id, preset, keywords)`` for every registered preset: its default build and (with
    ``options``) the main-option variants of tests/test_presets_suite.py."""
    out = []
    for name in ac.presets.names():
        configs = [{}] + (MAIN_OPTIONS.get(name, []) if options else [])
        for i, kw in enumerate(configs):
            out.append((f"{name}-{'default' if i == 0 else f'options{i}'}", name, kw))
    return out


#: bf16 parameters with stochastic rounding: the noise of a shard must be the unsharded noise
BF16_CASES = [(f"{name}-bf16-stochastic_rounding", name, dict(stochastic_rounding=True))
              for name in ("adamw", "lion", "adamw_adv")] + [
    ("adamw_adv-bf16-orthograd-sr", "adamw_adv", dict(orthogonal_gradient="flattened", stochastic_rounding=True)),
    ("ranger-bf16-kahan", "ranger", dict(kahan_sum=True))]

#: state storage variants (whole-tensor state wrappers) on top of the presets' own options
STORAGE_CASES = [("adamw_adv-factored", "adamw_adv", dict(state_precision="factored")),
                 ("adamw_adv-int8_sr", "adamw_adv", dict(state_precision="int8_sr", weight_decay=0.01)),
                 ("adopt_adv-factored_2nd", "adopt_adv", dict(factored_2nd=True, orthogonal_gradient="flattened")),
                 ("adopt_adv-bf16_sr-kourkoutas", "adopt_adv", dict(state_precision="bf16_sr", kourkoutas_beta=True)),
                 ("simplified_ademamix-nnmf", "simplified_ademamix", dict(nnmf_factor=True))]


class Net(torch.nn.Module):
    """Uneven shards on two ranks: 5 output rows split 3/2, and a 1-row layer whose second shard is
    empty. Every parameter gets a gradient (a DCP dry step gives state to all of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 5)
        self.fc3 = torch.nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.fc1(x)))
        return self.fc3(torch.tanh(self.fc2(h)))


def make_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


_GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 8, generator=_GEN)
Y = torch.sin(X[:, :1] * 2) + X[:, 1:2]


def batch(step: int, rank: int | None = None, world: int = WORLD) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step (rolled so steps differ); ``rank``: that rank's half of it."""
    x, y = X.roll(step * 8, 0), Y.roll(step * 8, 0)
    if rank is None:
        return x, y
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def make_opt(params: Any, name: "str | dict[str, Any]", kw: dict[str, Any]) -> ac.ChainOptimizer:
    """A preset by name with its suite lr, or a chain given as its config (``kw["lr"]``)."""
    if isinstance(name, dict):
        return ac.ChainOptimizer(params, ac.chain_from_config(name), **kw)
    return ac.ChainOptimizer(params, name, lr=PRESET_LR.get(name, 1e-2), **kw)


#: hand-built chains whose barriers no preset uses by default (configs: chains are built in the workers)
CHAIN_CASES = [
    ("chain-clip-cautious", ac.chain(ac.clip_by_global_norm(0.05), ac.scale_by_adam(), ac.eps_divide(),
                                     ac.cautious(), ac.weight_decay(0.01), ac.apply()).to_config(), dict(lr=1e-2)),
    ("chain-orthograd-iterative-kourkoutas-lag",
     ac.chain(ac.orthograd(mode="iterative"), ac.kourkoutas_beta(lag=True, layer_key="shape"), ac.scale_by_adam(),
              ac.eps_divide(), ac.cautious(rescale="mean"), ac.apply()).to_config(), dict(lr=1e-2)),
]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0,
          rank: int | None = None) -> None:
    dtype = next(model.parameters()).dtype
    for s in range(start, start + steps):
        x, y = batch(s, rank)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()


def train_averaged(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, world: int = WORLD) -> None:
    """One process doing DDP's arithmetic: each step's gradient is the mean of the per-rank halves'."""
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        grads = []
        for rank in range(world):
            x, y = batch(s, rank, world)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad for p in model.parameters()])
        for p, gs in zip(model.parameters(), zip(*grads)):
            p.grad = sum(g / world for g in gs)
        opt.step()


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors gathered: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in (model.fc1, model.fc2, model.fc3):
        fully_shard(m)
    fully_shard(model)
    return model


def guarded(fn: Callable[[], Any]) -> Any:
    """A case's result, or its error as text (the parent reports it next to the others)."""
    try:
        return fn()
    except Exception as ex:  # noqa: BLE001
        return f"{type(ex).__name__}: {ex}\n{traceback.format_exc()}"
