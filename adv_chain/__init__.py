"""adv_chain: optimizers as chains of small gradient transforms.

>>> import torch, adv_chain as ac
>>> opt = ac.ChainOptimizer(torch.nn.Linear(3, 1).parameters(), "adamw", lr=1e-3, weight_decay=0.01)
"""
from . import optim, presets
from ._core.chain import Chain, chain, chain_from_config, named
from ._core.optimizer import ChainOptimizer
from .ablation import ablate
from ._core.release import disable_gradient_release, enable_gradient_release
from ._core.transform import HParam, StateSpec, Transform
from .memory import MemoryReport, memory_report
from .transforms import (add_l2, ademamix, apply, atan2_scale, cautious, cautious_wd, centered_wd, clip_by_global_norm,
                         clip_by_value, eps_divide, fisher_wd, grams, kahan_apply, kourkoutas_beta, momentum, negate, orthograd, scale_by_adam, scale_by_adopt, scale_by_lion,
                         sign, simplified_accumulator, stochastic_round_apply, weight_decay)
from .transforms import lookahead, proximal_wd, scale_by_adan, scale_by_radam, stable_clip
from .transforms import factored_state, low_precision_state

from .transforms import prodigy

__version__ = "0.1.0"

__all__ = [
    "Chain", "ChainOptimizer", "HParam", "StateSpec", "Transform", "chain", "chain_from_config", "named",
    "optim", "presets", "ablate", "enable_gradient_release", "disable_gradient_release",
    "add_l2", "apply", "clip_by_global_norm", "clip_by_value", "eps_divide", "kahan_apply", "momentum", "negate",
    "scale_by_adam", "scale_by_lion", "sign", "stochastic_round_apply", "weight_decay",
    "orthograd", "cautious", "grams", "ademamix", "simplified_accumulator", "atan2_scale", "cautious_wd", "scale_by_adopt", "kourkoutas_beta",
    "centered_wd", "fisher_wd",
    "scale_by_radam", "scale_by_adan", "proximal_wd", "stable_clip", "lookahead",
    "factored_state", "low_precision_state", "memory_report", "MemoryReport",
]
__all__ += ["prodigy"]
