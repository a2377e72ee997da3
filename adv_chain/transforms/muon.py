"""The Muon family as small parts: MARS-M correction, Muon momentum, Newton-Schulz orthogonalization,
NorMuon's row normalization, AdaMuon's projection, and Muon's step scale.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalizes a momentum on
each weight's matrix view ``(rows, numel / rows)``. adv_optm 2.5.16's ``Muon_adv`` (spec §2.7) is::

    ac.chain(ac.approx_mars(), ac.orthograd(),                       # both optional, in this order
             ac.muon_momentum(beta=0.95, nesterov=True),
             ac.newton_schulz(),                                     # ns_steps, ns_eps, ns_coeffs, CANS
             ac.normuon(beta2=0.95, eps=1e-8),                       # optional (normuon_variant)
             ac.muon_scale("rms"),                                   # rms_rescaling=False: "aspect"
             ac.weight_decay(wd), ac.stochastic_round_apply())

and ``AdaMuon_adv`` (spec §2.8; AdaMuon, arXiv 2507.11005) puts AdaMuon's elementwise second
moment after the orthogonalization. That moment is no new transform: it is Adam's second moment
without first moment or bias correction, then a division (or atan2)::

    ac.chain(ac.muon_momentum(beta=0.95), ac.kappa_projection("auto"), ac.newton_schulz(),
             ac.scale_by_adam(betas=(0.0, 0.95), bias_correction=False), ac.eps_divide(1e-8),
             ac.muon_scale("rms"), ac.apply())

(``use_atan2``: ``ac.atan2_scale()`` instead of ``eps_divide`` and ``muon_scale(rms_target=0.2 * 4 / pi)``,
since adv_optm multiplies its unit-RMS update by 4/pi; ``normuon_variant``: ``ac.normuon(beta2, eps)``
instead of the two.)

What differs from adv_optm (spec §10.1): the step is always ``lr * u`` applied by the terminal, and
the orthogonalization always runs on the weight's own matrix view, also when the momentum is stored
factored (``ac.factored_state(ac.muon_momentum())``; B1: adv_optm's factored Muon never multiplies by
lr and orthogonalizes an unrelated square-ish reshape); the direction is fp32 whatever the parameter's
dtype, so a scale is never lost to a dtype mismatch (B6); 1-D and 0-d tensors are orthogonalized as
``1 x n`` matrices (``u / ||u||``) instead of crashing (B7). ``low_rank_ortho``: ``newton_schulz(rank=r)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HParam, HostView, StateSpec, Transform
from . import low_rank
from .normalize import _eps_or_none, auto_eps_specs, eps_operand, eps_scalars
from .sign_family import key_halves

#: Keller Jordan's quintic Newton-Schulz coefficients (adv_optm's ``ns_coeffs`` default)
QUINTIC = (3.4445, -4.775, 2.0315)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _rows(p: torch.Tensor) -> int:
    """Rows of the matrix view: ``shape[0]`` for ndim >= 2, else 1 (a vector is one row)."""
    return p.shape[0] if p.dim() >= 2 else 1


def matrix_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``(rows, numel / rows)`` matrix: ``flatten(1)`` for ndim >= 2, one row otherwise."""
    return x.reshape(_rows(x), -1) if x.numel() else x.reshape(_rows(x), 0)


# -- approximate MARS-M --------------------------------------------------------------------------


