"""Reusable work buffers for the state codecs and wrappers (:mod:`adv_chain.transforms.state_codecs`,
:mod:`adv_chain.transforms.low_precision`, :mod:`adv_chain.transforms.state_slices`)."""
from __future__ import annotations

import threading
from typing import Any

import torch


class Scratch:
    """Reusable work buffers (one per name, grown as needed): an op writing into memory that is
    still in cache costs a fraction of one writing a fresh allocation (and a fresh allocation of a
    few MB costs page faults). :func:`scratch` keeps one per thread; a buffer handed on (to the
    direction) is :meth:`drop`-ped."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}
        self._names: dict[int, str] = {}  # storage address -> buffer name (for :meth:`holds`)

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            self.drop(name, dtype, device)
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
            self._names[buf.untyped_storage().data_ptr()] = name
        return buf if buf.numel() == n else buf[:n]  # (no slicing op when the size is the buffer's)

    def drop(self, name: str, dtype: torch.dtype, device: torch.device) -> None:
        buf = self._bufs.pop((name, dtype, device), None)
        if buf is not None:
            self._names.pop(buf.untyped_storage().data_ptr(), None)

    def holds(self, prefix: str, x: torch.Tensor) -> bool:
        """Whether ``x`` lies in one of this pool's buffers named ``prefix...``."""
        ptr = x.untyped_storage().data_ptr()
        if ptr:  # one lookup (two live buffers never share an address)
            name = self._names.get(ptr)
            return name is not None and name.startswith(prefix)
        return any(name.startswith(prefix) and buf.untyped_storage().data_ptr() == ptr
                   for (name, _, _), buf in self._bufs.items())


_LOCAL = threading.local()


def scratch() -> Scratch:
    """This thread's work buffers (a few MB at most: slices, never whole tensors)."""
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = Scratch()
    return s
