"""Quality: final train/validation loss of adv_chain's drop-ins and their references, same seeds.

Rows: adamw (vs torch), the adamw_adv features (vs adv-optm 2.5.16), prodigy (vs prodigyopt), and
prodigy_adv, muon_adv, adamuon_adv and lion_adv (vs adv-optm 2.5.16).

The two built-in tasks of the ablation runner (adv_chain/ablation/tasks.py), which need no download:
  * ``charlm`` - a byte-level transformer trained on the Python standard library's own source files
    (present on every machine), next-byte cross-entropy;
  * ``mlp`` - a classifier on a deterministic synthetic dataset (overlapping Gaussian clusters through
    a fixed random nonlinear map, 10% label noise).
Each variant runs with the same seeds, data order and initialization for both libraries, so "same
feature, same seed: ours and the reference agree" can be read off the table: the "max seed Δ" column
is the largest per-seed difference. ``--control`` adds the same difference between the reference and
itself started one ulp away, the size to which the task and optimizer alone grow rounding differences
(ours and the reference round differently from the first steps on: operation order, fused kernels).

Every row runs the same schedule: OneCycleLR to the row's peak learning rate (10% warm-up, cosine
decay, no momentum cycling) and weight decay 0.01. The peak lr is the task's (3e-3) for the Adam
family, 1.0 for Prodigy (learning-rate free: lr is a multiplier of its estimated step size d, and
the schedule multiplies it as it would Adam's lr), 2e-2 for the Muon family and 3e-4 for Lion. The
Muon rows pass ``model.parameters()`` to both libraries, so both route by the reference's shape test
(matrices to Muon, vectors to the auxiliary Adam, which runs at the same lr with
``adam_weight_decay=0.01``); given ``model.named_parameters()`` adv_chain would also send embeddings
and heads to Adam, which the reference does not.

Usage (from the repository root; ``--threads 1`` runs faster on a busy machine):
    python benchmarks/quality.py --steps 150 --seeds 3 --markdown benchmarks/RESULTS.md
    python benchmarks/quality.py --steps 300 --seeds 3 --threads 1 --control \
        --variants adamw,prodigy,prodigy_adv,muon_adv,adamuon_adv,lion_adv
"""

import argparse
import datetime
import importlib
import importlib.metadata
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adv_chain.ablation.tasks import charlm, mlp  # noqa: E402

WD = 0.01

# family -> (adv_chain class, reference "module.Class", peak lr: None for the task's own, extra keywords)
FAMILIES = {
    "adamw": ("AdamW", "torch.optim.AdamW", None, {}),
    "adamw_adv": ("AdamW_adv", "adv_optm.AdamW_adv", None, {}),
    "prodigy": ("Prodigy", "prodigyopt.Prodigy", 1.0, {}),
    "prodigy_adv": ("Prodigy_adv", "adv_optm.Prodigy_adv", 1.0, {}),
    "muon_adv": ("Muon_adv", "adv_optm.Muon_adv", 2e-2, {"adam_weight_decay": WD}),
    "adamuon_adv": ("AdaMuon_adv", "adv_optm.AdaMuon_adv", 2e-2, {"adam_weight_decay": WD}),
    "lion_adv": ("Lion_adv", "adv_optm.Lion_adv", 3e-4, {}),
}

VARIANTS = {  # name -> (family, feature keywords given to both libraries)
    "adamw": ("adamw", {}),
    "adamw_adv": ("adamw_adv", {}),
    "adamw_adv orthograd": ("adamw_adv", {"orthogonal_gradient": "flattened"}),
    "adamw_adv atan2": ("adamw_adv", {"use_atan2": True}),
    "adamw_adv cautious_wd": ("adamw_adv", {"cautious_wd": True}),
    "adamw_adv kourkoutas": ("adamw_adv", {"kourkoutas_beta": True}),
    "adamw_adv cautious_mask (legacy)": ("adamw_adv", {"cautious_mask": True}),
    "adamw_adv grams (legacy)": ("adamw_adv", {"grams_moment": True}),
    "adamw_adv nnmf_factor": ("adamw_adv", {"nnmf_factor": True}),  # low-memory state (issue 5): SMMF factored moments
    "prodigy": ("prodigy", {}),
    "prodigy_adv": ("prodigy_adv", {}),
    "muon_adv": ("muon_adv", {}),
    "adamuon_adv": ("adamuon_adv", {}),
    "lion_adv": ("lion_adv", {}),
}
LEGACY = {"cautious_mask", "grams_moment", "use_AdEMAMix"}


TASKS = {"charlm": charlm, "mlp": mlp}  # the ablation runner's built-in tasks (one source of truth)


def reference_name(family: str) -> str:
    """The reference column's library, with its installed version (torch's for adamw)."""
    module = FAMILIES[family][1].split(".")[0]
    dist = {"adv_optm": "adv-optm"}.get(module, module)
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def peak_lr(family: str, task_lr: float) -> float:
    lr = FAMILIES[family][2]
    return task_lr if lr is None else lr


