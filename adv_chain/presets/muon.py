"""adv_optm's Muon family with its auxiliary Adam: ``muon_adv`` and ``adamuon_adv`` (spec §2.7-§2.9).

Both are one :func:`~adv_chain.partition` and the shared terminal::

    ac.chain(ac.partition({"muon": <Muon or AdaMuon route>, "adam": <auxiliary Adam route>},
                          rules=muon_rules(...), default="adam", group_keys=...),
             ac.stochastic_round_apply())

**Which parameters take Muon** follows the reference (spec §2.7), first match wins:

1. ``group["use_muon"]`` when the param group sets it (True / False);
2. the constructor's ``use_muon`` when not ``None`` (the reference keeps it as every group's default);
3. ``group["optim_type"]`` when set: ``"muon"`` -> Muon, anything else -> Adam;
4. *(adv_chain, only when the optimizer got ``model.named_parameters()``)* names matching
   ``adam_names`` (default :data:`DEFAULT_ADAM_NAMES`: embeddings and output heads) -> Adam, the
   usual Muon recipe; ``adam_names=None`` turns it off. The reference has no such rule: it sends an
   embedding of 50257 x 768 to Muon (aspect ratio 65 < 128);
5. the reference's shape test :func:`~adv_chain.transforms.partition.suitable_for_muon` (ndim >= 2,
   both sides of the matrix view >= 4, aspect ratio <= 128) -> Muon; everything else (biases, norms,
   thin heads) -> the auxiliary Adam.

The auxiliary Adam is :func:`adamw_adv`'s chain (without its terminal) on the reference's
``adam_*`` keywords: its transforms are named ``adam`` (state ``"adam/exp_avg"``, ``"adam/exp_avg_sq"``)
and ``adam_<name>`` for the others (``adam_eps_divide``, ``adam_weight_decay``...), and they read the
reference's group keys ``adam_betas``, ``adam_eps``, ``adam_weight_decay``, ``adam_beta2_min``; ``lr``,
``centered_wd`` and ``vector_reshape`` are shared with Muon, as the reference. Bugs fixed (spec §10.1):

* **B4**: ``adam_kourkoutas_beta=True`` works: the dynamic beta2 reaches the auxiliary Adam (the
  reference overwrites it with the static one whenever ``adam_use_bias_correction=True``, and turns
  it off in any group that holds a Muon parameter); the bias correction stays the static
  ``1 - beta2_max^t`` as in ``AdamW_adv``. Each tensor is its own Kourkoutas layer (the paper's
  default; the reference buckets tensors by shape), because a partition's routes run per-tensor
  reductions only;
* **B5**: ``adam_fisher_wd=True`` applies FAdam's Fisher weight decay to the auxiliary Adam (the
  reference reads a key that is never set: a no-op);
* **B13**: with ``adam_spectral_normalization`` the auxiliary Adam's step is not multiplied by
  ``1/(1 - beta1^t)`` (the normalized direction needs no bias correction; :func:`adamw_adv` does the same);
* and from the Muon transforms: B1 (factored Muon keeps lr and the weight's geometry), B6 (the
  spectral scale always reaches the parameter: the direction is fp32 and scaled in place, whatever
  the parameter's dtype), B7 (vectors forced into Muon are ``1 x n`` matrices, no crash).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

from .. import transforms as T
from .._core import checks
from .._core.chain import Chain, chain
from .._core.transform import Transform
from ._registry import register
from ._storage import stored
from .adv import adamw_adv, centered_stage, decay_stage, gradient_stage, spectral_stage
from .classic import terminal

#: names routed to the auxiliary Adam when the optimizer gets named parameters: embeddings
#: (``embed_tokens``, ``wte``/``wpe``, ``word_embeddings``, ``patch_embed``...) and output heads
DEFAULT_ADAM_NAMES = r"embed|(^|\.)(lm_head|head|classifier|wte|wpe)(\.|$)"
#: the plain group keys the auxiliary Adam reads under the reference's ``adam_`` names
AUX_GROUP_KEYS = {"betas": "adam_betas", "eps": "adam_eps", "weight_decay": "adam_weight_decay",
                  "beta2_min": "adam_beta2_min"}


def muon_rules(use_muon: bool | None = None, adam_names: str | None = DEFAULT_ADAM_NAMES) -> list[dict[str, Any]]:
    """The reference's routing as partition rules (module docstring); the default route is Adam."""
    if use_muon is not None:
        checks.flag("muon_rules", "use_muon", use_muon)
    rules: list[dict[str, Any]] = [{"group": "use_muon", "value": True, "route": "muon"},
                                   {"group": "use_muon", "value": False, "route": "adam"}]
    if use_muon is not None:
        rules.append({"route": "muon" if use_muon else "adam"})
    rules += [{"group": "optim_type", "value": "muon", "route": "muon"}, {"group": "optim_type", "route": "adam"}]
    if adam_names is not None:
        rules.append({"name": adam_names, "missing_name": "skip", "route": "adam"})
    rules.append({"matrix": True, "route": "muon"})
    return rules


