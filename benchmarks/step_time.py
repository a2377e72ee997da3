"""Optimizer step time of adv_chain and peers, relative to torch AdamW (foreach).

Measures the wall time of ``optimizer.step()`` alone (grads pre-filled, no
forward/backward) on the GPT-shaped parameter sets of ``_params.py``. Each row
is timed in alternating pairs against a ``torch.optim.AdamW(foreach=True)``
baseline in the same process (``_timing.py``); every optimizer owns its own
copy of the parameters, so state sizes are realistic. The 6-transform chain is
also paired against the 2-transform chain: same math, so their ratio is the
cost of four extra no-op transforms. Imports this repository's ``adv_chain``.

Usage (from the repository root):
    python benchmarks/step_time.py                        # both sets, 1 and 2 threads
    python benchmarks/step_time.py --quick --set small149 --rows torch,optimi
    python benchmarks/step_time.py --pairs 30 --threads 1 --markdown results.md
    python benchmarks/step_time.py --peers --set gpt27m   # drop-ins vs optimi / prodigyopt, paired
"""

import argparse
import datetime
import importlib
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import Parameter

from _params import PARAM_SETS, clone_params, count_params, make_params
from _timing import PairTiming, time_alternating_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR = 1e-3
WEIGHT_DECAY = 0.01
COMPILE_WARMUP = 3  # extra warm-up steps for rows that compile on their first step
Step = Callable[[], object]


class NotInstalled(Exception):
    """The row's package is not importable."""


def import_peer(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name == module:
            raise NotInstalled(module) from None
        raise


def torch_adamw(**options) -> Callable[[list[Parameter]], Step]:
    return lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **options).step


def compiled_torch_adamw(params: list[Parameter]) -> Step:
    # A tensor lr keeps LR schedules from triggering recompiles; torch only
    # accepts a tensor lr on the foreach path together with capturable=True.
    lr = torch.tensor(LR, device=params[0].device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, foreach=True, capturable=True)
    return torch.compile(optimizer.step)


def optimi_adamw(params: list[Parameter]) -> Step:
    # optimi defaults to betas=(0.9, 0.99), eps=1e-6: match torch's. Its default
    # decouple_lr=False scales the decay by lr, as torch AdamW does.
    optimi = import_peer("optimi")
    return optimi.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8).step


def adv_chain_adamw(compile: bool) -> Callable[[list[Parameter]], Step]:
    def build(params: list[Parameter]) -> Step:
        ac = import_peer("adv_chain")
        return ac.ChainOptimizer(params, "adamw", lr=LR, weight_decay=WEIGHT_DECAY, compile=compile).step
    return build


def momentum_chain(with_noops: bool) -> Callable[[list[Parameter]], Step]:
    """momentum + apply, optionally padded with 4 transforms that change nothing."""
    def build(params: list[Parameter]) -> Step:
        ac = import_peer("adv_chain")
        transforms = [ac.momentum(0.9), ac.apply()]
        if with_noops:  # zero decay and clipping at inf leave the update unchanged: the ratio is
            # the cost of composing four more transforms into the chain
            transforms = [ac.add_l2(0.0), ac.clip_by_value(float("inf")), ac.momentum(0.9), ac.weight_decay(0.0),
                          ac.named("clip_updates", ac.clip_by_value(float("inf"))), ac.apply()]
        return ac.ChainOptimizer(params, ac.chain(*transforms), lr=LR).step
    return build


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable[[list[Parameter]], Step]
    compiles: bool = False


BASELINE = torch_adamw(foreach=True)
SIX_CHAIN, TWO_CHAIN = "adv_chain 6-transform chain", "adv_chain 2-transform chain"
ROWS = [
    Row("torch AdamW foreach", torch_adamw(foreach=True)),
    Row("torch AdamW for-loop", torch_adamw(foreach=False)),
    Row("torch AdamW fused", torch_adamw(fused=True)),
    Row("torch AdamW foreach + torch.compile", compiled_torch_adamw, compiles=True),
    Row("optimi AdamW", optimi_adamw),
    Row("adv_optm AdamW_adv", lambda p: import_peer("adv_optm").AdamW_adv(p, lr=LR, weight_decay=WEIGHT_DECAY).step),
    Row("adv_chain adamw (eager)", adv_chain_adamw(compile=False)),
    Row("adv_chain adamw (compile=True)", adv_chain_adamw(compile=True), compiles=True),
    Row("prodigyopt Prodigy", lambda p: import_peer("prodigyopt").Prodigy(p, lr=1.0, weight_decay=WEIGHT_DECAY).step),
    Row("adv_optm Prodigy_adv", lambda p: import_peer("adv_optm").Prodigy_adv(p, lr=1.0, weight_decay=WEIGHT_DECAY).step),
    Row("adv_chain Prodigy (eager)",
        lambda p: import_peer("adv_chain").optim.Prodigy(p, lr=1.0, weight_decay=WEIGHT_DECAY).step),
    Row(SIX_CHAIN, momentum_chain(with_noops=True)),
    Row(TWO_CHAIN, momentum_chain(with_noops=False)),
]


