"""adv_chain: optimizers as chains of small gradient transforms.

>>> import torch, adv_chain as ac
>>> opt = ac.ChainOptimizer(torch.nn.Linear(3, 1).parameters(), "adamw", lr=1e-3, weight_decay=0.01)
"""
from . import optim, presets, transforms
from ._core.chain import Chain, chain, chain_from_config, named
from ._core.optimizer import ChainOptimizer
from ._core.release import disable_gradient_release, enable_gradient_release
from ._core.transform import HParam, StateSpec, Transform
from .ablation import ablate
from .memory import MemoryReport, memory_report
from .transforms import *  # noqa: F401,F403 - every public transform, listed in transforms.__all__

__version__ = "0.1.0"

__all__ = [
    "Chain", "ChainOptimizer", "HParam", "StateSpec", "Transform", "chain", "chain_from_config", "named",
    "optim", "presets", "ablate", "enable_gradient_release", "disable_gradient_release",
    "memory_report", "MemoryReport", *transforms.__all__,
]
