"""Command line: ``python -m adv_chain {ablate,presets,show}``.

    python -m adv_chain ablate --preset adamw_adv --set cautious_mask=true \\
        --swap cautious=grams --without cautious --task charlm --steps 600 --seeds 3
    python -m adv_chain ablate --config my_ablation.toml --resume
    python -m adv_chain presets
    python -m adv_chain show adamw_adv --use_atan2 true
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import presets as _presets
from .ablation.engine import DTYPES, ablate
from .ablation.tasks import TASKS
from .ablation.variants import AblationError, baseline_chain, split_setting

CONFIG_KEYS = {"preset", "set", "variants", "task", "steps", "seeds", "lr", "out", "threads", "device", "dtype"}


class _Change(argparse.Action):
    """Collects --swap/--without/--insert-after/--insert-before/--vary in the order typed."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        changes = list(getattr(namespace, "changes", None) or [])
        changes.append((self.dest, values))
        namespace.changes = changes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adv_chain", description="adv_chain: optimizers as chains.")
    sub = parser.add_subparsers(dest="command", required=True)
    ab = sub.add_parser("ablate", help="train a preset and variants of it over seeds; table, JSONL and plot",
                        description="Each --swap/--without/--insert-after/--insert-before/--vary is one variant "
                                    "against the baseline (the preset with its --set keywords); the baseline "
                                    "always runs.")
    ab.add_argument("--preset", help="baseline preset (default adamw_adv; see `python -m adv_chain presets`)")
    ab.add_argument("--config", type=Path, help="a TOML or JSON file with preset/set/variants/task/...; "
                                                 "flags given here override it")
    ab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a baseline preset keyword (cautious_mask=true) or a transform argument (adam.betas=0.9,0.95)")
    for flag, dest, meta, text in (("--swap", "swap", "A=B", "replace transform A by B, e.g. cautious=grams"),
                                   ("--without", "without", "A", "drop transform A"),
                                   ("--insert-after", "insert_after", "A=B", "insert B(args) after A"),
                                   ("--insert-before", "insert_before", "A=B", "insert B(args) before A"),
                                   ("--vary", "vary", "KEY=VALUE", "the baseline preset with one more keyword")):
        ab.add_argument(flag, dest=dest, action=_Change, metavar=meta, help=text + " (one variant)")
    ab.add_argument("--task", help=f"{' | '.join(TASKS)} | module:function (default charlm)")
    ab.add_argument("--steps", type=int, help="training steps per run (default 600)")
    ab.add_argument("--seeds", type=int, help="seeds 0..N-1 per variant (default 3)")
    ab.add_argument("--lr", type=float, help="peak learning rate (default: the task's, 3e-3 for the built-ins)")
    ab.add_argument("--out", type=Path, help="output directory (default ablations/<preset>-<time>/)")
    ab.add_argument("--resume", action="store_true", help="continue the ablation recorded in --out "
                                                          "(default: the newest one of this preset)")
    ab.add_argument("--threads", type=int, help="torch threads")
    ab.add_argument("--device", help="torch device (default cpu)")
    ab.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (bf16 uses the stochastic-rounding terminal)")
    ab.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    ab.add_argument("--quiet", action="store_true", help="no progress bar")
    pr = sub.add_parser("presets", help="list the presets and their keywords")
    pr.add_argument("name", nargs="?", help="only this preset, one keyword per line")
    sh = sub.add_parser("show", help="print the chain a preset builds: show adamw_adv --use_atan2 true")
    sh.add_argument("preset")
    sh.add_argument("--json", action="store_true", help="print the chain's JSON config instead")
    return parser


def _load_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AblationError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise AblationError(f"--config {path}: invalid JSON ({err})") from None
    else:
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise AblationError(f"--config {path}: invalid TOML ({err})") from None
    if not isinstance(data, dict):
        raise AblationError(f"--config {path}: the top level must be a table/object")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise AblationError(f"--config {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    return data


def _newest_run(preset: str) -> Path:
    root = Path("ablations")
    found = sorted((p for p in root.glob(f"{preset}-*") if (p / "config.json").exists()),
                   key=lambda p: p.stat().st_mtime) if root.exists() else []
    if not found:
        raise AblationError(f"--resume: no earlier ablation of {preset!r} under {root}/; pass --out DIR")
    return found[-1]


def cmd_ablate(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config) if args.config else {}
    pick = lambda key, default=None: getattr(args, key) if getattr(args, key) is not None else cfg.get(key, default)  # noqa: E731
    preset = pick("preset", "adamw_adv")
    settings = dict(cfg.get("set", {}))
    settings.update(split_setting(s) for s in args.set)
    out = args.out or (Path(cfg["out"]) if "out" in cfg else None)
    if out is None:
        out = _newest_run(preset) if args.resume else Path("ablations") / (
            f"{preset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    result = ablate(preset, set=settings, changes=getattr(args, "changes", None) or [],
                    variants=cfg.get("variants"), task=pick("task", "charlm"), steps=pick("steps", 600),
                    seeds=pick("seeds", 3), lr=pick("lr"), out=out, resume=args.resume, threads=pick("threads"),
                    device=pick("device", "cpu"), dtype=pick("dtype", "fp32"), progress=not args.quiet,
                    plot=not args.no_plot)
    print(result.table)
    print(f"results: {out / 'results.jsonl'}\ntable:   {out / 'table.md'}")
    if result.plot is not None:
        print(f"curves:  {result.plot}")
    elif not args.no_plot:
        print("curves:  not drawn, matplotlib is missing: pip install 'adv-chain[plot]'")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    names = [args.name.lower()] if args.name else _presets.names()
    for name in names:
        if name not in _presets.names():
            raise AblationError(f"unknown preset {args.name!r}; known presets: {', '.join(_presets.names())}")
        kws = _presets.keywords(name)
        print(f"{name}: {_presets.summary(name)}")
        if args.name:
            for k, v in kws.items():
                print(f"    {k} = {v!r}")
        else:
            print("    " + ", ".join(f"{k}={v!r}" for k, v in kws.items()))
    return 0


def cmd_show(args: argparse.Namespace, extra: Sequence[str]) -> int:
    settings: dict[str, str] = {}
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) < 3:
            raise AblationError(f"show: expected --KEY VALUE pairs after the preset name, got {item!r}")
        if "=" in item:
            key, value = split_setting(item[2:], "show")
            i += 1
        else:
            if i + 1 >= len(extra):
                raise AblationError(f"show: {item} needs a value")
            key, value = item[2:], extra[i + 1]
            i += 2
        settings[key] = value
    c = baseline_chain(args.preset, settings)
    print(json.dumps(c.to_config(), indent=2) if args.json else c)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command != "show" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "ablate":
            return cmd_ablate(args)
        if args.command == "presets":
            return cmd_presets(args)
        return cmd_show(args, extra)
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are in results.jsonl; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
