"""Hyperparameter signals: transforms that compute a per-step hyperparameter for a later transform."""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Hashable, Mapping

import torch

from .._core import checks
from .._core.bucket import broadcast_range
from .._core.plan import flat_view
from .._core.tags import ADAPTER_TAGS, param_tags
from .._core.transform import HParam, HostView, StateSpec, Transform

_LAYER_KEYS = ("tensor", "shape")
_WARMUPS = ("hold", "ramp")
#: parameters that are a Kourkoutas layer of their own whatever ``layer_key`` says (as in adv_optm)
_OWN_LAYER_TAGS = ADAPTER_TAGS | {"dora_scale"}


def stat_axis(shape: tuple[int, ...], tags: frozenset[str]) -> int | None:
    """The dimension along which a parameter keeps one Kourkoutas statistic per index: 0 (per row)
    for OFT blocks and LoRA A factors, 1 (per column) for LoRA B factors (adv_optm's rule for 2-D
    adapters; other dimensions are summed over), ``None`` (one per tensor) for everything else,
    including adapter parameters with fewer than two dimensions."""
    if len(shape) < 2:
        return None
    if "oft" in tags or "lora_A" in tags:
        return 0
    return 1 if "lora_B" in tags else None


def _zeros(shape: tuple[int, ...], p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=p.device)


