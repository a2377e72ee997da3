"""Per-feature overhead: step time of AdamW_adv with one feature on / the same optimizer without it
(a row may name another optimizer, e.g. Lion_adv for Lion-K, and another baseline).

For adv_chain (eager and ``compile=True``) and for the installed adv-optm 2.5.16 (features it still
has), each feature is timed in alternating pairs against its own library's plain ``AdamW_adv`` in
the same process, on the shared parameter sets of ``_params.py`` (grads pre-filled, fp32).
Legacy features (``cautious_mask``, ``grams_moment``, ``use_AdEMAMix``) exist in adv-optm 2.2.3
only, which cannot be installed beside 2.5.16: install it apart and name the directory, and those
rows time 2.2.3 (against its own plain ``AdamW_adv``) in a child process that imports it first::

    pip install --no-deps --target /tmp/adv_optm_223 adv-optm==2.2.3
    python benchmarks/feature_overhead.py --features cautious_mask,grams,AdEMAMix --legacy-reference /tmp/adv_optm_223

Usage (from the repository root):
    python benchmarks/feature_overhead.py --set gpt27m --threads 1,2 --markdown benchmarks/RESULTS.md
"""

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from _params import PARAM_SETS, clone_params, count_params, make_params
from _timing import time_alternating_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR = 1e-3
FEATURES = {  # name -> (keywords, available in adv-optm 2.5.16[, optimizer[, (baseline optimizer, its keywords)]])
    "orthograd": ({"orthogonal_gradient": "flattened"}, True),
    "cautious_mask": ({"cautious_mask": True}, False),
    "grams": ({"grams_moment": True}, False),
    "AdEMAMix": ({"use_AdEMAMix": True}, False),
    "atan2": ({"use_atan2": True}, True),
    "cautious_wd": ({"cautious_wd": True, "weight_decay": 0.01}, True),
    "kourkoutas_beta": ({"kourkoutas_beta": True}, True),
    # low-memory state (issue 5): targets factored <= 2x, bf16 <= 1.3x, int8 <= 2x over the plain step
    "nnmf_factor": ({"nnmf_factor": True}, True),
    "factored_2nd": ({"factored_2nd": True}, True),
    "bf16_sr state": ({"state_precision": "bf16_sr"}, True),
    "int8_sr state": ({"state_precision": "int8_sr"}, True),
    "spectral_normalization": ({"spectral_normalization": True}, True),
    # the sign family, each against its own plain optimizer
    "lion_k (Lion_adv, kappa_p=2)": ({"kappa_p": 2.0}, True, "Lion_adv"),
    "stochastic_sign (Lion_adv)": ({"stochastic_sign": True}, True, "Lion_adv"),
    "spectral_normalization (Lion_adv)": ({"spectral_normalization": True}, True, "Lion_adv"),
    "sinkhorn (SinkSGD_adv / SignSGD_adv momentum=0)": ({}, True, "SinkSGD_adv", ("SignSGD_adv", {"momentum": 0.0})),
}


def adv_chain_step(params, compile: bool, cls: str = "AdamW_adv", **kw):
    import adv_chain as ac
    return getattr(ac.optim, cls)(params, lr=LR, compile=compile, **kw).step


def adv_optm_step(params, cls: str = "AdamW_adv", **kw):
    import adv_optm
    return getattr(adv_optm, cls)(params, lr=LR, **kw).step


def ratio(template, make_base, make_row, args, compiles: bool) -> str:
    try:
        if compiles:
            torch.compiler.reset()
        base, row = make_base(clone_params(template)), make_row(clone_params(template))
        t = time_alternating_pairs(base, row, pairs=args.pairs, warmup=args.warmup, device=torch.device("cpu"),
                                   extra_row_warmup=3 if compiles else 0)
        return f"{t.ratio_median:.2f}x ({t.ratio_p25:.2f}–{t.ratio_p75:.2f})"
    except Exception as error:  # a failing row is reported, not fatal
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def legacy_reference(args, set_name: str, threads: int, name: str) -> str:
    """The reference cell of a legacy feature, timed on adv-optm 2.2.3 in a child process whose
    import path starts with ``--legacy-reference``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.legacy_reference.resolve()),
                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--reference-row", name, "--set", set_name, "--threads", str(threads),
           "--pairs", str(args.pairs), "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return f"error: {(done.stderr.strip().splitlines() or ['no output'])[-1][:80]}"
    _, version, cell = line.split(" ", 2)
    return f"{cell} (adv-optm {version})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="gpt27m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--features", default=",".join(FEATURES),
                        help="comma-separated subset of the features (a prefix picks every row that starts with it)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--legacy-reference", type=Path,
                        help="directory holding adv-optm 2.2.3 (pip install --no-deps --target DIR adv-optm==2.2.3)")
    parser.add_argument("--reference-row", help=argparse.SUPPRESS)  # the child process of --legacy-reference
    args = parser.parse_args()
    if args.reference_row:
        import adv_optm
        kw, _, *which = FEATURES[args.reference_row]
        torch.set_num_threads(int(args.threads))
        cell = ratio(make_params(args.set), lambda p: adv_optm_step(p, "AdamW_adv"),
                     lambda p: adv_optm_step(p, which[0] if which else "AdamW_adv", **kw), args, False)
        print(f"RESULT {adv_optm.__version__} {cell}")
        return
    prefixes = args.features.split(",")
    wanted = {n for n in FEATURES if any(n == w or n.startswith(w) for w in prefixes)}
    out = [f"## Per-feature overhead: `python {shlex.join(sys.argv)}`", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}",
           "- each cell: median (p25–p75) of step time with the feature / without it, same library, same run", ""]
    for set_name in args.set.split(","):
        template = make_params(set_name)
        for threads in [int(n) for n in args.threads.split(",")]:
            torch.set_num_threads(threads)
            out += [f"### {set_name}: {len(template)} tensors, {count_params(template):,} params, threads={threads}",
                    "", "| feature | adv_chain eager | adv_chain compile=True | adv-optm 2.5.16 |", "|---|---:|---:|---:|"]
            for name, (kw, in_reference, *which) in FEATURES.items():
                if name not in wanted:
                    continue
                cls = which[0] if which else "AdamW_adv"
                base_cls, base_kw = which[1] if len(which) > 1 else (cls, {})
                print(f"  {set_name} threads={threads} {name}", file=sys.stderr, flush=True)
                eager = ratio(template, lambda p: adv_chain_step(p, False, base_cls, **base_kw),
                              lambda p: adv_chain_step(p, False, cls, **kw), args, False)
                compiled = ratio(template, lambda p: adv_chain_step(p, True, base_cls, **base_kw),
                                 lambda p: adv_chain_step(p, True, cls, **kw), args, True)
                if in_reference:
                    reference = ratio(template, lambda p: adv_optm_step(p, base_cls, **base_kw),
                                      lambda p: adv_optm_step(p, cls, **kw), args, False)
                elif args.legacy_reference:
                    reference = legacy_reference(args, set_name, threads, name)
                else:
                    reference = "only in 2.2.3 (see --legacy-reference)"
                out.append(f"| {name} | {eager} | {compiled} | {reference} |")
                print(out[-1], flush=True)
            out.append("")
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as report:
            report.write(text)


if __name__ == "__main__":
    main()