def _ours(cls: str, nonfinite: str = "raise", **kw) -> Callable[[list[Parameter]], Step]:
    """The drop-in's step; ``nonfinite="off"`` drops the NaN/inf guard (the peers run none)."""
    def build(p: list[Parameter]) -> Step:
        opt = getattr(import_peer("adv_chain").optim, cls)(p, **kw)
        opt.nonfinite = nonfinite
        return opt.step
    return build


def _peer(module: str, cls: str, **kw) -> Callable[[list[Parameter]], Step]:
    return lambda p: getattr(import_peer(module), cls)(p, **kw).step


#: adv_chain drop-ins timed directly against the peer they stand in for: (name, ours, peer)
PEER_PAIRS = [
    ("RAdam vs optimi", _ours("RAdam", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False),
     _peer("optimi", "RAdam", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("Ranger vs optimi", _ours("Ranger", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False),
     _peer("optimi", "Ranger", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("Adan vs optimi", _ours("Adan", lr=LR, weight_decay=WEIGHT_DECAY),
     _peer("optimi", "Adan", lr=LR, weight_decay=WEIGHT_DECAY)),
    ("StableAdamW vs optimi", _ours("StableAdamW", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False),
     _peer("optimi", "StableAdamW", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("AdamW vs optimi", _ours("AdamW", lr=LR, weight_decay=WEIGHT_DECAY),
     _peer("optimi", "AdamW", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("RAdam, nonfinite='off', vs optimi", _ours("RAdam", "off", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False),
     _peer("optimi", "RAdam", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("StableAdamW, nonfinite='off', vs optimi", _ours("StableAdamW", "off", lr=LR, weight_decay=WEIGHT_DECAY,
                                                      kahan_sum=False),
     _peer("optimi", "StableAdamW", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("Ranger, nonfinite='off', vs optimi", _ours("Ranger", "off", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False),
     _peer("optimi", "Ranger", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("Adan, nonfinite='off', vs optimi", _ours("Adan", "off", lr=LR, weight_decay=WEIGHT_DECAY),
     _peer("optimi", "Adan", lr=LR, weight_decay=WEIGHT_DECAY)),
    ("AdamW, nonfinite='off', vs optimi", _ours("AdamW", "off", lr=LR, weight_decay=WEIGHT_DECAY),
     _peer("optimi", "AdamW", lr=LR, weight_decay=WEIGHT_DECAY, kahan_sum=False)),
    ("Prodigy, nonfinite='off', vs prodigyopt", _ours("Prodigy", "off", lr=1.0, weight_decay=WEIGHT_DECAY),
     _peer("prodigyopt", "Prodigy", lr=1.0, weight_decay=WEIGHT_DECAY)),
    ("Prodigy vs prodigyopt", _ours("Prodigy", lr=1.0, weight_decay=WEIGHT_DECAY),
     _peer("prodigyopt", "Prodigy", lr=1.0, weight_decay=WEIGHT_DECAY)),
    ("Prodigy_adv, nonfinite='off', vs adv_optm", _ours("Prodigy_adv", "off", lr=1.0, weight_decay=WEIGHT_DECAY),
     _peer("adv_optm", "Prodigy_adv", lr=1.0, weight_decay=WEIGHT_DECAY)),
    ("Prodigy_adv vs adv_optm", _ours("Prodigy_adv", lr=1.0, weight_decay=WEIGHT_DECAY),
     _peer("adv_optm", "Prodigy_adv", lr=1.0, weight_decay=WEIGHT_DECAY)),
]


def peer_pairs(set_name: str, threads: int, wanted: list[str], args) -> str:
    """Each drop-in against its peer, alternating pairs in one process: ratio = ours / peer."""
    torch.set_num_threads(threads)
    template = make_params(set_name, device=args.device)
    results: dict[str, PairTiming | str] = {}
    for name, ours, peer in PEER_PAIRS:
        if wanted and not any(s in name.lower() for s in wanted):
            continue
        print(f"  timing {name}", file=sys.stderr, flush=True)
        try:
            results[name] = time_alternating_pairs(peer(clone_params(template)), ours(clone_params(template)),
                                                   pairs=args.pairs, warmup=args.warmup, device=args.device)
        except NotInstalled as missing:
            results[name] = f"not installed: {missing}"
        except Exception as error:  # a failing row is reported, not fatal
            results[name] = short_error(error)
    title = (f"### {set_name}, threads={threads}: adv_chain drop-in / its peer (eager), {args.pairs} pairs")
    return title + "\n\n" + markdown_table(results, "peer") + "\n"


def short_error(error: Exception) -> str:
    text = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    return "error: " + (text if len(text) <= 100 else text[:97] + "...")


def measure(row: Row, reference: Step, template: list[Parameter], args) -> PairTiming | str:
    """Time ``row`` against ``reference``; a status string if it cannot run."""
    print(f"  timing {row.name}", file=sys.stderr, flush=True)
    try:
        if row.compiles:
            torch.compiler.reset()  # fresh compile per run, never a stale cache hit
        step = row.build(clone_params(template))
        return time_alternating_pairs(reference, step, pairs=args.pairs, warmup=args.warmup, device=args.device,
                                      extra_row_warmup=COMPILE_WARMUP if row.compiles else 0)
    except NotInstalled:
        return "not installed"
    except Exception as error:  # a failing row is reported, not fatal
        return short_error(error)


def markdown_table(results: dict[str, PairTiming | str], baseline_name: str) -> str:
    lines = [f"| row | median ms | {baseline_name} median ms | ratio (median) | ratio p25–p75 |",
             "|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        if isinstance(result, PairTiming):
            lines.append(f"| {name} | {result.row_ms:.2f} | {result.baseline_ms:.2f} | {result.ratio_median:.3f}"
                         f" | {result.ratio_p25:.3f}–{result.ratio_p75:.3f} |")
        else:
            lines.append(f"| {name} | {result.replace('|', '/')} | | | |")
    return "\n".join(lines)


def benchmark(set_name: str, threads: int, rows: list[Row], args) -> str:
    torch.set_num_threads(threads)
    template = make_params(set_name, device=args.device)
    title = (f"### {set_name}: {len(template)} tensors, {count_params(template):,} params, "
             f"threads={threads}, device={args.device}, {args.pairs} pairs")
    print(f"{set_name}, threads={threads}:", file=sys.stderr, flush=True)
    baseline = BASELINE(clone_params(template))
    results = {row.name: measure(row, baseline, template, args) for row in rows}
    sections = [title, markdown_table(results, "baseline")]

    selected = {row.name: row for row in rows}
    if SIX_CHAIN in selected and TWO_CHAIN in selected:
        if isinstance(results[TWO_CHAIN], PairTiming):
            two_chain = selected[TWO_CHAIN].build(clone_params(template))
            overhead = measure(selected[SIX_CHAIN], two_chain, template, args)
        else:
            overhead = "not run: the 2-transform chain failed"
        sections += ["Composition overhead (6-transform vs 2-transform chain, same math):",
                     markdown_table({SIX_CHAIN: overhead}, "2-transform chain")]
    return "\n\n".join(sections) + "\n"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor() or "unknown"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default=",".join(PARAM_SETS), help="comma-separated parameter sets")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rows", default="", help="comma-separated substrings selecting rows (default: all)")
    parser.add_argument("--pairs", type=int, default=15, help="timed (baseline, row) pairs per row, >= 2")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 3 pairs, 1 warm-up step")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--markdown", type=Path, help="append the results to this Markdown file")
    parser.add_argument("--peers", action="store_true",
                        help="time each drop-in against the peer it stands in for instead (optimi, prodigyopt)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.warmup = 3, 1
    if args.pairs < 2:
        parser.error("--pairs must be at least 2")
    args.sets = args.set.split(",")
    unknown = set(args.sets) - set(PARAM_SETS)
    if unknown:
        parser.error(f"unknown parameter set(s) {sorted(unknown)}; choose from {list(PARAM_SETS)}")
    args.thread_counts = [int(n) for n in args.threads.split(",")]
    return args


def main() -> None:
    args = parse_args()
    wanted = [s.lower() for s in args.rows.split(",") if s]
    rows = [row for row in ROWS if not wanted or any(s in row.name.lower() for s in wanted)]
    header = "\n".join([
        f"## Optimizer step time: `python {shlex.join(sys.argv)}`",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, python {platform.python_version()}, device {args.device}",
        f"- CPU: {cpu_model()}; threads: {args.threads}",
        "- baseline: torch.optim.AdamW(foreach=True, lr=1e-3, weight_decay=0.01); ratio = row / baseline per pair",
    ]) + "\n"
    print(header, flush=True)
    tables = []
    for set_name in args.sets:
        for threads in args.thread_counts:
            tables.append(peer_pairs(set_name, threads, wanted, args) if args.peers
                          else benchmark(set_name, threads, rows, args))
            print(tables[-1], flush=True)
    if args.markdown:
        with args.markdown.open("a") as report:
            report.write("\n".join([header, *tables]) + "\n")


if __name__ == "__main__":
    main()