class ApproxMars(Transform):
    """Approximate MARS-M (arXiv 2510.21800, the matrix version of MARS, arXiv 2411.10438; adv_optm's
    ``approx_mars``, spec §3.3): a variance-reduced gradient from the change since the previous step::

        c_t = g_t + gamma * beta / (1 - beta) * (g_t - g_{t-1}),     g_0 = 0

    ``beta`` is the momentum's (``muon_momentum``'s ``beta``; give the same value). Like adv_optm, no
    norm control of ``c_t`` (the paper rescales ``c_t`` to unit norm when it exceeds 1), and step 1
    is ``(1 + gamma*beta/(1-beta)) * g_1``. A gradient-stage transform: put it first, before
    :func:`orthograd`. State ``"approx_mars/last_grad"`` (fp32, full size).

    >>> import adv_chain as ac
    >>> ac.chain(ac.approx_mars(0.025), ac.muon_momentum(), ac.newton_schulz(), ac.muon_scale(), ac.apply()).names
    ('approx_mars', 'muon_momentum', 'newton_schulz', 'muon_scale', 'apply')
    """

    type_name = "approx_mars"
    default_name = "approx_mars"
    stage = "gradient"
    hparams = {"gamma": HParam(None, checks.nonneg), "beta": HParam(None, checks.unit_interval)}

    def __init__(self, gamma: float = 0.025, beta: float = 0.95, *, name: str | None = None) -> None:
        super().__init__(name=name, gamma=gamma, beta=beta)

    def state_specs(self, param: torch.Tensor, hp: Any) -> dict[str, StateSpec]:
        return {"last_grad": StateSpec(kind="signed")}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"factor": h.hp["gamma"] * h.hp["beta"] / (1.0 - h.hp["beta"])}

    def update(self, b: Any) -> None:
        g, last = b.u, b.state("last_grad")
        c = torch._foreach_sub(g, last)    # (g_t - g_{t-1}) * factor + g_t: adv_optm's order of operations
        torch._foreach_copy_(last, g)
        torch._foreach_mul_(c, b.s("factor"))
        torch._foreach_add_(c, g)
        b.set_u(c)


# -- momentum ------------------------------------------------------------------------------------


