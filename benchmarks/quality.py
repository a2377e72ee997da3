"""Quality: final train/validation loss of adamw and adamw_adv features, ours and adv-optm's, over seeds.

Two small tasks that need no download:
  * ``charlm`` - a byte-level transformer trained on the Python standard library's own source files
    (present on every machine), next-byte cross-entropy;
  * ``mlp`` - a classifier on a deterministic synthetic dataset (Gaussian clusters through a fixed
    random nonlinear map).
Each variant runs with the same seeds, data order and initialization for both libraries, so "same
feature, same seed: ours and the reference agree" can be read off the table.

Usage (from the repository root):
    python benchmarks/quality.py --steps 150 --seeds 3 --markdown benchmarks/RESULTS.md
"""

import argparse
import datetime
import math
import shlex
import statistics
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> keywords of AdamW_adv (both libraries); None: plain adamw
    "adamw": None,
    "adamw_adv": {},
    "adamw_adv orthograd": {"orthogonal_gradient": "flattened"},
    "adamw_adv atan2": {"use_atan2": True},
    "adamw_adv cautious_wd": {"cautious_wd": True},
    "adamw_adv kourkoutas": {"kourkoutas_beta": True},
    "adamw_adv cautious_mask (legacy)": {"cautious_mask": True},
    "adamw_adv grams (legacy)": {"grams_moment": True},
}
LEGACY = {"cautious_mask", "grams_moment", "use_AdEMAMix"}


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)


class TinyCharLM(torch.nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.zeros(context, d))
        block = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)))


def charlm_task(seed: int, steps: int):
    data = stdlib_bytes()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    context, batch = 64, 16
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - context - 1, (steps, batch), generator=gen)
    val_starts = torch.arange(0, len(val) - context - 1, (len(val) - context - 1) // 32)[:32]
    torch.manual_seed(seed)
    model = TinyCharLM(context=context)

    def loss_on(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = torch.stack([source[i:i + context] for i in idx.tolist()])
        y = torch.stack([source[i + 1:i + context + 1] for i in idx.tolist()])
        return torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))

    return model, (lambda t: loss_on(train, starts[t])), (lambda: loss_on(val, val_starts))


def mlp_task(seed: int, steps: int):
    gen = torch.Generator().manual_seed(1234)  # the dataset is the same for every seed
    centers = torch.randn(10, 32, generator=gen) * 2
    labels = torch.randint(0, 10, (6000,), generator=gen)
    mix = torch.randn(32, 32, generator=gen) / math.sqrt(32)
    x = torch.tanh((centers[labels] + torch.randn(6000, 32, generator=gen)) @ mix)
    train_x, train_y, val_x, val_y = x[:5000], labels[:5000], x[5000:], labels[5000:]
    order = torch.randint(0, 5000, (steps, 128), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 10))

    def loss_on(xs, ys):
        return torch.nn.functional.cross_entropy(model(xs), ys)

    return model, (lambda t: loss_on(train_x[order[t]], train_y[order[t]])), (lambda: loss_on(val_x, val_y))


TASKS = {"charlm": (charlm_task, 3e-3), "mlp": (mlp_task, 3e-3)}


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
    build, lr = TASKS[task]
    model, train_loss, val_loss = build(seed, steps)
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
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = [f"## Quality: `python {shlex.join(sys.argv)}`", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
           f"lr 3e-3 with OneCycleLR, weight decay 0.01, {args.steps} steps, seeds 0..{args.seeds - 1}",
           "- cells: mean train loss of the last 10 steps / mean validation loss ± its std over seeds; "
           "`adamw` row: torch.optim.AdamW for the reference column", ""]
    for task in args.tasks.split(","):
        out += [f"### {task}", "", "| variant | adv_chain | adv-optm 2.5.16 (torch for adamw) |", "|---|---:|---:|"]
        for name, variant in VARIANTS.items():
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
