"""Interleaved timing of several steps in one process, and the ratios taken from it.

Every step is warmed up first; then each round times one call of every step, the order rotating
from round to round, in whole rotations (every step equally often in every position) until the
budget is spent. Slow drifts of the machine (load, clocks, caches) hit every step alike, so the
ratio of medians is steadier than timings taken one after the other. The garbage collector is off
while timing. On CUDA, ``sync`` (``torch.cuda.synchronize``) runs before the clock starts and
before it stops.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def time_interleaved(steps: dict[str, Callable[[], None]], budget_s: float, min_rounds: int,
                     max_rounds: int, warmup: int = 2,
                     sync: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], int]:
    """``{name: [seconds per call, ...]}`` and the number of rounds."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    if sync is not None:
        sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    rounds = 0
    t_start = time.perf_counter()
    try:
        while rounds < max_rounds:
            k = rounds % len(names)
            for n in names[k:] + names[:k]:
                step = steps[n]
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                step()
                if sync is not None:
                    sync()
                samples[n].append(time.perf_counter() - t0)
            rounds += 1
            if (rounds % len(names) == 0 and rounds >= min_rounds
                    and time.perf_counter() - t_start >= budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, rounds


def ratios(samples: dict[str, list[float]], name: str, ref: str) -> dict[str, float]:
    """``name`` against ``ref``: median / median (the figure), min / min, and the quartiles of
    the per-round paired ratio (noise)."""
    a, b = samples[name], samples[ref]
    paired = [x / y for x, y in zip(a, b)]
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    return {"ratio": statistics.median(a) / statistics.median(b), "min": min(a) / min(b),
            "q1": q[0], "q3": q[2]}
