"""Presets: named optimizers as chains. ``ac.presets.adamw(weight_decay=0.1)`` returns a :class:`Chain`;
``ac.presets.get(name, **kw)`` looks one up by name (case-insensitive); ``ac.presets.names()`` lists them."""
from ._registry import get, keywords, names, register, summary
from .adv import adamw_adv, adopt_adv, lion_adv, simplified_ademamix
from .classic import adam, adamw, lion, sgd, signum, terminal
from .optimi_family import adan, radam, ranger, stableadamw

__all__ = ["get", "keywords", "names", "register", "summary", "sgd", "adam", "adamw", "lion", "signum", "terminal", "adamw_adv", "lion_adv", "adopt_adv", "simplified_ademamix", "adan", "radam", "ranger", "stableadamw"]
from .prodigy import prodigy, prodigy_adv  # noqa: E402

__all__ += ["prodigy", "prodigy_adv"]
from .sign import signsgd_adv, sinksgd_adv  # noqa: E402

__all__ += ["signsgd_adv", "sinksgd_adv"]
from .muon import adamuon_adv, muon_adv  # noqa: E402

__all__ += ["muon_adv", "adamuon_adv"]
from .lion_prodigy import lion_prodigy_adv  # noqa: E402

__all__ += ["lion_prodigy_adv"]
