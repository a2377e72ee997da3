"""Scale stage: spectral normalization (adv_optm's ``spectral_normalization=True``, the "scaled
optimizer"; ``adv_optm_spec.md`` §6). adv_optm cites "Scalable Optimization in the Modular Norm"
(Large et al., arXiv 2405.14813) for it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .._core import checks
from .._core import foreach as F
from .._core.transform import HostView, StateSpec, Transform

Tensors = list[torch.Tensor]
#: tags that make a tensor a "vector" for this transform (L-infinity normalized, no state)
_VECTOR_TAGS = frozenset({"dora_scale", "vector"})
_KEEP = 1e-6      # a power-iteration vector is replaced only when the new one's norm reaches this
_NORM_FLOOR = 1e-8
_LINF_FLOOR = 1e-12


def _kind(shape: torch.Size | tuple[int, ...], tags: frozenset[str]) -> str:
    """``"vector"``, ``"oft"`` or ``"matrix"`` for a tensor of ``shape`` with ``tags``."""
    if len(shape) < 2 or tags & _VECTOR_TAGS or "hidden" not in tags:
        return "vector"
    return "oft" if "oft" in tags else "matrix"


def oft_block_size(n_el: int) -> int:
    """The block size ``b`` of an OFT parameter whose last dimension packs ``b(b-1)/2`` entries."""
    b = int((1.0 + math.sqrt(1.0 + 8.0 * n_el)) / 2.0)
    return b


def _unit_rows(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    return (x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-12)).to(device)


def _generator(seed: int, shape: tuple[int, ...], which: int) -> torch.Generator:
    key = seed * 1_000_003 + which
    for s in shape:
        key = (key * 31 + s) & 0x7FFFFFFFFFFF
    return torch.Generator().manual_seed(key)


class SpectralNormalization(Transform):
    """Spectral normalization of the update (adv_optm's ``spectral_normalization``, spec §6; after
    "Scalable Optimization in the Modular Norm", Large et al., arXiv 2405.14813). It replaces the
    scale of the direction ``u`` by a norm-controlled one; the terminal then applies ``p -= lr * u``.
    Per kind of tensor (tags: :mod:`adv_chain._core.tags`):

    * matrices (``Y`` = the ``d_out x d_in`` matrix view of ``u``): ``iterations`` power-iteration
      steps with persistent unit vectors ``a`` (``d_out``) and ``b`` (``d_in``)::

          b' = Y^T a ;  b = b' / max(||b'||, 1e-8)  if ||b'|| >= 1e-6  (else b stays)
          a' = Y b   ;  a = a' / max(||a'||, 1e-8)  if ||a'|| >= 1e-6  (else a stays)
          sigma = max(<a, a'>, 1 / (sqrt(d_out) + sqrt(d_in)))
          u = Y * target / sigma,   target = 1 for ``lora_A``, else sqrt(d_out / d_in)

      so the update's spectral norm is about ``lr * target``;
    * ``oft`` blocks (last dim packs the upper triangles of ``b x b`` blocks, ``b(b-1)/2`` entries):
      ``G = T - T^T`` from the packed ``T``, the same power iteration per block (``a, b`` of shape
      ``(blocks, b)``) and ``u = u * 0.5 * s / max(sigma, 1 / (2 sqrt(b)))`` with ``s`` the
      parameter's ``_oft_scale_factor`` (1 when absent);
    * vectors - fewer than 2 dims, or tagged ``dora_scale``/``vector``, or not ``hidden``:
      ``u = u / max(max|u|, 1e-12)`` (L-infinity: no coordinate moves by more than ``lr``).

    ``step_size``: the name of a published scalar signal that is a step-size factor already inside
    ``u`` (``"wd_scale"`` after :func:`prodigy`: its ``d``): ``u`` is divided by it before and
    multiplied by it after the normalization, so that Prodigy's ``d`` still sets the step (adv_optm:
    ``spectral(u, d * lr)``) and the floors above see the direction at its natural scale.

    State: ``"spectral/spectral_u"`` and ``"spectral/spectral_v"`` (``a`` and ``b``, fp32; adv_optm's
    key names, so its checkpoints convert - with ``strict=False`` when the model has vectors, for which
    adv_optm stores nothing) for matrices and OFT blocks, initialised to random unit
    vectors from ``seed`` and the tensor's shape (a local generator: the global RNG is never touched);
    empty for vectors. Per-tensor scope: each matrix costs two matrix-vector products and one
    in-place scaling (stacking same-shaped matrices for a batched product would copy them, a pass
    more than it saves); OFT blocks run as one batch, vectors as one multi-tensor op.
    Defaults: ``iterations=1`` (adv_optm's).

    Differs from adv_optm (spec §10, B13, and one crash): the bias correction ``1/(1 - b1^t)`` that
    adv_optm's AdamW multiplies into the normalized update (first steps up to ``1/(1-b1)`` = 10x too
    large) is not applied - placed after :func:`scale_by_adam` this transform normalizes ``m/bc1/D``,
    whose ``1/bc1`` cancels; ``iterations > 1`` counters the underestimated ``sigma`` of a single
    power-iteration step from a random start (adv_optm: step 1 up to ~1.3x oversize); a matrix tagged
    ``vector`` or not ``hidden`` is L-infinity normalized (adv_optm creates no power-iteration state
    for it and then fails with a ``KeyError``); the power iteration runs in fp32 for bf16 weights too.

    >>> import torch, adv_chain as ac
    >>> w = torch.nn.Parameter(torch.zeros(16, 64))
    >>> opt = ac.ChainOptimizer([w], ac.chain(ac.scale_by_adam(), ac.eps_divide(),
    ...                                       ac.spectral_normalization(iterations=8), ac.apply()), lr=0.1)
    >>> w.grad = torch.randn(16, 64); opt.step()
    >>> target = 0.1 * (16 / 64) ** 0.5                 # lr * sqrt(d_out / d_in)
    >>> bool(abs(torch.linalg.matrix_norm(w.detach(), 2) / target - 1) < 0.05)
    True
    """

    type_name = "spectral_normalization"
    default_name = "spectral"
    stage = "scale"
    scope = "tensor"
    static_scalars = frozenset({"kind", "lora_A"})

    def __init__(self, iterations: int = 1, seed: int = 0, step_size: str | None = None, *,
                 name: str | None = None) -> None:
        owner = self.type_name
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ValueError(f"{owner}: iterations={iterations!r} must be an int >= 1 (power-iteration steps "
                             "per update)")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{owner}: seed={seed!r} must be an int >= 0")
        if step_size is not None and (not isinstance(step_size, str) or not step_size):
            raise ValueError(f"{owner}: step_size={step_size!r} must be None or the name of a published signal "
                             "(e.g. 'wd_scale' after prodigy)")
        super().__init__(name=name, iterations=iterations, seed=seed, step_size=step_size)

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        step = self.args["step_size"]
        return frozenset({"update"} | ({f"sig:{step}"} if step else set()))

    # -- state -----------------------------------------------------------------------------------
    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        kind = _kind(param.shape, hp.get("tags", frozenset({"hidden"})))
        if kind == "vector":  # no power iteration; empty placeholders (a bucket's tensors share state keys)
            empty = StateSpec(build=lambda p: torch.zeros(0, dtype=torch.float32, device=p.device))
            return {"spectral_u": empty, "spectral_v": empty}
        seed = self.args["seed"]
        if kind == "oft":
            n_el = param.shape[-1]
            b = oft_block_size(n_el)
            if b * (b - 1) // 2 != n_el:
                raise ValueError(f"{self.type_name}: a parameter tagged 'oft' has shape {tuple(param.shape)}; its "
                                 f"last dimension {n_el} must be b*(b-1)/2 (the packed upper triangle of a b x b "
                                 "block)")
            rows_u = rows_v = param.numel() // n_el
            size_u = size_v = b
        else:
            rows_u = rows_v = 1
            size_u, size_v = param.shape[0], param.numel() // param.shape[0]
        shape = tuple(param.shape)

        def build_v(p: torch.Tensor) -> torch.Tensor:
            v = _unit_rows(rows_v, size_v, _generator(seed, shape, 0), p.device)
            return v if kind == "oft" else v[0]

        def build_u(p: torch.Tensor) -> torch.Tensor:
            u = _unit_rows(rows_u, size_u, _generator(seed, shape, 1), p.device)
            return u if kind == "oft" else u[0]

        return {"spectral_u": StateSpec(build=build_u), "spectral_v": StateSpec(build=build_v)}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        # a bucket's parameters share their tags; the kind of each tensor also depends on its shape
        tags = h.hp.get("tags", frozenset({"hidden"}))
        return {"kind": tags, "lora_A": "lora_A" in tags}

    # -- the update ------------------------------------------------------------------------------
    def update(self, b: Any) -> None:
        tags = b.s("kind")
        step_name = self.args["step_size"]
        step = b.signals[step_name] if step_name else None
        if step is not None:  # divide the step size out (a zero step size: the update stays zero)
            step = step if F.is_tensor(step) else torch.tensor(float(step), device=b.u[0].device)
            b.set_u(torch._foreach_div(b.u, torch.where(step != 0, step, torch.ones_like(step))))
        u = b.own_u()
        # one factor per tensor, applied in place at the end (OFT blocks: a factor per block, applied here)
        factors: list[Any] = [None] * len(u)
        vectors, oft = [], []
        for i, x in enumerate(u):
            kind = _kind(x.shape, tags)
            if kind == "vector":
                vectors.append(i)
            elif kind == "oft":
                oft.append(i)
            else:
                factors[i] = self._matrix_factor(x, b.state("spectral_u")[i], b.state("spectral_v")[i],
                                                 b.s("lora_A"))
        if vectors:
            peak = torch._foreach_norm([u[i] for i in vectors], math.inf)
            torch._foreach_clamp_min_(peak, _LINF_FLOOR)
            for i, m in zip(vectors, torch._foreach_reciprocal(peak)):
                factors[i] = m
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in oft:  # same-shaped OFT parameters: one batch of blocks
            groups.setdefault(tuple(u[i].shape), []).append(i)
        for idx in groups.values():
            scales = [0.5 * float(getattr(b.params[i], "_oft_scale_factor", 1.0)) for i in idx]
            res = self._oft([u[i] for i in idx], [b.state("spectral_u")[i] for i in idx],
                            [b.state("spectral_v")[i] for i in idx], scales)
            for i, y in zip(idx, res):
                u[i].copy_(y)
        keep = [i for i, f in enumerate(factors) if f is not None]
        if step is not None:
            factors = [step if f is None else f * step for f in factors]
            keep = list(range(len(u)))
        if keep:
            torch._foreach_mul_([u[i] for i in keep], [factors[i] for i in keep])

    def _matrix_factor(self, x: torch.Tensor, a: torch.Tensor, v: torch.Tensor, lora_a: bool) -> torch.Tensor:
        """``target / sigma`` of one matrix (a 0-d tensor); updates its vectors ``a`` and ``v`` in place."""
        d_out = x.shape[0]
        d_in = x.numel() // d_out
        y = x.reshape(d_out, d_in)
        a_new, v_new = a, v
        for _ in range(self.args["iterations"]):
            v_raw = torch.mv(y.T, a_new)
            norm = torch.linalg.vector_norm(v_raw)
            v_new = torch.where(norm >= _KEEP, v_raw / norm.clamp_min(_NORM_FLOOR), v_new)
            a_raw = torch.mv(y, v_new)
            norm = torch.linalg.vector_norm(a_raw)
            a_new = torch.where(norm >= _KEEP, a_raw / norm.clamp_min(_NORM_FLOOR), a_new)
        sigma = torch.dot(a_new, a_raw)
        a.copy_(a_new)
        v.copy_(v_new)
        target = 1.0 if lora_a else math.sqrt(d_out / d_in)
        return target / sigma.clamp_min(1.0 / (math.sqrt(d_out) + math.sqrt(d_in)))

    def _power(self, y: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``iterations`` power-iteration steps on a batch ``y`` (B, m, n) from unit vectors ``a``
        (B, m, 1) and ``v`` (B, n, 1): the new ``a``, ``v`` and ``sigma`` (B, 1, 1)."""
        for _ in range(self.args["iterations"]):
            v_raw = torch.bmm(y.mT, a)
            norm = torch.linalg.vector_norm(v_raw, dim=1, keepdim=True)
            v = torch.where(norm >= _KEEP, v_raw / norm.clamp_min(_NORM_FLOOR), v)
            a_raw = torch.bmm(y, v)
            norm = torch.linalg.vector_norm(a_raw, dim=1, keepdim=True)
            a = torch.where(norm >= _KEEP, a_raw / norm.clamp_min(_NORM_FLOOR), a)
        sigma = (a * a_raw).sum(dim=1, keepdim=True)
        return a, v, sigma

    def _oft(self, xs: Tensors, a_st: Tensors, v_st: Tensors, scales: list[float]) -> Tensors:
        n_el = xs[0].shape[-1]
        size = oft_block_size(n_el)
        blocks = xs[0].numel() // n_el
        packed = torch.stack([x.reshape(blocks, n_el).float() for x in xs]).reshape(-1, n_el)
        rows, cols = torch.triu_indices(size, size, 1, device=packed.device)
        g = packed.new_zeros(packed.shape[0], size, size)
        g[:, rows, cols] = packed
        g = g - g.mT
        a = torch.stack(a_st).reshape(-1, size, 1)
        v = torch.stack(v_st).reshape(-1, size, 1)
        a, v, sigma = self._power(g, a, v)
        torch._foreach_copy_(a_st, list(a.reshape(len(xs), blocks, size).unbind(0)))
        torch._foreach_copy_(v_st, list(v.reshape(len(xs), blocks, size).unbind(0)))
        sigma = sigma.reshape(len(xs), blocks, 1).clamp_min(1.0 / (2.0 * math.sqrt(size)))
        factor = torch.tensor(scales, dtype=torch.float32, device=packed.device).view(-1, 1, 1)
        out = packed.reshape(len(xs), blocks, n_el) * (factor / sigma)
        return [r.view(x.shape) for r, x in zip(out.unbind(0), xs)]


spectral_normalization = SpectralNormalization
