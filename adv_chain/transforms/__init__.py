"""Transforms grouped by kind of operation; every public one is re-exported by ``adv_chain``."""
from .apply import apply, kahan_apply, stochastic_round_apply
from .decay import cautious_wd, centered_wd, fisher_wd, weight_decay
from .gradient import add_l2, clip_by_global_norm, clip_by_value, negate, orthograd
from .hyper import kourkoutas_beta
from .masks import cautious, grams
from .mixing import ademamix, simplified_accumulator
from .moments import momentum, scale_by_adam, scale_by_adopt, scale_by_lion
from .normalize import atan2_scale, eps_divide, sign
from .optimi_family import lookahead, proximal_wd, scale_by_adan, scale_by_radam, stable_clip
from .state_compression import factored_state, low_precision_state

__all__ = ["apply", "kahan_apply", "stochastic_round_apply", "weight_decay", "add_l2", "clip_by_global_norm",
           "clip_by_value", "negate", "momentum", "scale_by_adam", "scale_by_lion", "eps_divide", "sign", "orthograd", "cautious", "grams",
           "ademamix", "simplified_accumulator", "atan2_scale", "cautious_wd", "scale_by_adopt", "kourkoutas_beta",
           "centered_wd", "fisher_wd",
           "scale_by_radam", "scale_by_adan", "proximal_wd", "stable_clip", "lookahead",
           "factored_state", "low_precision_state"]
from .prodigy import prodigy  # noqa: E402  (Prodigy's global D-adaptation, arXiv 2306.06101)

__all__ += ["prodigy"]
