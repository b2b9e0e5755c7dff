#!/usr/bin/env python
"""Time and extra peak memory of ``paramsplit.split`` on a 124M-parameter GPT-2.

Usage::

    python benchmarks/split_time.py [--repeats 3] [--json out.json] [--profile]
    python benchmarks/split_time.py --quick     # smoke run: a 2-layer GPT-2, in this process

The model is ``GPT2LMHeadModel(GPT2Config())`` (n_layer=12, n_embd=768, vocab 50257; random
weights, nothing is downloaded). The spec splits every 2-D weight (wte, which lm_head ties to,
wpe, and every c_attn / c_proj / c_fc weight) into 2 row blocks with different weight_decay,
with ``per_element_decay=False``: parts, as described below (without it, regions that differ only
in weight_decay make no parts at all: the decay layout).

Each repeat runs in a fresh subprocess (so every figure is a cold, first ``split`` in its process)
with glibc's mmap threshold pinned low (``MALLOC_MMAP_THRESHOLD_``) so that RSS tracks live tensor
bytes. Time is the wall time of the ``split`` call. Extra peak memory is the kernel's RSS
high-water mark during ``split`` (reset through ``/proc/self/clear_refs`` just before it; without
that, ``ru_maxrss``) minus the RSS before it, divided by the model's parameter bytes.

paramsplit 0.3 returns the model itself, unchanged, and makes *parts* for the optimizer: views of
the weight for ``rows`` (so this spec copies nothing: the extra memory is bookkeeping), dense
copies for ``cols`` and masks (those would add the split weights' bytes). There is no separate
split model, hence no "original" to drop.

Targets: time < 5 s, extra peak memory < 1.1x the parameter bytes (0.2's targets; with row
blocks 0.3 should be far below both).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from _memory import _reset_hwm, _status_kb  # benchmarks/ is sys.path[0]

TIME_TARGET_S = 5.0
MEM_TARGET_X = 1.1
MMAP_THRESHOLD = 16384


#: ``--quick``: a small GPT-2 instead of the 124M one, split in the calling process (no fresh
#: subprocess, so not a cold split: a smoke test of the script, not a figure).
QUICK_CONFIG = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000, "n_positions": 64}


def _worker(profile: bool, threads: int | None, quick: bool = False) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import paramsplit

    if threads:
        torch.set_num_threads(threads)
    verbosity = transformers.logging.get_verbosity()  # both restored: --quick runs in its caller
    rng = torch.get_rng_state()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(GPT2Config(**QUICK_CONFIG) if quick else GPT2Config())
    build_s = time.perf_counter() - t0
    params = list(model.parameters())  # deduplicated: wte and lm_head count once
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    n_params = sum(p.numel() for p in params)

    def spec(name: str, p: torch.nn.Parameter) -> Any:
        if p.dim() != 2:
            return None
        h = p.shape[0] // 2
        return paramsplit.rows({(0, h): {"weight_decay": 0.0}, (h, None): {"weight_decay": 0.1}})

    n_split = sum(1 for n, p in model.named_parameters() if spec(n, p) is not None)
    split_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if spec(n, p) is not None)
    gc.collect()
    gc.freeze()
    can_reset = _reset_hwm()
    rss0 = _status_kb("VmRSS") or 0
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    split_model, groups = paramsplit.split(model, spec, per_element_decay=False)
    split_s = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    peak = _status_kb("VmHWM") if can_reset else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    rss_after = _status_kb("VmRSS") or 0
    assert split_model is model  # 0.3: the model itself
    layouts = sorted({line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]})
    group_names = [g["name"] for g in groups]
    del model, split_model, params, groups
    gc.unfreeze()  # frozen objects are never collected, and HF models hold reference cycles
    gc.collect()
    out = {
        "n_params": n_params, "param_bytes": param_bytes, "split_params": n_split,
        "split_param_bytes": split_bytes, "groups": group_names,
        "build_s": build_s, "split_s": split_s, "hwm_reset": can_reset,
        "extra_peak_bytes": (peak - rss0) * 1024,
        "extra_after_bytes": (rss_after - rss0) * 1024, "layouts": layouts,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(30)
        out["profile"] = buf.getvalue()
    transformers.logging.set_verbosity(verbosity)
    torch.set_rng_state(rng)
    return out


def _run(profile: bool, threads: int | None, quick: bool = False) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker"]
    if profile:
        cmd.append("--profile")
    if quick:
        cmd.append("--quick")
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh subprocesses (default 3; --quick: 1, in this process)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a 2-layer GPT-2 (n_embd 128) instead of the 124M one")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="one more run under cProfile; print where split's time goes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.profile, args.threads, args.quick)))
        return 0
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    t_start = time.perf_counter()
    if args.quick:
        runs = [_worker(False, args.threads, True) for _ in range(repeats)]
    else:
        runs = [_run(False, args.threads) for _ in range(repeats)]
    first = runs[0]
    pb = first["param_bytes"]
    times = [r["split_s"] for r in runs]
    peaks = [r["extra_peak_bytes"] / pb for r in runs]
    t_med = statistics.median(times)
    m_max = max(peaks)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    model = (f"a small GPT-2 {QUICK_CONFIG} (--quick: smoke test only)" if args.quick
             else "GPT-2 124M (GPT2Config() defaults)")
    lines = [
        f"paramsplit.split on {model}, every 2-D weight -> 2 row blocks",
        f"machine: {os.cpu_count()} CPUs, torch threads {first['threads']}"
        f" ({'set by --threads' if args.threads else 'default'}), torch {first['torch']}, "
        f"transformers {first['transformers']}, python {platform.python_version()}, "
        f"{platform.platform()}, load average now " + "/".join(f"{x:.1f}" for x in load),
        f"model: {first['n_params'] / 1e6:.1f}M parameters, {pb / 2**20:.0f} MiB; "
        f"{first['split_params']} split parameters, {first['split_param_bytes'] / 2**20:.0f} MiB,"
        f" layout {','.join(first['layouts'])}; groups {first['groups']}",
        ("--quick: in this process, not a cold split" if args.quick else
         f"{repeats} fresh subprocess(es), each one cold split") + ";"
        f" building the model took "
        f"{statistics.median(r['build_s'] for r in runs):.1f} s (not counted)",
        "",
    ]
    rows = [("metric", "value", "all runs", "target", ""),
            ("split time (median)", f"{t_med:.2f} s", " ".join(f"{t:.2f}" for t in times),
             f"< {TIME_TARGET_S:.0f} s", "OK" if t_med < TIME_TARGET_S else "MISS"),
            ("extra peak memory (max) / param bytes", f"{m_max:.3f}x",
             " ".join(f"{x:.3f}" for x in peaks), f"< {MEM_TARGET_X}x",
             "OK" if m_max < MEM_TARGET_X else "MISS"),
            ("extra memory right after split", f"{first['extra_after_bytes'] / pb:.3f}x", "",
             "", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not first["hwm_reset"]:
        lines.append("(no /proc/self/clear_refs: peak is ru_maxrss, it includes building the model)")
    profile = None
    if args.profile:
        profile = _run(True, args.threads, args.quick)
        lines += ["", f"cProfile of one more split ({profile['split_s']:.2f} s under the "
                      "profiler):", profile["profile"]]
    lines.append(f"total wall time {time.perf_counter() - t_start:.1f} s")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "runs": runs, "split_s_median": t_med, "extra_peak_x_max": m_max,
                       "time_target_s": TIME_TARGET_S, "mem_target_x": MEM_TARGET_X,
                       "load_average": load, "profile": profile}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