def make_optimizer(library: str, variant: tuple[str, dict], params, lr: float):
    family, features = variant
    ours, reference, _, extra = FAMILIES[family]
    kwargs = {"lr": lr, "weight_decay": WD, **extra, **features}
    if library == "adv_chain":
        import adv_chain as ac
        return getattr(ac.optim, ours)(params, **kwargs)
    if set(features) & LEGACY:
        return None  # adv-optm 2.5.16 no longer has the legacy features
    module, _, cls = reference.rpartition(".")
    return getattr(importlib.import_module(module), cls)(params, **kwargs)


def nudge_one_ulp(model: torch.nn.Module) -> None:
    """Move every parameter element to the next float up: a starting point one rounding away, for the
    ``--control`` column (how far the task and optimizer alone amplify rounding differences)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


def run(task: str, library: str, variant: tuple[str, dict], seed: int, steps: int, nudge: bool = False):
    job = TASKS[task](seed, steps)
    model, train_loss, val_loss = job.model, job.train_loss, job.val_loss
    if nudge:
        nudge_one_ulp(model)
    lr = peak_lr(variant[0], job.lr)
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


def largest_difference(ours, ref) -> str:
    """The largest per-seed |ours - reference| of the train and of the validation loss."""
    if not ours or not ref or any(r is None for r in ours + ref):
        return "–"
    train = max(abs(a[0] - b[0]) for a, b in zip(ours, ref))
    val = max(abs(a[1] - b[1]) for a, b in zip(ours, ref))
    return f"{train:.4f} / {val:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="charlm,mlp")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--control", action="store_true",
                        help="add a column: the reference against itself started one ulp away (every weight moved "
                             "to the next float), the task's own amplification of rounding differences")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    chosen = [name for name in VARIANTS if name in args.variants.split(",")]
    families = list(dict.fromkeys(VARIANTS[name][0] for name in chosen))
    lr_note = ", ".join(f"{family} {FAMILIES[family][2] or 'the task default (3e-3)'}" for family in families)
    out = [f"## Quality: `python {shlex.join(sys.argv)}`", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
           f"OneCycleLR to the peak lr (pct_start 0.1, no momentum cycling), weight decay 0.01, "
           f"{args.steps} steps, seeds 0..{args.seeds - 1}, {args.threads} thread(s)",
           f"- peak lr: {lr_note}",
           "- cells: mean train loss of the last 10 steps / mean validation loss ± its std over seeds; "
           "max seed Δ: the largest per-seed |adv_chain - reference| of the train / validation loss", ""]
    if args.control:
        out.insert(-1, "- control: the same largest per-seed difference between the reference and the reference "
                       "started one ulp away (every parameter element moved to the next float up); "
                       "ours and the reference round differently (summation order, fused ops) from the first steps "
                       "on, so a max seed Δ of the control's size is the task amplifying rounding, not a math "
                       "difference")
    if any(VARIANTS[n][0] in ("prodigy", "prodigy_adv") for n in chosen):
        out.insert(-1, "- prodigy rows: learning-rate free, so lr=1.0 (a multiplier of the estimated d) under the "
                       "same OneCycleLR schedule as every other row")
    if any(VARIANTS[n][0] in ("muon_adv", "adamuon_adv") for n in chosen):
        out.insert(-1, "- muon rows: both libraries get `model.parameters()` and route by the reference's shape "
                       "test (2-D+ to Muon, embeddings and head included; the rest to the auxiliary Adam at the same "
                       "lr, adam_weight_decay 0.01)")
    for task in args.tasks.split(","):
        header = "| variant | reference | peak lr | adv_chain | reference | max seed Δ train / val |"
        rule = "|---|---|---:|---:|---:|---:|"
        if args.control:
            header, rule = header + " control: reference vs reference 1 ulp away |", rule + "---:|"
        out += [f"### {task}", "", header, rule]
        for name in chosen:
            variant = VARIANTS[name]
            print(f"  {task}: {name}", file=sys.stderr, flush=True)
            lr = peak_lr(variant[0], TASKS[task](0, 1).lr)
            ours = [run(task, "adv_chain", variant, s, args.steps) for s in range(args.seeds)]
            ref = [run(task, "reference", variant, s, args.steps) for s in range(args.seeds)]
            row = (f"| {name} | {reference_name(variant[0])} | {lr:g} | {cell(ours)} | {cell(ref)} "
                   f"| {largest_difference(ours, ref)} |")
            if args.control:
                nudged = [run(task, "reference", variant, s, args.steps, nudge=True) for s in range(args.seeds)]
                row += f" {largest_difference(ref, nudged)} |"
            out.append(row)
            print(out[-1], flush=True)
        out.append("")
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as report:
            report.write(text)


if __name__ == "__main__":
    main()
