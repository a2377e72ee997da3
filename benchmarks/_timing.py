"""Alternating-pair timing of a function against a baseline in the same process.

Timing the row and the baseline back to back, and swapping which goes first
on every pair, makes slow drift (thermal state, other load on the machine,
allocator growth) hit both sides equally; the per-pair ratio then cancels it.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairTiming:
    row_ms: float          # median over pairs
    baseline_ms: float     # median over pairs
    ratio_median: float    # median of per-pair row / baseline
    ratio_p25: float
    ratio_p75: float


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in seconds."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def settle_allocator(nbytes: int = 30 << 20) -> None:
    """Put the CPU allocator in the state a training loop keeps it in.

    glibc's malloc serves blocks above its mmap threshold (128 KB at start-up)
    with fresh pages, and raises that threshold, and the heap's trim threshold
    to twice it, to the size of any such block that is freed (up to 32 MB). In a
    training loop the backward pass frees activations of many MB every step, so
    by the optimizer's step a step's same-sized temporaries are recycled from
    the heap. A benchmark that builds its parameters and gradients once and
    never frees a large block keeps the start-up thresholds; a step's
    temporaries can then be returned to the OS and faulted in again, 4 KB at a
    time, on every step (measured on gpt27m: 0 against 2.5K-50K minor faults per
    step, varying from run to run, and grams' ratio 1.25x against 1.4-3.1x).
    Allocating and freeing one 30 MB block, as a backward pass does, removes
    that noise from every library alike. Harmless where malloc is not glibc's.
    """
    block = torch.empty(nbytes // 4)
    block.fill_(0.0)  # touch it (a block that is never written may never be mapped at all)
    del block


def time_alternating_pairs(baseline: Callable[[], object], row: Callable[[], object], *,
                           pairs: int, warmup: int, device: torch.device,
                           extra_row_warmup: int = 0) -> PairTiming:
    """Time ``pairs`` (baseline, row) pairs after warm-up; needs ``pairs >= 2``.

    ``extra_row_warmup`` adds warm-up calls of ``row`` only, e.g. to let
    ``torch.compile`` finish compiling before timing starts. The allocator is
    settled first (:func:`settle_allocator`).
    """
    settle_allocator()
    for _ in range(warmup):
        baseline()
    for _ in range(warmup + extra_row_warmup):
        row()
    baseline_s, row_s = [], []
    for pair in range(pairs):
        if pair % 2 == 0:
            baseline_s.append(time_once(baseline, device))
            row_s.append(time_once(row, device))
        else:
            row_s.append(time_once(row, device))
            baseline_s.append(time_once(baseline, device))
    ratios = [r / b for r, b in zip(row_s, baseline_s)]
    p25, median, p75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return PairTiming(row_ms=1e3 * statistics.median(row_s),
                      baseline_ms=1e3 * statistics.median(baseline_s),
                      ratio_median=median, ratio_p25=p25, ratio_p75=p75)
