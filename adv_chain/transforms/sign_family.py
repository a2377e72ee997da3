"""The sign family: sign-like directions and the momentum they follow (Lion-K, stochastic sign,
Signum's EMA momentum with SNR recovery and conditioning, Sinkhorn normalization), Lion's legacy
per-tensor gradient clip, and two never-released ideas (:func:`freeze_on_flip`, :func:`l1_adaptive`).

Formulas: ``adv_optm_spec.md`` §2.4-§2.6, §5.2-§5.5, §9.5, §9.7. "Vector": fewer than 2 dims or a
``vector``/``dora_scale`` tag (:mod:`adv_chain._core.tags`); "matrix view": ``(shape[0], -1)``.
Stochastic sign noise is counter-based like stochastic rounding's (a hash of seed, step, parameter,
element). Geometric weight decay (§7.5) is in :mod:`adv_chain.transforms.geometric`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.numerics import noise_key, random_bits
from .._core.transform import HParam, HostView, StateSpec, Transform
from .gradient import ClipByGlobalNorm

Tensors = list[torch.Tensor]
_VECTOR_TAGS = frozenset({"vector", "dora_scale"})
A = 4.0 / math.pi  # adv_optm's atan/atan2 output scale


# -- shared helpers ------------------------------------------------------------------------------------
def is_vector(x: torch.Tensor, tagged: bool) -> bool:
    """adv_optm's vector rule: fewer than 2 dims, or a ``vector``/``dora_scale`` tag."""
    return tagged or x.dim() < 2


def vector_tagged(h: HostView) -> bool:
    return bool(h.hp.get("tags", frozenset()) & _VECTOR_TAGS)


def matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def key_halves(seed: int, step: int, salt: int) -> dict[str, float]:
    """A (seed, step, salt) noise key as two exact 16-bit halves: host scalars become fp32 0-d
    tensors under ``compile=True``, where a 31-bit integer would lose bits."""
    k = noise_key(seed, step, salt)
    return {"key_hi": float(k >> 16), "key_lo": float(k & 0xFFFF)}


def tensor_keys(b: Any) -> list[Any]:
    """One noise key per tensor of the bucket: this transform's (seed, step) key mixed with the
    terminal's (seed, step, parameter) key when the executor provides one, else with the tensor's
    position in the bucket."""
    hi, lo = b.s("key_hi"), b.s("key_lo")
    key = (hi.to(torch.int32) * 65536 + lo.to(torch.int32)) if F.is_tensor(hi) else (int(hi) << 16) | int(lo)
    if b.noise_keys is not None:
        return [key ^ k for k in b.noise_keys]
    return [key ^ ((i * 0x9E3779B1 + 0x7F4A7C15) & 0x7FFFFFFF) for i in range(len(b.params))]


def uniform_pm1(like: torch.Tensor, key: Any) -> torch.Tensor:
    """Uniform noise in [-1, 1) shaped like ``like`` (24 random bits per element)."""
    bits = random_bits(like, 0, key)
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32) * (2.0 / (1 << 24)) - 1.0


