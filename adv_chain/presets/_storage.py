"""The reference's state-storage keywords (adv_optm ``state_precision``, ``nnmf_factor``,
``factored_2nd``, ``vector_reshape``; spec §1.5, §4.4) as state wrappers around a moment transform."""
from __future__ import annotations

from typing import Any

from .._core import checks
from .._core.transform import Transform
from ..transforms.state_compression import factored_state, low_precision_state

#: adv_optm 2.5.16's ``state_precision`` values (case-insensitive, as the reference)
STATE_PRECISIONS = ("auto", "fp32", "fp16", "bf16_sr", "int8_sr", "factored")
_LOW = {"fp16": "fp16", "bf16_sr": "bf16", "int8_sr": "int8"}
#: adv_optm's int8_sr block (elements per fp32 scale)
REFERENCE_INT8_BLOCK = 2048


def state_precision_mode(preset: str, state_precision: Any) -> str:
    mode = state_precision.lower() if isinstance(state_precision, str) else state_precision
    if mode not in STATE_PRECISIONS:
        raise ValueError(f"{preset}: state_precision={state_precision!r} is not allowed; state_precision must be one "
                         f"of {STATE_PRECISIONS}")
    return mode


def stored(preset: str, moment: Transform, *, state_precision: Any = "auto", nnmf_factor: bool = False,
           factored_2nd: bool = False, vector_reshape: bool = False, seed: int = 0,
           second_moment: bool = True) -> Transform:
    """``moment`` wrapped as the reference stores its state:

    * ``nnmf_factor=True`` or ``state_precision='factored'`` -> :func:`factored_state` (every moment;
      ``factored_2nd`` is then ignored, as the reference);
    * ``factored_2nd=True`` -> ``factored_state(moment, keys=('exp_avg_sq',))`` (only ``v``; a
      transform without one, ``second_moment=False``, is left alone);
    * ``'bf16_sr'`` / ``'fp16'`` / ``'int8_sr'`` -> :func:`low_precision_state` (``'bf16'``, ``'fp16'``,
      ``'int8'`` with the reference's blocks of 2048) around what remains dense;
    * ``'auto'`` / ``'fp32'`` -> unchanged: adv_chain keeps moments in fp32 (the reference's
      ``'auto'`` uses the parameter dtype).

    ``vector_reshape=True`` factors 1-D tensors too (the reference's default leaves them dense).
    """
    mode = state_precision_mode(preset, state_precision)
    checks.flag(preset, "nnmf_factor", nnmf_factor)
    checks.flag(preset, "factored_2nd", factored_2nd)
    checks.flag(preset, "vector_reshape", vector_reshape)
    if nnmf_factor or mode == "factored":
        return factored_state(moment, vector_reshape=vector_reshape)
    out = moment
    if factored_2nd and second_moment:
        out = factored_state(out, vector_reshape=vector_reshape, keys=("exp_avg_sq",))
    if mode in _LOW:
        out = low_precision_state(out, _LOW[mode], seed=seed,
                                  **({"block_size": REFERENCE_INT8_BLOCK} if mode == "int8_sr" else {}))
    return out
