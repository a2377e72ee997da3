"""Drop-in optimizer classes: the keywords and defaults of the optimizers they stand in for, so a
training script switches with one changed import.

>>> import torch, adv_chain as ac
>>> model = torch.nn.Linear(4, 2)
>>> opt = ac.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
>>> print(opt.chain.names)
('adam', 'eps_divide', 'weight_decay', 'apply')

Implementation-choice keywords of torch (``foreach``, ``fused``, ``capturable``) and optimi
(``triton``) are accepted and do not change the math: adv_chain picks its own kernels (``compile=True``
for fused ones). ``differentiable=True`` is not supported and says so.

``SGD``, ``Adam``, ``AdamW`` and ``Lion`` also take torch-optimi's keywords where they do not clash
with the torch ones: ``kahan_sum`` (``None``: on for bf16/fp16 parameters, as optimi; the default
stays ``False``, torch's behaviour), ``decouple_lr`` and ``max_lr`` (fully decoupled weight decay,
``p *= 1 - wd * lr / max_lr``), ``decouple_wd`` (SGD, Adam), and ``gradient_release=True`` (the
optimizer registers :func:`adv_chain.enable_gradient_release` hooks on its parameters; optimi needs a
separate ``prepare_for_gradient_release`` call). optimi's own defaults (``betas=(0.9, 0.99)``,
``eps=1e-6``) are not adopted: the defaults are torch's.
"""
from .adv import Adam_Adv, AdamW_adv, Adopt_Adv, Adopt_adv, Lion_Adv, Lion_adv, Simplified_AdEMAMix
from .classic import SGD, Adam, AdamW, Lion
from .optimi_family import Adan, RAdam, Ranger, StableAdamW
from .prodigy import Prodigy, Prodigy_Adv, Prodigy_adv

__all__ = ["SGD", "Adam", "AdamW", "Lion", "AdamW_adv", "Adam_Adv", "Lion_adv", "Lion_Adv", "Adopt_adv", "Adopt_Adv",
           "Simplified_AdEMAMix", "RAdam", "Ranger", "Adan", "StableAdamW", "Prodigy", "Prodigy_adv", "Prodigy_Adv"]
from .sign import SignSGD_adv, SinkSGD_adv  # noqa: E402

__all__ += ["SignSGD_adv", "SinkSGD_adv"]
from .muon import AdaMuon_adv, Muon_adv  # noqa: E402

__all__ += ["Muon_adv", "AdaMuon_adv"]
from .lion_prodigy import Lion_Prodigy_Adv, Lion_Prodigy_adv, Prodigy_Lion_Adv  # noqa: E402

__all__ += ["Lion_Prodigy_adv", "Prodigy_Lion_Adv", "Lion_Prodigy_Adv"]
