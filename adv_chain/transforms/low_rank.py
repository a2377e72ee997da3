"""Low-rank orthogonalization for :func:`~adv_chain.transforms.newton_schulz` (``rank=r``; adv_optm's
``low_rank_ortho=True, ortho_rank=r``, spec §5.6) after "Low-rank Orthogonalization for Large-scale
Matrix Optimization with Applications to Foundation Model Training" (arXiv 2509.11983).

For a matrix ``G`` (``m x n``, the direction's matrix view) and ``r = min(rank, m, n)``::

    Omega ~ N(0, 1)^(n x r)            a Gaussian sketch, new every step
    Q = qr(G Omega).Q                  (m x r) orthonormal basis of the sketched range, fp32
    O = NS(Q^T G)                      Newton-Schulz on the small (r x n) projection
    result = Q O                       rank <= r

The Newton-Schulz floor ``eps=None`` (``1/sqrt(mn)``) and CANS's default lower bound are those of the
whole ``G``, as adv_optm computes them. With ``r = min(m, n)`` the result equals full-rank Newton-Schulz
up to rounding (``Q`` then spans ``G``'s range, and the iteration commutes with it); below that, only
the part of ``G`` the sketch captures is orthogonalized (the paper's cost saving: products with the
``r x n`` projection instead of ``m x n``).

The sketch is counter-based noise, like stochastic rounding's (:mod:`adv_chain._core.numerics`): a
pure function of (``seed``, step, parameter index, element index), Box-Muller on two 24-bit uniforms.
It draws from no ``torch.Generator``, so it never touches the global RNG, stores nothing in a
checkpoint, and a resumed run draws the same sketches as an uninterrupted one. adv_optm draws ``Omega``
from its shared generator (seeded 42, also used for stochastic rounding and spectral vectors) in the
order parameters are stepped: the two libraries agree in distribution, not draw for draw (the tests
inject the reference's stream through :func:`gaussian_sketch` to compare the math exactly).

>>> import torch
>>> from adv_chain.transforms.muon import orthogonalize
>>> g = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
>>> low, = orthogonalize([g], sketches=[gaussian_sketch(24, 4, key=7, device=g.device)], dtype=torch.float32)
>>> int(torch.linalg.matrix_rank(low))
4
>>> full, = orthogonalize([g], dtype=torch.float32)
>>> same, = orthogonalize([g], sketches=[gaussian_sketch(24, 16, key=7, device=g.device)], dtype=torch.float32)
>>> bool((same - full).abs().max() < 1e-4)
True
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .._core.numerics import random_bits
from .sign_family import tensor_keys

#: the salt of the sketch's per-step noise key (distinct from every other noise user's)
SKETCH_SALT = 0x10F7
_U24 = 1.0 / (1 << 24)


def gaussian_sketch(rows: int, cols: int, key: Any, device: torch.device) -> torch.Tensor:
    """A ``(rows, cols)`` fp32 standard-normal matrix as a pure function of ``key`` (an int or a 0-d
    int32 tensor): Box-Muller, ``sqrt(-2 ln u1) cos(2 pi u2)``, on two counter-based uniforms per
    element (``u1`` in ``(0, 1]``, ``u2`` in ``[0, 1)``, 24 bits each; tails beyond 5.8 sigma cut)."""
    like = torch.empty((rows, cols), dtype=torch.int32, device=device)
    u1 = (((random_bits(like, 0, key) >> 8) & 0xFFFFFF).to(torch.float32) + 1.0) * _U24
    u2 = ((random_bits(like, rows * cols, key) >> 8) & 0xFFFFFF).to(torch.float32) * _U24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def sketches(b: Any, mats: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """One sketch ``(n, min(rank, m, n))`` per ``m x n`` matrix of bucket ``b``, keyed by the calling
    transform's ``key_hi``/``key_lo`` host scalars (seed and step) and the parameter."""
    return [gaussian_sketch(m.shape[1], min(rank, m.shape[0], m.shape[1]), key, m.device)
            for m, key in zip(mats, tensor_keys(b))]


def project_orthogonalize(x: torch.Tensor, omega: torch.Tensor,
                          ns: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``Q ns(Q^T X)`` with ``Q = qr(X Omega).Q`` for a batch ``x`` (B, m, n) and sketches ``omega``
    (B, n, r), in fp32 (or wider, for a wider input); ``ns`` orthogonalizes a batch (B, r, n)."""
    work = torch.promote_types(x.dtype, torch.float32)
    x = x.to(work)
    q = torch.linalg.qr(torch.bmm(x, omega.to(work))).Q
    return torch.bmm(q, ns(torch.bmm(q.mT, x)).to(work))
