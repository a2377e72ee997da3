"""Drop-in for adv_optm 2.2.3's legacy ``Lion_Prodigy_adv`` (preset in adv_chain.presets.lion_prodigy)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import presets
from .._core import checks
from ._base import ChainOptimizer, _DropIn


def _group_state_now(opt: ChainOptimizer) -> None:
    """Give every param group the initial global state of the chain's global transforms and its
    plain mirrors (``group["d"] = d0``) now, as the reference's groups hold ``d`` before any step."""
    for t in opt.chain:
        for group in opt.param_groups:
            for key, value in t.group_state(t.args).items():
                group.setdefault(f"{t.name}/{key}", value)
            for plain, key in t.group_mirrors.items():
                group.setdefault(plain, group[f"{t.name}/{key}"])


class Lion_Prodigy_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm 2.2.3's ``Lion_Prodigy_adv`` as a chain (preset ``lion_prodigy_adv``; spec §9.6):
    Lion (Chen et al., arXiv 2302.06675) stepping by Prodigy's ``d * lr`` (Mishchenko & Defazio,
    arXiv 2306.06101)::

        c = b1 m + d (1 - b1) g ;  m = b2 m + d (1 - b2) g ;  p -= d lr (P(c) + weight_decay p)

    ``P`` the sign or the Lion-K projection (``kappa_p``, ``auto_kappa_p``), optionally masked
    (``cautious_mask``); ``d`` Prodigy's estimate (spec §2.3). The reference's keywords and defaults:
    ``lr=1``, ``betas=(0.9, 0.99)``, ``weight_decay=0.0``, ``cautious_wd=False``,
    ``stochastic_rounding=True``, ``orthogonal_gradient=False``, ``cautious_mask=False``,
    ``clip_threshold=0.0``, ``kappa_p=1.0``, ``auto_kappa_p=False``, ``nnmf_factor=False``,
    ``vector_reshape=False``, ``compiled_optimizer=False`` (``True`` means ``compile=True``),
    ``beta3=None`` (``sqrt(b2)``), ``d0=1e-6``, ``d_coef=1``, ``growth_rate=inf``,
    ``safeguard_warmup=False``, ``fsdp_in_use=False``, ``slice_p=11``, ``prodigy_steps=0``,
    ``d_limiter=True``. ``fsdp_in_use=True`` sums Prodigy's numerator and ``sum |s|`` over the
    default process group (FSDP1 flat shards, ZeRO; see :class:`~adv_chain.optim.Prodigy`).
    ``nnmf_factor=True`` stores the moment as SMMF factors, with the sign update, Lion-K and
    ``cautious_mask`` alike (the factored state is rebuilt dense, read-only, for the per-tensor sums of
    the reduction); the reference's factored-path bug (``m`` updated with ``b1``) is not reproduced.
    ``group["d"]`` holds the current ``d`` (``d0`` before the first step; a 0-d tensor after it, no
    host sync: ``float(group["d"])`` for a number); ``d``, ``d_max``, ``d_numerator`` and ``k`` are saved with
    ``state_dict`` under ``"lion_prodigy/..."`` in every param group. Also ``ac.optim.Prodigy_Lion_Adv``
    and ``ac.optim.Lion_Prodigy_Adv``.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.optim.Lion_Prodigy_adv(model.parameters(), weight_decay=0.01)
    >>> opt.chain.names, float(opt.param_groups[0]["d"])
    (('lion_prodigy', 'weight_decay', 'apply'), 1e-06)
    >>> x = torch.randn(16, 4)
    >>> for _ in range(5):
    ...     opt.zero_grad(); model(x).square().mean().backward(); opt.step()
    >>> float(opt.param_groups[0]["d"]) > 1e-6
    True
    """

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, cautious_wd: bool = False, stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = False, cautious_mask: bool = False, clip_threshold: float = 0.0,
                 kappa_p: float = 1.0, auto_kappa_p: bool = False, nnmf_factor: bool = False,
                 vector_reshape: bool = False, compiled_optimizer: bool = False, beta3: float | None = None,
                 d0: float = 1e-6, d_coef: float = 1, growth_rate: float = float("inf"),
                 safeguard_warmup: bool = False, fsdp_in_use: bool = False, slice_p: int = 11,
                 prodigy_steps: int = 0, d_limiter: bool = True, *, compile: "bool | Mapping[str, Any]" = False,
                 state_dtype: str = "fp32", seed: int = 0) -> None:
        owner = type(self).__name__
        checks.nonneg(owner, "lr", lr)
        chain = presets.lion_prodigy_adv(
            betas=betas, weight_decay=weight_decay, cautious_wd=cautious_wd, stochastic_rounding=stochastic_rounding,
            orthogonal_gradient=orthogonal_gradient, cautious_mask=cautious_mask, clip_threshold=clip_threshold,
            kappa_p=kappa_p, auto_kappa_p=auto_kappa_p, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape,
            beta3=beta3, d0=d0, d_coef=d_coef, growth_rate=growth_rate, safeguard_warmup=safeguard_warmup,
            fsdp_in_use=fsdp_in_use, slice_p=slice_p, prodigy_steps=prodigy_steps, d_limiter=d_limiter, seed=seed)
        super().__init__(params, chain, lr, compile or checks.flag(owner, "compiled_optimizer", compiled_optimizer),
                         state_dtype)
        _group_state_now(self)


Prodigy_Lion_Adv = Lion_Prodigy_Adv = Lion_Prodigy_adv