def stochastic_sign_of(x: torch.Tensor, key: Any, vector: bool) -> torch.Tensor:
    """Spec §5.3 on a fresh fp32 tensor: ``sign(x)`` for a vector, else on the matrix view
    ``x /= max(row max|x|, 1e-12)``, ``x /= max(col max|x|, 1e-12)``, ``sign(x + U[-1, 1))``."""
    if vector:
        return torch.sign(x.float())
    y = matrix(x).float()
    y = y / y.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    y = y / y.abs().amax(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.sign(y + uniform_pm1(y, key)).view(x.shape)


def snr_denominator(prev: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(1 - m^2, 1e-30))`` of the previous sign momentum (spec §5.4)."""
    return (1.0 - prev.square()).clamp_min(1e-30).sqrt()


def snr_row_col(prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column variances ``max(1 - mean b^2, 1e-30)`` of the matrix view (SinkSGD, §2.6)."""
    sq = matrix(prev).square()
    return (1 - sq.mean(dim=-1)).clamp_min(1e-30), (1 - sq.mean(dim=-2)).clamp_min(1e-30)


# -- gradient stage ----------------------------------------------------------------------------------
class ClipByTensorNorm(ClipByGlobalNorm):
    """Per-tensor gradient norm clip, ``g <- g * min(1, max_norm / ||g||)`` (adv_optm 2.2.3's Lion
    ``clip_threshold``, spec §9.5; ``p.grad`` is not written, unlike the reference). A per-tensor
    reduction (layer scope, each tensor its own layer): exact under gradient release too.

    >>> import adv_chain as ac
    >>> ac.chain(ac.clip_by_tensor_norm(1.0), ac.scale_by_lion(), ac.apply()).names
    ('clip_by_tensor_norm', 'lion', 'apply')
    """

    type_name = "clip_by_tensor_norm"
    default_name = "clip_by_tensor_norm"
    scope = "layer"  # each tensor its own layer; reduce and update are the global clip's

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        return {"coef": [(hp["max_norm"] / v.sqrt()).clamp(max=1.0) for v in values]}


# -- moment ------------------------------------------------------------------------------------------
class SignMomentum(Transform):
    """The EMA momentum of adv_optm's SignSGD_adv / SinkSGD_adv (spec §2.5, §2.6, §4.1, §4.2)::

        m = beta*m + (1-beta)*x                  (m starts at 0; x: the incoming direction)
        u = m                                    nesterov=False
        u = (1-c)*x + c*m                        nesterov=True   (c = nesterov_coef, default beta)
        u = (1-c)*(|m_prev| * x) + c*m           nesterov=True, snr_recovery=True

    ``snr_recovery`` is the form for normalization-then-momentum (``x`` a normalized gradient:
    ``|m_prev|`` restores the magnitude the normalization removed). ``publish_prev=True`` publishes
    ``m_prev`` as the ``prev_momentum`` signal (for :func:`snr_condition`, :func:`geometric_wd`).
    ``beta = 0`` keeps no state and passes ``x`` through. Fed by ``group["momentum"]``. Unlike
    :func:`momentum` (torch's SGD) the first step is ``(1-beta)*x``, not ``x``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign_momentum(0.9), ac.sign(), ac.apply()).names
    ('sign_momentum', 'sign', 'apply')
    """

    type_name = "sign_momentum"
    default_name = "sign_momentum"
    stage = "moment"
    hparams = {"beta": HParam("momentum", checks.unit_interval)}
    static_scalars = frozenset({"active", "nesterov", "recovery", "publish"})

    def __init__(self, beta: float = 0.9, nesterov: bool = False, nesterov_coef: float | None = None,
                 snr_recovery: bool = False, publish_prev: bool = False, *, name: str | None = None) -> None:
        if nesterov_coef is not None:
            nesterov_coef = checks.closed_unit(self.type_name, "nesterov_coef", nesterov_coef)
        super().__init__(name=name, beta=beta, nesterov=checks.flag(self.type_name, "nesterov", nesterov),
                         nesterov_coef=nesterov_coef,
                         snr_recovery=checks.flag(self.type_name, "snr_recovery", snr_recovery),
                         publish_prev=checks.flag(self.type_name, "publish_prev", publish_prev))
        self.check_hparams(self.type_name, self.args)

    def check_hparams(self, owner: str, hp: Any) -> None:
        if hp["publish_prev"] and hp["beta"] == 0:
            raise ValueError(f"{owner}: momentum={hp['beta']!r} keeps no momentum, but publish_prev=True (SNR "
                             "conditioning) needs one; use momentum in (0, 1)")

    @property
    def writes(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"update", "sig:prev_momentum"}) if self.args["publish_prev"] else frozenset({"update"})

    @property
    def optional_signals(self) -> frozenset[str]:  # type: ignore[override]
        # read by snr_condition and/or geometric_wd; neither has to be there
        return frozenset({"sig:prev_momentum"}) if self.args["publish_prev"] else frozenset()

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(kind="signed", factorable=True)} if hp["beta"] != 0 else {}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        beta = h.hp["beta"]
        c = beta if h.hp["nesterov_coef"] is None else h.hp["nesterov_coef"]
        return {"active": beta != 0, "nesterov": h.hp["nesterov"], "recovery": h.hp["snr_recovery"],
                "publish": h.hp["publish_prev"], "one_minus_beta": 1.0 - beta, "c": c}

    def update(self, b: Any) -> None:
        if not b.s("active"):
            return
        x = b.u
        m = b.state("exp_avg")
        if b.s("publish"):
            b.signals["prev_momentum"] = [t.clone() for t in m]
        nesterov = b.s("nesterov")
        if nesterov:
            base = torch._foreach_mul(torch._foreach_abs(m), x) if b.s("recovery") else [t.clone() for t in x]
        F.lerp_(m, x, b.s("one_minus_beta"))
        if nesterov:
            F.lerp_(base, m, b.s("c"))
            b.set_u(base)
        else:
            b.set_u(m, owned=False)