class MuonMomentum(Transform):
    """Muon's momentum (spec §2.7): an EMA of the gradient, and adv_optm's universal Nesterov form::

        m = beta * m + (1 - beta) * g            (m = lerp(m, g, 1 - beta))
        u = c * m + (1 - c) * g                  nesterov=True (default), c = nesterov_coef or beta
        u = m                                    nesterov=False

    Defaults are Muon_adv's (``beta1=0.95``, ``nesterov=True``). Unlike :func:`momentum` (torch's SGD
    heavy ball, ``m = mu*m + g``) the gradient enters with weight ``1 - beta``; the scale does not
    matter to the orthogonalization but does to anything that reads the momentum's size. ``beta``
    may be set per param group as ``"muon_momentum.beta"``. State ``"muon_momentum/momentum_buffer"``
    (fp32; wrap in :func:`factored_state` or :func:`low_precision_state` to store it smaller).

    >>> import adv_chain as ac
    >>> ac.muon_momentum(beta=0.9, nesterov=False)
    muon_momentum(beta=0.9, nesterov=False)
    """

    type_name = "muon_momentum"
    default_name = "muon_momentum"
    stage = "moment"
    hparams = {"beta": HParam(None, checks.unit_interval)}
    static_scalars = frozenset({"nesterov"})

    def __init__(self, beta: float = 0.95, nesterov: bool = True, nesterov_coef: float | None = None, *,
                 name: str | None = None) -> None:
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(self.type_name, "nesterov_coef", nesterov_coef)
        super().__init__(name=name, beta=beta, nesterov=checks.flag(self.type_name, "nesterov", nesterov),
                         nesterov_coef=nesterov_coef)

    def state_specs(self, param: torch.Tensor, hp: Any) -> dict[str, StateSpec]:
        return {"momentum_buffer": StateSpec(kind="signed", factorable=True)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        beta = h.hp["beta"]
        c = beta if h.hp["nesterov_coef"] is None else h.hp["nesterov_coef"]
        return {"one_minus_beta": 1.0 - beta, "c": c, "nesterov": h.hp["nesterov"]}

    def update(self, b: Any) -> None:
        g, m = b.u, b.state("momentum_buffer")
        F.lerp_(m, g, b.s("one_minus_beta"))
        if not b.s("nesterov"):
            b.set_u(m, owned=False)
            return
        c = b.s("c")
        if F.is_tensor(c):
            u = torch._foreach_sub(m, g)
            torch._foreach_mul_(u, c)
            torch._foreach_add_(u, g)
        else:
            u = torch._foreach_lerp(g, m, c)
        b.set_u(u)


# -- Newton-Schulz -------------------------------------------------------------------------------


def _cans_schedule(steps: int, lower: float) -> list[tuple[float, float]]:
    """CANS's per-iteration ``(c1, c3)`` of ``p(x) = c1 x + c3 x^3`` from the bounds ``[lower, 1]``."""
    out, lo, hi = [], lower, 1.0
    for _ in range(steps):
        e2 = (lo * lo + lo * hi + hi * hi) / 3.0
        k, l_ = 2.0 * e2 ** 1.5, lo * hi * (lo + hi)
        alpha = 6.0 / (k + l_)
        out.append((alpha * e2, -alpha / 3.0))
        err = (k - l_) / (k + l_)
        lo, hi = 1.0 - err, 1.0 + err
    return out


def orthogonalize(mats: list[torch.Tensor], *, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float | None = 1e-7, method: str = "quintic", cans_lower_bound: float | None = None,
                  dtype: torch.dtype = torch.bfloat16,
                  sketches: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Newton-Schulz of every 2-D matrix in ``mats`` (new fp32 tensors, inputs untouched). Matrices
    of one shape go through one batched chain of ``bmm``/``baddbmm``. ``sketches`` (one ``(cols, r)``
    Gaussian per matrix): low-rank orthogonalization (:func:`.low_rank.project_orthogonalize`)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(mats):
        groups.setdefault((int(x.shape[0]), int(x.shape[1])), []).append(i)
    out: list[Any] = [None] * len(mats)
    for (rows, cols), idx in groups.items():
        if rows * cols == 0:
            for i in idx:
                out[i] = torch.zeros_like(mats[i], dtype=torch.float32)
            continue
        # the floor and CANS's bound are the whole matrix's, also for a low-rank projection (as adv_optm)
        floor = eps if eps is not None else 1.0 / math.sqrt(rows * cols)
        lower = cans_lower_bound if cans_lower_bound is not None else max(
            1.0 / math.sqrt(rows * cols), abs(1.0 / math.sqrt(cols) - 1.0 / math.sqrt(rows)))

        def ns(y: torch.Tensor) -> torch.Tensor:
            return _newton_schulz_op(y.to(dtype), steps, list(coefficients), floor, method, lower).float()

        x = torch.stack([mats[i] for i in idx])
        result = ns(x) if sketches is None else low_rank.project_orthogonalize(
            x, torch.stack([sketches[i] for i in idx]), ns)
        for k, i in enumerate(idx):
            out[i] = result[k]
    return out


def _newton_schulz_batch(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                         eps: float, method: str, cans_lower_bound: float) -> torch.Tensor:
    """The iteration on a batch ``(B, rows, cols)`` in ``x.dtype``, in the wide orientation."""
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = (x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)).contiguous()
    if method == "quintic":
        a, b, c = coefficients
        for _ in range(steps):
            s = torch.bmm(x, x.mT)
            s = torch.baddbmm(s, s, s, beta=b, alpha=c)   # b*S + c*S^2
            x = torch.baddbmm(x, s, x, beta=a)             # a*X + (b*S + c*S^2) X
    else:
        for c1, c3 in _cans_schedule(steps, cans_lower_bound):
            s = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, s, x, beta=c1, alpha=c3)  # c1*X + c3*(X X^T) X
    return x.mT if transposed else x


@torch.library.custom_op("adv_chain::newton_schulz", mutates_args=())
def _newton_schulz_op(x: torch.Tensor, steps: int, coefficients: list[float], eps: float, method: str,
                      cans_lower_bound: float) -> torch.Tensor:
    """:func:`_newton_schulz_batch` as an opaque operator: under ``torch.compile`` it runs the same
    fused bf16 ``baddbmm`` kernels as eager mode (inductor would split them into a product and an
    add, two roundings, which the iteration amplifies: 3e-4 apart after one step), so compiled and
    eager runs agree."""
    return _newton_schulz_batch(x, steps, tuple(coefficients), eps, method, cans_lower_bound).contiguous()


@_newton_schulz_op.register_fake
def _(x: torch.Tensor, steps: int, coefficients: list[float], eps: float, method: str,
      cans_lower_bound: float) -> torch.Tensor:
    return torch.empty_like(x)


