"""Drop-ins for adv_optm 2.5.16's SignSGD_adv and SinkSGD_adv (their keywords and defaults, spec §13.1)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import presets
from ._base import _DropIn


class SignSGD_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``SignSGD_adv`` as a chain (preset ``signsgd_adv``; Signum, arXiv 1802.04434):
    every 2.5.16 keyword with its default; ``compiled_optimizer=True`` means ``compile=True``.
    ``spectral_normalization=True`` -> :func:`adv_chain.spectral_normalization`; ``geometric_wd`` with
    ``centered_wd`` decays toward the anchor by the signed target of the distance, as the reference.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.optim.SignSGD_adv(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    >>> opt.chain.names
    ('sign_momentum', 'sign', 'weight_decay', 'apply')
    """

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 0.0,
                 geometric_wd: bool = False, cautious_wd: bool = False, stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = "disabled", stochastic_sign: bool = False, nesterov: bool = False,
                 nesterov_coef: float | None = None, normed_momentum: bool = False, snr_cond: bool = False,
                 centered_wd: float = 0.0, centered_wd_mode: str = "float8", state_precision: str = "auto",
                 spectral_normalization: bool = False, nnmf_factor: bool = False, vector_reshape: bool = False,
                 compiled_optimizer: bool = False, *, compile: "bool | Mapping[str, Any]" = False,
                 state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.signsgd_adv(
            momentum=momentum, weight_decay=weight_decay, geometric_wd=geometric_wd, cautious_wd=cautious_wd,
            stochastic_rounding=stochastic_rounding, orthogonal_gradient=orthogonal_gradient,
            stochastic_sign=stochastic_sign, nesterov=nesterov, nesterov_coef=nesterov_coef,
            normed_momentum=normed_momentum, snr_cond=snr_cond, centered_wd=centered_wd,
            centered_wd_mode=centered_wd_mode, state_precision=state_precision,
            spectral_normalization=spectral_normalization, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape,
            seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)


class SinkSGD_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``SinkSGD_adv`` as a chain (preset ``sinksgd_adv``; SinkGD, arXiv 2502.06742): every
    2.5.16 keyword with its default (``lr=1e-3``, ``momentum=0``, ``sinkhorn_iterations=5``);
    ``compiled_optimizer=True`` means ``compile=True``. ``geometric_wd`` with ``centered_wd`` works as
    the reference's (vectors: signed target of the distance to the anchor; matrices: scaled by ``S``).

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.optim.SinkSGD_adv(model.parameters(), momentum=0.9, sinkhorn_iterations=3)
    >>> opt.chain.names
    ('sign_momentum', 'sinkhorn', 'weight_decay', 'apply')
    """

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 sinkhorn_iterations: int = 5, orthogonal_sinkhorn: bool = False, normed_momentum: bool = False,
                 snr_cond: bool = False, nesterov: bool = False, nesterov_coef: float | None = None,
                 geometric_wd: bool = False, cautious_wd: bool = False, stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = "disabled", spectral_normalization: bool = False,
                 centered_wd: float = 0.0, centered_wd_mode: str = "float8", state_precision: str = "auto",
                 nnmf_factor: bool = False, vector_reshape: bool = False, compiled_optimizer: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.sinksgd_adv(
            momentum=momentum, weight_decay=weight_decay, sinkhorn_iterations=sinkhorn_iterations,
            orthogonal_sinkhorn=orthogonal_sinkhorn, normed_momentum=normed_momentum, snr_cond=snr_cond,
            nesterov=nesterov, nesterov_coef=nesterov_coef, geometric_wd=geometric_wd, cautious_wd=cautious_wd,
            stochastic_rounding=stochastic_rounding, orthogonal_gradient=orthogonal_gradient,
            spectral_normalization=spectral_normalization, centered_wd=centered_wd,
            centered_wd_mode=centered_wd_mode, state_precision=state_precision, nnmf_factor=nnmf_factor,
            vector_reshape=vector_reshape, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)
