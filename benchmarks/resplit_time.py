#!/usr/bin/env python
"""Cost of ``paramsplit.resplit`` on a 124M-parameter GPT-2 (CPU), against a training step.

Usage::

    python benchmarks/resplit_time.py [--repeats 3] [--threads N] [--json out.json] [--profile]
    python benchmarks/resplit_time.py --quick     # smoke run: a 2-layer GPT-2, fewer repeats

The model is ``GPT2LMHeadModel(GPT2Config())`` (n_layer=12, n_embd=768, vocab 50257; random
weights, nothing is downloaded). Every block weight (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj`` of the 12 layers: 48 weights, 85M elements) is split with a random
5% mask: ``Regions(mask, {True: {"weight_decay": 0.0}, False: FROZEN})`` (the ``sparse``
layout); AdamW over paramsplit's groups.

Measured, after a warm-up:

* one training step: forward, backward, ``optimizer.step()``, ``zero_grad()`` on one batch of
  random tokens (default 1 x 128), median of ``--steps``;
* one RigL-style update of all 48 weights that changes a share ``f`` of the trained elements
  (``f`` in 1%, 10%, 20%, 50%): drop the ``f`` smallest-magnitude trained elements and grow as
  many FROZEN ones by gradient magnitude (the new masks: ``masks_s``), then one
  ``paramsplit.resplit(opt, model, spec)`` of all 48 weights (``resplit_s``). Each sample is
  taken right after a training step (its gradient feeds the grow), with the optimizer state of
  the steps before it; median of ``--repeats``.

The claim checked: "a RigL update every 100 steps costs under 1% of training time", that is
``(masks_s + resplit_s) / (100 * step_s + masks_s + resplit_s) < 1%``, at the 20% drop rate of
``examples/rigl.py`` (the verdict for every ``f`` is printed too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

FRACTIONS = (0.01, 0.10, 0.20, 0.50)
CLAIM_FRACTION = 0.20
EVERY = 100  # steps between two updates, in the claim
TARGET = 0.01
DENSITY = 0.05
BLOCK_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
QUICK_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 64}


def _masks_after(weights: dict[str, Any], masks: dict[str, Any], fraction: float) -> dict:
    """Drop ``fraction`` of each weight's trained elements (smallest magnitude), grow as many
    FROZEN ones (largest gradient magnitude)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, mask in masks.items():
            w = weights[name]
            flat = mask.flatten()
            k = max(1, int(fraction * int(flat.sum())))
            new = flat.clone()
            new[w.detach().abs().flatten().masked_fill(~flat, math.inf)
                .topk(k, largest=False).indices] = False
            new[w.grad.abs().flatten().masked_fill(flat, -math.inf).topk(k).indices] = True
            out[name] = new.view_as(mask)
    return out


