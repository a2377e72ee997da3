"""Ablations: train a baseline chain and variants that change one transform each, over seeds.

``ac.ablate(...)`` (Python) and ``python -m adv_chain ablate ...`` (command line) are the same engine;
see :func:`adv_chain.ablation.engine.ablate` and the README's "Ablations" section.
"""
from .engine import AblationResult, RunRecord, ablate, build_variants, markdown_table, read_results, summarize
from .tasks import TASKS, TaskRun, charlm, mlp, resolve_task
from .variants import (AblationError, Variant, baseline_chain, parse_transform, parse_value, variant_from_config,
                       variant_from_flag)

__all__ = ["AblationError", "AblationResult", "RunRecord", "TASKS", "TaskRun", "Variant", "ablate",
           "baseline_chain", "build_variants", "charlm", "markdown_table", "mlp", "parse_transform", "parse_value", "read_results",
           "resolve_task", "summarize", "variant_from_config", "variant_from_flag"]
