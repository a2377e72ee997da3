"""Quality: final train/validation loss of adamw and adamw_adv features, ours and adv-optm's, over seeds.

The two built-in tasks of the ablation runner (adv_chain/ablation/tasks.py), which need no download:
  * ``charlm`` - a byte-level transformer trained on the Python standard library's own source files
    (present on every machine), next-byte cross-entropy;
  * ``mlp`` - a classifier on a deterministic synthetic dataset (overlapping Gaussian clusters through
    a fixed random nonlinear map, 10% label noise).
Each variant runs with the same seeds, data order and initialization for both libraries, so "same
feature, same seed: ours and the reference agree" can be read off the table.

Usage (from the repository root):
    python benchmarks/quality.py --steps 150 --seeds 3 --markdown benchmarks/RESULTS.md
"""

import argparse
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adv_chain.ablation.tasks import charlm, mlp  # noqa: E402

VARIANTS = {  # name -> keywords of AdamW_adv (both libraries); None: plain adamw
    "adamw": None,
    "adamw_adv": {},
    "adamw_adv orthograd": {"orthogonal_gradient": "flattened"},
    "adamw_adv atan2": {"use_atan2": True},
    "adamw_adv cautious_wd": {"cautious_wd": True},
    "adamw_adv kourkoutas": {"kourkoutas_beta": True},
    "adamw_adv cautious_mask (legacy)": {"cautious_mask": True},
    "adamw_adv grams (legacy)": {"grams_moment": True},
    "adamw_adv nnmf_factor": {"nnmf_factor": True},  # low-memory state (issue 5): SMMF factored moments
}
LEGACY = {"cautious_mask", "grams_moment", "use_AdEMAMix"}


TASKS = {"charlm": charlm, "mlp": mlp}  # the ablation runner's built-in tasks (one source of truth)


def make_optimizer(library: str, variant: dict | None, params, lr: float):
    if library == "adv_chain":
        import adv_chain as ac
        if variant is None:
            return ac.optim.AdamW(params, lr=lr, weight_decay=0.01)
        return ac.optim.AdamW_adv(params, lr=lr, weight_decay=0.01, **variant)
    if variant is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if set(variant) & LEGACY:
        return None  # adv-optm 2.5.16 no longer has the legacy features
    import adv_optm
    return adv_optm.AdamW_adv(params, lr=lr, weight_decay=0.01, **variant)


def run(task: str, library: str, variant: dict | None, seed: int, steps: int):
    job = TASKS[task](seed, steps)
    model, train_loss, val_loss, lr = job.model, job.train_loss, job.val_loss, job.lr
    opt = make_optimizer(library, variant, model.parameters(), lr)
    if opt is None:
        return None
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                cycle_momentum=False)
    recent = []
    for t in range(steps):
        loss = train_loss(t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-10:]
    with torch.no_grad():
        return statistics.fmean(recent), val_loss().item()


def cell(results) -> str:
    if not results or any(r is None for r in results):
        return "n/a (only in adv-optm 2.2.3)"
    tr, va = [r[0] for r in results], [r[1] for r in results]
    spread = statistics.pstdev(va) if len(va) > 1 else 0.0
    return f"{statistics.fmean(tr):.4f} / {statistics.fmean(va):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="charlm,mlp")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    out = [f"## Quality: `python {shlex.join(sys.argv)}`", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
           f"lr 3e-3 with OneCycleLR, weight decay 0.01, {args.steps} steps, seeds 0..{args.seeds - 1}",
           "- cells: mean train loss of the last 10 steps / mean validation loss ± its std over seeds; "
           "`adamw` row: torch.optim.AdamW for the reference column", ""]
    for task in args.tasks.split(","):
        out += [f"### {task}", "", "| variant | adv_chain | adv-optm 2.5.16 (torch for adamw) |", "|---|---:|---:|"]
        for name, variant in VARIANTS.items():
            if name not in args.variants.split(","):
                continue
            print(f"  {task}: {name}", file=sys.stderr, flush=True)
            ours = [run(task, "adv_chain", variant, s, args.steps) for s in range(args.seeds)]
            ref = [run(task, "reference", variant, s, args.steps) for s in range(args.seeds)]
            out.append(f"| {name} | {cell(ours)} | {cell(ref)} |")
            print(out[-1], flush=True)
        out.append("")
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as report:
            report.write(text)


if __name__ == "__main__":
    main()
