"""Low-memory optimizer state: wrappers that store another transform's declared state compressed.

* :func:`factored_state` keeps every ``factorable`` state tensor as SMMF rank-1 non-negative factors
  (Park et al., "SMMF: Square-Matricized Momentum Factorization", arXiv 2412.08894), with 1-bit
  packed signs for signed state (adv_optm's ``nnmf_factor``/``state_precision='factored'``).
* :func:`low_precision_state` keeps the state in bf16 or fp16 (stochastic rounding) or in int8
  blocks with one fp32 scale per block (adv_optm's ``state_precision='bf16_sr'``/``'int8_sr'``;
  its ``'fp16'`` crashes, this one works).

Both run the wrapped transform unchanged: a chunk at a time (at most ``chunk_bytes`` of dense state,
at least one slice; an elementwise inner transform runs on cache-sized slices of each tensor, cut at
whole matrix rows or int8 blocks, see :mod:`adv_chain.transforms.state_slices`) they rebuild the
dense fp32 state as temporaries, run the inner ``update`` on a part of the bucket in which
``b.state(key)`` returns those temporaries, and store the result compressed again. The slicing is
fixed by each tensor's shape, so ``chunk_bytes`` never changes the numbers. The wrapper takes the inner transform's name, so state keys read
``"adam/exp_avg:row"``, param-group overrides stay ``"adam.betas"``, and the signals the inner
transform publishes (``denom``) reach the transforms after it. The direction of a step is computed
from the full-precision updated state, not from its compressed copy (as SMMF and adv_optm do).
A global inner transform's ``reduce`` runs on the stored state; the compressed keys it lists in
``reduce_reads_state`` (lion_prodigy's moment, for its Lion-K norms and cautious counts) are rebuilt
for it the same way, whole tensors a chunk at a time, read-only (reading an unlisted one is an error).
"""
from __future__ import annotations

import zlib
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .._core.numerics import noise_key
from .._core.transform import _NAME_RE, HostView, StateSpec, Transform, transform_from_config
from .state_codecs import (  # noqa: F401 - the formats, re-exported
    _TINY, _BIT_WEIGHTS, DEFAULT_CHUNK_BYTES, LOW_PRECISION_DTYPES, _TORCH_DTYPES, _PARTS, _bad, matrix_shape,
    nnmf, pack_bits, unpack_bits, reconstruct, compress, _state_float, _factored_layout, _build_part,
    round_to, quantize_blocks, dequantize_blocks)
from .state_slices import FactoredCodec, LowPrecisionCodec, reduce_dense, run_sliced