def measure(quick: bool, repeats: int, steps: int, batch: int, seq: int,
            threads: int | None, profile: bool = False) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import paramsplit
    from paramsplit import FROZEN, Regions

    saved_threads, rng = torch.get_num_threads(), torch.get_rng_state()
    verbosity = transformers.logging.get_verbosity()  # restored: --quick runs in its caller
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        config = GPT2Config(**QUICK_CONFIG) if quick else GPT2Config()
        model = GPT2LMHeadModel(config)
        weights = {f"transformer.h.{i}.{w}": block.get_submodule(w).weight
                   for i, block in enumerate(model.transformer.h) for w in BLOCK_WEIGHTS}
        g = torch.Generator().manual_seed(1)
        masks = {n: torch.rand(w.shape, generator=g) < DENSITY for n, w in weights.items()}

        def spec(ms: dict[str, Any]) -> dict[str, Any]:
            return {n: Regions(m, {True: {"weight_decay": 0.0}, False: FROZEN})
                    for n, m in ms.items()}

        t0 = time.perf_counter()
        model, groups = paramsplit.split(model, spec(masks))
        split_s = time.perf_counter() - t0
        layouts = sorted({line.split()[-1] for line in
                          paramsplit.describe(model).splitlines()[1:]})
        opt = torch.optim.AdamW(groups, lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (batch, seq),
                            generator=torch.Generator().manual_seed(2))

        def step(zero: bool = True) -> float:
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            opt.step()
            if zero:
                opt.zero_grad()
            return time.perf_counter() - start

        for _ in range(2):  # warm-up: lazy initialisation, optimizer state
            step()
        step_samples = [step() for _ in range(steps)]
        step_s = statistics.median(step_samples)

        trained = sum(int(m.sum()) for m in masks.values())
        rows = []
        profiler = None
        for fraction in FRACTIONS:
            resplit_samples, mask_samples, changed = [], [], 0
            for _ in range(repeats):
                step(zero=False)  # the gradient the grow reads
                t0 = time.perf_counter()
                new = _masks_after(weights, masks, fraction)
                t1 = time.perf_counter()
                if profile and fraction == CLAIM_FRACTION and profiler is None:
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
                    paramsplit.resplit(opt, model, spec(new))
                    profiler.disable()
                else:
                    paramsplit.resplit(opt, model, spec(new))
                t2 = time.perf_counter()
                opt.zero_grad()
                changed = sum(int((new[n] & ~masks[n]).sum()) for n in masks)
                assert all(int(new[n].sum()) == int(masks[n].sum()) for n in masks)
                masks = new
                mask_samples.append(t1 - t0)
                resplit_samples.append(t2 - t1)
            resplit_s = statistics.median(resplit_samples)
            masks_s = statistics.median(mask_samples)
            update_s = resplit_s + masks_s
            share = update_s / (EVERY * step_s + update_s)
            resplit_share = resplit_s / (EVERY * step_s + resplit_s)
            rows.append({"fraction": fraction, "changed_elements": changed,
                         "resplit_s": resplit_s, "resplit_samples": resplit_samples,
                         "masks_s": masks_s, "masks_samples": mask_samples,
                         "resplit_over_step": resplit_s / step_s,
                         "update_over_step": update_s / step_s,
                         "share_every_100": share, "resplit_share_every_100": resplit_share,
                         "ok": share < TARGET, "resplit_ok": resplit_share < TARGET})
        step()  # the optimizer still steps after every resplit
        after = sorted({line.split()[-1] for line in
                        paramsplit.describe(model).splitlines()[1:]})
        out: dict[str, Any] = {
            "quick": quick, "config": QUICK_CONFIG if quick else "GPT2Config()",
            "n_params": sum(p.numel() for p in model.parameters()),
            "split_weights": len(weights),
            "split_elements": sum(w.numel() for w in weights.values()),
            "trained_elements": trained, "layouts": layouts, "layouts_after": after,
            "batch": batch, "seq": seq, "threads": torch.get_num_threads(),
            "split_s": split_s, "step_s": step_s, "step_samples": step_samples,
            "fractions": rows, "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        if profiler is not None:
            import io
            import pstats

            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
            out["profile"] = buf.getvalue()
        return out
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(rng)
        transformers.logging.set_verbosity(verbosity)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a 2-layer GPT-2 (n_embd 64), 2 repeats, batch 1 x 32")
    ap.add_argument("--repeats", type=int, default=None,
                    help="resplits per changed share (default 3; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed training steps (default 5; --quick: 3)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="tokens a sequence (default 128; "
                                                           "--quick: 32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one resplit at the 20%% share; print where its time goes")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    steps = args.steps or (3 if args.quick else 5)
    seq = args.seq or (32 if args.quick else 128)

    t_start = time.perf_counter()
    r = measure(args.quick, repeats, steps, args.batch, seq, args.threads, args.profile)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    model = (f"a small GPT-2 {QUICK_CONFIG} (--quick: smoke test only)" if args.quick
             else "GPT-2 124M (GPT2Config() defaults)")
    lines = [
        f"paramsplit.resplit on {model}, CPU",
        f"machine: {os.cpu_count()} CPUs, torch threads {r['threads']}"
        f" ({'set by --threads' if args.threads else 'default'}), torch {r['torch']}, "
        f"transformers {r['transformers']}, python {platform.python_version()}, load average "
        + "/".join(f"{x:.1f}" for x in load),
        f"model: {r['n_params'] / 1e6:.1f}M parameters; {r['split_weights']} block weights "
        f"({r['split_elements'] / 1e6:.1f}M elements) split with a random {DENSITY:.0%} mask: "
        f"{r['trained_elements']} trained elements, layout {','.join(r['layouts'])} "
        f"(after the resplits: {','.join(r['layouts_after'])}); split took {r['split_s']:.2f} s",
        f"training step (batch {r['batch']} x {r['seq']}, AdamW): median "
        f"{r['step_s'] * 1e3:.1f} ms of " + " ".join(f"{t * 1e3:.0f}" for t in r["step_samples"]),
        f"one update of all {r['split_weights']} weights, median of {repeats}:",
        "",
    ]
    table = [("changed", "elements", "new masks", "resplit", "resplit/step", "update/step",
              f"every {EVERY} steps: resplit", "update (masks+resplit)")]
    for f in r["fractions"]:
        table.append((f"{f['fraction']:.0%}", str(f["changed_elements"]),
                      f"{f['masks_s'] * 1e3:.1f} ms", f"{f['resplit_s'] * 1e3:.1f} ms",
                      f"{f['resplit_over_step']:.2f}x", f"{f['update_over_step']:.2f}x",
                      f"{f['resplit_share_every_100']:.2%} "
                      f"{'OK' if f['resplit_ok'] else 'MISS'}",
                      f"{f['share_every_100']:.2%} {'OK' if f['ok'] else 'MISS'}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    first, last = r["fractions"][0], r["fractions"][-1]
    claim = next(f for f in r["fractions"] if f["fraction"] == CLAIM_FRACTION)
    verdict = "holds" if claim["ok"] else "does NOT hold"
    alone = "holds" if claim["resplit_ok"] else "does NOT hold"
    # share < TARGET  <=>  step_s > update_s * (1 - TARGET) / (EVERY * TARGET)
    even = (1 - TARGET) / (EVERY * TARGET)
    lines += [
        "",
        f"growth with the changed elements: resplit at {last['changed_elements']} changed "
        f"({last['fraction']:.0%}) / at {first['changed_elements']} ({first['fraction']:.0%}): "
        f"{last['resplit_s'] / first['resplit_s']:.2f}x for "
        f"{last['changed_elements'] / max(1, first['changed_elements']):.0f}x the elements",
        f"claim 'a RigL update every {EVERY} steps costs under {TARGET:.0%} of training time' "
        f"({CLAIM_FRACTION:.0%} of the trained elements changed): {verdict} here with the new "
        f"masks included ({claim['share_every_100']:.2%}); for resplit alone it {alone} "
        f"({claim['resplit_share_every_100']:.2%})",
        f"break-even: the claim holds once a training step takes more than "
        f"{(claim['masks_s'] + claim['resplit_s']) * even * 1e3:.0f} ms (update included) or "
        f"{claim['resplit_s'] * even * 1e3:.0f} ms (resplit alone); this step: "
        f"{r['step_s'] * 1e3:.0f} ms",
    ]
    if "profile" in r:
        lines += ["", "cProfile of one resplit (20% changed):", r["profile"]]
    lines.append(f"total wall time {time.perf_counter() - t_start:.1f} s")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**r, "repeats": repeats, "load_average": load, "every": EVERY,
                       "target": TARGET, "claim_fraction": CLAIM_FRACTION,
                       "claim_holds": claim["ok"], "claim_holds_resplit_alone":
                       claim["resplit_ok"]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