def aux_adam(preset: str, *, adam_betas: Any, adam_eps: Any, adam_weight_decay: float, adam_fisher_wd: bool,
             adam_use_bias_correction: bool, adam_use_atan2: bool, adam_orthogonal_gradient: Any, adam_nesterov: bool,
             adam_nesterov_coef: Any, adam_kourkoutas_beta: bool, adam_beta2_min: float, adam_ema_alpha: float,
             adam_tiny_spike: float, adam_k_warmup_steps: int, adam_spectral_normalization: bool,
             adam_state_precision: str, adam_nnmf_factor: bool, adam_factored_2nd: bool, cautious_wd: bool,
             centered_wd: float, centered_wd_mode: str, vector_reshape: bool, seed: int) -> Chain:
    """The auxiliary Adam route (spec §2.9) with B4, B5 and B13 fixed (module docstring).
    ``adam_spectral_normalization``: :func:`spectral_normalization` as in :func:`adamw_adv`, then, with
    ``adam_use_atan2``, ``scale(4/pi)``: the reference's auxiliary Adam keeps atan2's factor there."""
    checks.flag(preset, "adam_spectral_normalization", adam_spectral_normalization)
    full = adamw_adv(betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay, fisher_wd=adam_fisher_wd,
                     cautious_wd=cautious_wd, use_bias_correction=adam_use_bias_correction, use_atan2=adam_use_atan2,
                     orthogonal_gradient=adam_orthogonal_gradient, nesterov=adam_nesterov,
                     nesterov_coef=adam_nesterov_coef, kourkoutas_beta=adam_kourkoutas_beta,
                     beta2_min=adam_beta2_min, ema_alpha=adam_ema_alpha, tiny_spike=adam_tiny_spike,
                     k_warmup_steps=adam_k_warmup_steps, spectral_normalization=adam_spectral_normalization,
                     centered_wd=centered_wd, centered_wd_mode=centered_wd_mode,
                     state_precision=adam_state_precision, factored_2nd=adam_factored_2nd,
                     nnmf_factor=adam_nnmf_factor, vector_reshape=vector_reshape, seed=seed)
    out = []
    for t in full.transforms[:-1]:
        if t.type_name == "kourkoutas_beta":
            t = t.with_args(layer_key="tensor")  # per-tensor layers: a reduction a partition route runs
        out.append(t if t.name == "adam" else t.renamed("adam_" + t.name))
        if t.type_name == "spectral_normalization" and adam_use_atan2:
            out.append(T.scale(4 / math.pi, name="adam_atan2_factor"))
    return chain(*out)


#: the keywords :func:`aux_adam` takes, forwarded by name from a preset's own (one list for both presets)
_AUX_KEYWORDS = tuple(inspect.signature(aux_adam).parameters)[1:]