# -- directions ----------------------------------------------------------------------------------------
def _kappa(owner: str, arg: str, value: Any) -> float:
    return checks.number(owner, arg, value, lo=1.0)


class LionK(Transform):
    """Lion-K projection (Chen et al., "Lion Secretly Solves Constrained Optimization, As Lyapunov
    Predicts", arXiv 2310.05898; adv_optm's ``kappa_p``/``auto_kappa_p``, spec §5.2), per tensor of
    ``N`` elements::

        kappa = 1:  u = sign(x)
        kappa = 2:  u = x * sqrt(N) / max(||x||, 1e-12)                  ("spherical")
        otherwise:  y = sign(x) * |x|^(kappa-1),  u = y * sqrt(N) / max(||y||, 1e-12)

    The ``sqrt(N)`` scale (adv_optm's) gives every kappa the L2 norm of a sign vector, so one lr fits
    all. ``auto=True`` picks ``kappa = 2`` for tensors with 4 or more dims (convolutions), else 1
    (it overrides ``kappa_p``). ``kappa_p >= 1``. Anything but plain sign needs whole tensors
    (``"tensor"`` scope). Place it after :func:`scale_by_lion` with ``sign=False``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_lion(sign=False), ac.lion_k(kappa_p=2.0), ac.apply()).names
    ('lion', 'lion_k', 'apply')
    """

    type_name = "lion_k"
    default_name = "lion_k"
    stage = "normalize"

    def __init__(self, kappa_p: float = 1.0, auto: bool = False, *, name: str | None = None) -> None:
        super().__init__(name=name, kappa_p=_kappa(self.type_name, "kappa_p", kappa_p),
                         auto=checks.flag(self.type_name, "auto", auto))

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "elementwise" if self.args["kappa_p"] == 1.0 and not self.args["auto"] else "tensor"

    def update(self, b: Any) -> None:
        u = b.own_u()
        if self.scope == "elementwise":
            torch._foreach_sign_(u)
            return
        for x in u:  # per-tensor norms (whole tensors)
            kappa = (2.0 if x.dim() >= 4 else 1.0) if self.args["auto"] else self.args["kappa_p"]
            if kappa == 1.0:
                x.sign_()
                continue
            if kappa != 2.0:
                x.copy_(torch.sign(x) * x.abs().pow(kappa - 1.0))
            x.div_(torch.linalg.vector_norm(x).clamp_min(1e-12)).mul_(math.sqrt(x.numel()))


