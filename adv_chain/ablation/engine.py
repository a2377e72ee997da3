"""The ablation engine behind ``ac.ablate`` and ``python -m adv_chain ablate``.

Every (variant, seed) run trains the task from the same initialization and data order with one chain,
then appends one JSON line to ``results.jsonl`` at once: an interrupted ablation loses at most the run
in progress, and ``resume=True`` skips every run already recorded with the same chain, task, steps,
learning rate and dtype. The table (``table.md``) and the curves (``curves.png``, with matplotlib) are
rebuilt from that file, so they always describe everything recorded.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .._core.chain import Chain
from .._core.optimizer import ChainOptimizer
from .tasks import as_task_run, resolve_task
from .variants import AblationError, Variant, baseline_chain, variant_from_config, variant_from_flag

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
#: two-sided 95% critical values of Student's t by degrees of freedom (paired test over seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


@dataclass
class RunRecord:
    """One finished run (one line of ``results.jsonl``)."""

    variant: str
    seed: int
    key: str
    train_loss: float
    val_loss: float
    step_ms: float
    state_bytes: int
    diverged: bool
    curve: list[float]
    val_curve: list[list[float]]
    wall_s: float
    chain: dict[str, Any] = field(default_factory=dict)


@dataclass
class AblationResult:
    """What :func:`ablate` returns: the variants (baseline first), every recorded run, and the
    Markdown table; ``out`` is the directory holding ``results.jsonl``, ``table.md``, ``config.json``
    and ``curves.png``."""

    variants: list[Variant]
    runs: list[RunRecord]
    table: str
    out: Path | None
    plot: Path | None

    def rows(self) -> list[dict[str, Any]]:
        return summarize(self.variants, self.runs)


def run_key(chain: Chain, task: str, steps: int, lr: float, dtype: str, device: str) -> str:
    """A digest of everything that determines a run's numbers except the seed."""
    text = json.dumps({"chain": chain.to_config(), "task": task, "steps": steps, "lr": lr, "dtype": dtype,
                       "device": device}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def for_dtype(c: Chain, dtype: str) -> Chain:
    """bf16 weights get the stochastic-rounding terminal when the chain ends with plain ``apply``."""
    if DTYPES[dtype] is torch.bfloat16 and c.transforms[-1].type_name == "apply":
        from ..transforms import stochastic_round_apply
        return c.replace(c.transforms[-1].name, stochastic_round_apply())
    return c


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per quarter otherwise)."""

    def __init__(self, enabled: bool, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._quarter = -1

    def update(self, label: str, step: int, steps: int, loss: float, started: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step == steps
        quarter = 4 * step // steps
        if self.tty and not done and now - self._last < 0.2:
            return
        if not self.tty and not done and quarter == self._quarter:
            return
        self._last, self._quarter = now, quarter
        rate = (now - started) / max(step, 1)
        eta = int(rate * (steps - step))
        width = 24
        fill = width * step // steps
        text = (f"{label} [{'#' * fill}{'.' * (width - fill)}] {step}/{steps} loss {loss:.4f} "
                f"{1000 * rate:.0f} ms/it ETA {eta // 60}:{eta % 60:02d}")
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _schedule(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 10)

    def factor(t: int) -> float:  # linear warm-up over 10% of the steps, then cosine to 10%
        if t < warm:
            return (t + 1) / warm
        frac = (t - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return factor


def train_once(c: Chain, task: Callable[..., Any], task_name: str, seed: int, steps: int, lr: float | None,
               device: str, dtype: str, progress: Progress, label: str) -> dict[str, Any]:
    """Train one (chain, seed); returns the measured numbers."""
    run = as_task_run(task(seed=seed, steps=steps, device=device, dtype=DTYPES[dtype]), task_name)
    lr = run.lr if lr is None else lr
    opt = ChainOptimizer(run.model.parameters(), c, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    losses: list[float] = []
    val_curve: list[list[float]] = []
    step_times: list[float] = []
    every = max(1, steps // 10)
    started = time.perf_counter()
    diverged = False
    for t in range(steps):
        loss = run.train_loss(t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tick = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - tick)
        sched.step()
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            diverged = True
            break
        if (t + 1) % every == 0 or t + 1 == steps:
            with torch.no_grad():
                val_curve.append([t + 1, float(run.val_loss())])
        progress.update(label, t + 1, steps, value, started)
    if diverged:
        progress.update(label + " DIVERGED", steps, steps, float("nan"), started)
    tail = losses[-max(1, min(10, len(losses))):]
    return {"train_loss": statistics.fmean(tail) if not diverged else float("nan"),
            "val_loss": val_curve[-1][1] if val_curve and not diverged else float("nan"),
            "step_ms": 1000 * statistics.median(step_times), "state_bytes": state_bytes(opt),
            "diverged": diverged, "curve": _thin(losses, 200), "val_curve": val_curve,
            "wall_s": time.perf_counter() - started}


def _thin(values: list[float], points: int) -> list[float]:
    """Means of consecutive windows so a curve keeps at most ``points`` values."""
    if len(values) <= points:
        return [round(v, 6) for v in values]
    size = math.ceil(len(values) / points)
    return [round(statistics.fmean(values[i:i + size]), 6) for i in range(0, len(values), size)]


def read_results(path: Path) -> list[RunRecord]:
    runs = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    runs.append(RunRecord(**json.loads(line)))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut short by an interruption: that run is simply redone
    return runs


# -- summaries ------------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(variants: list[Variant], runs: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """Per variant: mean/std of train and validation loss over seeds, the paired difference of the
    validation loss to the baseline with a 95% significance flag, median step time, state bytes."""
    by_variant: dict[str, dict[int, RunRecord]] = {}
    for r in runs:
        by_variant.setdefault(r.variant, {})[r.seed] = r
    base = by_variant.get(variants[0].name, {})
    rows = []
    for v in variants:
        rs = by_variant.get(v.name, {})
        ok = [r for r in rs.values() if not r.diverged]
        tr, tr_sd = _mean_std([r.train_loss for r in ok])
        va, va_sd = _mean_std([r.val_loss for r in ok])
        row = {"variant": v.name, "seeds": len(rs), "diverged": len(rs) - len(ok), "train": tr, "train_std": tr_sd,
               "val": va, "val_std": va_sd, "delta": None, "significant": None,
               "step_ms": statistics.median([r.step_ms for r in rs.values()]) if rs else float("nan"),
               "state_mb": (max(r.state_bytes for r in rs.values()) / 2**20) if rs else float("nan")}
        shared = [s for s in rs if s in base and not rs[s].diverged and not base[s].diverged]
        if v is not variants[0] and shared:
            diffs = [rs[s].val_loss - base[s].val_loss for s in shared]
            row["delta"] = statistics.fmean(diffs)
            if len(diffs) > 1:
                sd = statistics.stdev(diffs)
                dof = len(diffs) - 1
                crit = _T95.get(dof) or _T95[max(k for k in _T95 if k <= dof)]
                row["significant"] = sd == 0 and row["delta"] != 0 or sd > 0 and abs(row["delta"]) / (
                    sd / math.sqrt(len(diffs))) > crit
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += ["| variant | train loss | val loss | Δ val vs baseline | step (ms) | state (MB) |",
              "|---|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        name = f"**{r['variant']}** (baseline)" if i == 0 else r["variant"]
        if r["diverged"]:
            name += f" ({r['diverged']} diverged)"
        if r["delta"] is None:
            delta = "—"
        else:
            mark = "" if r["significant"] is None else (" *" if r["significant"] else "")
            delta = f"{r['delta']:+.4f}{mark}"
        lines.append(f"| {name} | {r['train']:.4f} ± {r['train_std']:.4f} | {r['val']:.4f} ± {r['val_std']:.4f} "
                     f"| {delta} | {r['step_ms']:.2f} | {r['state_mb']:.3f} |")
    lines += ["", "mean ± std over seeds; Δ is the mean paired difference in validation loss (same seeds); "
              "`*` marks |Δ| beyond the 95% paired t-test threshold; step = median optimizer.step() time."]
    return "\n".join(lines) + "\n"


def plot_curves(variants: list[Variant], runs: list[RunRecord], path: Path, title: str) -> Path | None:
    """Mean training curve (smoothed) and validation points per variant; ``None`` without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    tops: list[float] = []
    lows: list[float] = []
    for i, v in enumerate(variants):
        rs = [r for r in runs if r.variant == v.name and not r.diverged]
        if not rs:
            continue
        n = min(len(r.curve) for r in rs)
        mean = [statistics.fmean(r.curve[j] for r in rs) for j in range(n)]
        smooth, acc = [], mean[0]
        for x in mean:
            acc = 0.9 * acc + 0.1 * x
            smooth.append(acc)
        total = max(r.val_curve[-1][0] for r in rs)
        xs = [total * (j + 1) / n for j in range(n)]
        style = {"color": "black", "linewidth": 2.4, "zorder": 5} if i == 0 else {"linewidth": 1.3}
        label = v.name + (" (baseline)" if i == 0 else "")
        ax_train.plot(xs, smooth, label=label, **style)
        tops.append(smooth[len(smooth) // 10])
        lows.append(min(smooth))
        m = min(len(r.val_curve) for r in rs)
        vx = [rs[0].val_curve[j][0] for j in range(m)]
        vy = [statistics.fmean(r.val_curve[j][1] for r in rs) for j in range(m)]
        ax_val.plot(vx, vy, marker="o", markersize=3, label=label, **style)
    for ax, name in ((ax_train, "train loss (EMA, mean over seeds)"), (ax_val, "validation loss (mean over seeds)")):
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    if tops:  # the first steps' loss would flatten the part of the curves that differs
        ax_train.set_ylim(min(lows) - 0.02 * (max(tops) - min(lows)), max(tops))
    ax_val.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the engine -----------------------------------------------------------------------------------
def build_variants(preset: "str | Chain", settings: Mapping[str, Any] | None = None,
                   changes: Iterable[tuple[str, str]] = (), variants: Any = None) -> list[Variant]:
    """Baseline first, then one variant per ``(kind, spec)`` change and per entry of ``variants``
    (a mapping name -> Chain, or a list of config-file tables / Chains)."""
    settings = dict(settings or {})
    base = baseline_chain(preset, settings)
    label = (preset if isinstance(preset, str) else "baseline") + "".join(f" {k}={v}" for k, v in settings.items())
    out = [Variant(label, base)]
    for kind, spec in changes:
        label, c = variant_from_flag(base, kind, spec, preset=preset, settings=settings)
        out.append(Variant(label, c))
    if isinstance(variants, Mapping):
        for name, c in variants.items():
            if not isinstance(c, Chain):
                raise AblationError(f"variants[{name!r}] must be a Chain, got {type(c).__name__}")
            out.append(Variant(str(name), c))
    elif variants:
        for i, entry in enumerate(variants):
            out.append(variant_from_config(base, entry, preset=preset, settings=settings, index=i))
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AblationError(f"variant names must be unique; repeated: {dupes} (give each a 'name')")
    if len(out) == 1:
        raise AblationError("no variants: add --swap A=B, --without A, --insert-after A=B, --vary KEY=VALUE "
                            "or [[variants]] in a config file")
    return out


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AblationError(f"{name}={value!r} must be an integer >= 1")
    return value


def ablate(preset: "str | Chain" = "adamw_adv", *, set: Mapping[str, Any] | None = None,  # noqa: A002
           changes: Iterable[tuple[str, str]] = (), variants: Any = None, task: Any = "charlm",
           steps: int = 600, seeds: int = 3, lr: float | None = None, out: "str | os.PathLike | None" = None,
           resume: bool = False, threads: int | None = None, device: str = "cpu", dtype: str = "fp32",
           progress: bool = True, plot: bool = True) -> AblationResult:
    """Train a baseline and its variants on a task over several seeds; table, JSONL and plot.

    ``preset`` (a name or a :class:`Chain`) with ``set`` (preset keywords, or ``name.arg`` transform
    arguments) is the baseline; ``changes`` are ``(kind, spec)`` pairs, one variant each (kinds:
    ``swap``, ``without``, ``insert_after``, ``insert_before``, ``vary``); ``variants`` adds named
    chains (``{"grams": chain}``) or config tables (``[{"swap": {"cautious": "grams"}}]``). The task is
    ``"charlm"``, ``"mlp"``, ``"module:function"`` or a callable (see :mod:`adv_chain.ablation.tasks`);
    the learning rate follows a 10% warm-up and cosine decay to 10% of ``lr`` (default: the task's).
    Results go to ``out`` (nothing is written when it is ``None``); an ``out`` with results in it needs
    ``resume=True``, which skips runs already recorded.

    >>> import adv_chain as ac
    >>> result = ac.ablate("adamw", changes=[("swap", "eps_divide=atan2_scale")], task="mlp", steps=5,
    ...                    seeds=1, progress=False)
    >>> [row["variant"] for row in result.rows()]
    ['adamw', 'eps_divide -> atan2_scale']
    """
    steps, seeds = _positive_int("steps", steps), _positive_int("seeds", seeds)
    if dtype not in DTYPES:
        raise AblationError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise AblationError(f"lr={lr!r} must be a number > 0")
    if threads is not None:
        torch.set_num_threads(_positive_int("threads", threads))
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as err:
        raise AblationError(f"device={device!r} is not usable here: {err}") from None
    task_name, task_fn = resolve_task(task)
    vs = [Variant(v.name, for_dtype(v.chain, dtype)) for v in build_variants(preset, set, changes, variants)]
    out_dir = Path(out) if out is not None else None
    results_path = out_dir / "results.jsonl" if out_dir else None
    if results_path is not None and results_path.exists() and results_path.stat().st_size and not resume:
        raise AblationError(f"{results_path} already holds results; pass resume=True (--resume) to continue "
                            "that ablation, or choose another out directory")
    keys = {v.name: run_key(v.chain, task_name, steps, lr or 0.0, dtype, str(device)) for v in vs}
    previous = read_results(results_path) if results_path is not None else []
    runs = [r for r in previous if keys.get(r.variant) == r.key and r.seed < seeds]
    stale = len(previous) - len(runs)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"preset": preset if isinstance(preset, str) else preset.to_config(), "set": dict(set or {}),
                  "task": task_name, "steps": steps, "seeds": seeds, "lr": lr, "dtype": dtype,
                  "device": str(device), "threads": torch.get_num_threads(),
                  "variants": [{"name": v.name, "chain": v.chain.to_config(), "key": keys[v.name]} for v in vs],
                  "written": datetime.datetime.now().isoformat(timespec="seconds")}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    bar = Progress(progress)
    if progress and stale:
        print(f"resume: {stale} recorded run(s) belong to another configuration and are not used",
              file=sys.stderr)
    done = {(r.variant, r.seed) for r in runs}
    todo = [(seed, v) for seed in range(seeds) for v in vs if (v.name, seed) not in done]
    if progress and done:
        print(f"resume: {len(done)} run(s) already recorded, {len(todo)} to go", file=sys.stderr)
    for i, (seed, v) in enumerate(todo):
        label = f"[{i + 1}/{len(todo)}] {v.name} seed {seed}"
        numbers = train_once(v.chain, task_fn, task_name, seed, steps, lr, str(device), dtype, bar, label)
        record = RunRecord(variant=v.name, seed=seed, key=keys[v.name], chain=v.chain.to_config(), **numbers)
        runs.append(record)
        if results_path is not None:
            with results_path.open("a+") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():  # after a line cut short by an interruption, start a new line
                    fh.seek(fh.tell() - 1)
                    last = fh.read(1)
                    fh.seek(0, os.SEEK_END)
                    if last != "\n":
                        fh.write("\n")
                fh.write(json.dumps(record.__dict__) + "\n")
    title = (f"{task_name}, {steps} steps, {seeds} seed(s), {dtype}, baseline "
             f"{preset if isinstance(preset, str) else 'chain'}")
    table = markdown_table(summarize(vs, runs), f"### Ablation: {title}")
    plot_path = None
    if out_dir is not None:
        (out_dir / "table.md").write_text(table)
        if plot:
            plot_path = plot_curves(vs, runs, out_dir / "curves.png", title)
    return AblationResult(vs, runs, table, out_dir, plot_path)