def _aux_from(preset: str, keywords: dict[str, Any]) -> Chain:
    """:func:`aux_adam` on the ``adam_*`` (and shared) keywords of a preset call (its ``locals()``)."""
    return aux_adam(preset, **{k: keywords[k] for k in _AUX_KEYWORDS})


def _low_rank(preset: str, low_rank_ortho: bool, ortho_rank: Any) -> int | None:
    """``newton_schulz``'s ``rank`` from the reference's ``low_rank_ortho``/``ortho_rank``."""
    if not isinstance(ortho_rank, int) or isinstance(ortho_rank, bool) or ortho_rank < 1:
        raise ValueError(f"{preset}: ortho_rank={ortho_rank!r} must be a positive int >= 1 (the sketch's rank)")
    return ortho_rank if checks.flag(preset, "low_rank_ortho", low_rank_ortho) else None


def _final_scale(preset: str, spectral: bool, rms_rescaling: bool, seed: int, rms: Transform) -> tuple:
    """Muon's step scale: ``spectral_normalization`` replaces ``muon_scale`` (rms or aspect); with
    ``rms_rescaling=True`` too, the reference warns and turns rms_rescaling off, and so does this."""
    if not checks.flag(preset, "spectral_normalization", spectral):
        return (rms,)
    if rms_rescaling:
        warnings.warn(f"{preset}: spectral_normalization=True is incompatible with rms_rescaling=True; "
                      "rms_rescaling is turned off (as adv_optm does). Pass rms_rescaling=False to silence this.",
                      UserWarning, stacklevel=4)
    return spectral_stage(preset, True, seed)


def _ns(ns_steps: int, ns_eps: Any, ns_coeffs: Any, accelerated_ns: bool, cns_a_bound: Any, rank: int | None,
        seed: int) -> T.newton_schulz:
    method = "cans" if checks.flag("preset", "accelerated_ns", accelerated_ns) else "quintic"
    return T.newton_schulz(steps=ns_steps, coefficients=tuple(ns_coeffs), eps=ns_eps, method=method,
                           cans_lower_bound=cns_a_bound, rank=rank, seed=seed)


def _gradient(preset: str, approx_mars: bool, mars_gamma: float, beta: float, orthogonal_gradient: Any) -> tuple:
    mars = (T.approx_mars(mars_gamma, beta),) if checks.flag(preset, "approx_mars", approx_mars) else ()
    return (*mars, *gradient_stage(preset, orthogonal_gradient))


def _assemble(preset: str, muon_route: Chain, aux: Chain, use_muon: Any, adam_names: Any,
              muon_keys: Any, stochastic_rounding: bool, seed: int) -> Chain:
    if adam_names is not None and not isinstance(adam_names, str):
        raise ValueError(f"{preset}: adam_names={adam_names!r} must be a regular expression or None")
    groups = {"adam": AUX_GROUP_KEYS, **({"muon": muon_keys} if muon_keys else {})}
    return chain(T.partition({"muon": muon_route, "adam": aux}, rules=muon_rules(use_muon, adam_names),
                             default="adam", group_keys=groups),
                 terminal(stochastic_rounding=stochastic_rounding, seed=seed))