class StochasticSign(Transform):
    """Stochastic sign (adv_optm's ``stochastic_sign``, spec §5.3): an unbiased sign of the direction
    scaled into ``[-1, 1]``. On the matrix view ``X`` of each tensor::

        X <- X / max(max_j |X_ij|, 1e-12)         (every row's max becomes 1)
        X <- X / max(max_i |X_ij|, 1e-12)         (then every column's)
        u = sign(X + xi),   xi ~ U[-1, 1)         so E[u] = X

    Vectors get the plain sign. adv_optm normalizes along the raw dims 1 and 0 of a >= 3-D tensor
    (its B16); this uses the matrix view. The noise is counter-based (``seed``, step, parameter,
    element), not the reference's generator stream: runs agree with adv_optm in distribution only.
    Needs whole tensors.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign_momentum(0.9), ac.stochastic_sign(seed=1), ac.apply()).names
    ('sign_momentum', 'stochastic_sign', 'apply')
    """

    type_name = "stochastic_sign"
    default_name = "stochastic_sign"
    stage = "normalize"
    scope = "tensor"
    static_scalars = frozenset({"vector_tagged"})

    def __init__(self, seed: int = 0, *, name: str | None = None) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{self.type_name}: seed={seed!r} must be an int >= 0")
        super().__init__(name=name, seed=seed)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"vector_tagged": vector_tagged(h), **key_halves(h.hp["seed"], h.step, 0x5157)}

    def update(self, b: Any) -> None:
        tagged = b.s("vector_tagged")
        b.set_u([stochastic_sign_of(x, k, is_vector(x, tagged)) for x, k in zip(b.u, tensor_keys(b))])


class SnrCondition(Transform):
    """SNR conditioning (adv_optm's ``snr_cond``, spec §5.4): for a momentum ``m`` of ±1 values,
    ``1 - m^2`` is their variance; the direction is divided by that noise level through a bounded
    atan (``m``: the ``prev_momentum`` a :func:`sign_momentum` published)::

        mode="elementwise" (SignSGD):  u = (4/pi) * atan2(u, sqrt(max(1 - m^2, 1e-30)))
        mode="sinkhorn" (SinkSGD), matrices:
            r_i = max(1 - mean_j m_ij^2, 1e-30),  c_j = max(1 - mean_i m_ij^2, 1e-30)
            u = (4/pi) * atan(u / sqrt(r_i) / sqrt(c_j))
        mode="sinkhorn", vectors: as "elementwise"

    (adv_optm puts 4/pi in the lr.) Place it after ``sign_momentum(publish_prev=True)``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign(), ac.sign_momentum(0.9, publish_prev=True), ac.snr_condition(), ac.apply()).names
    ('sign', 'sign_momentum', 'snr_condition', 'apply')
    """

    type_name = "snr_condition"
    default_name = "snr_condition"
    stage = "normalize"
    reads = frozenset({"update", "sig:prev_momentum"})
    static_scalars = frozenset({"vector_tagged"})

    def __init__(self, mode: str = "elementwise", *, name: str | None = None) -> None:
        super().__init__(name=name, mode=checks.choice(self.type_name, "mode", mode, ("elementwise", "sinkhorn")))

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "tensor" if self.args["mode"] == "sinkhorn" else "elementwise"

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"vector_tagged": vector_tagged(h)}

    def update(self, b: Any) -> None:
        prev = b.signals["prev_momentum"]  # read, not consumed: geometric_wd may use it too
        tagged = b.s("vector_tagged")
        out = []
        for x, m in zip(b.u, prev):
            if self.args["mode"] == "elementwise" or is_vector(x, tagged):
                out.append(torch.atan2(x, snr_denominator(m)))
            else:
                r, c = snr_row_col(m)
                y = matrix(x) * r.rsqrt().unsqueeze(1)
                out.append((y * c.rsqrt().unsqueeze(0)).atan_().view(x.shape))
        torch._foreach_mul_(out, A)
        b.set_u(out)


def _sinkhorn_batch(x: torch.Tensor, iters: int, p: torch.Tensor | None) -> torch.Tensor:
    """SR-Sinkhorn on a batch of matrices ``(B, m, n)`` (modified in place; fp32); ``p`` (same
    shape) for the orthogonal variant."""
    m, n = x.shape[1], x.shape[2]
    first = 1 if m > n else 2  # per-column norms first for tall matrices
    dims = (first, 3 - first)
    scale = [math.sqrt(x.shape[d]) for d in dims]
    floor = [1.0 / math.sqrt(x.shape[d]) for d in dims]
    power = None if p is None else [(p * p).sum(d, keepdim=True) + 1e-30 for d in dims]
    for _ in range(iters):
        for k, d in enumerate(dims):
            x.mul_(scale[k] / torch.linalg.vector_norm(x, dim=d, keepdim=True).clamp_min(floor[k]))
            if p is not None:
                x.addcmul_((p * x).sum(d, keepdim=True) / power[k], p, value=-1.0)
                x.mul_(scale[k] / torch.linalg.vector_norm(x, dim=d, keepdim=True).clamp_min(floor[k]))
    return x