def _ema(r: torch.Tensor, n: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * r + (1 - alpha) * n


def _compact(x: torch.Tensor) -> torch.Tensor:
    """The broadcast tensor behind an expanded view (``(rows, 1)`` of a ``(rows, cols)`` expansion)."""
    return x[tuple(slice(0, 1) if st == 0 else slice(None) for st in x.stride())]


def _laid_out(beta2: torch.Tensor, u: torch.Tensor, offset: int) -> torch.Tensor:
    """An adapter's ``beta2`` (expanded to its parameter's shape) for the piece ``u`` of the parameter
    that starts at flat element ``offset``: the ``(rows, 1)``/``(1, cols)`` broadcast tensor when
    ``u`` is the whole parameter, else the piece's own elements (a flat slice or an FSDP shard)."""
    if u.shape == beta2.shape:
        return _compact(beta2)
    n = u.numel()
    if 0 in beta2.stride():
        piece = broadcast_range(beta2, beta2.shape, offset, offset + n)
    else:  # dense in the parameter's memory order (e.g. a channels_last adapter): slice that order
        piece = flat_view(beta2)[offset:offset + n]
    return piece.reshape(u.shape)


def _import_path(fn: Any) -> str | None:
    """``'module:qualname'`` when that path imports back to ``fn`` (a top-level function of an
    importable module), else ``None`` (a lambda, a local function, one defined in ``__main__``)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        return f"{module}:{qualname}" if _resolve(module, qualname) is fn else None
    except (ImportError, AttributeError):
        return None


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_key_arg(owner: str, value: Any) -> Any:
    """``layer_key`` as stored in ``args``: ``"tensor"``, ``"shape"``, ``"module:function"`` (also
    for a callable that imports back by that path, so configs stay plain data) or the callable."""
    if callable(value):
        return _import_path(value) or value
    if isinstance(value, str) and ":" in value:
        _layer_key_function(owner, value)  # fails now, not at the first step
        return value
    return checks.choice(owner, "layer_key", value, _LAYER_KEYS)


def _layer_key_function(owner: str, value: Any) -> Callable[[torch.Tensor], Hashable] | None:
    if callable(value):
        return value
    if not isinstance(value, str) or ":" not in value:
        return None
    module, _, qualname = value.partition(":")
    try:
        fn = _resolve(module, qualname)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{owner}: layer_key={value!r} names no importable function ({error}); expected "
                         "'module:function', 'tensor', 'shape' or a callable param -> hashable key") from None
    if not callable(fn):
        raise ValueError(f"{owner}: layer_key={value!r} is not callable; expected a function param -> hashable key")
    return fn


class KourkoutasBeta(Transform):
    """Kourkoutas-beta (Kassinos, arXiv 2508.12996): a per-layer second-moment decay driven by
    gradient spikes, published as the ``beta2`` signal that the next :func:`scale_by_adam` uses::

        n = ||g||_layer ;  r = ema_alpha * r + (1 - ema_alpha) * n          (EMA first, then the ratio)
        sun = (n / (r + tiny_spike)) / (1 + n / (r + tiny_spike))          (in [0, 1))
        beta2 = beta2_max - (beta2_max - beta2_min) * sun

    A layer is one tensor (``layer_key="tensor"``, the paper's per-parameter default), every
    tensor of the same shape (``"shape"``, adv_optm's default), or every tensor for which a
    function ``layer_key(param) -> hashable`` returns the same key (adv_optm's ``layer_key_fn``;
    given as a callable or as ``"module:function"``; a top-level function of an importable module is
    stored by that path, so the chain's config stays plain data). ``warmup`` steps either hold
    ``(beta2_min + beta2_max) / 2`` (``warmup_mode="hold"``, the paper's) or blend linearly from
    ``beta2_max`` (``"ramp"``, adv_optm's). ``lag=True`` uses the previous step's norms, as adv_optm
    does (its first step is then ``beta2_max``). ``r`` is kept per tensor (``"kourkoutas/r_ema"``),
    identical across a layer, so checkpoints never alias. Adam keeps its static bias correction
    ``1 - beta2_max^t`` (adv_optm's choice). Fed by ``group["beta2_min"]``.

    Adapter parameters (:mod:`parameter tags <adv_chain._core.tags>`, as adv_optm): a tensor tagged
    ``lora_A``, ``lora_B``, ``oft`` or ``dora_scale`` is always a layer of its own. OFT blocks and
    LoRA A factors keep one ``n``, ``r`` and ``beta2`` per row (norms over each row, ``r`` of shape
    ``(rows, 1)``), LoRA B factors one per column (``(1, cols)``); a DoRA scale, or an adapter with
    fewer than two dimensions, one per tensor. For more than two dimensions the other dimensions are
    summed over (shape ``(rows, 1, ..., 1)`` / ``(1, cols, 1, ..., 1)``).

    The ``beta2`` signal, per tensor of the bucket a consumer sees: a 0-d tensor, or a tensor
    broadcastable to that tensor - ``(rows, 1)``/``(1, cols)`` when it is the whole adapter
    parameter, the slice's own elements when the executor runs a slice or shard of it.

    Under gradient release (per-parameter steps) ``layer_key="tensor"`` and adapters stay exact;
    shape buckets need every tensor of the bucket first, so they use the previous round's layer
    statistics (one step lagged, on top of ``lag=True``'s own lag).

    >>> import adv_chain as ac
    >>> ac.chain(ac.kourkoutas_beta(beta2_min=0.88), ac.scale_by_adam(), ac.eps_divide(), ac.apply()).names
    ('kourkoutas', 'adam', 'eps_divide', 'apply')
    """

    type_name = "kourkoutas_beta"
    default_name = "kourkoutas"
    stage = "hyper"
    scope = "layer"
    reads = frozenset({"update"})
    writes = frozenset({"sig:beta2"})
    hparams = {"beta2_min": HParam("beta2_min", checks.unit_interval)}

    def __init__(self, beta2_min: float = 0.88, beta2_max: float = 0.999, ema_alpha: float = 0.93,
                 tiny_spike: float = 1e-9, warmup: int = 0, warmup_mode: str = "hold",
                 layer_key: "str | Callable[[torch.Tensor], Hashable]" = "tensor",
                 lag: bool = False, *, name: str | None = None) -> None:
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"{self.type_name}: warmup={warmup!r} must be an int >= 0 (steps)")
        beta2_max = checks.unit_interval(self.type_name, "beta2_max", beta2_max)
        super().__init__(name=name, beta2_min=beta2_min, beta2_max=beta2_max,
                         ema_alpha=checks.unit_interval(self.type_name, "ema_alpha", ema_alpha),
                         tiny_spike=checks.positive(self.type_name, "tiny_spike", tiny_spike), warmup=warmup,
                         warmup_mode=checks.choice(self.type_name, "warmup_mode", warmup_mode, _WARMUPS),
                         layer_key=_layer_key_arg(self.type_name, layer_key),
                         lag=checks.flag(self.type_name, "lag", lag))
        self.check_hparams(self.type_name, self.args)
        object.__setattr__(self, "_layer_fn", _layer_key_function(self.type_name, self.args["layer_key"]))

    def check_hparams(self, owner: str, hp: Any) -> None:
        if not hp["beta2_min"] < hp["beta2_max"]:
            raise ValueError(f"{owner}: beta2_min={hp['beta2_min']} must be below beta2_max={hp['beta2_max']}")

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        axis = stat_axis(tuple(param.shape), hp.get("tags", frozenset()))
        if axis is None:
            spec = StateSpec(scalar=True)
        else:  # one value per row / column of an adapter, never sliced with the parameter
            shape = tuple(n if d == axis else 1 for d, n in enumerate(param.shape))
            spec = StateSpec(kind="nonneg", build=functools.partial(_zeros, shape))
        specs = {"r_ema": spec}
        if hp["lag"]:
            specs["sq_norm"] = spec  # ||g||^2 of the previous step (per tensor: summed over slices)
        return specs

    def layer_key(self, param: torch.Tensor, index: int, group: Mapping[str, Any]) -> Any:
        fn = self._layer_fn
        if fn is None and self.args["layer_key"] != "shape" or param_tags(param, group) & _OWN_LAYER_TAGS:
            return index  # adapters and DoRA scales are layers of their own, as in adv_optm
        if fn is None:
            return tuple(param.shape)
        key = fn(param)
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"{self.type_name}: layer_key={self.args['layer_key']!r} returned {key!r} for a parameter "
                            f"of shape {tuple(param.shape)}; a layer key must be hashable (a str, int or tuple)") from None
        return ("layer_key", key)  # never equal to another parameter's index

    def to_config(self) -> dict[str, Any]:
        if callable(self.args["layer_key"]):
            raise ValueError(f"{self.type_name}: layer_key={self.args['layer_key']!r} cannot be saved in a config: "
                             "define the function at the top level of an importable module (then it is stored "
                             "as 'module:function') or pass that 'module:function' string")
        return super().to_config()

    def host_scalars(self, h: HostView) -> dict[str, Any]:
        warmup, t = h.hp["warmup"], h.step
        if warmup == 0:
            weight, hold = 1.0, False
        elif h.hp["warmup_mode"] == "hold":
            weight, hold = 1.0, t <= warmup
        else:
            weight, hold = min(1.0, (t - 1) / warmup), False
        return {"warm_weight": weight, "hold": 1.0 if hold else 0.0}

    def reduce(self, b: Any) -> list[torch.Tensor]:
        r_old = b.state("r_ema")
        lag = self.args["lag"]
        plain = [j for j, r in enumerate(r_old) if r.dim() == 0]
        used: dict[int, torch.Tensor] = {}
        if plain:
            if lag:
                # last step's norms, accumulated by update() slice by slice: no pass over the gradients here
                acc = [b.state("sq_norm")[j] for j in plain]
                got = [x.clone() for x in acc]
                torch._foreach_zero_(acc)
            else:
                got = torch._foreach_pow(torch._foreach_norm([b.u[j] for j in plain], 2, dtype=torch.float32), 2)
            used.update(zip(plain, got))
        weight = torch.tensor([b.s("warm_weight"), b.s("hold")], dtype=torch.float32)
        out = []
        for j, (r, u) in enumerate(zip(r_old, b.u)):
            if j in used:
                out.append(torch.cat((torch.stack((r, used[j])), weight.to(r.device))))
            else:
                out.append(self._reduce_adapter(b, j, r, u, weight.to(r.device)))
        return out

    def _reduce_adapter(self, b: Any, j: int, r: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One value per row / column of a whole adapter tensor ``u``: ``(4, *u.shape)``, the
        statistics ``(r, n^2, warm_weight, hold)`` expanded over ``u``'s shape. Its own layer, so its
        ``r`` is final here: it is written now (``update`` runs on slices, where the ``(rows, 1)``
        state is not laid out like them)."""
        dims = tuple(d for d, size in enumerate(r.shape) if size == 1)
        sq = torch.linalg.vector_norm(u, 2, dim=dims, keepdim=True, dtype=torch.float32).square()
        if self.args["lag"]:
            acc = b.state("sq_norm")[j]
            last = acc.clone()
            acc.copy_(sq)  # this step's norms, for the next step
            sq = last
        stats = torch.stack((r, sq, *(w.expand(r.shape) for w in weight)))
        r.copy_(_ema(r, sq.sqrt(), self.args["ema_alpha"]))
        value = stats.expand(4, *u.shape)
        if not u.is_contiguous() and flat_view(u) is not None:
            # dense in another memory order: lay the value out like the parameter (update slices that order)
            value = torch.empty_strided(value.shape, (u.numel(), *u.stride()), dtype=torch.float32,
                                        device=u.device).copy_(value)
        return value

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        b2min, b2max, alpha, tiny = hp["beta2_min"], hp["beta2_max"], hp["ema_alpha"], hp["tiny_spike"]
        sums: dict[Any, torch.Tensor] = {}
        owner: dict[Any, torch.Tensor] = {}
        for v, key in zip(values, layer_keys):
            v = _compact(v) if v.dim() > 1 else v  # an adapter's per-row / per-column statistics
            sums[key] = sums[key] + v[1] if key in sums else v[1]
            owner.setdefault(key, v)
        shapes = {key: v.shape[1:] for v, key in zip(values, layer_keys)}
        per_layer = {}
        for key, sq in sums.items():
            v = owner[key]
            n = sq.sqrt()
            r = _ema(v[0], n, alpha)
            ratio = n / (r + tiny)
            sun = ratio / (1 + ratio)
            target = b2max - (b2max - b2min) * sun
            beta2 = (1 - v[2]) * b2max + v[2] * target
            beta2 = torch.where(v[3] > 0, torch.full_like(beta2, 0.5 * (b2min + b2max)), beta2)
            per_layer[key] = (beta2.expand(shapes[key]), r.expand(shapes[key]))
        return {"beta2": [per_layer[k][0] for k in layer_keys], "r_new": [per_layer[k][1] for k in layer_keys]}

    def update(self, b: Any) -> None:
        beta2 = b.s("beta2")
        plain = [j for j, x in enumerate(beta2) if x.dim() == 0]
        if len(plain) == len(beta2):
            self._keep(b.state("r_ema"), b.s("r_new"), b.state("sq_norm") if self.args["lag"] else None, b.u)
            b.signals["beta2"] = beta2
            return
        if plain:  # adapters kept their r in reduce
            def pick(xs: list[Any]) -> list[Any]:
                return [xs[j] for j in plain]
            self._keep(pick(b.state("r_ema")), pick(b.s("r_new")),
                       pick(b.state("sq_norm")) if self.args["lag"] else None, pick(b.u))
        offsets = b.offsets if b.offsets is not None else [0] * len(beta2)
        b.signals["beta2"] = [x if x.dim() == 0 else _laid_out(x, u, off) for x, u, off in zip(beta2, b.u, offsets)]

    @staticmethod
    def _keep(r_ema: list[torch.Tensor], r_new: list[torch.Tensor], sq_norm: list[torch.Tensor] | None,
              u: list[torch.Tensor]) -> None:
        """Store the new ``r`` of per-tensor statistics and (``lag``) add this slice's ``||g||^2``."""
        torch._foreach_copy_(r_ema, r_new)
        if sq_norm is not None:  # this step's squared norms, for the next step (slices of a tensor add up)
            for acc, norm in zip(sq_norm, torch._foreach_norm(u, 2, dtype=torch.float32)):
                acc.add_(norm * norm)


kourkoutas_beta = KourkoutasBeta
