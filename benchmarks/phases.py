#!/usr/bin/env python
"""Where a split step's time goes: forward + backward, and the optimizer step, timed apart.

    python benchmarks/phases.py [--device cuda] [--models linear] [--adamw fused]
                                [--variants baseline,rows,...] [--batch 8] [--rounds 50] [--quick]

The models, variants and steps are ``step.py``'s (``_cases``, ``_variants``): each table named by
``--models`` (default ``linear``; ``gpt124m`` is GPT-2 124M, one table per AdamW implementation,
``--adamw`` picks one) is built variant by variant, then every variant is timed in interleaved
rounds, three readings per step:

* ``fwd+bwd``: ``zero_grad`` + forward + loss + backward, bracketed by synchronisations;
* ``update (host)``: ``optimizer.step()`` (with a floor's copies around it) from its call to its
  return, the device idle at the call: on a GPU the time the host takes to issue the step's
  kernels, which is what paramsplit's step hooks and the optimizer's extra parts add to a
  host-bound step;
* ``update``: the same until the device is done (a synchronisation).

paramsplit 0.3 runs no code of its own in forward and backward: a split's whole cost is in the
update, which holds paramsplit's optimizer-step hooks (the gathers and scatters of ``cols`` /
``mask``, the per-element decay of ``decay``) and the optimizer's extra param groups and parts.
Medians in ms over ``--rounds`` rounds (after 3 warm-up rounds), with the step's ratio to the
table's reference (``step.py``'s: the unsplit model); ``groups``: the param groups of the
variant's optimizer (a split adds one per distinct region options). On the CPU the
synchronisations are no-ops and ``update (host)`` is ``update``. Threads: ``--threads``, else
one under ``--quick`` or in a table with its own (``many``), else torch's default; the header
gives them and the load average before and after (other work on the machine skews CPU figures).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cases import FULL_CASES, QUICK_CASES  # noqa: E402
from _variants import GROUPS, REFERENCE, build  # noqa: E402

COLUMNS = ("fwd+bwd", "update (host)", "update")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="linear", help="comma-separated step.py tables")
    ap.add_argument("--adamw", default=None, help="gpt124m: fused or foreach (default: both)")
    ap.add_argument("--variants", default=None, help="comma-separated (default: the table's)")
    ap.add_argument("--batch", type=int, default=None, help="default: the table's first")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="step.py's small tables")
    ap.add_argument("--profile", default=None,
                    help="comma-separated variants whose updates cProfile then profiles "
                    "(20 updates each; the top 12 functions by own time)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: 1 with --quick or in many, else torch's)")
    return ap.parse_args(argv)


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES)
             if c.kind in args.models.split(",") and args.adamw in (None, c.adamw)]
    default_threads = torch.get_num_threads()
    for case in cases:
        torch.set_num_threads(args.threads or case.threads or (1 if args.quick else
                                                               default_threads))
        load = _load()
        variants = args.variants.split(",") if args.variants else list(GROUPS[case.kind])
        batch = args.batch or case.batches[0]
        runners = {v: build(case, v, batch, device) for v in variants}
        times: dict[str, dict[str, list[float]]] = {v: {c: [] for c in COLUMNS} for v in variants}
        warmup = 3
        for r in range(args.rounds + warmup):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                runner = runners[v]
                assert runner.forward_backward is not None and runner.update is not None
                gc.disable()
                sync()
                t0 = time.perf_counter()
                runner.forward_backward()
                sync()
                t1 = time.perf_counter()
                runner.update()
                t2 = time.perf_counter()
                sync()
                t3 = time.perf_counter()
                gc.enable()
                if r >= warmup:
                    for c, dt in zip(COLUMNS, (t1 - t0, t2 - t1, t3 - t1)):
                        times[v][c].append(dt * 1e3)
        med = {v: {c: statistics.median(x) for c, x in t.items()} for v, t in times.items()}
        ref = REFERENCE[case.kind] if REFERENCE[case.kind] in med else variants[0]
        base = med[ref]["fwd+bwd"] + med[ref]["update"]
        print(f"phases of a step, {case.label()}, batch {batch}, {device} (median ms over "
              f"{args.rounds} interleaved rounds; x: the step over {ref}'s; torch threads "
              f"{torch.get_num_threads()}, load average {load} -> {_load()})")
        print(f"{'variant':12} {'groups':>6} {'fwd+bwd':>8} {'update (host)':>13} "
              f"{'update':>8} {'step':>8} {'x':>6}")
        for v, m in med.items():
            step = m["fwd+bwd"] + m["update"]
            groups = len(runners[v].prepared.groups)
            print(f"{v:12} {groups:6d} {m['fwd+bwd']:8.3f} {m['update (host)']:13.3f} "
                  f"{m['update']:8.3f} {step:8.3f} {step / base:6.3f}")
        for v in (args.profile.split(",") if args.profile else []):
            _profile(runners[v], v, sync)
        del runners
        gc.collect()


def _profile(runner: Any, variant: str, sync: Any) -> None:
    """cProfile of 20 updates of ``runner`` (after its forward and backward, untimed)."""
    profile = cProfile.Profile()
    for _ in range(20):
        runner.forward_backward()
        sync()
        profile.enable()
        runner.update()
        sync()
        profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
    body = out.getvalue()
    print(f"profile of 20 updates of {variant}:")
    print(body[body.find("ncalls"):].rstrip())


if __name__ == "__main__":
    main()
