#!/usr/bin/env python
"""Where a split step's time goes: forward, backward and optimizer step, timed apart.

    python benchmarks/phases.py [--device cuda] [--batch 8] [--rounds 200]

``nn.Linear(1024, 4096)``, AdamW (foreach), unsplit against ``rows`` / ``cols`` / ``mask`` splits
(the ``step.py`` plans: their regions differ only in weight_decay, so they split with
``per_element_decay=False`` to measure the parts) and ``decay`` (the mask's weight decays as a
tensor, the weight kept whole: the decay layout), each variant on a fresh layer of its own
(``paramsplit.split`` registers plans for the parameters it is given). Each phase is bracketed by
``torch.cuda.synchronize()`` on CUDA; the variants are timed interleaved and each phase's median is
printed in ms, with the step's ratio to the unsplit one. paramsplit 0.3 runs no code of its own in
forward and backward: a split's whole cost is in ``opt step``, which includes paramsplit's
optimizer-step hooks (the gathers and scatters of ``cols`` / ``mask``, the per-element decay of
``decay``) and the optimizer's extra param groups and parts. On a GPU a small step is bound by
kernel launches, and every param group of AdamW launches its own kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import paramsplit


def _variants(device: torch.device) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    out = {}
    for kind in ("unsplit", "rows", "cols", "mask", "decay"):
        torch.manual_seed(0)
        layer = nn.Linear(1024, 4096)
        mask = torch.rand(4096, 1024, generator=torch.Generator().manual_seed(1)) < 0.5
        plan = {
            "rows": paramsplit.rows({(0, 2048): {"weight_decay": 0.01},
                                     (2048, None): {"weight_decay": 0.1}}),
            "cols": paramsplit.cols({(0, 512): {"weight_decay": 0.01},
                                     (512, None): {"weight_decay": 0.1}}),
            "mask": paramsplit.Regions(mask, {True: {"weight_decay": 0.01},
                                              False: {"weight_decay": 0.1}}),
            "decay": torch.where(mask, 0.01, 0.1),
        }.get(kind)
        if plan is None:
            layer.to(device)
            groups = list(layer.parameters())
        else:  # the same layer, unchanged
            layer, _ = paramsplit.split(layer, {"weight": plan},
                                        per_element_decay=kind == "decay")
            layer.to(device)
            groups = paramsplit.param_groups(layer)
        out[kind] = (layer, torch.optim.AdamW(groups, lr=1e-3, foreach=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = _variants(device)
    x = torch.randn(args.batch, 1024, device=device)
    y = torch.randn(args.batch, 4096, device=device)
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "backward": [], "step": []}
                                                for k in variants}
    warmup = min(5, args.rounds)
    for r in range(args.rounds + warmup):
        for name, (layer, opt) in variants.items():
            opt.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(layer(x), y)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            sync()
            t3 = time.perf_counter()
            if r >= warmup:
                for phase, dt in zip(("forward", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2)):
                    times[name][phase].append(dt * 1e3)
    base = sum(statistics.median(v) for v in times["unsplit"].values())
    print(f"phases of a step, nn.Linear(1024, 4096), batch {args.batch}, {device} "
          f"(median ms over {args.rounds} interleaved rounds)")
    print(f"{'variant':8} {'groups':>6} {'forward':>8} {'backward':>9} {'opt step':>9} "
          f"{'step':>7} {'x unsplit':>9}")
    for name, phases in times.items():
        med = {k: statistics.median(v) for k, v in phases.items()}
        total = sum(med.values())
        print(f"{name:8} {len(variants[name][1].param_groups):6d} {med['forward']:8.3f} "
              f"{med['backward']:9.3f} {med['step']:9.3f} {total:7.3f} {total / base:9.3f}")


if __name__ == "__main__":
    main()
