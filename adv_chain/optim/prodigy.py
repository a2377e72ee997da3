"""Drop-ins for prodigyopt's Prodigy and adv_optm's Prodigy_adv (presets in adv_chain.presets.prodigy)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .. import presets
from .._core import checks
from .._core.optimizer import ChainOptimizer
from .._core.release import enable_gradient_release
from ._base import ChainOptimizer, _DropIn, _implementation_flags, _optimi_family_kahan, _optimi_kahan, _optimi_max_lr  # noqa: F401


class Prodigy(_DropIn):
    """prodigyopt's ``Prodigy`` (1.1.2) as a chain (preset ``prodigy``): same keywords and defaults
    (``lr=1.0``). ``group["d"]`` holds the current ``d`` after each step (a 0-d tensor, no host sync;
    ``float(group["d"])`` for a number); ``d``, ``d_max``, ``d_numerator`` and ``k`` are kept under
    ``"prodigy/..."`` in every param group and saved with ``state_dict``. Under gradient release
    the ``d`` estimate runs one step lagged (see :func:`adv_chain.prodigy`). ``fsdp_in_use=True``
    (FSDP1 flat shards, ZeRO: each rank steps plain tensors that are parts of the parameters) sums
    Prodigy's numerator and ``sum |s|`` over torch.distributed's default process group before ``d``
    is computed, as prodigyopt, so every rank has the one-process ``d``; it needs an initialized
    process group (else ``ValueError`` at the first step). FSDP2 (DTensor parameters) needs no flag.

    >>> import torch, adv_chain as ac
    >>> opt = ac.optim.Prodigy(torch.nn.Linear(4, 2).parameters(), weight_decay=0.01)
    >>> opt.chain.names, float(opt.param_groups[0]["d"])
    (('prodigy', 'weight_decay', 'apply'), 1e-06)
    """

    foreign_checkpoints = ("prodigyopt",)

    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), fsdp_in_use: bool = False, slice_p: int = 1,
                 *, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 stochastic_rounding: bool = False, kahan_sum: bool = False, gradient_release: bool = False) -> None:
        checks.positive("Prodigy", "lr", lr)  # prodigyopt refuses lr <= 0 at construction
        chain = presets.prodigy(betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                                d_coef=d_coef, growth_rate=growth_rate, fsdp_in_use=fsdp_in_use, slice_p=slice_p,
                                stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        super().__init__(params, chain, lr, compile, state_dtype, gradient_release=gradient_release)
        _prodigy_groups(self)


def _prodigy_groups(opt: ChainOptimizer) -> None:
    """Give every param group Prodigy's initial state and the ``d`` mirror now (prodigyopt's groups
    hold ``d = d0`` before the first step; loggers read it)."""
    t = next(t for t in opt.chain if "d" in t.group_mirrors)  # prodigy (whatever its name)
    for group in opt.param_groups:
        for key, value in t.group_state(t.args).items():
            group.setdefault(f"{t.name}/{key}", value)
        group.setdefault("d", group[f"{t.name}/d"])


class Prodigy_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm 2.5.16's ``Prodigy_adv`` as a chain (preset ``prodigy_adv``): its keywords and defaults
    (``lr=1``, ``slice_p=11``); ``compiled_optimizer=True`` means ``compile=True``. Its ``nesterov``
    bug B2 is fixed. ``kourkoutas_beta`` buckets layers by shape (or by ``layer_key_fn(param)``), uses the previous step's gradient
    norms and ramps ``beta2`` from ``betas[1]`` over ``k_warmup_steps``, as adv_optm; ``centered_wd``
    anchors the weights of a parameter's first step (adv_optm creates Prodigy's state lazily too).
    ``fsdp_in_use=True`` sums Prodigy's step sums over the ranks as :class:`Prodigy` does (adv_optm also
    sums ``beta3 * d_numerator``, counting the history once per rank: not reproduced).
    Keywords of features adv_chain lacks raise ``NotImplementedError`` (see the preset)."""

    foreign_checkpoints = ("adv_optm",)

    def __init__(self, params: Iterable[Any], lr: float = 1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = 1e-8, weight_decay: float = 0.0, fisher_wd: bool = False,
                 cautious_wd: bool = False, stochastic_rounding: bool = True, use_atan2: bool = False,
                 orthogonal_gradient: Any = "disabled", nesterov: bool = False, nesterov_coef: float | None = None,
                 state_precision: str = "auto", factored_2nd: bool = False, nnmf_factor: bool = False,
                 vector_reshape: bool = False, compiled_optimizer: bool = False, beta3: float | None = None,
                 d0: float = 1e-6, d_coef: float = 1, growth_rate: float = float("inf"),
                 safeguard_warmup: bool = False, fsdp_in_use: bool = False, slice_p: int = 11,
                 prodigy_steps: int = 0, d_limiter: bool = False, kourkoutas_beta: bool = False,
                 beta2_min: float = 0.9, ema_alpha: float = 0.95, tiny_spike: float = 1e-9, k_warmup_steps: int = 0,
                 k_logging: int = 0, layer_key_fn: Any = None, centered_wd: float = 0.0,
                 centered_wd_mode: str = "float8", spectral_normalization: bool = False, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0) -> None:
        chain = presets.prodigy_adv(
            betas=betas, eps=eps, weight_decay=weight_decay, fisher_wd=fisher_wd, cautious_wd=cautious_wd,
            stochastic_rounding=stochastic_rounding, use_atan2=use_atan2, orthogonal_gradient=orthogonal_gradient,
            nesterov=nesterov, nesterov_coef=nesterov_coef, state_precision=state_precision,
            factored_2nd=factored_2nd, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, beta3=beta3, d0=d0,
            d_coef=d_coef, growth_rate=growth_rate, safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use,
            slice_p=slice_p, prodigy_steps=prodigy_steps, d_limiter=d_limiter, kourkoutas_beta=kourkoutas_beta,
            beta2_min=beta2_min, ema_alpha=ema_alpha, tiny_spike=tiny_spike, k_warmup_steps=k_warmup_steps,
            k_logging=k_logging, layer_key_fn=layer_key_fn, centered_wd=centered_wd,
            centered_wd_mode=centered_wd_mode,
            spectral_normalization=spectral_normalization, seed=seed)
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        _prodigy_groups(self)


Prodigy_Adv = Prodigy_adv