class Sinkhorn(Transform):
    """SR-Sinkhorn normalization (Gradient Multi-Normalization, arXiv 2502.06742, as adv_optm's
    SinkSGD_adv, spec §5.5). On the matrix view ``X`` (``m x n``) of each tensor, alternately every
    column and every row is scaled to RMS 1 (columns first if ``m > n``, else rows)::

        repeat iterations:  for d in (d1, d2):
            X <- X * sqrt(size_d) / max(||X||_d, 1/sqrt(size_d))      (norms along dimension d)
            orthogonal=True: X <- X - (sum_d(P*X) / (sum_d P^2 + 1e-30)) * P, then rescale again

    with ``P`` the parameter's matrix view. After the last half-step every slice along ``d2`` has
    RMS exactly 1. Vectors get ``sign`` (SinkSGD's rule). Same-shaped matrices are stacked and
    normalized as one batch. Needs whole tensors (``"tensor"`` scope).

    >>> import adv_chain as ac
    >>> ac.chain(ac.sinkhorn(iterations=5), ac.apply()).names
    ('sinkhorn', 'apply')
    """

    type_name = "sinkhorn"
    default_name = "sinkhorn"
    stage = "normalize"
    scope = "tensor"
    static_scalars = frozenset({"vector_tagged"})

    def __init__(self, iterations: int = 5, orthogonal: bool = False, *, name: str | None = None) -> None:
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ValueError(f"{self.type_name}: iterations={iterations!r} must be an int >= 0 (sweeps of "
                             "column and row normalization)")
        super().__init__(name=name, iterations=iterations,
                         orthogonal=checks.flag(self.type_name, "orthogonal", orthogonal))

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"update", "param"}) if self.args["orthogonal"] else frozenset({"update"})

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"vector_tagged": vector_tagged(h)}

    def update(self, b: Any) -> None:
        tagged = b.s("vector_tagged")
        out: list[Any] = [None] * len(b.u)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(b.u):
            if is_vector(x, tagged):
                out[i] = torch.sign(x)
            else:
                groups.setdefault((x.shape[0], x.numel() // x.shape[0]), []).append(i)
        for view, idx in groups.items():
            x = torch.stack([b.u[i].reshape(view).float() for i in idx])  # a copy: the input stays intact
            p = torch.stack([b.params[i].detach().reshape(view).float() for i in idx]) \
                if self.args["orthogonal"] else None
            y = _sinkhorn_batch(x, self.args["iterations"], p)
            for k, i in enumerate(idx):
                out[i] = y[k].view(b.u[i].shape)
        b.set_u(out)


# -- never released ideas (spec §9.7) --------------------------------------------------------------------
class FreezeOnFlip(Transform):
    """Freeze-on-Flip (spec §9.7; **no released reference exists**: it is only in an unreleased
    development snapshot of adv_optm's SignSGD_adv): zero a coordinate's update for the step in
    which its direction's sign flips, ``u <- u * 1[(u_t > 0) == (u_(t-1) > 0)]``. State
    ``prev_positive`` (uint8) starts from the first step's direction (nothing frozen then). Place it
    after the momentum, before or after a sign. The test checks a hand-computed 4-step sequence.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign_momentum(0.9), ac.sign(), ac.freeze_on_flip(), ac.apply()).names
    ('sign_momentum', 'sign', 'freeze_on_flip', 'apply')
    """

    type_name = "freeze_on_flip"
    default_name = "freeze_on_flip"
    stage = "mask"
    static_scalars = frozenset({"first"})

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        return {"prev_positive": StateSpec(dtype=torch.uint8)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {"first": h.step == 1}

    def update(self, b: Any) -> None:
        prev = b.state("prev_positive")
        positive = torch._foreach_sign(b.u)
        torch._foreach_clamp_min_(positive, 0.0)  # 1 where u > 0, else 0
        if not b.s("first"):
            keep = torch._foreach_sub(positive, [x.float() for x in prev])
            torch._foreach_abs_(keep)
            torch._foreach_neg_(keep)
            torch._foreach_add_(keep, 1.0)  # 1 where the positivity is unchanged, 0 where it flipped
            torch._foreach_mul_(b.own_u(), keep)
        torch._foreach_copy_(prev, positive)


class L1Adaptive(Transform):
    """``l1_adaptive``, "projected adaptivity" (spec §9.7; **no released reference exists**: it is
    only in an unreleased development snapshot of adv_optm's SignSGD_adv): the sign update times a
    low-rank magnitude map of the direction ``x`` it replaces::

        a = |x| * k,   k = 1 / ((1 - beta^t) / (1 - beta) + alpha_grad)     (k = 1/(1+alpha_grad) if beta = 0)
        matrices:  u_ij = sign(x_ij) * rowmean(a)_i * colmean(a)_j     (outer product, as the spec states)
        vectors:   u = sign(x) * mean(a)
        lora_A / oft tags: u_ij = sign(x_ij) * rowmean(a)_i ;  lora_B: u_ij = sign(x_ij) * colmean(a)_j

    ``k`` turns the snapshot's accumulator ``m = beta*m + g`` into a mean; after an EMA momentum
    (:func:`sign_momentum`) use ``beta=0, alpha_grad=0`` (``k = 1``). For matrices the map has the
    square of the direction's units (the spec's literal outer product). Needs whole tensors. The
    test checks each case on hand-computed 2x3 and vector inputs.

    >>> import adv_chain as ac
    >>> ac.chain(ac.sign_momentum(0.9), ac.l1_adaptive(beta=0.0, alpha_grad=0.0), ac.apply()).names
    ('sign_momentum', 'l1_adaptive', 'apply')
    """

    type_name = "l1_adaptive"
    default_name = "l1_adaptive"
    stage = "normalize"
    scope = "tensor"
    static_scalars = frozenset({"kind"})

    def __init__(self, beta: float = 0.9, alpha_grad: float = 1.0, *, name: str | None = None) -> None:
        super().__init__(name=name, beta=checks.unit_interval(self.type_name, "beta", beta),
                         alpha_grad=checks.nonneg(self.type_name, "alpha_grad", alpha_grad))

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        beta, tags = h.hp["beta"], h.hp.get("tags", frozenset())
        total = (1.0 - beta ** h.step) / (1.0 - beta) + h.hp["alpha_grad"]
        kind = ("vector" if tags & _VECTOR_TAGS else "rows" if tags & {"lora_A", "oft"}
                else "cols" if "lora_B" in tags else "matrix")
        return {"k": 1.0 / total, "kind": kind}

    def update(self, b: Any) -> None:
        kind = b.s("kind")
        out = []
        for x in b.u:
            a = x.abs() * b.s("k")
            if kind == "vector" or x.dim() < 2:
                mag = a.mean()
            else:
                am = matrix(a)
                rows, cols = am.mean(dim=1, keepdim=True), am.mean(dim=0, keepdim=True)
                mag = (rows if kind == "rows" else cols if kind == "cols" else rows * cols).expand_as(am)
                mag = mag.reshape(x.shape)
            out.append(torch.sign(x) * mag)
        b.set_u(out)


clip_by_tensor_norm = ClipByTensorNorm
sign_momentum = SignMomentum
lion_k = LionK
stochastic_sign = StochasticSign
snr_condition = SnrCondition
sinkhorn = Sinkhorn
freeze_on_flip = FreezeOnFlip
l1_adaptive = L1Adaptive