def _coefficients(owner: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{owner}: coefficients={value!r} must be three real numbers (a, b, c) of "
                         "a*X + b*(X X^T) X + c*(X X^T)^2 X")
    return tuple(checks.number(owner, f"coefficients[{i}]", v) for i, v in enumerate(value))  # type: ignore[return-value]


class NewtonSchulz(Transform):
    """Orthogonalize the direction with Newton-Schulz (Muon: Jordan et al. 2024; spec §5.6), on each
    tensor's matrix view ``X`` (``rows x numel/rows``; a 1-D or 0-d tensor is one row), in the wide
    orientation (transposed while ``rows > cols``)::

        X = X / max(||X||_F, eps)                    (eps=None: 1 / sqrt(numel))
        quintic, ``steps`` times:  S = X X^T ;  X = a X + (b S + c S^2) X
        CANS (``method="cans"``):   X = c1 X + c3 (X X^T) X  with c1, c3 from the bounds [l, u],
                                    l0 = cans_lower_bound or max(1/sqrt(mn), |1/sqrt(n) - 1/sqrt(m)|),
                                    u0 = 1; then (l, u) = (1 - e, 1 + e) as the spec gives

    The iteration maps every singular value ``s`` of the normalized ``X`` through the same odd
    polynomial, so ``U S V^T`` becomes ``U p(S) V^T``: with the default quintic coefficients
    ``(3.4445, -4.775, 2.0315)`` and 5 steps, ``p`` sends [0.01, 1] into [0.68, 1.13] and [0.002, 1]
    into [0.68, 1.21] (not exactly 1: the coefficients trade accuracy for speed). Defaults are
    adv_optm's (``ns_steps=5``, ``ns_eps=1e-7``, ``ns_coeffs``, ``accelerated_ns=False``).

    ``dtype="bfloat16"`` (default, as Muon and adv_optm) runs the matrix products in bf16 (the
    direction is rounded to bf16 first and the result is returned as fp32); ``"float32"`` is slower and
    exact to fp32 rounding. Tensors of one matrix shape in a bucket are stacked and run as one batched
    chain (``bmm``/``baddbmm``; bit-identical to one matrix at a time). Per-tensor scope.
    CANS: "Accelerating Newton-Schulz Iteration for Orthogonalization via Chebyshev-type Polynomials".

    ``rank=r`` (default ``None``: full rank): low-rank orthogonalization (arXiv 2509.11983; adv_optm's
    ``low_rank_ortho``/``ortho_rank``): ``Q = qr(G Omega).Q`` with a fresh Gaussian sketch ``Omega``
    (``n x min(r, m, n)``, counter-based noise from ``seed``, the step and the parameter), then
    ``Q NS(Q^T G)`` (:mod:`adv_chain.transforms.low_rank`); batched by shape too.

    Differs from adv_optm: 1-D and 0-d tensors are orthogonalized as ``1 x n`` matrices (giving
    ``u / ||u||``) where adv_optm crashes (B7); the sketch is not drawn from adv_optm's shared generator.

    >>> import torch, adv_chain as ac
    >>> from adv_chain.transforms.muon import orthogonalize
    >>> o, = orthogonalize([torch.randn(8, 32)], dtype=torch.float32)
    >>> s = torch.linalg.svdvals(o)
    >>> bool(s.min() > 0.6 and s.max() < 1.2)
    True
    >>> ac.newton_schulz(steps=6, dtype="float32", rank=64)
    newton_schulz(steps=6, dtype='float32', rank=64)
    """

    type_name = "newton_schulz"
    default_name = "newton_schulz"
    stage = "normalize"
    scope = "tensor"

    def __init__(self, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC, eps: float | None = 1e-7,
                 method: str = "quintic", cans_lower_bound: float | None = None, dtype: str = "bfloat16",
                 rank: int | None = None, seed: int = 0, *, name: str | None = None) -> None:
        owner = self.type_name
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"{owner}: steps={steps!r} must be an int >= 0")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ValueError(f"{owner}: rank={rank!r} must be None (full rank) or a positive int >= 1")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{owner}: seed={seed!r} must be an int >= 0")
        if eps is not None:
            eps = checks.positive(owner, "eps", eps)
        if cans_lower_bound is not None:
            cans_lower_bound = checks.number(owner, "cans_lower_bound", cans_lower_bound, lo=0.0, hi=1.0,
                                             lo_open=True)
        super().__init__(name=name, steps=steps, coefficients=_coefficients(owner, coefficients), eps=eps,
                         method=checks.choice(owner, "method", method, ("quintic", "cans")),
                         cans_lower_bound=cans_lower_bound,
                         dtype=checks.choice(owner, "dtype", dtype, tuple(_DTYPES)), rank=rank, seed=seed)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {} if h.hp["rank"] is None else key_halves(h.hp["seed"], h.step, low_rank.SKETCH_SALT)

    def _orthogonalize(self, mats: list[torch.Tensor],
                       sketches: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        a = self.args
        return orthogonalize(mats, steps=a["steps"], coefficients=a["coefficients"], eps=a["eps"],
                             method=a["method"], cans_lower_bound=a["cans_lower_bound"], dtype=_DTYPES[a["dtype"]],
                             sketches=sketches)

    def update(self, b: Any) -> None:
        mats, rank = [matrix_view(x) for x in b.u], self.args["rank"]
        out = self._orthogonalize(mats, None if rank is None else low_rank.sketches(b, mats, rank))
        b.set_u([o.view(x.shape) for o, x in zip(out, b.u)])


# -- after the orthogonalization -------------------------------------------------------------------


class NorMuon(Transform):
    """NorMuon's row-wise second moment (NorMuon, arXiv 2510.05491; adv_optm's ``normuon_variant``,
    spec §5.7), applied to the orthogonalized direction ``O`` (matrix view, ``rows x cols``)::

        v = beta2 * v + (1 - beta2) * mean_cols(O^2)        (v: one value per row, fp32)
        O = O / (sqrt(v) + eps)                              (each row by its own v)

    No bias correction (as adv_optm and the paper). Follow it with :func:`muon_scale` (the paper's
    ``0.2 * sqrt(rows*cols) / ||O||``). Defaults are Muon_adv's ``beta2_normuon=0.95``,
    ``normuon_eps=1e-8`` (AdaMuon_adv passes its ``betas[1]`` and ``eps``). ``eps=None`` is the
    scale-invariant ``1/sqrt(N)`` of the whole tensor (as :func:`eps_divide`'s; adv_optm's NorMuon
    crashes on ``eps=None``). A 1-D tensor is one row. State ``"normuon/v"`` of shape ``(rows,)``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.muon_momentum(), ac.newton_schulz(), ac.normuon(), ac.muon_scale(), ac.apply()).names
    ('muon_momentum', 'newton_schulz', 'normuon', 'muon_scale', 'apply')
    """

    type_name = "normuon"
    default_name = "normuon"
    stage = "normalize"
    scope = "tensor"
    hparams = {"beta2": HParam(None, checks.unit_interval),
               "eps": HParam(None, _eps_or_none)}

    def __init__(self, beta2: float = 0.95, eps: float | None = 1e-8, *, name: str | None = None) -> None:
        super().__init__(name=name, beta2=beta2, eps=eps)

    def state_specs(self, param: torch.Tensor, hp: Any) -> dict[str, StateSpec]:
        specs = {"v": StateSpec(kind="nonneg", build=lambda p: torch.zeros(
            _rows(p), dtype=torch.float32, device=p.device))}
        return {**specs, **auto_eps_specs(hp["eps"])}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"one_minus_beta2": 1.0 - h.hp["beta2"], **eps_scalars(h.hp["eps"])}

    static_scalars = frozenset({"auto_eps"})

    def update(self, b: Any) -> None:
        v = b.state("v")
        mats = [matrix_view(x) for x in b.u]
        F.lerp_(v, [torch.mean(o.square(), dim=1, dtype=torch.float32) for o in mats], b.s("one_minus_beta2"))
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps_operand(b, len(denom)))
        b.set_u([(o / d.unsqueeze(1)).view(x.shape) for o, d, x in zip(mats, denom, b.u)])


