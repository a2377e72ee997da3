"""Direction masks: they compare the update with the reference gradient (the gradient-stage output)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .._core import checks
from .._core.transform import Transform

_RESCALES = ("paper", "mean", "none")
_COUNT_PIECE = 1 << 18  # elements counted per fp32 sum (exact: below 2^24)


def _agreement(u: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """1.0 where u and g have the same (non-zero) sign, else 0.0: ``u * g > 0`` written in place as
    fp32 (no foreach comparison exists; one pass fewer than ``clamp_min(sign(u * g), 0)``)."""
    mask = torch._foreach_mul(u, g)
    for x in mask:
        x.gt_(0)
    return mask


class Cautious(Transform):
    """C-Optim's cautious mask (Liang et al., arXiv 2411.16085): zero the update where its sign
    disagrees with the reference gradient, ``phi = 1[u * g > 0]``, and rescale per tensor:

    * ``rescale="paper"``: ``u * phi * N / (nnz(phi) + 1)`` (the paper);
    * ``rescale="mean"``: ``u * phi / max(mean(phi), 1e-3)`` (adv_optm's ``cautious_mask``);
    * ``rescale="none"``: ``u * phi``.

    The rescale needs the whole tensor's mask count, so with a rescale the mask is applied in a
    ``prepare`` step at the end of the segment before the count (on slices still in cache), the
    masked direction is kept and its non-zeros counted (``u * g > 0`` implies ``u != 0``, so they
    are the mask's ones), and the per-tensor rescale is the only work left after the count.
    ``whole_tensors=True`` (with a rescale) instead masks, counts and rescales within its segment on
    whole tensors (``"tensor"`` scope, no reduction barrier): for a segment that runs on whole tensors
    anyway, and so that the signals and decay terms published before it (:func:`fisher_wd`'s
    ``wd_scale``) reach the transforms after it. Cannot share a chain with :func:`grams`.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.cautious(), ac.apply()).names
    ('adam', 'eps_divide', 'cautious', 'apply')
    """

    type_name = "cautious"
    default_name = "cautious"
    stage = "mask"
    reads = frozenset({"update", "grad"})
    excludes = frozenset({"grams"})
    additive_reduce = True  # (count, size) of slices add up
    traceable_reduce = True
    prepares = True  # with a rescale (layer scope): the mask itself runs before the count

    def __init__(self, rescale: str = "paper", whole_tensors: bool = False, *, name: str | None = None) -> None:
        extra = {}
        if checks.flag(self.type_name, "whole_tensors", whole_tensors):
            if rescale == "none":
                raise ValueError(f"{self.type_name}: whole_tensors=True is for a rescale; rescale='none' is "
                                 "elementwise already")
            extra["whole_tensors"] = True
        super().__init__(name=name, rescale=checks.choice(self.type_name, "rescale", rescale, _RESCALES), **extra)

    @property
    def scope(self) -> str:  # type: ignore[override]
        if self.args["rescale"] == "none":
            return "elementwise"
        return "tensor" if self.args.get("whole_tensors") else "layer"

    def prepare(self, b: Any) -> None:
        u = b.own_u()
        torch._foreach_mul_(u, _agreement(u, b.grads))

    def reduce(self, b: Any) -> list[torch.Tensor]:
        out = []
        for u in b.u:  # the direction is masked already (prepare): its non-zeros are the kept coordinates
            # |sign(u)| summed in fp32 (~20x faster than count_nonzero on CPU) over cache-sized pieces
            # (exact: far below 2^24; the temporaries stay small even when u is a whole tensor, as
            # under compile=True), the piece counts added in fp64
            flat = u.reshape(-1)
            if torch.compiler.is_compiling():  # an exact integer count, fused into the kernel's pass
                count = flat.ne(0).sum(dtype=torch.int64).float()
                out.append(torch.stack((count, torch.full_like(count, float(u.numel())))))
                continue
            count = sum(torch.sign(flat[i:i + _COUNT_PIECE]).abs_().sum(dtype=torch.float32).double()
                        for i in range(0, max(1, flat.numel()), _COUNT_PIECE)).float()
            out.append(torch.stack((count, torch.full_like(count, float(u.numel())))))
        return out

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        if hp["rescale"] == "paper":
            return {"scale": [v[1] / (v[0] + 1.0) for v in values]}
        return {"scale": [1.0 / torch.clamp(v[0] / v[1], min=1e-3) for v in values]}

    def update(self, b: Any) -> None:
        if self.args["rescale"] == "none":
            self.prepare(b)
        elif self.args.get("whole_tensors"):  # the whole reduction right here, on whole tensors
            self.prepare(b)
            scale = self.finalize(self.reduce(b), list(range(len(b.params))), self.args)["scale"]
            torch._foreach_mul_(b.own_u(), scale)
        else:
            torch._foreach_mul_(b.own_u(), b.s("scale"))


class Grams(Transform):
    """Grams (Cao et al., arXiv 2412.17107): keep the update's magnitude, take the reference
    gradient's sign, ``u = |u| * sign(g)``. Cannot share a chain with :func:`cautious`.

    >>> import adv_chain as ac
    >>> ac.chain(ac.scale_by_adam(), ac.eps_divide(), ac.grams(), ac.apply()).names
    ('adam', 'eps_divide', 'grams', 'apply')
    """

    type_name = "grams"
    default_name = "grams"
    stage = "mask"
    reads = frozenset({"update", "grad"})
    excludes = frozenset({"cautious"})

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)

    def update(self, b: Any) -> None:
        u = b.own_u()
        torch._foreach_abs_(u)
        torch._foreach_mul_(u, torch._foreach_sign(b.grads))


cautious = Cautious
grams = Grams
