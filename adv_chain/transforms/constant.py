"""A constant step-size factor: ``u = factor * u`` (optax's ``scale``).

Presets use it where a reference multiplies a factor in after a normalization that would remove it
earlier: adv_optm's auxiliary Adam with ``adam_use_atan2`` and ``adam_spectral_normalization`` scales
the spectrally normalized update by atan2's ``4/pi`` (spec §2.9), so its chain ends in
``spectral_normalization -> scale(4/pi)``.
"""
from __future__ import annotations

from typing import Any

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, Transform


def _finite(owner: str, arg: str, value: Any) -> float:
    return checks.number(owner, arg, value, lo=-float("inf"), hi=float("inf"), lo_open=True, hi_open=True)


class Scale(Transform):
    """``u = factor * u``, elementwise. ``factor`` is a finite real number (a negative one flips the
    direction); a param group may override it as ``"scale.factor"``. Place it anywhere in a chain.

    >>> import torch, adv_chain as ac
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = ac.ChainOptimizer([w], ac.chain(ac.sign(), ac.scale(0.5), ac.apply()), lr=0.1)
    >>> w.grad = torch.tensor([2.0, -3.0, 0.0]); opt.step()
    >>> w.detach().tolist()
    [0.949999988079071, 1.0499999523162842, 1.0]
    """

    type_name = "scale"
    default_name = "scale"
    stage = "any"
    hparams = {"factor": HParam(None, _finite)}

    def __init__(self, factor: float = 1.0, *, name: str | None = None) -> None:
        super().__init__(name=name, factor=factor)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"factor": h.hp["factor"]}

    def update(self, b: Any) -> None:
        F.scale_(b.own_u(), b.s("factor"))


scale = Scale
