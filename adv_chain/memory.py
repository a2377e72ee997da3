"""``memory_report(opt)``: how many bytes an optimizer's state takes, by key and by transform."""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

#: bytes of state per parameter of fp32 AdamW (two fp32 moments): the report's yardstick
ADAMW_BYTES_PER_PARAM = 8


@dataclass
class MemoryReport:
    """State bytes of an optimizer. ``per_key`` maps ``"<transform>/<key>"`` to bytes summed over all
    parameters, ``per_transform`` the transform name to bytes; ``total`` is their sum (the per-param
    ``"step"`` counters are bookkeeping and not counted); ``params`` is the number of parameter
    elements of every param group; ``bytes_per_param = total / params``; ``ratio_to_adamw`` is
    ``total / (8 * params)``, the fraction of fp32 AdamW's two moments."""

    per_key: dict[str, int] = field(default_factory=dict)
    per_transform: dict[str, int] = field(default_factory=dict)
    total: int = 0
    params: int = 0

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.params if self.params else 0.0

    @property
    def ratio_to_adamw(self) -> float:
        return self.total / (ADAMW_BYTES_PER_PARAM * self.params) if self.params else 0.0

    def __str__(self) -> str:
        width = max([len(k) for k in self.per_key] + [len("total"), 12])
        lines = [f"{'state key':<{width}}  {'bytes':>14}  {'bytes/param':>11}"]

        def row(label: str, nbytes: int) -> str:
            per = nbytes / self.params if self.params else 0.0
            return f"{label:<{width}}  {nbytes:>14,}  {per:>11.4f}"

        lines += [row(k, v) for k, v in self.per_key.items()]
        lines.append("-" * len(lines[0]))
        lines += [row(f"[{k}]", v) for k, v in self.per_transform.items()]
        lines.append(row("total", self.total))
        lines.append(f"{self.params:,} parameters; {self.bytes_per_param:.4f} bytes/param = "
                     f"{self.ratio_to_adamw:.4f} x fp32 AdamW (8 bytes/param)")
        return "\n".join(lines)


def memory_report(opt: torch.optim.Optimizer) -> MemoryReport:
    """Bytes of every allocated state tensor of ``opt`` (state is allocated on a parameter's first
    step, or by ``opt.init_state()``).

    >>> import torch, adv_chain as ac
    >>> w = torch.nn.Parameter(torch.zeros(4, 8))
    >>> opt = ac.ChainOptimizer([w], "adamw")
    >>> opt.init_state()
    >>> r = ac.memory_report(opt)
    >>> r.total, r.params, r.ratio_to_adamw
    (256, 32, 1.0)
    """
    report = MemoryReport()
    seen: set[int] = set()
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            report.params += p.numel()
            for key, value in opt.state.get(p, {}).items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                nbytes = value.numel() * value.element_size()
                report.per_key[key] = report.per_key.get(key, 0) + nbytes
                tname = key.partition("/")[0] if "/" in key else key
                report.per_transform[tname] = report.per_transform.get(tname, 0) + nbytes
                report.total += nbytes
    return report


__all__ = ["MemoryReport", "memory_report"]
