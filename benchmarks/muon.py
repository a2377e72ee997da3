"""Muon step time: Newton-Schulz batched by shape vs one matrix at a time, and vs adv-optm's Muon_adv.

On the matrices (ndim >= 2) of a shared parameter set from ``_params.py`` (for gpt27m: the two
embeddings, the untied head and the four matrices of each block; its vectors are left out, because
``Muon_adv`` would send them to its auxiliary Adam and adv_chain routes them with a partition, which
is not what this benchmark measures). fp32 params with pre-filled grads, the same chain in every
row: ``muon_momentum -> newton_schulz (bf16) -> muon_scale("rms") -> apply``, which is Muon_adv's
default math. Each row is timed in alternating pairs against the batched adv_chain step in the same
process (``_timing.py``); a ratio above 1 means slower than batched adv_chain.

Two rows time low-rank orthogonalization (``--rank``, default 128; arXiv 2509.11983: ``Q NS(Q^T G)``
with ``Q = qr(G Omega)``): adv_chain's ``newton_schulz(rank=R)`` and adv-optm's
``Muon_adv(low_rank_ortho=True, ortho_rank=R)``, both against the same full-rank batched baseline.

The last two rows time the orthogonalization alone (bf16, 5 steps) handed every matrix in one call,
batched by shape, against one call per matrix: what batching buys when a bucket holds every
same-shaped matrix. (In the optimizer, eager tensor-scope segments run on chunks of about 256K
elements of consecutive tensors, so gpt27m's matrices, each >= 256K elements, reach
``newton_schulz`` one at a time and the first two rows do the same work.)

The per-matrix row is a benchmark-only subclass of ``newton_schulz`` that feeds its matrices to the
same iteration one at a time (the library has no such switch: batching is never worse).

Usage (from the repository root):
    python benchmarks/muon.py --set gpt27m --threads 1,2
"""

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch

from _params import clone_params, count_params, make_params
from _timing import time_alternating_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adv_chain as ac  # noqa: E402
from adv_chain.transforms.muon import NewtonSchulz, orthogonalize  # noqa: E402

LR = 1e-3


class PerMatrixNewtonSchulz(NewtonSchulz):
    """``newton_schulz`` that runs the iteration on one matrix at a time (a Python loop)."""

    type_name = ""  # not registered: benchmark only

    def _orthogonalize(self, mats, sketches=None):
        one = super(PerMatrixNewtonSchulz, self)._orthogonalize
        return [one([m], None if sketches is None else [sketches[i]])[0] for i, m in enumerate(mats)]


def chain_step(params, per_matrix: bool, rank=None):
    ns = PerMatrixNewtonSchulz() if per_matrix else ac.newton_schulz(rank=rank)
    chain = ac.chain(ac.muon_momentum(), ns, ac.muon_scale(), ac.apply())
    return ac.ChainOptimizer(params, chain, lr=LR).step


def adv_optm_step(params, rank=None):
    import adv_optm
    low = {} if rank is None else {"low_rank_ortho": True, "ortho_rank": rank}
    return adv_optm.Muon_adv(params, lr=LR, **low).step


def matrices(set_name: str):
    return [p for p in make_params(set_name) if p.dim() >= 2]


def fmt(t) -> str:
    return f"{t.row_ms:.0f} ms | {t.ratio_median:.2f}x ({t.ratio_p25:.2f}–{t.ratio_p75:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="gpt27m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=128, help="ortho_rank of the low-rank rows")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    out = [f"## Muon step time: `python {shlex.join(sys.argv)}`", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
           f"{args.pairs} alternating pairs after {args.warmup} warm-up",
           "- ratio: median (p25–p75) of per-pair step time / batched adv_chain step time", ""]
    cpu = torch.device("cpu")
    for set_name in args.set.split(","):
        template = matrices(set_name)
        shapes = len({tuple(p.shape) for p in template})
        for threads in [int(n) for n in args.threads.split(",")]:
            torch.set_num_threads(threads)
            out += [f"### {set_name} matrices: {len(template)} tensors ({shapes} shapes), "
                    f"{count_params(template):,} params, threads={threads}", "",
                    "| row | step time | ratio vs batched |", "|---|---:|---:|"]
            base = chain_step(clone_params(template), per_matrix=False)
            rows = {"adv_chain, NS per matrix (loop)": chain_step(clone_params(template), per_matrix=True),
                    "adv-optm 2.5.16 Muon_adv": adv_optm_step(clone_params(template)),
                    f"adv_chain, low-rank NS (rank={args.rank})": chain_step(clone_params(template), False, args.rank),
                    f"adv-optm 2.5.16 Muon_adv, low_rank_ortho (rank={args.rank})":
                        adv_optm_step(clone_params(template), args.rank)}
            base_ms = []
            for name, row in rows.items():
                print(f"  {set_name} threads={threads} {name}", file=sys.stderr, flush=True)
                t = time_alternating_pairs(base, row, pairs=args.pairs, warmup=args.warmup, device=cpu)
                base_ms.append(t.baseline_ms)
                out.append(f"| {name} | {fmt(t)} |")
                print(out[-1], flush=True)
            out.insert(len(out) - len(rows), f"| adv_chain, NS batched by shape | {base_ms[0]:.0f} ms | 1.00x |")
            # the orthogonalization alone, handed every matrix at once (one bucket, no executor chunks)
            mats = [p.grad.reshape(p.shape[0], -1) for p in template]
            t = time_alternating_pairs(lambda: orthogonalize(mats), lambda: [orthogonalize([m]) for m in mats],
                                       pairs=args.pairs, warmup=args.warmup, device=cpu)
            out += [f"| NS alone, all matrices in one call, batched by shape | {t.baseline_ms:.0f} ms | 1.00x |",
                    f"| NS alone, one matrix per call | {fmt(t)} |", ""]
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as report:
            report.write(text)


if __name__ == "__main__":
    main()
