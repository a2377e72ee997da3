"""Cross-check of ``Lion_Prodigy_adv(nnmf_factor=True)`` with Lion-K and the cautious mask against
adv-optm 2.2.3 itself (the version that has ``Lion_Prodigy_adv``), installed apart because it
cannot sit next to the pinned 2.5.16::

    pip install --no-deps --target /tmp/adv_optm_223 adv-optm==2.2.3
    python benchmarks/legacy_parity.py --legacy-reference /tmp/adv_optm_223

The test suite checks the same runs against the spec's formulas
(tests/test_lion_prodigy.py); this script is the check against the real reference. 2.2.3's
factored path updates the moment with ``b1`` where ``b2`` belongs (spec §9.6, not reproduced by
adv_chain), so each case runs twice: against the reference with exactly that line changed to
``b2`` (default betas), and against the unchanged reference with ``b1 == b2`` (where the bug
changes nothing). 25 fp32 steps, ``d0=1e-4``, the model and batches of
tests/test_lion_prodigy_factored.py. Prints the max |parameter difference| and the max relative
difference of ``d`` over the steps, with the dense run's distance as a control.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import adv_chain as ac  # noqa: E402
from test_lion_prodigy_factored import max_diff, train  # noqa: E402

_BUG = "exp_avg.mul_(self.beta1).add_(grad_reshaped, alpha=d * (1-self.beta1))"

CASES = {
    "kappa2": dict(kappa_p=2.0),
    "auto_kappa": dict(auto_kappa_p=True),
    "cautious": dict(cautious_mask=True),
    "kappa1.5-cautious-clip-ortho-cwd": dict(kappa_p=1.5, cautious_mask=True, clip_threshold=0.5,
                                             orthogonal_gradient=True, weight_decay=0.1, cautious_wd=True),
    "auto-cautious-vector_reshape": dict(auto_kappa_p=True, cautious_mask=True, vector_reshape=True, slice_p=3,
                                         weight_decay=0.05),
}


def load_reference(root: Path) -> tuple[type, type]:
    """2.2.3's ``Lion_Prodigy_adv`` as it is, and with its factored moment update using ``b2``
    (loaded under another module name, so it never shadows the installed 2.5.16)."""
    package = root / "adv_optm"
    name = "_adv_optm_223"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if module.__version__ != "2.2.3":
        raise SystemExit(f"{package} holds adv-optm {module.__version__}, not 2.2.3")
    plain = module.Lion_Prodigy_adv
    source = textwrap.dedent(inspect.getsource(plain._step_parameter))
    if source.count(_BUG) != 1:
        raise SystemExit("2.2.3's factored moment update is not where this script expects it")
    namespace = dict(vars(sys.modules[plain.__module__]))
    exec(compile(source.replace(_BUG, _BUG.replace("beta1", "beta2")), "<patched 2.2.3>", "exec"), namespace)
    patched = type("PatchedLionProdigy", (plain,), {"_step_parameter": namespace["_step_parameter"]})
    return plain, patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--legacy-reference", type=Path, required=True,
                        help="directory holding adv-optm 2.2.3 (pip install --no-deps --target DIR adv-optm==2.2.3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain, patched = load_reference(args.legacy_reference)
    print("| case | betas / oracle | max abs param diff | max rel d diff | dense run's distance |")
    print("|---|---|---:|---:|---:|")
    for name, kw in CASES.items():
        for betas, ref_cls, label in (((0.9, 0.99), patched, "0.9, 0.99 / b2-patched"),
                                      ((0.95, 0.95), plain, "0.95, 0.95 / unchanged")):
            kw_full = dict(kw, d0=1e-4, betas=betas, nnmf_factor=True)
            ref, _, ref_ds = train(lambda p: ref_cls(p, lr=1.0, **kw_full))
            ours, _, ds = train(lambda p: ac.optim.Lion_Prodigy_adv(p, lr=1.0, **kw_full))
            dense, _, _ = train(lambda p: ac.optim.Lion_Prodigy_adv(p, lr=1.0, **{**kw_full, "nnmf_factor": False}))
            rel_d = max(abs(a - b) / abs(b) for a, b in zip(ds, ref_ds))
            print(f"| {name} | {label} | {max_diff(ours, ref):.1e} | {rel_d:.1e} | {max_diff(dense, ref):.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