class KappaProjection(Transform):
    """AdaMuon's projection ``P_kappa`` before the orthogonalization (spec §2.8; adv_optm's
    ``kappa_p``/``auto_projection``, after Lion-K, arXiv 2310.05898)::

        kappa = 1:   u = sign(u)                       (AdaMuon's sign, arXiv 2507.11005)
        kappa = 2:   u unchanged                       (Newton-Schulz normalizes anyway)
        otherwise:   u = sign(u) |u|^(kappa-1) / max(||u||_kappa^(kappa-1), 1e-12)     (per tensor)
        "auto":      kappa = 2 for tensors with ndim >= 4 (convolutions), else 1    (the default)

    >>> import adv_chain as ac
    >>> ac.kappa_projection(1.5)
    kappa_projection(kappa=1.5)
    """

    type_name = "kappa_projection"
    default_name = "kappa_projection"
    stage = "normalize"
    scope = "tensor"

    def __init__(self, kappa: float | str = "auto", *, name: str | None = None) -> None:
        if kappa != "auto":
            if isinstance(kappa, str):
                raise ValueError(f"{self.type_name}: kappa={kappa!r} must be 'auto' or a number >= 1")
            kappa = checks.number(self.type_name, "kappa", kappa, lo=1.0)
        super().__init__(name=name, kappa=kappa)

    def update(self, b: Any) -> None:
        out = []
        for x in b.u:
            k = (2.0 if x.dim() >= 4 else 1.0) if self.args["kappa"] == "auto" else self.args["kappa"]
            if k == 1.0:
                out.append(torch.sign(x))
            elif k == 2.0:
                out.append(x)
            else:
                den = torch.linalg.vector_norm(x, ord=k).pow(k - 1.0).clamp_min(1e-12)
                out.append(torch.sign(x) * x.abs().pow(k - 1.0) / den)
        b.set_u(out, owned=b.u_owned or all(o is not x for o, x in zip(out, b.u)))


