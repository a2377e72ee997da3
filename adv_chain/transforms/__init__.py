"""Transforms grouped by kind of operation; every public one is re-exported by ``adv_chain``."""
from .apply import apply, kahan_apply, stochastic_round_apply
from .decay import cautious_wd, centered_wd, fisher_wd, weight_decay
from .geometric import geometric_wd
from .gradient import add_l2, clip_by_global_norm, clip_by_value, negate, orthograd
from .hyper import kourkoutas_beta
from .masks import cautious, grams
from .mixing import ademamix, simplified_accumulator
from .moments import momentum, scale_by_adam, scale_by_adopt, scale_by_lion
from .muon import approx_mars, kappa_projection, muon_momentum, muon_scale, newton_schulz, normuon
from .normalize import atan2_scale, eps_divide, sign
from .partition import partition
from .optimi_family import lookahead, proximal_wd, scale_by_adan, scale_by_radam, stable_clip
from .prodigy import prodigy
from .constant import scale
from .lion_prodigy import lion_prodigy
from .spectral import spectral_normalization
from .sign_family import (clip_by_tensor_norm, freeze_on_flip, l1_adaptive, lion_k, sign_momentum, sinkhorn,
                          snr_condition, stochastic_sign)
from .state_compression import factored_state, low_precision_state

__all__ = [
    # terminals and decay
    "apply", "kahan_apply", "stochastic_round_apply", "weight_decay", "cautious_wd", "centered_wd", "fisher_wd",
    "geometric_wd", "proximal_wd",
    # gradient stage and hyperparameter signals
    "add_l2", "clip_by_global_norm", "clip_by_value", "clip_by_tensor_norm", "negate", "orthograd", "approx_mars",
    "kourkoutas_beta",
    # moments
    "momentum", "scale_by_adam", "scale_by_adopt", "scale_by_lion", "scale_by_radam", "scale_by_adan", "ademamix",
    "simplified_accumulator", "muon_momentum", "sign_momentum", "prodigy", "lion_prodigy",
    # normalization, direction masks, scales
    "eps_divide", "atan2_scale", "sign", "stable_clip", "newton_schulz", "normuon", "kappa_projection", "lion_k",
    "stochastic_sign", "sinkhorn", "snr_condition", "cautious", "grams", "freeze_on_flip", "l1_adaptive", "muon_scale",
    "spectral_normalization", "scale",
    # wrappers
    "lookahead", "factored_state", "low_precision_state", "partition",
]