# -- the wrappers ---------------------------------------------------------------------------------
class _StateWrapper(Transform):
    """Shared by the state wrappers: takes the inner transform's name, stage, streams, signals and
    hyperparameters (``args`` *is* the inner transform's ``args``, so the optimizer resolves
    ``group["betas"]``/``"adam.betas"`` for it unchanged); the wrapper's own options are
    configuration in ``options``."""

    scope = "tensor"
    stage = "moment"  # replaced by the inner transform's stage on each instance
    #: data-dependent zero masks and a Python loop over slices: under ``compile=True`` the segment
    #: holding a wrapper runs eagerly (the other segments stay compiled)
    compilable = False
    #: the elementwise transforms after it in its segment run on each of its chunks (see
    #: :func:`adv_chain._core.bucket.run_transforms`)
    runs_rest = True

    def _setup(self, inner: Any, name: str | None, options: dict[str, Any]) -> None:
        if isinstance(inner, Mapping):  # from to_config
            inner = transform_from_config(inner)
        if not isinstance(inner, Transform):
            raise ValueError(f"{self.type_name}: inner={inner!r} is not allowed; inner must be a transform such as "
                             "ac.scale_by_adam()")
        if inner.terminal or inner.scope not in ("elementwise", "tensor", "global"):
            raise ValueError(f"{self.type_name}: inner={inner!r} is not allowed; inner must be an elementwise, "
                             f"per-tensor or global transform with state (its scope is {inner.scope!r}"
                             f"{', and it is a terminal' if inner.terminal else ''})")
        name = inner.name if name is None else name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"{self.type_name}: name={name!r} is not a valid transform name; use lowercase "
                             "letters, digits and '_' starting with a letter")
        for attr, value in (("name", name), ("inner", inner), ("options", MappingProxyType(options)),
                            ("args", inner.args), ("stage", inner.stage), ("reads", inner.reads),
                            ("writes", inner.writes), ("consumes", inner.consumes),
                            ("optional_signals", inner.optional_signals), ("hparams", inner.hparams),
                            ("static_scalars", inner.static_scalars | self._own_static),
                            ("excludes", inner.excludes), ("group_mirrors", inner.group_mirrors)):
            object.__setattr__(self, attr, value)

    _own_static: frozenset[str] = frozenset()

    # -- value semantics (inner + options) ------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and self.name == other.name and self.inner == other.inner
                and dict(self.options) == dict(other.options))

    def __hash__(self) -> int:
        return hash((type(self), self.name, self.inner, tuple(sorted(self.options.items()))))

    def _defaults(self) -> dict[str, Any]:
        return {k: v for k, v in self.signature_defaults().items() if k != "inner"}

    def __repr__(self) -> str:
        defaults = self._defaults()
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items()
                        if k in defaults and defaults[k] != v and not (isinstance(v, tuple) and defaults[k] == list(v)))
        text = f"{self.type_name}({self.inner!r}{extra})"
        return text if self.name == self.inner.name else f"named({self.name!r}, {text})"

    def non_default_args(self) -> dict[str, Any]:
        return {"inner": self.inner, **{k: v for k, v in self.options.items() if self._defaults().get(k) != v}}

    def renamed(self, name: str) -> "Transform":
        return type(self)(self.inner, name=name, **self.options)

    def with_args(self, **changes: Any) -> "Transform":
        own = {k: v for k, v in changes.items() if k in self.options or k == "inner"}
        rest = {k: v for k, v in changes.items() if k not in own}
        inner = own.pop("inner", self.inner)
        if rest:
            inner = inner.with_args(**rest)
        return type(self)(inner, name=self.name, **{**self.options, **own})

    def to_config(self) -> dict[str, Any]:
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        return {"type": self.type_name, "name": self.name, "args": {"inner": self.inner.to_config(), **opts}}

    # -- protocol: the inner transform's, around compressed storage ------------------------------------
    def check_hparams(self, owner: str, hp: Mapping[str, Any]) -> None:
        self.inner.check_hparams(owner, hp)

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return self.inner.host_scalars(h)

    # a global inner transform (Prodigy, lion_prodigy): its reduction runs on the stored state; the
    # compressed keys it declares in ``reduce_reads_state`` (lion_prodigy's moment, for its Lion-K
    # norms and cautious counts) are rebuilt dense for it, read-only, a chunk of whole tensors at a
    # time (:func:`~adv_chain.transforms.state_slices.reduce_dense`)
    def reduce(self, b: Any) -> list[torch.Tensor]:
        codecs, passing = self._codecs(b, b.own_states())
        reads = self.inner.reduce_reads_state
        return reduce_dense(self, b, codecs, passing, self._chunk_elems(sum(k in reads for k in codecs)))

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any], hp: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.finalize(values, layer_keys, hp)

    def layer_key(self, param: torch.Tensor, index: int, group: Mapping[str, Any]) -> Any:
        return self.inner.layer_key(param, index, group)

    def group_state(self, hp: Mapping[str, Any]) -> dict[str, float]:
        return self.inner.group_state(hp)

    def state_scalars(self, state: Mapping[str, torch.Tensor], h: HostView) -> dict[str, Any]:
        return self.inner.state_scalars(state, h)

    def _chunk_elems(self, keys: int) -> int:
        """Elements per chunk: ``chunk_bytes`` of dense fp32 state over ``keys`` state keys."""
        return max(1, self.options["chunk_bytes"] // (4 * max(1, keys)))

    def _check_chunk_bytes(self, chunk_bytes: Any) -> int:
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
            raise _bad(self.type_name, "chunk_bytes", chunk_bytes, "an int >= 1 (bytes of dense state per chunk)")
        return chunk_bytes


class FactoredState(_StateWrapper):
    """Store the ``factorable`` state of ``inner`` as SMMF rank-1 factors (spec §4.4, arXiv 2412.08894).

    Each such tensor (``N`` elements) is viewed as the ``d1 x d2`` matrix of :func:`matrix_shape`
    (square-ish, whatever the parameter's shape, as SMMF and adv_optm do) and stored as

    * ``"<key>:row"`` (``d1`` values) and ``"<key>:col"`` (``d2`` values): the non-negative rank-1
      factors of ``|state|`` (:func:`nnmf`), fp32;
    * for signed state (``kind`` ``"signed"``/``"any"``) ``"<key>:sign"``: ``state > 0``, 8 bits
      per uint8 byte, and ``"<key>:zero"``: where the state is exactly 0, the same way, kept only
      while such zeros lie among non-zero values (else empty; fixes adv_optm's bug B18, see
      :func:`compress`).

    1-D parameters keep a dense state unless ``vector_reshape=True`` (adv_optm's default); that
    dense state sits in ``"<key>:row"`` with the other parts empty, so all parameters share keys.
    ``keys`` limits factoring to some state keys (``("exp_avg_sq",)``: adv_optm's
    ``factored_2nd``); other state, and state that is not ``factorable``, passes through unchanged.
    Every step rebuilds the dense state of a few rows at a time (at most ``chunk_bytes``), runs
    ``inner`` on them and factors them again (row sums at once, column sums accumulated over the
    rows); this step's direction uses the exact updated state.
    Memory: ``4 (d1 + d2)`` bytes per key, plus ``d1 ceil(d2/8)`` for a signed key. Only ``rank=1``.

    >>> import adv_chain as ac
    >>> c = ac.chain(ac.factored_state(ac.scale_by_adam()), ac.eps_divide(), ac.apply())
    >>> c.names, c["adam"]
    (('adam', 'eps_divide', 'apply'), factored_state(scale_by_adam()))
    >>> ac.chain_from_config(c.to_config()) == c
    True
    """

    type_name = "factored_state"
    default_name = "factored_state"

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "global" if self.inner.scope == "global" else "tensor"

    @property
    def whole_tensors(self) -> bool:
        """Its update needs whole tensors (the factors' rows), also as a global transform."""
        return True

    def __init__(self, inner: "Transform | Mapping[str, Any]", rank: int = 1, vector_reshape: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, keys: "tuple[str, ...] | None" = None, *,
                 name: str | None = None) -> None:
        owner = self.type_name
        if rank != 1 or isinstance(rank, bool):
            raise _bad(owner, "rank", rank, "1 (SMMF's rank-1 factorization; higher ranks are not implemented)")
        if not isinstance(vector_reshape, bool):
            raise _bad(owner, "vector_reshape", vector_reshape, "True or False")
        if keys is not None:
            if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys) or not keys:
                raise _bad(owner, "keys", keys, "None (every factorable key) or a non-empty tuple of state keys "
                           "such as ('exp_avg_sq',)")
            keys = tuple(keys)
        self._setup(inner, name, {"rank": rank, "vector_reshape": vector_reshape,
                                  "chunk_bytes": self._check_chunk_bytes(chunk_bytes), "keys": keys})
        if keys is not None:
            # the inner transform's keys need a parameter and hyperparameters; check names we can
            known = self._probe_keys()
            unknown = [k for k in keys if known is not None and k not in known]
            if unknown:
                raise _bad(owner, "keys", keys, f"a tuple of factorable state keys of {self.inner!r}, "
                           f"i.e. drawn from {sorted(known)}")

    def _probe_keys(self) -> set[str] | None:
        """The factorable keys the inner transform declares for a small matrix at its defaults."""
        try:
            specs = self.inner.state_specs(torch.zeros(2, 2), dict(self.inner.args))
        except Exception:  # noqa: BLE001 - a transform that needs more context: skip the check
            return None
        return {k for k, s in specs.items() if s.factorable}

    def _factors(self, key: str, spec: StateSpec) -> bool:
        keys = self.options["keys"]
        return (spec.factorable and not spec.scalar and spec.build is None
                and (keys is None or key in keys))

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        out: dict[str, StateSpec] = {}
        vr = self.options["vector_reshape"]
        for key, spec in self.inner.state_specs(param, hp).items():
            if not self._factors(key, spec):
                out[key] = spec
                continue
            signed = spec.kind != "nonneg"
            for part in _PARTS if signed else _PARTS[:2]:
                out[f"{key}:{part}"] = StateSpec(kind="nonneg" if part in ("row", "col") else "any",
                                                 build=_Builder(part, vr))
        return out

    def _codecs(self, b: Any, stored: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The factored keys' codecs and the state stored dense (passing through)."""
        factored = sorted({k.rpartition(":")[0] for k in stored if k.endswith(":row") and k[:-4] + ":col" in stored})
        parts = {f"{k}:{p}" for k in factored for p in _PARTS}
        return ({k: FactoredCodec(stored, k) for k in factored},
                {k: v for k, v in stored.items() if k not in parts})

    def update(self, b: Any, rest: tuple = ()) -> None:
        codecs, passing = self._codecs(b, b.own_states())
        run_sliced(self, b, codecs, passing, self._chunk_elems(len(codecs)), rest)


class _Builder:
    """Picklable, comparable ``StateSpec.build`` for one part of a factored key."""

    __slots__ = ("part", "vector_reshape")

    def __init__(self, part: str, vector_reshape: bool) -> None:
        self.part, self.vector_reshape = part, vector_reshape

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return _build_part(self.part, self.vector_reshape, p)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Builder) and (self.part, self.vector_reshape) == (other.part, other.vector_reshape)

    def __hash__(self) -> int:
        return hash((self.part, self.vector_reshape))


