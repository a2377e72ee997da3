"""Decay terms: they do not touch the update; the terminal applies them to the parameters in fp32.

Every decay transform multiplies its term by the per-element ``wd_scale`` signal when an earlier
:func:`fisher_wd` published one, and by the ``lr_scale`` signal (a step-size factor such as
Simplified AdEMAMix's) when one was published.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .._core import checks
from .._core import foreach as F
from .._core.tags import ADAPTER_TAGS
from .._core.transform import HParam, HostView, StateSpec, Transform
from .normalize import _eps_or_none, auto_eps_specs, eps_operand, eps_scalars

Tensors = list[torch.Tensor]


def _fp32(xs: Tensors) -> Tensors:
    return xs if xs[0].dtype == torch.float32 else [x.float() for x in xs]


def _agree_mask(u: Tensors, x: Tensors) -> Tensors:
    """``1[u * x >= 0]`` as fp32 (zeros pass), without a comparison per tensor."""
    mask = torch._foreach_sign(torch._foreach_mul(u, x))
    torch._foreach_add_(mask, 1.0)
    torch._foreach_clamp_max_(mask, 1.0)
    return mask


class WeightDecay(Transform):
    """Decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101): the terminal computes
    ``p * (1 - c) - lr * u`` with ``c = lr * weight_decay`` (torch's AdamW), or, given ``max_lr``,
    ``c = weight_decay * lr / max_lr`` (fully decoupled, as optimi's ``decouple_lr`` and
    lion-pytorch's ``decoupled_weight_decay``: the strength no longer depends on the size of ``lr``,
    only on the schedule's shape). Fed by ``group["weight_decay"]``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.01), ac.apply()).names
    ('adam', 'eps_divide', 'weight_decay', 'apply')
    """

    type_name = "weight_decay"
    default_name = "weight_decay"
    stage = "decay"
    reads = frozenset({"param"})
    writes = frozenset({"decay"})
    consumes = frozenset({"sig:wd_scale"})  # fisher_wd's per-element multiplier, when present
    hparams = {"weight_decay": HParam("weight_decay", checks.nonneg)}

    def __init__(self, weight_decay: float = 0.01, max_lr: float | None = None, *, name: str | None = None) -> None:
        if max_lr is not None:
            max_lr = checks.positive(self.type_name, "max_lr", max_lr)
        super().__init__(name=name, weight_decay=weight_decay, max_lr=max_lr)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        wd = h.hp["weight_decay"]
        max_lr = h.hp["max_lr"]
        return {"coef": wd * h.lr if max_lr is None else wd * h.lr / max_lr}

    def update(self, b: Any) -> None:
        coef = self._coef(b)
        if F.is_zero(coef):
            return
        scale = b.signals.get("wd_scale")
        if scale is None:
            b.add_decay_coef(coef)
            return
        if isinstance(scale, (list, tuple)):  # per element (Fisher) or per tensor: coef * s * p
            term = torch._foreach_mul(_fp32(b.params), scale)
            torch._foreach_mul_(term, coef)
        elif not F.is_tensor(scale) and not F.is_tensor(coef):  # a host number (Prodigy's d on the CPU)
            b.add_decay_coef(F.AdditiveDecay(coef * scale))  # p += (-c) p in the terminal: no term written
            return
        else:  # one factor for every tensor (Prodigy's d on a device): (coef * s) * p, one pass
            term = torch._foreach_mul(_fp32(b.params), coef * scale)
        b.add_decay(term)

    @staticmethod
    def _coef(b: Any) -> Any:
        """The decay coefficient, shrunk by an ``lr_scale`` an earlier transform published (the
        step size the reference applies weight decay with, e.g. Simplified AdEMAMix's)."""
        coef = b.s("coef")
        scale = b.signals.get("lr_scale")
        return coef if scale is None else coef * scale


class CautiousWeightDecay(WeightDecay):
    """Cautious weight decay (adv_optm's ``cautious_wd``): decoupled decay applied only where it
    agrees with the update, ``p -= c * 1[u * p >= 0] * p`` with
    ``c = lr * weight_decay`` (or ``weight_decay * lr / max_lr``). Replaces :func:`weight_decay`.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.cautious_wd(0.1), ac.apply()).names
    ('adam', 'eps_divide', 'cautious_wd', 'apply')
    """

    type_name = "cautious_wd"
    default_name = "cautious_wd"
    reads = frozenset({"param", "update"})

    def update(self, b: Any) -> None:
        coef = self._coef(b)
        if F.is_zero(coef):
            return
        p32 = _fp32(b.params)
        agree = _agree_mask(b.u, p32)  # 1 where u * p >= 0 (zeros pass), else 0
        torch._foreach_mul_(agree, p32)
        scale = b.signals.get("wd_scale")
        if isinstance(scale, (list, tuple)):
            torch._foreach_mul_(agree, scale)
        elif scale is not None:
            coef = coef * scale  # one factor for every tensor (Prodigy's d): one pass
        torch._foreach_mul_(agree, coef)
        b.add_decay(agree)


# -- anchors of centered weight decay ----------------------------------------------------------------
ANCHOR_MODES = ("float8", "int8", "int4", "full")
#: block size and bit width of the block-quantized anchors (adv_optm_spec.md §7.3)
ANCHOR_BLOCKS = {"int8": (128, 8), "int4": (32, 4)}


def quantize_blockwise(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric block quantization of ``x`` flattened and padded to a multiple of ``block`` by
    repeating its last element: per block ``lo = min``, ``scale = (max - min) / (2^bits - 1)`` (1 for
    a constant block) and ``q = clamp(round((x - lo) / scale + q_min), q_min, q_max)`` with
    ``q_min = -2^(bits-1)``. Returns ``q`` (int8, ``(n_blocks, block)``) and fp32 ``scale``, ``lo``
    (``(n_blocks,)``). The rounding sees ``q_min`` added first, as adv_optm's does (same result but
    at fp32 half-way ties).

    >>> q, scale, lo = quantize_blockwise(torch.tensor([0.0, 1.02, 2.0]), 4, 8)  # padded with 2.0
    >>> q.tolist(), round(scale.item() * 255, 6), lo.item()
    ([[-128, 2, 127, 127]], 2.0, 0.0)
    """
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat((flat, flat[-1:].expand(pad)))
    blocks = flat.view(-1, block)
    lo, hi = torch.aminmax(blocks, dim=1)
    q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale = (hi - lo) / float(q_max - q_min)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = ((blocks - lo[:, None]) / scale[:, None] + q_min).round().clamp(q_min, q_max).to(torch.int8)
    return q, scale, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values (in [-8, 7]) per int8 byte: element ``2k`` in the high nibble, ``2k+1`` in
    the low nibble (adv_optm's layout). ``q`` must have an even number of elements.

    >>> pack_int4(torch.tensor([1, -2, 7, -8], dtype=torch.int8)).tolist()  # 0x1E, 0x78
    [30, 120]
    """
    x = q.reshape(-1).to(torch.int16)
    return ((x[0::2] << 4) | (x[1::2] & 15)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7], twice as many as bytes.

    >>> unpack_int4(torch.tensor([30, 120], dtype=torch.int8)).tolist()
    [1, -2, 7, -8]
    """
    x = packed.reshape(-1).to(torch.int16)
    high = x >> 4                       # arithmetic shift: the signed high nibble
    low = x & 15
    low = low - ((low & 8) << 1)        # sign-extend the low nibble
    return torch.stack((high, low), dim=1).reshape(-1).to(torch.int8)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int,
                         like: torch.Tensor) -> torch.Tensor:
    """``(q - q_min) * scale + lo`` in fp32, the padding dropped, shaped like ``like``."""
    q_min = -(1 << (bits - 1))
    blocks = (q.reshape(scale.numel(), -1).float() - q_min) * scale[:, None] + lo[:, None]
    return blocks.reshape(-1)[:like.numel()].view(like.shape)


def _build_anchor(mode: str, part: str, p: torch.Tensor) -> torch.Tensor:
    block, bits = ANCHOR_BLOCKS[mode]
    q, scale, lo = quantize_blockwise(p, block, bits)
    if part == "scale":
        return scale
    if part == "min":
        return lo
    return pack_int4(q) if mode == "int4" else q


class CenteredWeightDecay(Transform):
    """Centered weight decay (adv_optm's ``centered_wd``, adv_optm_spec.md §7.3): decay toward the
    weights ``a`` the parameter had when its state was created, in addition to any ordinary decay::

        p <- p - c * (p' - a),   c = lr * strength (times lr_scale, times fisher_wd's wd_scale)

    where ``p'`` is the parameter after the decay terms of the transforms before this one (adv_optm
    measures the distance from the already decayed weights). ``cautious=True`` decays only where it
    agrees with the update, ``1[u * (p' - a) >= 0]`` (§7.2). Fed by ``group["centered_wd"]``.

    After a :func:`geometric_wd`, a tensor it decays toward a signed target (its ``decay_target``
    signal, spec §7.5) is decayed by that target built from the distance instead: ``p' - a`` becomes
    ``T(p - a)`` (from the weights before any decay, as adv_optm's ``cwd_target``), in the mask too.

    ``anchor`` is how ``a`` is stored (state ``anchor``, plus ``anchor_scale``/``anchor_min``):
    ``"float8"`` (default, as adv_optm: float8_e4m3fn, 3 mantissa bits, ``|a| < 2^-9`` flushes toward
    zero, beyond 448 unrepresentable), ``"int8"`` (blocks of 128 of the flattened tensor, per-block
    min and scale, ``q in [-128, 127]``), ``"int4"`` (blocks of 32, ``q in [-8, 7]``, two per byte,
    even index in the high nibble), ``"full"`` (a copy in the parameter dtype). There is no
    anchor-less mode: without an anchor there is nothing to decay toward. Block scales and minima
    are kept in fp32 (adv_optm keeps them in the parameter dtype, bf16 for bf16 models). The
    block-quantized modes need whole tensors (``"tensor"`` scope): the chain then runs that segment
    on whole tensors instead of cache-sized slices. Parameters tagged ``lora_A``, ``lora_B`` or
    ``oft`` (:mod:`adv_chain._core.tags`) get no anchor and no centered decay, as in adv_optm: an
    adapter factor has no meaningful "initial weights" to return to.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.weight_decay(0.01), ac.centered_wd(0.1, anchor="int8"),
    ...          ac.apply()).names
    ('adam', 'eps_divide', 'weight_decay', 'centered_wd', 'apply')
    """

    type_name = "centered_wd"
    default_name = "centered_wd"
    stage = "decay"
    writes = frozenset({"decay"})
    consumes = frozenset({"sig:wd_scale", "sig:decay_target"})  # optional: fisher_wd's, geometric_wd's
    hparams = {"strength": HParam("centered_wd", checks.nonneg)}

    def __init__(self, strength: float = 0.1, anchor: str = "float8", cautious: bool = False, *,
                 name: str | None = None) -> None:
        super().__init__(name=name, strength=strength,
                         anchor=checks.choice(self.type_name, "anchor", anchor, ANCHOR_MODES),
                         cautious=checks.flag(self.type_name, "cautious", cautious))

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "tensor" if self.args["anchor"] in ANCHOR_BLOCKS else "elementwise"

    @property
    def reads(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"param", "decay", *({"update"} if self.args["cautious"] else ())})

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        mode = hp["anchor"]
        if hp.get("tags", frozenset()) & ADAPTER_TAGS:
            return {}  # LoRA factors and OFT blocks are not decayed toward an anchor (adv_optm's rule)
        if mode == "full":
            return {"anchor": StateSpec(dtype="param", init="param")}
        if mode == "float8":
            return {"anchor": StateSpec(dtype=torch.float8_e4m3fn, init="param")}
        return {"anchor": StateSpec(build=functools.partial(_build_anchor, mode, "data")),
                "anchor_scale": StateSpec(build=functools.partial(_build_anchor, mode, "scale")),
                "anchor_min": StateSpec(build=functools.partial(_build_anchor, mode, "min"))}

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        if h.hp.get("tags", frozenset()) & ADAPTER_TAGS:
            return {"coef": 0.0}
        return {"coef": h.hp["strength"] * h.lr}

    def _anchors(self, b: Any) -> Tensors:
        data = b.state("anchor")
        mode = self.args["anchor"]
        if mode not in ANCHOR_BLOCKS:
            return _fp32(data)
        bits = ANCHOR_BLOCKS[mode][1]
        scales, mins = b.state("anchor_scale"), b.state("anchor_min")
        # per tensor: the blocks follow the flattened tensor (whole tensors in this segment)
        return [dequantize_blockwise(unpack_int4(d) if mode == "int4" else d, s, m, bits, p)
                for d, s, m, p in zip(data, scales, mins, b.params)]

    def update(self, b: Any) -> None:
        coef = WeightDecay._coef(b)
        if F.is_zero(coef):
            return
        p32 = undecayed = _fp32(b.params)
        anchors = self._anchors(b)
        if not F.is_zero(b.decay_coef):  # p' = p * (1 - decay_coef) - decay
            p32 = F.decayed(p32, b.decay_coef)
        if b.decay is not None:
            p32 = torch._foreach_sub(p32, b.decay)
        dist = torch._foreach_sub(p32, anchors)
        shaped = b.signals.get("decay_target")  # per tensor: None, or geometric_wd's signed target T(.)
        if shaped is not None:  # T(p - a) from the undecayed weights (spec §7.5); p' - a for the others
            dist = [d if t is None else t(x - a) for d, t, x, a in zip(dist, shaped, undecayed, anchors)]
        if self.args["cautious"]:
            torch._foreach_mul_(dist, _agree_mask(b.u, dist))
        scale = b.signals.get("wd_scale")
        if scale is not None:
            torch._foreach_mul_(dist, scale)
        torch._foreach_mul_(dist, coef)
        b.add_decay(dist)


class FisherWD(Transform):
    """Fisher weight decay (adv_optm's ``fisher_wd``, adv_optm_spec.md §7.4; after FAdam, arXiv
    2405.12807, applied decoupled): a per-element multiplier ``s`` on every later decay term
    (:func:`weight_decay`, :func:`cautious_wd`, :func:`centered_wd`), computed from this step's
    denominator ``D`` and published as the ``wd_scale`` signal::

        atan2=False:  s = 1 / (D + eps),  s <- s / max(RMS(p * s), 1)      (RMS over the whole tensor)
        atan2=True:   s = (4/pi) * atan2(1, D)                              (no epsilon, no clipping)

    ``D`` is the ``denom`` a moment transform published (Adam's ``sqrt(v) / sqrt(1 - b2^t)``); place
    ``fisher_wd`` between that moment and the normalizer that consumes ``denom``, with ``atan2``
    matching the normalizer (:func:`atan2_scale` or :func:`eps_divide`) and the same ``eps``.
    ``atan2=False`` needs whole tensors (``"tensor"`` scope). Fed by ``group["eps"]``; ``eps=None``
    is the scale-invariant ``1/sqrt(N)`` (as :func:`eps_divide`'s).

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.fisher_wd(eps=1e-8), ac.eps_divide(1e-8), ac.weight_decay(0.1),
    ...          ac.apply()).names
    ('adam', 'fisher_wd', 'eps_divide', 'weight_decay', 'apply')
    """

    type_name = "fisher_wd"
    default_name = "fisher_wd"
    stage = "decay"
    reads = frozenset({"param", "sig:denom"})
    writes = frozenset({"sig:wd_scale"})
    hparams = {"eps": HParam("eps", _eps_or_none)}

    def __init__(self, eps: float | None = 1e-8, atan2: bool = False, *, name: str | None = None) -> None:
        super().__init__(name=name, eps=eps, atan2=checks.flag(self.type_name, "atan2", atan2))

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "elementwise" if self.args["atan2"] else "tensor"

    def state_specs(self, param: torch.Tensor, hp: Any) -> dict[str, StateSpec]:
        return {} if hp["atan2"] else auto_eps_specs(hp["eps"])

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {**eps_scalars(h.hp["eps"]), "atan2_scale": 4.0 / math.pi}

    def update(self, b: Any) -> None:
        denom = b.read_denom()  # read, not consumed: the normalizer after us divides by it
        if self.args["atan2"]:
            # torch has no multi-tensor atan2: one op per tensor (fused under compile=True)
            s = [torch.atan2(d.new_ones(()), d) for d in denom]
            torch._foreach_mul_(s, b.s("atan2_scale"))
        else:
            s = torch._foreach_add(denom, eps_operand(b, len(denom)))
            torch._foreach_reciprocal_(s)
            norms = torch._foreach_norm(torch._foreach_mul(s, _fp32(b.params)))
            # RMS = ||p * s|| / sqrt(N), clipped below at 1
            clip = [torch.clamp(n / math.sqrt(x.numel()), min=1.0) for n, x in zip(norms, s)]
            torch._foreach_div_(s, clip)
        b.signals["wd_scale"] = s


weight_decay = WeightDecay
cautious_wd = CautiousWeightDecay
centered_wd = CenteredWeightDecay
fisher_wd = FisherWD
