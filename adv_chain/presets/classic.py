"""Classic optimizers as chains: sgd, adam, adamw, lion, signum.

Each preset takes the keywords of the optimizer it reproduces (torch.optim's or lion-pytorch's),
plus ``stochastic_rounding`` / ``kahan_sum`` to choose the terminal for bf16/fp16 parameters.
Transforms whose hyperparameter is zero stay in the chain (they cost nothing then), so a param group
or a scheduler can turn them on.
"""
from __future__ import annotations

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from .._core.transform import Transform
from ._registry import register


def terminal(stochastic_rounding: bool = False, kahan_sum: bool = False, seed: int = 0) -> Transform:
    """The terminal a preset ends with: plain, stochastic rounding, or Kahan-compensated."""
    checks.flag("preset", "stochastic_rounding", stochastic_rounding)
    checks.flag("preset", "kahan_sum", kahan_sum)
    if stochastic_rounding and kahan_sum:
        raise ValueError("stochastic_rounding=True and kahan_sum=True are alternatives for bf16 weights; choose one")
    if stochastic_rounding:
        return T.stochastic_round_apply(seed=seed)
    if kahan_sum:
        return T.kahan_apply()
    return T.apply()


def _maximize(maximize: bool) -> tuple[Transform, ...]:
    return (T.negate(name="maximize"),) if checks.flag("preset", "maximize", maximize) else ()


@register
def sgd(momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False, stochastic_rounding: bool = False, kahan_sum: bool = False,
        decouple_wd: bool = False, max_lr: float | None = None) -> Chain:
    """SGD with momentum, dampening, Nesterov and coupled weight decay, as ``torch.optim.SGD``.
    ``decouple_wd=True`` decays the weights directly (``p *= 1 - lr * wd``, optimi's ``decouple_wd``);
    ``max_lr`` makes that fully decoupled (``p *= 1 - wd * lr / max_lr``, optimi's ``decouple_lr``).

    >>> import adv_chain as ac
    >>> ac.presets.sgd(momentum=0.9, nesterov=True).names
    ('add_l2', 'momentum', 'apply')
    """
    if checks.flag("sgd", "decouple_wd", decouple_wd) or max_lr is not None:
        return chain(*_maximize(maximize), T.momentum(momentum, dampening=dampening, nesterov=nesterov),
                     T.weight_decay(weight_decay, max_lr=max_lr), terminal(stochastic_rounding, kahan_sum))
    return chain(*_maximize(maximize), T.add_l2(weight_decay),
                 T.momentum(momentum, dampening=dampening, nesterov=nesterov),
                 terminal(stochastic_rounding, kahan_sum))


@register
def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False,
         stochastic_rounding: bool = False, kahan_sum: bool = False, max_lr: float | None = None) -> Chain:
    """Adam with coupled (L2) weight decay, as ``torch.optim.Adam``; ``decoupled_weight_decay=True``
    makes it AdamW, as torch does (``max_lr`` then makes the decay fully decoupled, see :func:`adamw`).

    >>> import adv_chain as ac
    >>> ac.presets.adam(weight_decay=1e-4).names
    ('add_l2', 'adam', 'eps_divide', 'apply')
    """
    if checks.flag("adam", "decoupled_weight_decay", decoupled_weight_decay):
        return adamw(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                     stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum, max_lr=max_lr)
    if max_lr is not None:
        raise ValueError(f"adam: max_lr={max_lr!r} applies to decoupled weight decay only; "
                         "set decoupled_weight_decay=True (optimi: decouple_wd=True) or leave max_lr=None")
    return chain(*_maximize(maximize), T.add_l2(weight_decay), T.scale_by_adam(betas=betas, amsgrad=amsgrad),
                 T.eps_divide(eps), terminal(stochastic_rounding, kahan_sum))


@register
def adamw(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False, maximize: bool = False, stochastic_rounding: bool = False,
          kahan_sum: bool = False, max_lr: float | None = None) -> Chain:
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101), as ``torch.optim.AdamW``; ``max_lr`` makes the
    weight decay fully decoupled, ``p *= 1 - wd * lr / max_lr`` (optimi's ``decouple_lr``).

    >>> import adv_chain as ac
    >>> ac.presets.adamw().names
    ('adam', 'eps_divide', 'weight_decay', 'apply')
    """
    return chain(*_maximize(maximize), T.scale_by_adam(betas=betas, amsgrad=amsgrad), T.eps_divide(eps),
                 T.weight_decay(weight_decay, max_lr=max_lr), terminal(stochastic_rounding, kahan_sum))


@register
def lion(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, max_lr: float | None = None,
         stochastic_rounding: bool = False, kahan_sum: bool = False) -> Chain:
    """Lion (Chen et al., arXiv 2302.06675), as lion-pytorch's ``Lion``; ``max_lr`` makes the weight
    decay fully decoupled (``weight_decay * lr / max_lr``, lion-pytorch's ``decoupled_weight_decay``).

    >>> import adv_chain as ac
    >>> ac.presets.lion(weight_decay=0.1).names
    ('lion', 'weight_decay', 'apply')
    """
    return chain(T.scale_by_lion(betas=betas), T.weight_decay(weight_decay, max_lr=max_lr),
                 terminal(stochastic_rounding, kahan_sum))


@register
def signum(momentum: float = 0.9, weight_decay: float = 0.0, stochastic_rounding: bool = False,
           kahan_sum: bool = False) -> Chain:
    """Signum (Bernstein et al., arXiv 1802.04434): ``m = beta*m + (1-beta)*g``, ``p -= lr*sign(m)``,
    with decoupled weight decay.

    >>> import adv_chain as ac
    >>> ac.presets.signum().names
    ('momentum', 'sign', 'weight_decay', 'apply')
    """
    return chain(T.momentum(momentum, dampening=momentum), T.sign(), T.weight_decay(weight_decay),
                 terminal(stochastic_rounding, kahan_sum))
