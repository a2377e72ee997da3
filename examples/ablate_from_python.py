"""An ablation from Python: the engine behind ``python -m adv_chain ablate``.

    python examples/ablate_from_python.py

Each change is one variant against the baseline preset; every variant trains from the same
initialization and data order per seed. With ``out=...`` the runs are appended to ``results.jsonl``
as they finish (``resume=True`` continues an interrupted ablation), with ``table.md`` and
``curves.png`` beside them.
"""
import adv_chain as ac


def main() -> None:
    base = ac.presets.adamw_adv(cautious_mask=True, weight_decay=0.01)
    result = ac.ablate(
        base,
        changes=[("swap", "cautious=grams"), ("without", "cautious"), ("insert_before", "adam=orthograd()")],
        variants={"lion instead": ac.presets.lion_adv(weight_decay=0.1)},  # any chain can be a variant
        task="mlp", steps=150, seeds=2, progress=False,
    )
    print(result.table)
    best = min(result.rows(), key=lambda row: row["val"])
    print(f"lowest validation loss: {best['variant']} ({best['val']:.4f})")


if __name__ == "__main__":
    main()
