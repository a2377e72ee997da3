"""Drop-ins for adv_optm 2.5.16's Muon_adv and AdaMuon_adv, auxiliary Adam included (keywords and
defaults of spec §13.1; presets ``muon_adv`` and ``adamuon_adv``, :mod:`adv_chain.presets.muon`)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import presets
from ..presets.muon import DEFAULT_ADAM_NAMES
from ._base import _DropIn

_NOT_PRESET = ("self", "__class__", "params", "lr", "compiled_optimizer", "compile", "state_dtype")


def _preset_kwargs(local: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in local.items() if k not in _NOT_PRESET}


class Muon_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``Muon_adv`` as a chain: Muon (Jordan et al. 2024) on hidden matrices, the
    auxiliary Adam on every other parameter, both stepped with ``lr``. Every 2.5.16 keyword with its
    default; ``compiled_optimizer=True`` means ``compile=True``. Which parameters take Muon: a param
    group's ``use_muon`` / ``optim_type``, the constructor's ``use_muon``, then (with
    ``model.named_parameters()``) embeddings and heads by name to Adam (``adam_names``), then the
    reference's shape test (:mod:`adv_chain.presets.muon`). ``adam_kourkoutas_beta`` and
    ``adam_fisher_wd`` work (the reference's bugs B4, B5). ``low_rank_ortho=True`` orthogonalizes
    ``Q NS(Q^T G)`` with ``Q = qr(G Omega)`` for a Gaussian sketch of rank ``ortho_rank`` (arXiv
    2509.11983; seeded by ``seed``, reproducible across checkpoints); ``spectral_normalization=True``
    replaces the rms scaling by ``lr * sqrt(d_out/d_in) / sigma`` (power iteration; turning
    ``rms_rescaling`` off with a warning, as the reference; its dtype bug B6 fixed), and
    ``adam_spectral_normalization=True`` does the same on the auxiliary Adam.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 8), "hidden": torch.nn.Linear(8, 16),
    ...                              "head": torch.nn.Linear(16, 2)})
    >>> opt = ac.optim.Muon_adv(model.named_parameters(), lr=0.02, weight_decay=0.01, adam_weight_decay=0.0)
    >>> x = model["hidden"](model["embed"](torch.randint(0, 10, (4,))))
    >>> model["head"](x).square().mean().backward(); opt.step()
    >>> {n: "muon" if "muon_momentum/momentum_buffer" in opt.state[p] else "adam" for n, p in model.named_parameters()}
    {'embed.weight': 'adam', 'hidden.weight': 'muon', 'hidden.bias': 'adam', 'head.weight': 'adam', 'head.bias': 'adam'}
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta1: float = 0.95, weight_decay: float = 0.0,
                 cautious_wd: bool = False, nesterov: bool = True, nesterov_coef: float | None = None,
                 ns_steps: int = 5, ns_eps: float | None = 1e-7,
                 ns_coeffs: tuple[float, float, float] = (3.4445, -4.775, 2.0315), stochastic_rounding: bool = True,
                 orthogonal_gradient: Any = "disabled", rms_rescaling: bool = True, nnmf_factor: bool = False,
                 vector_reshape: bool = False, use_muon: bool | None = None, state_precision: str = "auto",
                 low_rank_ortho: bool = False, ortho_rank: int = 128, normuon_variant: bool = False,
                 beta2_normuon: float = 0.95, normuon_eps: float = 1e-8, accelerated_ns: bool = False,
                 cns_a_bound: float | None = None, approx_mars: bool = False, mars_gamma: float = 0.025,
                 spectral_normalization: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
                 compiled_optimizer: bool = False, adam_betas: tuple[float, float] = (0.9, 0.99),
                 adam_eps: float | None = 1e-8, adam_weight_decay: float = 0.0, adam_fisher_wd: bool = False,
                 adam_use_bias_correction: bool = True, adam_use_atan2: bool = False,
                 adam_orthogonal_gradient: Any = "disabled", adam_nesterov: bool = False,
                 adam_nesterov_coef: float | None = None, adam_kourkoutas_beta: bool = False,
                 adam_beta2_min: float = 0.9, adam_ema_alpha: float = 0.95, adam_tiny_spike: float = 1e-9,
                 adam_k_warmup_steps: int = 0, adam_spectral_normalization: bool = False,
                 adam_state_precision: str = "auto", adam_nnmf_factor: bool = False, adam_factored_2nd: bool = False,
                 *, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0,
                 adam_names: str | None = DEFAULT_ADAM_NAMES) -> None:
        chain = presets.muon_adv(**_preset_kwargs(locals()))
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)


class AdaMuon_adv(_DropIn):  # noqa: N801 - the reference's class name
    """adv_optm's ``AdaMuon_adv`` as a chain (AdaMuon, arXiv 2507.11005): sign, Newton-Schulz and an
    elementwise second moment on hidden matrices, the auxiliary Adam on the rest (routing as
    :class:`Muon_adv`). Every 2.5.16 keyword with its default, ``low_rank_ortho`` and the spectral
    keywords as :class:`Muon_adv`.

    >>> import torch, adv_chain as ac
    >>> opt = ac.optim.AdaMuon_adv(torch.nn.Linear(8, 16).parameters(), lr=0.02, use_atan2=True)
    >>> [t.name for t in opt.chain["partition"].routes["muon"]][3:5]
    ['adamuon', 'atan2_scale']
    >>> model = torch.nn.Linear(8, 16)
    >>> opt = ac.optim.AdaMuon_adv(model.parameters(), lr=0.02, low_rank_ortho=True, ortho_rank=4,
    ...                            spectral_normalization=True, rms_rescaling=False)
    >>> model(torch.randn(4, 8)).square().mean().backward(); opt.step()
    >>> sorted(k for k in opt.state[model.weight] if "/" in k)
    ['adamuon/exp_avg_sq', 'muon_momentum/momentum_buffer', 'spectral/spectral_u', 'spectral/spectral_v']
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.95, 0.95),
                 eps: float | None = 1e-8, weight_decay: float = 0.0, cautious_wd: bool = False, nesterov: bool = True,
                 nesterov_coef: float | None = None, rms_rescaling: bool = True, ns_steps: int = 5,
                 ns_eps: float | None = 1e-7, ns_coeffs: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                 stochastic_rounding: bool = True, orthogonal_gradient: Any = "disabled", use_atan2: bool = False,
                 normuon_variant: bool = False, use_muon: bool | None = None, state_precision: str = "auto",
                 factored_2nd: bool = False, kappa_p: float = 1.0, auto_projection: bool = True,
                 low_rank_ortho: bool = False, ortho_rank: int = 128, vector_reshape: bool = False,
                 nnmf_factor: bool = False, accelerated_ns: bool = False, cns_a_bound: float | None = None,
                 approx_mars: bool = False, mars_gamma: float = 0.025, spectral_normalization: bool = False,
                 centered_wd: float = 0.0, centered_wd_mode: str = "float8", compiled_optimizer: bool = False,
                 adam_betas: tuple[float, float] = (0.9, 0.99), adam_eps: float | None = 1e-8,
                 adam_weight_decay: float = 0.0, adam_fisher_wd: bool = False, adam_use_bias_correction: bool = True,
                 adam_use_atan2: bool = False, adam_orthogonal_gradient: Any = "disabled", adam_nesterov: bool = False,
                 adam_nesterov_coef: float | None = None, adam_kourkoutas_beta: bool = False,
                 adam_beta2_min: float = 0.9, adam_ema_alpha: float = 0.95, adam_tiny_spike: float = 1e-9,
                 adam_k_warmup_steps: int = 0, adam_spectral_normalization: bool = False,
                 adam_state_precision: str = "auto", adam_nnmf_factor: bool = False, adam_factored_2nd: bool = False,
                 *, compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32", seed: int = 0,
                 adam_names: str | None = DEFAULT_ADAM_NAMES) -> None:
        chain = presets.adamuon_adv(**_preset_kwargs(locals()))
        super().__init__(params, chain, lr, compile or compiled_optimizer, state_dtype)
        self._centered_anchors(centered_wd)