_SCALE_MODES = ("rms", "aspect")


class MuonScale(Transform):
    """Muon's step scale (spec §5.8), per tensor on the matrix view (``rows x cols``, ``N = numel``)::

        mode="rms" (default):   u = u * rms_target * sqrt(N) / max(||u||_F, 1e-8)
                                (the update's RMS is exactly ``rms_target``, 0.2 = Adam's typical RMS,
                                so Adam's learning rate carries over; adv_optm's ``rms_rescaling=True``)
        mode="aspect":          u = u * sqrt(max(1, rows / cols))     (Keller Jordan's Muon)

    The terminal multiplies by ``lr`` afterwards. A 1-D tensor is one row (``aspect`` scale 1).
    ``aspect`` uses the matrix view also for tensors of 3 or more dims (as Muon_adv; AdaMuon_adv takes
    the last two dims of the raw shape there, e.g. ``kh/kw`` of a conv kernel - an oversight not kept).
    Differs from adv_optm: the scale always reaches the parameter, whatever the dtypes (B1, B6; see
    the module docstring).

    >>> import adv_chain as ac
    >>> ac.muon_scale("aspect")
    muon_scale(mode='aspect')
    """

    type_name = "muon_scale"
    default_name = "muon_scale"
    stage = "scale"
    scope = "tensor"

    def __init__(self, mode: str = "rms", rms_target: float = 0.2, *, name: str | None = None) -> None:
        super().__init__(name=name, mode=checks.choice(self.type_name, "mode", mode, _SCALE_MODES),
                         rms_target=checks.positive(self.type_name, "rms_target", rms_target))

    def update(self, b: Any) -> None:
        u = b.own_u()
        if self.args["mode"] == "aspect":
            factors = []
            for x in u:
                rows = _rows(x)
                cols = x.numel() // rows if rows else 1
                factors.append(math.sqrt(max(1.0, rows / max(cols, 1))))
            torch._foreach_mul_(u, factors)
            return
        norms = torch._foreach_norm(u)
        torch._foreach_clamp_min_(norms, 1e-8)
        torch._foreach_reciprocal_(norms)
        torch._foreach_mul_(norms, [self.args["rms_target"] * math.sqrt(x.numel()) for x in u])
        torch._foreach_mul_(u, norms)


approx_mars = ApproxMars
muon_momentum = MuonMomentum
newton_schulz = NewtonSchulz
normuon = NorMuon
kappa_projection = KappaProjection
muon_scale = MuonScale
