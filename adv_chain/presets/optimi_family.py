"""torch-optimi's optimizers as chains: radam, ranger, adan, stableadamw.

Each preset takes torch-optimi 0.3.3's keywords with its defaults (``betas``, ``eps``,
``weight_decay``, ``decouple_wd``, ``decouple_lr``, ``max_lr``, ``kahan_sum``, and ``k``/``alpha``
for Ranger, ``adam_wd`` for Adan), plus adv_chain's ``stochastic_rounding``. Two differences follow
from a preset being a chain, built before it sees a parameter or a learning rate:

* ``kahan_sum`` is ``True``/``False`` (default ``False``); optimi's ``None`` ("on for bf16/fp16
  parameters") is resolved by the drop-in classes (``ac.optim.RAdam`` ...), which see the parameters.
* ``decouple_lr=True`` needs ``max_lr`` (optimi defaults it to ``lr``, which a preset does not know;
  the drop-ins do the same as optimi). As in the classic presets, giving ``max_lr`` alone also selects
  the fully decoupled decay ``p *= 1 - wd * lr / max_lr``.

``foreach``/``triton``/``gradient_release`` choose how optimi runs, not what it computes; the
drop-in classes accept them.
"""
from __future__ import annotations

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from .._core.transform import Transform
from ..transforms.optimi_family import lookahead, proximal_wd, scale_by_adan, scale_by_radam, stable_clip
from ._registry import register
from .classic import terminal


def _max_lr(owner: str, decouple_lr: bool, max_lr: float | None) -> float | None:
    """``None``: lr-coupled decay; a number: fully decoupled (optimi's ``decouple_lr``)."""
    if checks.flag(owner, "decouple_lr", decouple_lr) and max_lr is None:
        raise ValueError(f"{owner}: decouple_lr=True needs max_lr (a preset does not know lr; optimi defaults "
                         f"max_lr to lr, as ac.optim.{owner} does): pass max_lr=<peak lr>")
    return None if max_lr is None else checks.positive(owner, "max_lr", max_lr)


def _radam_decay(owner: str, weight_decay: float, decouple_wd: bool, decouple_lr: bool,
                 max_lr: float | None) -> tuple[tuple[Transform, ...], tuple[Transform, ...]]:
    """optimi's three forms: L2 (a gradient term), decoupled, or fully decoupled decay."""
    max_lr = _max_lr(owner, decouple_lr, max_lr)
    if checks.flag(owner, "decouple_wd", decouple_wd) or max_lr is not None:
        return (), (T.weight_decay(weight_decay, max_lr=max_lr),)
    return (T.add_l2(weight_decay),), ()


@register
def radam(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, eps: float = 1e-6,
          decouple_wd: bool = False, decouple_lr: bool = False, max_lr: float | None = None,
          kahan_sum: bool = False, stochastic_rounding: bool = False) -> Chain:
    """RAdam (Liu et al., arXiv 1908.03265) as torch-optimi's ``RAdam``: the rectified Adam
    direction, momentum SGD while the variance is not tractable (``rho_t <= 5``), see
    :class:`~adv_chain.transforms.optimi_family.ScaleByRAdam`. Weight decay is L2 (``g += wd * p``)
    by default, decoupled (``p *= 1 - lr * wd``) with ``decouple_wd=True``, fully decoupled
    (``p *= 1 - wd * lr / max_lr``) with ``decouple_lr=True`` and ``max_lr``.

    >>> import adv_chain as ac
    >>> ac.presets.radam(weight_decay=1e-4).names
    ('add_l2', 'radam', 'apply')
    >>> ac.presets.radam(weight_decay=1e-2, decouple_wd=True).names
    ('radam', 'weight_decay', 'apply')
    """
    pre, post = _radam_decay("RAdam", weight_decay, decouple_wd, decouple_lr, max_lr)
    return chain(*pre, scale_by_radam(betas=betas, eps=eps), *post, terminal(stochastic_rounding, kahan_sum))


@register
def ranger(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, eps: float = 1e-6, k: int = 6,
           alpha: float = 0.5, decouple_wd: bool = True, decouple_lr: bool = False, max_lr: float | None = None,
           kahan_sum: bool = False, stochastic_rounding: bool = False) -> Chain:
    """Ranger as torch-optimi's ``Ranger``: :func:`radam` with Lookahead (Zhang et al., arXiv
    1907.08610) around the terminal: every ``k`` steps the slow weights move ``alpha`` of the way to
    the fast ones and the fast ones restart there. Decay is decoupled by default (optimi's
    ``decouple_wd=True``).

    >>> import adv_chain as ac
    >>> ac.presets.ranger(k=5).names
    ('radam', 'weight_decay', 'lookahead')
    """
    pre, post = _radam_decay("Ranger", weight_decay, decouple_wd, decouple_lr, max_lr)
    return chain(*pre, scale_by_radam(betas=betas, eps=eps), *post,
                 lookahead(terminal(stochastic_rounding, kahan_sum), k=k, alpha=alpha))


@register
def adan(betas: tuple[float, float, float] = (0.98, 0.92, 0.99), weight_decay: float = 2e-2, eps: float = 1e-6,
         decouple_lr: bool = False, max_lr: float | None = None, adam_wd: bool = False, kahan_sum: bool = False,
         stochastic_rounding: bool = False) -> Chain:
    """Adan (Xie et al., arXiv 2208.06677) as torch-optimi's ``Adan``: Nesterov-style moments of the
    gradient and of its change, see :class:`~adv_chain.transforms.optimi_family.ScaleByAdan`.
    Weight decay is Adan's proximal form ``p <- (p - lr*u) / (1 + lr*wd)`` (``max_lr``: ``wd*lr/max_lr``);
    ``adam_wd=True`` decays first, Adam-style, ``p *= 1 - lr*wd``, as optimi documents it and its
    functional ``optimi.adan.adan(adam_wd=True)`` computes (optimi 0.3.3's ``Adan`` class accepts
    ``adam_wd`` but never passes it on, so the class always uses the proximal form).

    >>> import adv_chain as ac
    >>> ac.presets.adan().names
    ('adan', 'proximal_wd', 'apply')
    >>> ac.presets.adan(adam_wd=True).names
    ('adan', 'weight_decay', 'apply')
    """
    max_lr = _max_lr("Adan", decouple_lr, max_lr)
    decay = (T.weight_decay(weight_decay, max_lr=max_lr) if checks.flag("Adan", "adam_wd", adam_wd)
             else proximal_wd(weight_decay, max_lr=max_lr))
    return chain(scale_by_adan(betas=betas, eps=eps), decay, terminal(stochastic_rounding, kahan_sum))


@register
def stableadamw(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 1e-2, eps: float = 1e-6,
                decouple_lr: bool = False, max_lr: float | None = None, kahan_sum: bool = False,
                stochastic_rounding: bool = False) -> Chain:
    """StableAdamW (Wortsman et al., arXiv 2304.13013) as torch-optimi's ``StableAdamW``: AdamW whose
    per-tensor learning rate is ``lr / max(1, RMS(g^2 / max(v_hat, eps^2)))``, for the update and the
    decoupled decay alike (:class:`~adv_chain.transforms.optimi_family.StableClip`).

    >>> import adv_chain as ac
    >>> ac.presets.stableadamw().names
    ('adam', 'weight_decay', 'stable_clip', 'apply')
    """
    max_lr = _max_lr("StableAdamW", decouple_lr, max_lr)
    return chain(T.scale_by_adam(betas=betas), T.weight_decay(weight_decay, max_lr=max_lr), stable_clip(eps),
                 terminal(stochastic_rounding, kahan_sum))
