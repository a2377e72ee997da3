"""Memory: peak memory of training steps with and without gradient release, and optimizer state bytes.

Each case runs in a fresh subprocess: it builds the parameter set, takes one step (the optimizer
state now exists), resets the peak-RSS mark (``/proc/self/clear_refs``), then takes 5 training steps on the
loss ``sum(0.5 * p**2)`` (each parameter's gradient is a fresh tensor the size of the parameter, as
with a real model, but there are no activations to blur the picture) and reports how far the peak
RSS grew above that starting point. Without release every gradient is alive at once before
``step()``; with ``ac.enable_gradient_release`` each parameter is stepped inside backward and its
gradient freed, so the peak should be about the state plus one gradient.

Usage (from the repository root):
    python benchmarks/memory.py --set gpt27m --markdown benchmarks/RESULTS.md
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _params import PARAM_SETS  # noqa: E402

MB = 2**20
CASES = {  # name -> (optimizer factory name, gradient release)
    "adamw, step()": ("adamw", False),
    "adamw, gradient release": ("adamw", True),
    "adamw_adv orthograd+cautious, step()": ("adamw_adv_features", False),
    "adamw_adv orthograd+cautious, gradient release": ("adamw_adv_features", True),
    "torch-optimi AdamW, step()": ("optimi", False),
    "torch-optimi AdamW, gradient release": ("optimi", True),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def child(set_name: str, optimizer: str, release: bool, steps: int) -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02)) for s in PARAM_SETS[set_name].tensor_shapes()]
    import adv_chain as ac
    if optimizer.startswith(("adv:", "ref:")):  # "<library>:<class>:<json keywords>"
        library, cls, kw = optimizer.split(":", 2)
        module = ac.optim if library == "adv" else __import__("adv_optm")
        opt = getattr(module, cls)(params, lr=1e-4, **json.loads(kw))
    elif optimizer == "optimi":
        import optimi
        opt = optimi.AdamW(params, lr=1e-4, gradient_release=release)
        if release:
            holder = torch.nn.Module()
            holder.params = torch.nn.ParameterList(params)
            optimi.prepare_for_gradient_release(holder, opt)
    else:
        chain = (ac.presets.adamw(weight_decay=0.01) if optimizer == "adamw" else
                 ac.presets.adamw_adv(orthogonal_gradient="flattened", cautious_mask=True, weight_decay=0.01))
        opt = ac.ChainOptimizer(params, chain, lr=1e-4)
        if release:
            ac.enable_gradient_release(opt, params)
    fixed_grads = optimizer.startswith(("adv:", "ref:"))
    if fixed_grads:  # state cases: gradients exist before the start point, growth is the optimizer's own
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).mul_(1e-2)

    def train_step() -> None:
        if fixed_grads:
            opt.step()
            return
        loss = sum(0.5 * p.square().sum() for p in params)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # allocates (and touches) every state tensor
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    start = rss_bytes()
    for _ in range(steps):
        train_step()
    peak = vm_hwm()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": sum(p.numel() * 4 for p in params), "state_bytes": state,
            "start_rss": start, "peak_rss": peak, "growth": peak - start}


#: low-memory state (issue 5): case -> (class, keywords); ours and adv-optm 2.5.16 side by side
STATE_CASES = {
    "AdamW_adv (fp32 moments)": ("AdamW_adv", {"state_precision": "fp32"}),
    "AdamW_adv nnmf_factor": ("AdamW_adv", {"nnmf_factor": True}),
    "AdamW_adv factored_2nd": ("AdamW_adv", {"factored_2nd": True}),
    "AdamW_adv bf16_sr": ("AdamW_adv", {"state_precision": "bf16_sr"}),
    "AdamW_adv int8_sr": ("AdamW_adv", {"state_precision": "int8_sr"}),
    "Adopt_adv nnmf_factor": ("Adopt_adv", {"nnmf_factor": True}),
    "Lion_adv nnmf_factor": ("Lion_adv", {"nnmf_factor": True}),
}


def run_case(set_name: str, name: str, steps: int) -> dict:
    optimizer, release = CASES[name] if name in CASES else (name, False)
    cmd = [sys.executable, __file__, "--child", json.dumps([set_name, optimizer, release, steps])]
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed,
    # so the peak RSS sees what is alive rather than what glibc kept cached
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="gpt27m", choices=sorted(PARAM_SETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    state_rows = []
    for name, (cls, kw) in STATE_CASES.items():
        ours = run_case(args.set, f"adv:{cls}:{json.dumps(kw)}", args.steps)
        ref = run_case(args.set, f"ref:{cls}:{json.dumps(kw)}", args.steps)
        state_rows.append((name, ours, ref))
        print(name, ours, ref, file=sys.stderr, flush=True)
    rows = {name: run_case(args.set, name, args.steps) for name in CASES}
    grads = next(iter(rows.values()))["param_bytes"]
    lines = [f"## Peak memory of training steps: `python {shlex.join(sys.argv)}`", "",
             f"- {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; set {args.set}: "
             f"params {grads / MB:.1f} MB, gradients {grads / MB:.1f} MB (fp32); {args.steps} steps, 1 thread",
             "- growth = peak RSS over the 5 steps minus RSS before them (model and optimizer state exist); "
             "saved = growth without release minus growth with it, as a share of the gradient bytes", "",
             "| case | state (MB) | peak growth (MB) | saved vs step() (MB) | share of gradient memory saved |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        saved = ""
        if name.endswith("gradient release"):
            plain = rows[name.replace("gradient release", "step()")]
            delta = plain["growth"] - r["growth"]
            saved = f"{delta / MB:.1f} | **{delta / grads:.0%}**"
        else:
            saved = "– | –"
        lines.append(f"| {name} | {r['state_bytes'] / MB:.1f} | {r['growth'] / MB:.1f} | {saved} |")
    largest = max(torch.Size(sh).numel() for sh in PARAM_SETS[args.set].tensor_shapes()) * 4
    lines += ["", f"### Optimizer state ({args.set}; after {args.steps + 1} steps, fp32 params)", "",
              "state = optimizer state bytes / (8 bytes x params), fp32 torch AdamW = 1; growth = peak RSS over "
              f"the steps (gradients already allocated: the optimizer's own temporaries); target for ours: growth <= 1.2 x state + one largest-tensor temporary "
              f"({largest / MB:.0f} MB)", "",
              "| case | adv_chain state | adv-optm state | adv_chain peak growth (MB) | adv-optm peak growth (MB) |",
              "|---|---:|---:|---:|---:|"]
    for name, ours, ref in state_rows:
        n8 = 8 * ours["param_bytes"] / 4
        lines.append(f"| {name} | {ours['state_bytes'] / n8:.4f} | {ref['state_bytes'] / n8:.4f} | "
                     f"{ours['growth'] / MB:.1f} | {ref['growth'] / MB:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
