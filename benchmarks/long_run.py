"""Long runs: every registered preset for many steps on a tiny model, looking for state that grows,
caches that grow, and step time that drifts.

The model is a 2-layer MLP (32 -> 64 -> 10, 2.8k parameters) fitting fixed random data; a LambdaLR
scheduler changes ``lr`` at every step (the case that would fill a cache keyed by hyperparameter
values). For each preset the table gives:

* state KB at step 100 and at the end (tensors in ``optimizer.state`` plus tensor group values);
* the executor's caches at the end: compiled kernels, cached 0-d scalars, validated group values;
* RSS growth in MB of the process between 10% of the run and its end (``/proc/self/statm``; the
  allocator's noise is a few hundred KB);
* median step time (ms) over the first and the last 10% of the steps, and their ratio (drift).

Usage (from the repository root):
    python benchmarks/long_run.py --steps 10000 [--presets adamw,lion] [--markdown benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adv_chain as ac  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def state_kb(opt: torch.optim.Optimizer) -> float:
    total = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    total += sum(v.numel() * v.element_size() for g in opt.param_groups for k, v in g.items()
                 if k != "params" and isinstance(v, torch.Tensor))
    return total / 1024


def lr_for(name: str) -> float:
    return 1.0 if "prodigy" in name else 1e-3


def run(name: str, steps: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    x, y = torch.randn(256, 32), torch.randn(256, 10)
    opt = ac.ChainOptimizer(model.parameters(), name, lr=lr_for(name))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.5 * s / steps)
    times: list[float] = []
    tenth = max(steps // 10, 1)
    kb100 = rss_start = None
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        sched.step()
        if s == 99:
            kb100 = state_kb(opt)
        if s == tenth:
            rss_start = rss_mb()
    early = statistics.median(times[:tenth]) * 1e3
    late = statistics.median(times[-tenth:]) * 1e3
    caches = f"{len(opt._kernels)}/{len(opt._scalar_cache._entries)}/{len(opt._validated)}"
    return {"preset": name, "loss": float(loss), "kb100": kb100, "kb_end": state_kb(opt),
            "rss": rss_mb() - (rss_start or rss_mb()), "early": early, "late": late, "caches": caches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--presets", default="", help="comma-separated preset names (default: all registered)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.presets.split(",") if n] or list(ac.presets.names())
    rows = []
    for name in names:
        print(f"  {name}", file=sys.stderr, flush=True)
        try:
            rows.append(run(name, args.steps))
        except Exception as error:  # a failing preset is reported, not fatal
            rows.append({"preset": name, "error": f"{type(error).__name__}: {error}"[:160]})
    lines = [f"### Long runs: {args.steps} steps per preset, MLP 2.8k params, LambdaLR every step, "
             f"{args.threads} thread(s), torch {torch.__version__}", "",
             "| preset | final loss | state KB @100 | state KB @end | caches (kernels/scalars/validated) | "
             "RSS growth MB | step ms first 10% | last 10% | drift |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['preset']} | {r['loss']:.4f} | {r['kb100']:.1f} | {r['kb_end']:.1f} | {r['caches']} | "
                     f"{r['rss']:+.2f} | {r['early']:.3f} | {r['late']:.3f} | {r['late'] / r['early']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