@register
def muon_adv(beta1: float = 0.95, weight_decay: float = 0.0, cautious_wd: bool = False, nesterov: bool = True,
             nesterov_coef: float | None = None, ns_steps: int = 5, ns_eps: float | None = 1e-7,
             ns_coeffs: tuple[float, float, float] = (3.4445, -4.775, 2.0315), stochastic_rounding: bool = True,
             orthogonal_gradient: Any = "disabled", rms_rescaling: bool = True, nnmf_factor: bool = False,
             vector_reshape: bool = False, use_muon: bool | None = None, state_precision: str = "auto",
             low_rank_ortho: bool = False, ortho_rank: int = 128, normuon_variant: bool = False,
             beta2_normuon: float = 0.95, normuon_eps: float = 1e-8, accelerated_ns: bool = False,
             cns_a_bound: float | None = None, approx_mars: bool = False, mars_gamma: float = 0.025,
             spectral_normalization: bool = False, centered_wd: float = 0.0, centered_wd_mode: str = "float8",
             adam_betas: tuple[float, float] = (0.9, 0.99), adam_eps: float | None = 1e-8,
             adam_weight_decay: float = 0.0, adam_fisher_wd: bool = False, adam_use_bias_correction: bool = True,
             adam_use_atan2: bool = False, adam_orthogonal_gradient: Any = "disabled", adam_nesterov: bool = False,
             adam_nesterov_coef: float | None = None, adam_kourkoutas_beta: bool = False, adam_beta2_min: float = 0.9,
             adam_ema_alpha: float = 0.95, adam_tiny_spike: float = 1e-9, adam_k_warmup_steps: int = 0,
             adam_spectral_normalization: bool = False, adam_state_precision: str = "auto",
             adam_nnmf_factor: bool = False, adam_factored_2nd: bool = False,
             adam_names: str | None = DEFAULT_ADAM_NAMES, seed: int = 0) -> Chain:
    """adv_optm's ``Muon_adv`` with its auxiliary Adam (spec §2.7, §2.9; 2.5.16 keywords and defaults).

    Muon route (hidden matrices), in the reference's order::

        [approx_mars(mars_gamma, beta1)] [orthograd] muon_momentum(beta1, nesterov, nesterov_coef)
        newton_schulz(ns_steps, ns_coeffs, ns_eps; CANS with accelerated_ns / cns_a_bound;
                      rank=ortho_rank with low_rank_ortho)
        [normuon(beta2_normuon, normuon_eps)]
        muon_scale("rms" | "aspect" when rms_rescaling=False) | spectral_normalization
        weight_decay (cautious with cautious_wd) [centered_wd]

    i.e. ``b = lerp(b, g, 1-beta1)``, ``u = NS(lerp(g, b, c))``, ``U = lr * 0.2 sqrt(numel) u / ||u||``.

    * ``low_rank_ortho=True`` (arXiv 2509.11983): ``r = min(ortho_rank, m, n)``, a fresh Gaussian
      ``Omega`` (``n x r``, counter-based noise from ``seed``, step and parameter: reproducible, also
      after a checkpoint, never the global RNG), ``Q = qr(G Omega)`` in fp32, ``u = Q NS(Q^T G)``
      (:mod:`adv_chain.transforms.low_rank`). ``ortho_rank`` must be a positive int.
    * ``spectral_normalization=True`` (spec §6): ``U = lr * target / sigma * u`` with ``sigma`` the
      power-iteration estimate of ``||u||_2`` and ``target = sqrt(d_out / d_in)`` replaces
      ``muon_scale``; with ``rms_rescaling=True`` (the default) a ``UserWarning`` says rms_rescaling
      is off, as the reference prints. The scale always reaches the parameter (the reference loses it
      when the update's dtype differs from the parameter's, B6).
    * ``adam_spectral_normalization=True``: the same on the auxiliary Adam (vectors: L-infinity), times
      ``4/pi`` with ``adam_use_atan2`` as the reference; without the reference's ``1/(1 - beta1^t)``
      (B13, as :func:`adamw_adv`).

    The auxiliary Adam (every other parameter, same ``lr``) is :func:`adamw_adv` on the ``adam_*``
    keywords; routing, group keys and the fixed bugs B4/B5 are in the module docstring.
    ``adam_names`` (an adv_chain keyword) routes named embeddings and heads to Adam. Papers: Muon
    (Jordan et al. 2024), NorMuon (arXiv 2510.05491), MARS-M (arXiv 2510.21800), CANS, low-rank
    orthogonalization (arXiv 2509.11983), modular-norm scaling (arXiv 2405.14813), Adam (arXiv
    1412.6980), Kourkoutas-beta (arXiv 2508.12996), FAdam (arXiv 2405.12807).

    >>> import torch, adv_chain as ac
    >>> c = ac.presets.muon_adv(weight_decay=0.01)
    >>> [t.name for t in c["partition"].routes["muon"]], c.names
    (['muon_momentum', 'newton_schulz', 'muon_scale', 'weight_decay'], ('partition', 'apply'))
    >>> [t.name for t in c["partition"].routes["adam"]]
    ['adam', 'adam_eps_divide', 'adam_weight_decay']
    >>> c = ac.presets.muon_adv(low_rank_ortho=True, ortho_rank=8, spectral_normalization=True, rms_rescaling=False)
    >>> c["partition"].routes["muon"]["newton_schulz"], [t.name for t in c["partition"].routes["muon"]][2:]
    (newton_schulz(rank=8), ['spectral', 'weight_decay'])
    """
    name = "muon_adv"
    rank = _low_rank(name, low_rank_ortho, ortho_rank)
    rms = checks.flag(name, "rms_rescaling", rms_rescaling)
    muon_route = chain(
        *_gradient(name, approx_mars, mars_gamma, beta1, orthogonal_gradient),
        stored(name, T.muon_momentum(beta=beta1, nesterov=checks.flag(name, "nesterov", nesterov),
                                     nesterov_coef=nesterov_coef),
               state_precision=state_precision, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, seed=seed),
        _ns(ns_steps, ns_eps, ns_coeffs, accelerated_ns, cns_a_bound, rank, seed),
        *((T.normuon(beta2_normuon, normuon_eps),) if checks.flag(name, "normuon_variant", normuon_variant) else ()),
        *_final_scale(name, spectral_normalization, rms, seed, T.muon_scale("rms" if rms else "aspect")),
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
    )
    return _assemble(name, muon_route, _aux_from(name, locals()), use_muon, adam_names, None, stochastic_rounding,
                     seed)


