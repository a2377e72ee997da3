"""adv_optm 2.2.3's legacy ``Lion_Prodigy_adv`` (spec §9.6, §13.2) as a chain around
:func:`adv_chain.lion_prodigy`."""
from __future__ import annotations

import math
from typing import Any

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from ._registry import register
from .adv import decay_stage, gradient_stage
from ._storage import stored
from .classic import terminal
from .sign import tensor_clip_stage


@register
def lion_prodigy_adv(betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, cautious_wd: bool = False,
                     stochastic_rounding: bool = True, orthogonal_gradient: Any = False, cautious_mask: bool = False,
                     clip_threshold: float = 0.0, kappa_p: float = 1.0, auto_kappa_p: bool = False,
                     nnmf_factor: bool = False, vector_reshape: bool = False, beta3: float | None = None,
                     d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = math.inf,
                     safeguard_warmup: bool = False, fsdp_in_use: bool = False, slice_p: int = 11,
                     prodigy_steps: int = 0, d_limiter: bool = True, seed: int = 0) -> Chain:
    """adv_optm 2.2.3's ``Lion_Prodigy_adv``: Lion (arXiv 2302.06675) whose step size is Prodigy's
    ``d * lr`` (arXiv 2306.06101), with its keywords and defaults (use ``lr=1``; spec §9.6, §13.2).

    Per step, with ``g`` the gradient after ``clip_threshold`` (:func:`clip_by_tensor_norm`, a
    per-tensor norm clip, 0 = off) and ``orthogonal_gradient`` (:func:`orthograd`; legacy bool or
    2.5.16 string) and ``dlr = d * lr``::

        c = b1 m + d (1 - b1) g ;  m = b2 m + d (1 - b2) g
        U = dlr * P(c)            P: sign (kappa_p = 1) or Lion-K (kappa_p, auto_kappa_p; spec §5.2);
                                  cautious_mask: * 1[P(c) g > 0] / max(mean, 1e-3)   (spec §9.2)
        p = p - U - dlr * weight_decay * p     (cautious_wd: decay only where U * p >= 0)

    and ``d`` is Prodigy's estimate (spec §2.3: ``d0``, ``d_coef``, ``growth_rate``, ``beta3``,
    ``safeguard_warmup``, ``slice_p``, ``prodigy_steps``, ``d_limiter``), all in
    :func:`adv_chain.lion_prodigy`; bf16 weights are stochastically rounded once. The reference's
    factored path updates ``m`` with ``b1`` (a bug; ``b2`` is right): not reproduced. ``nnmf_factor``
    stores ``m`` SMMF-factored (:func:`factored_state` around the global transform; ``vector_reshape``
    factors 1-D tensors too), also with Lion-K and the cautious mask: the wrapper rebuilds ``m`` dense,
    read-only and a chunk of whole tensors at a time, for the reduction that takes their per-tensor
    sums (see ``reduce_reads_state``); otherwise as the reference's factored path (and its exact
    zeros stay zeros, bug B18). ``fsdp_in_use=True`` sums Prodigy's step sums over the ranks of
    sharded plain tensors, as ``prodigy_adv`` (:func:`adv_chain.lion_prodigy`'s ``sum_across_ranks``).

    >>> import adv_chain as ac
    >>> ac.presets.lion_prodigy_adv(weight_decay=0.1, cautious_wd=True).names
    ('lion_prodigy', 'weight_decay', 'apply')
    >>> ac.presets.get("LION_PRODIGY_ADV", clip_threshold=1.0, orthogonal_gradient=True, kappa_p=2.0).names
    ('clip_by_tensor_norm', 'orthograd', 'lion_prodigy', 'weight_decay', 'apply')
    """
    name = "lion_prodigy_adv"
    checks.flag(name, "auto_kappa_p", auto_kappa_p)
    checks.flag(name, "nnmf_factor", nnmf_factor)
    checks.flag(name, "vector_reshape", vector_reshape)
    checks.nonneg(name, "weight_decay", weight_decay)
    return chain(
        *tensor_clip_stage(name, clip_threshold),
        *gradient_stage(name, orthogonal_gradient),
        stored(name, T.lion_prodigy(betas=betas, beta3=beta3, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
                                    safeguard_warmup=safeguard_warmup, slice_p=slice_p, d_limiter=d_limiter,
                                    prodigy_steps=prodigy_steps, kappa_p=kappa_p, auto_kappa_p=auto_kappa_p,
                                    cautious=checks.flag(name, "cautious_mask", cautious_mask),
                                    sum_across_ranks=checks.flag(name, "fsdp_in_use", fsdp_in_use)),
               nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, seed=seed),
        decay_stage(weight_decay, cautious_wd),
        terminal(stochastic_rounding=stochastic_rounding, seed=seed),
    )
