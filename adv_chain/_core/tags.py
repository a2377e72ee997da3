"""Parameter tags: what kind of tensor a parameter is (a LoRA factor, an OFT block, a DoRA scale...).

Some transforms treat such parameters differently, as adv_optm does (spec §7.7): centered weight decay
skips LoRA factors and OFT blocks, Kourkoutas-β gives each of them its own layer, the iterative
OrthoGrad treats DoRA scales as vectors. Tags come from one place, :func:`param_tags`, read once per
parameter when its state is created:

* attributes on the tensor, as the hosts that use adv_optm set them (OneTrainer, PEFT patches):
  ``p._is_lora_A``, ``p._is_lora_B``, ``p._is_oft``, ``p._is_dora_scale``, ``p.is_vector`` (true
  values tag the parameter) and ``p.is_hidden = False`` (untags the default ``hidden``);
* a param group's ``"tags"`` entry, for every parameter of the group: a collection of tag names
  (``{"params": lora_a, "tags": ["lora_A"]}``) or a mapping name -> bool, which wins over attributes.

Transforms see them as ``hp["tags"]`` (a frozenset of names) in ``state_specs`` and
``host_scalars``; parameters with different tags never share a bucket. A partition
(:func:`adv_chain.partition`) adds its route as a tag ``"<partition name>=<route>"``
(:func:`route_tags`), decided once per parameter.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(4, 8))
>>> p._is_lora_A = True
>>> sorted(param_tags(p, {"tags": {"hidden": False}}))
['lora_A']
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .transform import Transform

#: tag name -> the tensor attribute adv_optm's hosts set
TAG_ATTRIBUTES = {"lora_A": "_is_lora_A", "lora_B": "_is_lora_B", "oft": "_is_oft",
                  "dora_scale": "_is_dora_scale", "vector": "is_vector", "hidden": "is_hidden"}
#: tags a parameter has unless told otherwise (adv_optm: ``getattr(p, "is_hidden", True)``)
DEFAULT_TAGS = frozenset({"hidden"})
#: parameters that are factors of an adapter rather than weights of their own
ADAPTER_TAGS = frozenset({"lora_A", "lora_B", "oft"})


def param_tags(p: torch.Tensor, group: Mapping[str, Any] | None = None) -> frozenset[str]:
    """The tag names of parameter ``p`` in ``group`` (see the module docstring)."""
    tags = set(DEFAULT_TAGS)
    for name, attr in TAG_ATTRIBUTES.items():
        value = getattr(p, attr, None)
        if value is not None:
            (tags.add if bool(value) else tags.discard)(name)
    given = None if group is None else group.get("tags")
    if given is not None:
        if isinstance(given, str) or not isinstance(given, (Mapping, list, tuple, set, frozenset)):
            raise ValueError(f"param group 'tags'={given!r} must be a list of tag names or a mapping name -> bool; "
                             f"tags: {sorted(TAG_ATTRIBUTES)}")
        items = given.items() if isinstance(given, Mapping) else ((name, True) for name in given)
        for name, value in items:
            if name not in TAG_ATTRIBUTES:
                raise ValueError(f"param group 'tags': unknown tag {name!r}; tags: {sorted(TAG_ATTRIBUTES)}")
            (tags.add if bool(value) else tags.discard)(name)
    return frozenset(tags)


def oft_scale_factor(p: torch.Tensor) -> float:
    """adv_optm's ``_oft_scale_factor`` of an OFT block parameter (1.0 when absent)."""
    return float(getattr(p, "_oft_scale_factor", 1.0))


def with_tags(hps: Mapping[str, Mapping[str, Any]], tags: frozenset[str]) -> dict[str, dict[str, Any]]:
    """Every transform's resolved hyperparameters with ``"tags"`` added."""
    return {name: {**hp, "tags": tags} for name, hp in hps.items()}


def route_tags(opt: Any, p: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
    """The tags the chain's transforms decide for ``p`` (:meth:`Transform.route_tags`, e.g. a
    partition's route), with the parameter's name when the optimizer got ``named_parameters()``
    (torch keeps them in ``group["param_names"]``)."""
    deciders = [t for t in opt.chain.all_transforms if type(t).route_tags is not Transform.route_tags]
    if not deciders:
        return frozenset()
    names = opt.__dict__.setdefault("_param_names", {})
    if p not in names and "param_names" in group:
        names.update(zip(group["params"], group["param_names"]))
    name = names.get(p)
    index = opt._param_index.get(p, "?")
    where = (f"parameter {name!r}" if name is not None else
             f"parameter {index} (shape {tuple(p.shape)}; pass model.named_parameters() to name it)")
    out: frozenset[str] = frozenset()
    for t in deciders:
        out |= t.route_tags(p, group, name, where)
    return out