@register
def adamuon_adv(betas: tuple[float, float] = (0.95, 0.95), eps: float | None = 1e-8, weight_decay: float = 0.0,
                cautious_wd: bool = False, nesterov: bool = True, nesterov_coef: float | None = None,
                rms_rescaling: bool = True, ns_steps: int = 5, ns_eps: float | None = 1e-7,
                ns_coeffs: tuple[float, float, float] = (3.4445, -4.775, 2.0315), stochastic_rounding: bool = True,
                orthogonal_gradient: Any = "disabled", use_atan2: bool = False, normuon_variant: bool = False,
                use_muon: bool | None = None, state_precision: str = "auto", factored_2nd: bool = False,
                kappa_p: float = 1.0, auto_projection: bool = True, low_rank_ortho: bool = False,
                ortho_rank: int = 128, vector_reshape: bool = False, nnmf_factor: bool = False,
                accelerated_ns: bool = False, cns_a_bound: float | None = None, approx_mars: bool = False,
                mars_gamma: float = 0.025, spectral_normalization: bool = False, centered_wd: float = 0.0,
                centered_wd_mode: str = "float8", adam_betas: tuple[float, float] = (0.9, 0.99),
                adam_eps: float | None = 1e-8, adam_weight_decay: float = 0.0, adam_fisher_wd: bool = False,
                adam_use_bias_correction: bool = True, adam_use_atan2: bool = False,
                adam_orthogonal_gradient: Any = "disabled", adam_nesterov: bool = False,
                adam_nesterov_coef: float | None = None, adam_kourkoutas_beta: bool = False,
                adam_beta2_min: float = 0.9, adam_ema_alpha: float = 0.95, adam_tiny_spike: float = 1e-9,
                adam_k_warmup_steps: int = 0, adam_spectral_normalization: bool = False,
                adam_state_precision: str = "auto", adam_nnmf_factor: bool = False, adam_factored_2nd: bool = False,
                adam_names: str | None = DEFAULT_ADAM_NAMES, seed: int = 0) -> Chain:
    """adv_optm's ``AdaMuon_adv`` with its auxiliary Adam (spec §2.8, §2.9; AdaMuon, arXiv 2507.11005).

    Muon route::

        [approx_mars] [orthograd] muon_momentum(betas[0], nesterov, nesterov_coef)
        kappa_projection("auto" | kappa_p)          (sign for matrices, identity for >= 4-D)
        newton_schulz(...)
        v = betas[1] v + (1 - betas[1]) u^2 ;  u = u / (sqrt(v) + eps)      ("adamuon": scale_by_adam with
                                                                            beta1 = 0, no bias correction)
            (use_atan2: u = (4/pi) atan2(u, sqrt(v)); normuon_variant: normuon(betas[1], eps) instead)
        muon_scale("rms", 0.2, or 0.2 * 4/pi with atan2 | "aspect")  weight_decay [centered_wd]

    ``low_rank_ortho``/``ortho_rank``, ``spectral_normalization`` (replacing ``muon_scale``; the
    reference passes it ``lr`` without atan2's ``4/pi``, so the atan2 runs with ``a=1`` there) and
    ``adam_spectral_normalization`` are as :func:`muon_adv`, as are the auxiliary Adam, routing and
    fixed bugs (module docstring). A param-group ``"betas"`` is not read (it would set the second
    moment's beta1); override ``"muon_momentum.beta"`` and ``"adamuon.betas"`` instead.

    >>> import adv_chain as ac
    >>> [t.name for t in ac.presets.adamuon_adv()["partition"].routes["muon"]]
    ['muon_momentum', 'kappa_projection', 'newton_schulz', 'adamuon', 'eps_divide', 'muon_scale', 'weight_decay']
    >>> c = ac.presets.adamuon_adv(use_atan2=True, spectral_normalization=True, rms_rescaling=False)
    >>> [t for t in c["partition"].routes["muon"]][4:6]
    [atan2_scale(a=1.0), spectral_normalization()]
    """
    name = "adamuon_adv"
    rank = _low_rank(name, low_rank_ortho, ortho_rank)
    spectral = checks.flag(name, "spectral_normalization", spectral_normalization)
    beta1, beta2 = checks.beta_pair(name, "betas", betas)
    atan2 = checks.flag(name, "use_atan2", use_atan2)
    rms = checks.flag(name, "rms_rescaling", rms_rescaling)
    if checks.flag(name, "normuon_variant", normuon_variant):
        second: tuple = (T.normuon(beta2, eps),)
        atan2 = False  # the reference ignores use_atan2 with NorMuon
    else:
        second = (stored(name, T.scale_by_adam(betas=(0.0, beta2), bias_correction=False, name="adamuon"),
                         state_precision=state_precision, nnmf_factor=nnmf_factor, factored_2nd=factored_2nd,
                         vector_reshape=vector_reshape, seed=seed),
                  (T.atan2_scale(a=1.0) if spectral else T.atan2_scale()) if atan2 else T.eps_divide(eps))
    kappa = "auto" if checks.flag(name, "auto_projection", auto_projection) else kappa_p
    muon_route = chain(
        *_gradient(name, approx_mars, mars_gamma, beta1, orthogonal_gradient),
        stored(name, T.muon_momentum(beta=beta1, nesterov=checks.flag(name, "nesterov", nesterov),
                                     nesterov_coef=nesterov_coef),
               state_precision=state_precision, nnmf_factor=nnmf_factor, vector_reshape=vector_reshape, seed=seed),
        T.kappa_projection(kappa),
        _ns(ns_steps, ns_eps, ns_coeffs, accelerated_ns, cns_a_bound, rank, seed),
        *second,
        *_final_scale(name, spectral, rms, seed,
                      T.muon_scale("rms", 0.2 * 4 / math.pi if atan2 else 0.2) if rms else T.muon_scale("aspect")),
        decay_stage(weight_decay, cautious_wd),
        *centered_stage(name, centered_wd, centered_wd_mode, cautious_wd),
    )
    return _assemble(name, muon_route, _aux_from(name, locals()), use_muon, adam_names, {"betas": None},
                     stochastic_rounding, seed)
