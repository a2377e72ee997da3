"""Decay terms: they do not touch the update; the terminal applies them to the parameters in fp32."""
from __future__ import annotations

from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, Transform


class WeightDecay(Transform):
    """Decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101): the terminal computes
    ``p * (1 - c) - lr * u`` with ``c = lr * weight_decay`` (torch's AdamW), or, given ``max_lr``,
    ``c = weight_decay * lr / max_lr`` (fully decoupled, as optimi's ``decouple_lr`` and
    lion-pytorch's ``decoupled_weight_decay``: the strength no longer depends on the size of ``lr``,
    only on the schedule's shape). Fed by ``group["weight_decay"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.01), ac.apply()).names
    ('adam', 'eps_divide', 'weight_decay', 'apply')
    """

    type_name = "weight_decay"
    default_name = "weight_decay"
    stage = "decay"
    reads = frozenset({"param"})
    writes = frozenset({"decay"})
    hparams = {"weight_decay": HParam("weight_decay", checks.nonneg)}

    def __init__(self, weight_decay: float = 0.01, max_lr: float | None = None, *, name: str | None = None) -> None:
        if max_lr is not None:
            max_lr = checks.positive(self.type_name, "max_lr", max_lr)
        super().__init__(name=name, weight_decay=weight_decay, max_lr=max_lr)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        wd = h.hp["weight_decay"]
        max_lr = h.hp["max_lr"]
        return {"coef": wd * h.lr if max_lr is None else wd * h.lr / max_lr}

    def update(self, b: Any) -> None:
        coef = self._coef(b)
        if not F.is_zero(coef):
            b.add_decay_coef(coef)

    @staticmethod
    def _coef(b: Any) -> Any:
        """The decay coefficient, shrunk by an ``lr_scale`` an earlier transform published (the
        step size the reference applies weight decay with, e.g. Simplified AdEMAMix's)."""
        coef = b.s("coef")
        scale = b.signals.get("lr_scale")
        return coef if scale is None else coef * scale


class CautiousWeightDecay(WeightDecay):
    """Cautious weight decay (adv_optm's ``cautious_wd``): decoupled decay applied only where it
    agrees with the update, ``p -= c * 1[u * p >= 0] * p`` with
    ``c = lr * weight_decay`` (or ``weight_decay * lr / max_lr``). Replaces :func:`weight_decay`.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.cautious_wd(0.1), ac.apply()).names
    ('adam', 'eps_divide', 'cautious_wd', 'apply')
    """

    type_name = "cautious_wd"
    default_name = "cautious_wd"
    reads = frozenset({"param", "update"})

    def update(self, b: Any) -> None:
        coef = self._coef(b)
        if F.is_zero(coef):
            return
        p32 = b.params if b.params[0].dtype == torch.float32 else [p.float() for p in b.params]
        agree = torch._foreach_sign(torch._foreach_mul(b.u, p32))
        torch._foreach_add_(agree, 1.0)
        torch._foreach_clamp_max_(agree, 1.0)  # 1 where u * p >= 0 (zeros pass), else 0
        torch._foreach_mul_(agree, p32)
        torch._foreach_mul_(agree, coef)
        b.add_decay(agree)


weight_decay = WeightDecay
cautious_wd = CautiousWeightDecay
