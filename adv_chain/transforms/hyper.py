"""Hyperparameter signals: transforms that compute a per-step hyperparameter for a later transform."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .._core import checks
from .._core.tags import ADAPTER_TAGS, param_tags
from .._core.transform import HParam, HostView, StateSpec, Transform

_LAYER_KEYS = ("tensor", "shape")
_WARMUPS = ("hold", "ramp")


class KourkoutasBeta(Transform):
    """Kourkoutas-beta (Kassinos, arXiv 2508.12996): a per-layer second-moment decay driven by
    gradient spikes, published as the ``beta2`` signal that the next :func:`scale_by_adam` uses::

        n = ||g||_layer ;  r = ema_alpha * r + (1 - ema_alpha) * n          (EMA first, then the ratio)
        sun = (n / (r + tiny_spike)) / (1 + n / (r + tiny_spike))          (in [0, 1))
        beta2 = beta2_max - (beta2_max - beta2_min) * sun

    A layer is one tensor (``layer_key="tensor"``, the paper's per-parameter default) or every
    tensor of the same shape (``"shape"``, adv_optm's default). ``warmup`` steps either hold
    ``(beta2_min + beta2_max) / 2`` (``warmup_mode="hold"``, the paper's) or blend linearly from
    ``beta2_max`` (``"ramp"``, adv_optm's). ``lag=True`` uses the previous step's norms, as adv_optm
    does (its first step is then ``beta2_max``). ``r`` is kept per tensor (``"kourkoutas/r_ema"``),
    identical across a layer, so checkpoints never alias. Adam keeps its static bias correction
    ``1 - beta2_max^t`` (adv_optm's choice). Fed by ``group["beta2_min"]``.

    Under gradient release (per-parameter steps) ``layer_key="tensor"`` stays exact; shape buckets
    need every tensor of the bucket first, so they use the previous round's layer statistics (one
    step lagged, on top of ``lag=True``'s own lag).

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
                 tiny_spike: float = 1e-9, warmup: int = 0, warmup_mode: str = "hold", layer_key: str = "tensor",
                 lag: bool = False, *, name: str | None = None) -> None:
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"{self.type_name}: warmup={warmup!r} must be an int >= 0 (steps)")
        beta2_max = checks.unit_interval(self.type_name, "beta2_max", beta2_max)
        super().__init__(name=name, beta2_min=beta2_min, beta2_max=beta2_max,
                         ema_alpha=checks.unit_interval(self.type_name, "ema_alpha", ema_alpha),
                         tiny_spike=checks.positive(self.type_name, "tiny_spike", tiny_spike), warmup=warmup,
                         warmup_mode=checks.choice(self.type_name, "warmup_mode", warmup_mode, _WARMUPS),
                         layer_key=checks.choice(self.type_name, "layer_key", layer_key, _LAYER_KEYS),
                         lag=checks.flag(self.type_name, "lag", lag))
        self.check_hparams(self.type_name, self.args)

    def check_hparams(self, owner: str, hp: Any) -> None:
        if not hp["beta2_min"] < hp["beta2_max"]:
            raise ValueError(f"{owner}: beta2_min={hp['beta2_min']} must be below beta2_max={hp['beta2_max']}")

    def state_specs(self, param: torch.Tensor, hp: dict[str, Any]) -> dict[str, StateSpec]:
        adapter = sorted(hp.get("tags", frozenset()) & ADAPTER_TAGS)
        if adapter:
            raise NotImplementedError(
                f"{self.type_name}: a parameter of shape {tuple(param.shape)} is tagged {adapter[0]!r}; adv_optm gives "
                "LoRA factors and OFT blocks one beta2 per rank/block row, which adv_chain does not implement yet: "
                "put adapter parameters in a param group of an optimizer without kourkoutas_beta")
        specs = {"r_ema": StateSpec(scalar=True)}
        if hp["lag"]:
            specs["sq_norm"] = StateSpec(scalar=True)  # ||g||^2 of the previous step, summed over slices
        return specs

    def layer_key(self, param: torch.Tensor, index: int, group: Mapping[str, Any]) -> Any:
        if self.args["layer_key"] != "shape" or "dora_scale" in param_tags(param, group):
            return index  # a DoRA scale is a layer of its own, as in adv_optm
        return tuple(param.shape)

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
        if self.args["lag"]:
            # last step's norms, accumulated by update() slice by slice: no pass over the gradients here
            sq_used = [x.clone() for x in b.state("sq_norm")]
            torch._foreach_zero_(b.state("sq_norm"))
        else:
            sq_used = torch._foreach_pow(torch._foreach_norm(b.u, 2, dtype=torch.float32), 2)
        weight = torch.tensor([b.s("warm_weight"), b.s("hold")], dtype=torch.float32)
        return [torch.cat((torch.stack((r, used)), weight.to(used.device))) for r, used in zip(r_old, sq_used)]

    def finalize(self, values: list[torch.Tensor], layer_keys: list[Any],
                 hp: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        b2min, b2max, alpha, tiny = hp["beta2_min"], hp["beta2_max"], hp["ema_alpha"], hp["tiny_spike"]
        sums: dict[Any, torch.Tensor] = {}
        owner: dict[Any, torch.Tensor] = {}
        for v, key in zip(values, layer_keys):
            sums[key] = sums[key] + v[1] if key in sums else v[1]
            owner.setdefault(key, v)
        per_layer = {}
        for key, sq in sums.items():
            v = owner[key]
            n = sq.sqrt()
            r = alpha * v[0] + (1 - alpha) * n
            ratio = n / (r + tiny)
            sun = ratio / (1 + ratio)
            target = b2max - (b2max - b2min) * sun
            beta2 = (1 - v[2]) * b2max + v[2] * target
            beta2 = torch.where(v[3] > 0, torch.full_like(beta2, 0.5 * (b2min + b2max)), beta2)
            per_layer[key] = (beta2, r)
        return {"beta2": [per_layer[k][0] for k in layer_keys], "r_new": [per_layer[k][1] for k in layer_keys]}

    def update(self, b: Any) -> None:
        torch._foreach_copy_(b.state("r_ema"), b.s("r_new"))
        if self.args["lag"]:  # this step's squared norms, for the next step (slices of a tensor add up)
            for acc, norm in zip(b.state("sq_norm"), torch._foreach_norm(b.u, 2, dtype=torch.float32)):
                acc.add_(norm * norm)
        b.signals["beta2"] = b.s("beta2")


kourkoutas_beta = KourkoutasBeta
