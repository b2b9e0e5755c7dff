#!/usr/bin/env python
"""Step time and peak memory of paramsplit's layouts, each next to its floor.

Usage::

    python benchmarks/step.py                  # full run on the CPU (several minutes on 2 cores)
    python benchmarks/step.py --quick          # smoke run: small models, one rotation
    python benchmarks/step.py --device cuda    # the same tables on CUDA, and the gpt124m ones
    python benchmarks/step.py --models linear --json out.json   # raw numbers, every sample
    python benchmarks/step.py --models sparse --threads 2       # the sparse fine-tuning table
    python benchmarks/step.py --models many    # 48 small weights: the per-weight overhead
    python benchmarks/step.py --device cuda --models gpt124m,many --budget 8   # gpu_check.sh's
    python benchmarks/step.py --quick --models gpt124m          # its tiny version, on the CPU

Tables (``_cases``): ``nn.Linear(1024, 4096)`` at batch 8/128/2048; a GPT-2 (2 layers, n_embd 256,
every 2-D weight of the blocks split) at batch 8/128/2048; ``generate``: a GPT-2 (2 layers,
n_embd 128, vocab 1000, every 2-D weight of the blocks split by a random 50% mask) timing
``model.generate(input_ids, max_new_tokens=32, do_sample=False)``; ``sparse``: sparse
fine-tuning (project issue 12) of the ``nn.Linear(1024, 4096)`` at batch 8/128/2048;
``many``: a 12-layer GPT-2 with n_embd 64 (n_head 4, n_positions 64, vocab 1000), batch 2 x 32
tokens, one torch thread, its 48 block weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``) split; and ``gpt124m``: GPT-2 124M (``GPT2Config()``'s sizes: 12 layers, n_embd
768, n_head 12, vocab 50257, n_positions 1024; random weights from a seed), batch 8 x 512
tokens, forward and loss under ``torch.autocast(device type, dtype=torch.bfloat16)``, its 48
block weights split, in two tables: ``AdamW(..., fused=True)`` and ``AdamW(..., foreach=True)``
(every ratio is taken within one table). The GPT-2 tables need ``transformers``; without it they
are skipped with a note.

Default tables (``--models``): on the CPU linear, gpt2, generate, sparse and many (a gpt124m
table takes minutes on a few cores: ask for it by name); with ``--device cuda`` those and
gpt124m. ``--quick`` makes every table tiny but ``many`` (small already: its full size);
gpt124m's: 2 layers of n_embd 64 (n_head 4,
n_positions 16, vocab 500), batch 2 x 16 tokens, the same autocast and AdamW implementations.

paramsplit 0.3 leaves the model as it is (``split`` returns the model itself) and steps parts of
each split weight in the optimizer; optimizer-step hooks copy values and gradients between the
weight and the parts once per step. Every variant builds its own fresh model (``split`` registers
plans for the parameters it is given, so a model is never shared between variants), from the
same initial weights; a step is ``zero_grad(set_to_none=True)`` + forward + loss + backward +
``AdamW.step`` (AdamW's default implementation: on the CPU, its for-loop one; in the gpt124m
tables ``fused=True`` or ``foreach=True``, with forward and loss under bf16 autocast).

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
                   gradient (before ``AdamW.step``) and an ``index_select`` of the values back
                   through the inverse permutation (after it), with the int32 permutation that
                   sorts the elements by the ``mask`` variant's random 50% mask.
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

The ``many`` table: ``baseline`` (unsplit, also full fine-tuning), ``rows_by_hand`` (AdamW over
the two row blocks of each weight as tensors of their own, gradients handed over by a plain loop,
no paramsplit: the optimizer's cost of stepping twice as many tensors, which every optimizer-side
split pays), ``rows``, ``cols_floor``, ``cols``, ``mask_floor``, ``mask`` (random 50%), ``decay``,
``sparse_1`` (a random 1% of every weight trained, the rest FROZEN), ``penalty`` and ``hooks``,
every ratio over the unsplit step (the floors shown, not judged); split weights get weight_decay
0.01 / 0.1.

The ``gpt124m`` tables (one per AdamW implementation): ``baseline`` (unsplit, also full
fine-tuning), ``rows``, ``cols_floor``, ``cols``, ``mask_floor``, ``mask`` (random 50%),
``decay``, ``sparse_1`` (a random 1% of every weight trained, the rest FROZEN), ``penalty`` and
``hooks``: every ratio over the unsplit step, and ``cols`` / ``mask`` also over their floors
(``x floor``, ``mem x floor``: reported, not judged). The floors' memory is the unsplit model's
plus persistent buffers for the parts' values and their gradients (weight-sized for cols and for
a 50% mask with both regions trained; ``mask_floor`` also the int32 permutation and its inverse): the memory a
copying layout cannot avoid, against which cols and mask are measured.

Targets: each split (rows, cols, forum, mask) within 1.10x of its floor's step time, and its
peak memory within 1.05x of its floor's; in the sparse table, ``sparse_1`` at most 0.50x
``full_ft``'s step time at batch 8 and faster than ``shira`` at every batch, and the sparse_*
variants on the sparse layout; in the many table, ``rows`` at most 1.02x the unsplit step and
``cols``, ``mask``, ``sparse_1`` at most 1.05x, each on its layout; in the gpt124m tables (the
issue's GPU targets, ``_report.GPT124M_TIME_TARGETS`` / ``GPT124M_MEM_TARGETS``): ``rows``,
``cols``, ``mask``, ``decay`` at most 1.02x the unsplit step, ``sparse_1`` at most 0.95x (full
fine-tuning's), each on its layout; peak memory: ``rows`` at most 1.01x the unsplit model's,
``cols`` / ``mask`` at most 1.01x their floors' (within the buffers their parts and part
gradients need, up to the allocator's rounding), ``sparse_1`` below the unsplit model's (full
fine-tuning). Misses are listed at the end ("targets missed"; a gpt124m miss names its AdamW
implementation: ``gpt124m/fused``).

Time (``_timing``): all variants of one table are built (one at a time), warmed up (2 steps
each) and timed interleaved in this process, the order rotating every round, in whole rotations
(n rounds of the n variants) until ``--budget`` seconds (default 35; on CUDA 10) have passed;
figures are ratios of medians (x unsplit, x floor), with the quartiles of the per-round paired
ratio as a noise indicator. On CUDA every step is bracketed by ``torch.cuda.synchronize()``.
``--quick`` runs one rotation, 1 thread unless ``--threads``; a table with threads of its own
(``many``: 1) runs with those. Progress goes to stderr, with the seconds since the start (on CUDA
and in the gpt124m tables, one line per variant built).

Memory (``_memory``): the figure is the peak over the memory in use just before the variant's
build, over its build and two steps. On the CPU (RSS with glibc's mmap threshold pinned low)
every (table, variant) is built and stepped twice in a fresh process; ``--quick`` measures every
table in one process, concurrently with the timing. On CUDA (``torch.cuda.max_memory_allocated``,
exact to the allocated byte) this process measures each variant as it builds it for the timing,
with the peak counters reset before the build and after it, once every variant has run on a tiny
case of the table (lazy initialisation: cuBLAS workspaces, kernels); the two measured steps are
warm-up steps too, so no model is built twice (a GPT-2 124M variant takes seconds to build and
split on the CPU). ``--no-memory`` skips it.

Report (``_report``): one table per model, misses at the end; ``--json PATH`` (default
``benchmarks/results.json``) gets every record with all samples, rewritten after every table
(``"complete": false`` until the run ends).
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
#: Every table (``Case.kind``), and those a run on the CPU makes by default (gpt124m's 124M model
#: takes minutes a table on a few cores; ``--models gpt124m`` asks for it, ``--device cuda`` runs
#: it by default).
KINDS = ("linear", "gpt2", "generate", "sparse", "many", "gpt124m")
CPU_MODELS = ("linear", "gpt2", "generate", "sparse", "many")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, one rotation (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"),
                    help="where to write every record (default: benchmarks/results.json)")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated tables: {','.join(KINDS)} (default: "
                    f"{','.join(CPU_MODELS)}; with --device cuda also gpt124m)")
    ap.add_argument("--batches", default=None, help="comma-separated subset of the batches")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed rounds per table and batch (default 35; CUDA 10); "
                    "whole rotations, so a table may run one rotation past it")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; --quick: 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    args = ap.parse_args(argv)
    if args.models is None:
        cuda = args.device.startswith("cuda")
        args.models = ",".join(CPU_MODELS + (("gpt124m",) if cuda else ()))
    unknown = [m for m in args.models.split(",") if m not in KINDS]
    if unknown:
        ap.error(f"--models: unknown table(s) {','.join(unknown)}; known: {','.join(KINDS)}")
    return args


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


def _progress(t0: float, what: str, end: str = " ...") -> None:
    print(f"[step {time.perf_counter() - t0:6.1f}s] {what}{end}", file=sys.stderr, flush=True)


def _write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    t0 = time.perf_counter()
    problem = _check_device(args.device)
    if problem:
        print(f"step.py: {problem}", file=sys.stderr)
        return 2

    import torch

    from _cases import FULL_CASES, QUICK_CASES, have_peft, have_transformers, preload
    from _memory import Probe, build_measured, meter_for, warm_up
    from _report import (GPT124M_MEM_TARGETS, GPT124M_TIME_TARGETS, MEM_TARGET, TIME_TARGET,
                         machine_info, record, render)
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
    cuda = args.device.startswith("cuda")
    # CUDA: memory measured in this process, as the variants are built (no model built twice)
    in_process = cuda and not args.no_memory
    # the CPU: a probe that forks here, before tensor work
    probe = None if args.no_memory or cuda else Probe(args.device)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    run_threads = torch.get_num_threads()  # a table without threads of its own runs with these
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
    memory = (None if args.no_memory else
              "torch.cuda.max_memory_allocated, in the timing process" if cuda else
              "RSS, fresh processes" + (", concurrently with the timing" if args.quick else ""))
    report: dict[str, Any] = {"quick": args.quick, "device": args.device, "threads": threads,
                              "budget_s": budget, "machine": machine_info(args.device),
                              "memory": memory, "complete": False,
                              "targets": {"time_x_floor": TIME_TARGET, "mem_x_floor": MEM_TARGET,
                                          "gpt124m_time_x_unsplit": GPT124M_TIME_TARGETS,
                                          "gpt124m_mem": GPT124M_MEM_TARGETS},
                              "variants": {v.name: {"floor": v.floor, "what": v.what}
                                           for v in VARIANTS.values()
                                           if any(v.name in GROUPS[c.kind] for c in cases)},
                              "cases": [], "results": [], "skipped": skipped}
    for case in cases:
        variants = GROUPS[case.kind]
        n = len(variants)
        timed = {}
        info: dict[int, dict[str, dict[str, Any]]] = {}
        mem: dict[str, int] = {}
        build_mem: dict[str, int] = {}
        torch.set_num_threads(case.threads or run_threads)
        if in_process:
            _progress(t0, f"warming up {case.label()} (a tiny model, every variant)")
            warm_up(case, list(variants), args.device)
        for batch in batches_of(case):
            _progress(t0, f"building {case.label()} batch {batch}: {n} variants, one at a time"
                      + (", each stepped twice for its peak memory" if in_process else ""))
            runners = {}
            for i, v in enumerate(variants):
                if in_process:
                    key = f"{v}/{batch}"
                    runners[v], build_mem[key], mem[key] = build_measured(
                        case, v, batch, args.device, 2, meter_for(args.device))
                else:
                    runners[v] = build(case, v, batch, args.device)
                if cuda or case.kind == "gpt124m":
                    _progress(t0, f"  built {v} ({i + 1}/{n})"
                              + (f", peak {mem[key] / 2**20:.0f} MB" if in_process else ""), end="")
            info[batch] = {v: r.prepared.info for v, r in runners.items()}
            _progress(t0, f"timing {case.label()} batch {batch}"
                      + ("" if args.quick else f" (budget {budget:g} s, whole rotations of "
                         f"{n} x {n} steps)"))
            timed[batch] = time_interleaved({v: r.step for v, r in runners.items()}, budget,
                                            min_rounds=n, max_rounds=n if args.quick else 40 * n,
                                            warmup=1 if args.quick or in_process else 2,
                                            sync=sync)
            _progress(t0, f"timed {timed[batch][1]} rounds", end="")
            del runners
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
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
                                "autocast": case.autocast, "adamw": case.adamw,
                                "n_split": max((i.get("n_targets", 0) for i in first.values()),
                                               default=0)})
        torch.set_num_threads(run_threads)
        for batch, (samples, rounds) in timed.items():
            for v in variants:
                report["results"].append(record(case, batch, v, samples, rounds, mem, build_mem,
                                                info[batch][v]))
        if args.json:  # what is done so far survives a run cut short (gpu_check's timeouts)
            report["wall_s"] = time.perf_counter() - t0
            _write_json(report, args.json)
    if probe is not None:
        probe.close()
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - t0
    report["complete"] = True
    print(render(report))
    if args.json:
        _write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