class _LowBuilder:
    """Initial storage of one low-precision key (``part`` ``"q"`` or ``"scale"``)."""

    __slots__ = ("mode", "part", "signed", "block", "init")

    def __init__(self, mode: str, part: str, signed: bool, block: int, init: str) -> None:
        self.mode, self.part, self.signed, self.block, self.init = mode, part, signed, block, init

    def _key(self) -> tuple:
        return (self.mode, self.part, self.signed, self.block, self.init)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LowBuilder) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        start = p.float() if self.init == "param" else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.mode in _TORCH_DTYPES:
            return start.to(_TORCH_DTYPES[self.mode])  # nearest rounding of the initial value
        q, scale = quantize_blocks(start, self.signed, self.block, 0)
        return q if self.part == "q" else scale


class LowPrecisionState(_StateWrapper):
    """Store the moment state of ``inner`` (its keys that follow the optimizer's ``state_dtype``
    policy) in a low-precision format, rounding stochastically (unbiased) at every write:

    * ``dtype="bf16"`` / ``"fp16"``: ``"<key>"`` in bf16/fp16 (adv_optm's ``'bf16_sr'``; its ``'fp16'``
      crashes unless the gradient is fp16, this one works; fp16 overflows above 65504);
    * ``dtype="int8"``: ``"<key>"`` as int8 (signed state, ``scale = max|x|/127`` per block) or uint8
      (``kind="nonneg"`` state, ``max x/255``) and ``"<key>:scale"``, one fp32 scale per block of
      ``block_size`` elements (adv_optm's ``'int8_sr'`` uses 2048).

    The noise is counter-based (a function of ``seed``, the step, the key, the parameter and the
    element's index in the flattened tensor, see :mod:`adv_chain.transforms.state_codecs`): one
    table lookup per element, reproducible, the same for any chunking, no generator state, global
    RNG untouched. (The parameter part is the terminal's noise key, e.g. with
    :func:`stochastic_round_apply`; with a terminal that has none, the tensor's position in its
    bucket.) Dtypes survive ``state_dict``/``load_state_dict``.

    >>> import adv_chain as ac
    >>> ac.chain(ac.low_precision_state(ac.scale_by_adam(), "int8"), ac.eps_divide(), ac.apply())["adam"]
    low_precision_state(scale_by_adam(), dtype='int8')
    """

    type_name = "low_precision_state"
    default_name = "low_precision_state"
    _own_static = frozenset({"sr_step"})

    def __init__(self, inner: "Transform | Mapping[str, Any]", dtype: str = "bf16", block_size: int = 256,
                 seed: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, name: str | None = None) -> None:
        owner = self.type_name
        if dtype not in LOW_PRECISION_DTYPES:
            raise _bad(owner, "dtype", dtype, f"one of {LOW_PRECISION_DTYPES}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise _bad(owner, "block_size", block_size, "an int >= 1 (elements per int8 block)")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise _bad(owner, "seed", seed, "an int >= 0")
        self._setup(inner, name, {"dtype": dtype, "block_size": block_size, "seed": seed,
                                  "chunk_bytes": self._check_chunk_bytes(chunk_bytes)})

    @property
    def scope(self) -> str:  # type: ignore[override]
        # bf16/fp16 storage is elementwise: it runs on cache-sized slices like the plain chain;
        # int8 blocks follow the flattened tensor and need whole tensors
        elementwise = self.options["dtype"] != "int8" and self.inner.scope in ("elementwise", "global")
        if self.inner.scope == "global":
            return "global"
        return "elementwise" if elementwise else "tensor"

    @property
    def whole_tensors(self) -> bool:
        return self.options["dtype"] == "int8" or self.inner.scope == "tensor"

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        return {**self.inner.host_scalars(h), "sr_step": h.step}

    @staticmethod
    def _stores(spec: StateSpec) -> bool:
        return spec.dtype == "state" and not spec.scalar and spec.build is None and spec.init in ("zeros", "param")

    def state_specs(self, param: torch.Tensor, hp: Mapping[str, Any]) -> dict[str, StateSpec]:
        mode, block = self.options["dtype"], self.options["block_size"]
        out: dict[str, StateSpec] = {}
        for key, spec in self.inner.state_specs(param, hp).items():
            if not self._stores(spec) or param.dtype == torch.float64:
                out[key] = spec
                continue
            signed = spec.kind != "nonneg"
            out[key] = StateSpec(kind=spec.kind, build=_LowBuilder(mode, "q", signed, block, spec.init))
            if mode == "int8":
                out[f"{key}:scale"] = StateSpec(kind="nonneg", build=_LowBuilder(mode, "scale", signed, block, spec.init))
        return out

    def _codecs(self, b: Any, stored: Mapping[str, Any], step: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
        """The low-precision keys' codecs (their noise for ``step``) and the state passing through."""
        mode, block = self.options["dtype"], self.options["block_size"]
        low = (torch.int8, torch.uint8) if mode == "int8" else (_TORCH_DTYPES[mode],)
        keys = sorted(k for k, v in stored.items() if ":" not in k and v and v[0].dtype in low)
        codecs = {k: LowPrecisionCodec(b, stored, k, block, noise_key(self.options["seed"], step, zlib.crc32(k.encode())))
                  for k in keys}
        scales = {f"{k}:scale" for k in keys}
        return codecs, {k: v for k, v in stored.items() if k not in codecs and k not in scales}

    def update(self, b: Any, rest: tuple = ()) -> None:
        step = int(b.s("sr_step"))  # a static scalar: a Python int under compile=True too (no host sync)
        codecs, passing = self._codecs(b, b.own_states(), step)
        run_sliced(self, b, codecs, passing, self._chunk_elems(len(codecs)), rest)


factored_state = FactoredState
low_precision_state = LowPrecisionState
