#!/usr/bin/env python
"""Step time and peak memory of paramsplit's layouts, each next to its floor.

Usage::

    python benchmarks/step.py                  # full run on the CPU (several minutes on 2 cores)
    python benchmarks/step.py --quick          # smoke run: tiny models, one rotation
    python benchmarks/step.py --device cuda    # the same tables on CUDA
    python benchmarks/step.py --models linear --json out.json   # raw numbers, every sample
    python benchmarks/step.py --models sparse --threads 2       # the sparse fine-tuning table
    python benchmarks/step.py --models many    # 48 small weights: the per-weight overhead

Tables (``_cases``): ``nn.Linear(1024, 4096)`` at batch 8/128/2048; a GPT-2 (2 layers, n_embd 256,
every 2-D weight of the blocks split) at batch 8/128/2048; ``generate``: a GPT-2 (2 layers,
n_embd 128, vocab 1000, every 2-D weight of the blocks split by a random 50% mask) timing
``model.generate(input_ids, max_new_tokens=32, do_sample=False)``; ``sparse``: sparse
fine-tuning (project issue 12) of the ``nn.Linear(1024, 4096)`` at batch 8/128/2048; and
``many``: a 12-layer GPT-2 with n_embd 64 (n_head 4, n_positions 64, vocab 1000), batch 2 x 32
tokens, one torch thread, its 48 block weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``) split. The GPT-2 tables need ``transformers``; without it they are skipped with
a note.

paramsplit 0.3 leaves the model as it is (``split`` returns the model itself) and steps parts of
each split weight in the optimizer; optimizer-step hooks copy values and gradients between the
weight and the parts once per step. Every variant builds its own fresh model (``split`` registers
plans for the parameters it is given, so a model is never shared between variants), from the
same initial weights; a step is ``zero_grad(set_to_none=True)`` + forward + loss + backward +
``AdamW.step`` (AdamW's default implementation: on the CPU, its for-loop one).

Variants (``_variants``, ``_floors``):

* ``baseline``     the unsplit model; also rows' floor.
* ``rows``         ``paramsplit.rows``, 2 row blocks (weight_decay 0.01 / 0.1); its parts are
                   views of the weight, so its floor is the unsplit step.
* ``cols_floor``   the unsplit step + 3 weight-sized copies per step: the trained columns'
                   values into dense buffers and their gradient before ``AdamW.step``, the values
                   back into the weight after it.
* ``cols``         ``paramsplit.cols``, 2 column blocks; floor: ``cols_floor``.
* ``forum``        (Linear only) the forum question's ``mask[:, :5] = 1`` scaled to the Linear:
                   ``mask[:, :512] = 1`` as ``paramsplit.Regions`` with two weight-decay options;
                   its regions are two column blocks, so its floor is ``cols_floor``.
* ``mask_floor``   the unsplit step + ``index_select`` of the values, ``index_select`` of the
                   gradient (before ``AdamW.step``) and ``index_copy_`` of the values back (after
                   it), with the int64 permutation that sorts the elements by the ``mask``
                   variant's random 50% mask.
* ``mask``         ``paramsplit.Regions``, a random 50% mask; floor: ``mask_floor``.
* ``penalty``      the forum answer: masked L2 penalty on the loss (not exact AdamW decay).
* ``hooks``        gradient hooks zeroing the frozen half of each gradient.
* ``parametrize``  ``torch.nn.utils.parametrize``: ``cat`` of two row blocks.

The ``generate`` table has ``baseline`` and ``mask``: 0.3 runs no paramsplit code in the forward,
so the mask split's floor there is the unsplit model.

The ``sparse`` table has variants of its own, every ratio over ``full_ft``; a random bool mask
(fixed seed) picks 1% or 10% of the weight to train (``weight_decay`` 0.01), the rest is frozen:

* ``full_ft``          full fine-tuning: the unsplit layer, AdamW over all of it (the reference).
* ``sparse_1/10``      ``paramsplit.split(layer, {"weight": Regions(mask, {True: {...}, False:
                       FROZEN})})``: paramsplit picks its ``sparse`` layout by itself (the
                       ``layout`` column and JSON field: from ``paramsplit.describe``).
* ``hooks_1/10``       the unsplit layer, ``weight.register_hook(lambda g: g * mask)``, AdamW over
                       all of it (inexact: decay and the moments still move frozen elements).
* ``shira``            PEFT's SHiRA, ``ShiraConfig(r=8)`` with its default random mask (0.98% of
                       the weight) on the Linear in a wrapper module, AdamW over the PEFT model's
                       trainable parameters; needs ``peft`` >= 0.17, else skipped with a note.

(0.2's ``sparse_mask_1/10`` column, the same spec forced onto the gather layout, is gone: in 0.3
``sparse`` and ``mask`` are one mechanism.)

The ``many`` table: ``baseline`` (unsplit, also full fine-tuning), ``rows``, ``cols``, ``mask``
(random 50%), ``sparse_1`` (a random 1% of every weight trained, the rest FROZEN), ``penalty`` and
``hooks``, every ratio over the unsplit step; split weights get weight_decay 0.01 / 0.1.

Targets: each split (rows, cols, forum, mask) within 1.10x of its floor's step time, and its
peak memory within 1.05x of its floor's; in the sparse table, ``sparse_1`` at most 0.50x
``full_ft``'s step time at batch 8 and faster than ``shira`` at every batch, and the sparse_*
variants on the sparse layout; in the many table, ``rows`` at most 1.02x the unsplit step and
``cols``, ``mask``, ``sparse_1`` at most 1.05x, each on its layout. Misses are listed at the end
("targets missed").

Time (``_timing``): all variants of one table are built, warmed up (2 steps each) and timed
interleaved in this process, the order rotating every round, in whole rotations until
``--budget`` seconds have passed; figures are ratios of medians (x unsplit, x floor), with the
quartiles of the per-round paired ratio as a noise indicator. On CUDA every step is bracketed by
``torch.cuda.synchronize()``. ``--quick`` runs one rotation, 1 thread unless ``--threads``; a
table with threads of its own (``many``: 1) runs with those.

Memory (``_memory``): every (table, variant) is built and stepped twice in a fresh process; the
figure is the peak over the memory in use before the build (CPU: RSS with glibc's mmap threshold
pinned low; CUDA: ``torch.cuda.max_memory_allocated``). ``--quick`` measures every table in one
process, concurrently with the timing. ``--no-memory`` skips it.

Report (``_report``): one table per model, misses at the end; ``--json PATH`` (default
``benchmarks/results.json``) gets every record with all samples.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, one rotation (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"),
                    help="where to write every record (default: benchmarks/results.json)")
    ap.add_argument("--models", default="linear,gpt2,generate,sparse,many",
                    help="comma-separated tables: linear,gpt2,generate,sparse,many")
    ap.add_argument("--batches", default=None, help="comma-separated subset of the batches")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed rounds per table and batch (default 35; CUDA 10)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; --quick: 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    return ap.parse_args(argv)


def _check_device(device: str) -> str | None:
    """Why ``device`` cannot be benchmarked here, or None."""
    import torch

    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"--device {device}: only cpu and cuda are supported"
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device {device}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, {built}); run without --device for the CPU tables")
    return None


def _progress(t0: float, what: str) -> None:
    print(f"[step {time.perf_counter() - t0:6.1f}s] {what} ...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    t0 = time.perf_counter()
    problem = _check_device(args.device)
    if problem:
        print(f"step.py: {problem}", file=sys.stderr)
        return 2

    import torch

    from _cases import FULL_CASES, QUICK_CASES, have_peft, have_transformers, preload
    from _memory import Probe
    from _report import MEM_TARGET, TIME_TARGET, machine_info, record, render
    from _timing import time_interleaved
    from _variants import GROUPS, VARIANTS, build

    wanted = args.models.split(",")
    cases, skipped = [], []
    for c in QUICK_CASES if args.quick else FULL_CASES:
        if c.kind not in wanted:
            continue
        if c.needs_transformers and not have_transformers():
            skipped.append({"label": c.label(), "reason": "transformers is not installed"})
        else:
            cases.append(c)
            if c.kind == "sparse" and not have_peft():
                skipped.append({"label": f"shira in {c.label()}",
                                "reason": "peft (>= 0.17, with SHiRA) is not installed"})
    preload(cases)
    probe = None if args.no_memory else Probe(args.device)  # forks here, before tensor work
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    run_threads = torch.get_num_threads()  # a table without threads of its own runs with these
    cuda = args.device.startswith("cuda")
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 10.0 if cuda
                                                           else 35.0)
    if cuda and torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))
    sync = torch.cuda.synchronize if cuda else None

    def batches_of(case: Any) -> list[int]:
        if args.batches is None:
            return list(case.batches)
        return [b for b in case.batches if str(b) in args.batches.split(",")]

    def jobs(case: Any) -> list[dict[str, Any]]:
        base = {"case": case.to_json(), "batches": batches_of(case), "steps": 2,
                "threads": case.threads or threads, "device": args.device}
        if args.quick or cuda:  # CUDA's reading needs no process per variant
            return [dict(base, variants=list(GROUPS[case.kind]))]
        return [dict(base, variants=[v]) for v in GROUPS[case.kind]]

    if probe is not None and args.quick:  # measured while the timing runs
        for case in cases:
            for job in jobs(case):
                probe.submit(job)
    gc.collect()
    gc.freeze()
    report: dict[str, Any] = {"quick": args.quick, "device": args.device, "threads": threads,
                              "budget_s": budget, "machine": machine_info(args.device),
                              "targets": {"time_x_floor": TIME_TARGET, "mem_x_floor": MEM_TARGET},
                              "variants": {v.name: {"floor": v.floor, "what": v.what}
                                           for v in VARIANTS.values()
                                           if any(v.name in GROUPS[c.kind] for c in cases)},
                              "cases": [], "results": [], "skipped": skipped}
    for case in cases:
        variants = GROUPS[case.kind]
        n = len(variants)
        timed = {}
        info: dict[int, dict[str, dict[str, Any]]] = {}
        torch.set_num_threads(case.threads or run_threads)
        for batch in batches_of(case):
            _progress(t0, f"timing {case.label()} batch {batch}")
            runners = {v: build(case, v, batch, args.device) for v in variants}
            info[batch] = {v: r.prepared.info for v, r in runners.items()}
            timed[batch] = time_interleaved({v: r.step for v, r in runners.items()}, budget,
                                            min_rounds=n, max_rounds=n if args.quick else 40 * n,
                                            warmup=1 if args.quick else 2, sync=sync)
            del runners
            gc.collect()
        mem: dict[str, int] = {}
        build_mem: dict[str, int] = {}
        if probe is not None:
            _progress(t0, f"memory {case.label()}")
            case_jobs = jobs(case)
            if not args.quick:
                for job in case_jobs:
                    probe.submit(job)
            for _ in case_jobs:
                res = probe.result()
                mem.update(res["mem"])
                build_mem.update(res["build"])
        first = next(iter(info.values()), {})
        report["cases"].append({"label": case.label(), "kind": case.kind, "sizes": case.sizes,
                                "seq": {b: case.seq[b] for b in timed if b in case.seq},
                                "threads": torch.get_num_threads(),
                                "n_split": max((i.get("n_targets", 0) for i in first.values()),
                                               default=0)})
        torch.set_num_threads(run_threads)
        for batch, (samples, rounds) in timed.items():
            for v in variants:
                report["results"].append(record(case, batch, v, samples, rounds, mem, build_mem,
                                                info[batch][v]))
    if probe is not None:
        probe.close()
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - t0
    print(render(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
