#!/usr/bin/env python
"""Training-step time and peak memory of paramsplit, against an unsplit model and alternatives.

Usage::

    python benchmarks/step.py            # full run (a few minutes on 2 cores)
    python benchmarks/step.py --quick    # smoke run: tiny models, few rounds (< 60 s)
    python benchmarks/step.py --json out.json

Models: (a) ``nn.Linear(1024, 4096)``; (b) a small GPT-2 (``GPT2LMHeadModel`` from a
``GPT2Config``, random weights, nothing is downloaded). For GPT-2 every 2-D weight of the
transformer blocks (``transformer.h.*``: c_attn, c_proj, c_fc, mlp.c_proj) is the target.

Variants (every one starts from the same initial weights):

* ``baseline``    the unsplit model, ``AdamW`` groups {targets: wd=0.1}, {rest: wd=0}. Ratio 1.00.
* ``rows``        ``paramsplit.rows``: 2 row blocks of each target, wd=0.01 / wd=0.1.
* ``cols``        ``paramsplit.cols``: 2 column blocks, wd=0.01 / wd=0.1.
* ``mask``        ``paramsplit.Regions``: a random 50% mask (2 ids), wd=0.01 / wd=0.1.
* ``penalty``     the seed's masked L2 penalty: ``loss + 0.5 * sum(wd_mask * w**2)`` (wd_mask is
                  0.01 / 0.1 by the same random mask), AdamW weight_decay=0 on the targets.
* ``hooks``       ``w.register_hook(lambda g: g * keep)`` zeroes the gradient of the frozen half
                  of the same random mask; AdamW weight_decay=0 on the targets (so frozen
                  elements really stay put).
* ``parametrize`` ``torch.nn.utils.parametrize`` with a parametrization returning
                  ``torch.cat((a, b), 0)`` of two row blocks (a hand-written rows split),
                  wd=0.01 / wd=0.1.

The 0.01 (not 0) on the first block keeps AdamW's work equal to the baseline's: with
weight_decay == 0 AdamW skips one pass over the parameter.

Time: one step is ``opt.zero_grad(set_to_none=True)`` + forward + loss + backward +
``opt.step()``. All variants of one (model, batch) are built first, warmed up (2 steps each), then
timed INTERLEAVED in this process: each round times one step of every variant, the order rotating
from round to round. Rounds run in whole rotations (every variant equally often in every
position) until ``--budget`` seconds have passed. The figure is median(variant) /
median(baseline); ``min x`` (min / min) and the interquartile range of the per-round paired ratio
are printed as noise indicators. Threads: torch's default (``--threads`` to change it); ``--quick``
uses 1 thread unless told otherwise, because with 2 OpenMP threads on a loaded 2-core machine a
tiny model's step can stall for tens of ms and the smoke run would not finish in time.

Peak memory: every variant is built and stepped in a fresh subprocess (full run: one per model
and variant; ``--quick``: one per model) with glibc's mmap threshold pinned low
(``MALLOC_MMAP_THRESHOLD_``), so that freed tensors go back to the OS and RSS tracks live tensor
bytes. The figure is the peak RSS during two training steps minus the RSS before the model was
built: parameters, gradients, optimizer state, saved activations, inputs and every transient of
the step. The kernel's high-water mark is reset (``/proc/self/clear_refs``) after the build, so
build-time transients (the copy ``paramsplit.split`` makes of the original weights, index
computation for masks) are left out; they are in the JSON as ``build_mem_bytes`` and
``benchmarks/split_time.py`` measures them for a 124M model. Lazy initialisation (code pages,
thread pools) is paid beforehand by running every variant on a tiny model. Without
``clear_refs`` the script falls back to one subprocess per (model, variant, batch) and
``ru_maxrss`` (then build transients are included).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import paramsplit

from _memory import _reset_hwm, _status_kb  # benchmarks/ is sys.path[0]

VARIANTS = ("baseline", "rows", "cols", "mask", "penalty", "hooks", "parametrize")
BATCHES = (8, 128, 2048)
LR = 1e-3
WD_HI = 0.1  # baseline's weight decay on the targets; second block / mask id 1
WD_LO = 0.01  # first block / mask id 0

#: (variant, batch) -> the largest acceptable time ratio.
TIME_TARGETS: dict[tuple[str, int], float] = {
    ("rows", 8): 1.03, ("rows", 2048): 1.01,
    ("cols", 8): 1.03, ("cols", 2048): 1.01,
    ("mask", 8): 1.25, ("mask", 2048): 1.03,
}
#: variant -> the largest acceptable peak-memory ratio (every batch).
MEM_TARGETS: dict[str, float] = {"rows": 1.05, "cols": 1.05}

MMAP_THRESHOLD = 16384  # bytes; allocations above it are mmap'ed and unmapped when freed


# -- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One model to benchmark, with its sizes."""

    kind: str  # "linear" | "gpt2"
    sizes: dict[str, int]
    seq: dict[int, int] = field(default_factory=dict)  # gpt2: batch -> sequence length

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sizes": self.sizes, "seq": {str(k): v for k, v in self.seq.items()}}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        return Case(d["kind"], d["sizes"], {int(k): v for k, v in d["seq"].items()})

    def label(self) -> str:
        s = self.sizes
        if self.kind == "linear":
            return f"nn.Linear({s['in']}, {s['out']})"
        return (f"GPT-2 n_layer={s['n_layer']} n_embd={s['n_embd']} n_head={s['n_head']} "
                f"vocab={s['vocab']}")


FULL_CASES = (
    Case("linear", {"in": 1024, "out": 4096}),
    # batch 128 and 2048 at sequence length 64 take seconds per step on 2 cores, so the
    # sequence is shortened there (tokens per step: 512, 2048, 4096).
    Case("gpt2", {"n_layer": 2, "n_embd": 256, "n_head": 4, "vocab": 8000},
         {8: 64, 128: 16, 2048: 2}),
)
QUICK_CASES = (
    Case("linear", {"in": 256, "out": 1024}),
    Case("gpt2", {"n_layer": 1, "n_embd": 128, "n_head": 2, "vocab": 1000},
         {8: 8, 128: 2, 2048: 1}),
)
TINY_CASES = {  # for warming up lazy initialisation before memory measurements
    "linear": Case("linear", {"in": 16, "out": 32}),
    "gpt2": Case("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab": 64}, {2: 4}),
}


def build_base(case: Case) -> nn.Module:
    torch.manual_seed(0)
    if case.kind == "linear":
        return nn.Linear(case.sizes["in"], case.sizes["out"])
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    s = case.sizes
    cfg = GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                     vocab_size=s["vocab"], n_positions=max(case.seq.values()), use_cache=False)
    return GPT2LMHeadModel(cfg)


def target_names(case: Case, model: nn.Module) -> list[str]:
    if case.kind == "linear":
        return ["weight"]
    return [n for n, p in model.named_parameters()
            if n.startswith("transformer.h.") and p.dim() == 2]


def make_inputs(case: Case, batch: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    if case.kind == "linear":
        return (torch.randn(batch, case.sizes["in"], generator=g),
                torch.randn(batch, case.sizes["out"], generator=g))
    ids = torch.randint(0, case.sizes["vocab"], (batch, case.seq[batch]), generator=g)
    return ids, ids


def task_loss(case: Case, model: nn.Module, inputs: tuple[Tensor, Tensor]) -> Tensor:
    if case.kind == "linear":
        return F.mse_loss(model(inputs[0]), inputs[1])
    return model(input_ids=inputs[0], labels=inputs[1], use_cache=False).loss


def random_masks(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """A random 50% bool mask per target, the same in every variant."""
    params = dict(model.named_parameters())
    out = {}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(1000 + i)
        out[name] = torch.rand(params[name].shape, generator=g) < 0.5
    return out


# -- variants ----------------------------------------------------------------------------------


@dataclass
class Runner:
    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable[[], Tensor]

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()


class _CatSplit(nn.Module):
    """A hand-written rows split as a parametrization: ``weight = cat((original0, original1))``."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.dim = dim
        self.k = k

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat((a, b), self.dim)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        rest = w.shape[self.dim] - self.k
        return (w.narrow(self.dim, 0, self.k).clone(), w.narrow(self.dim, self.k, rest).clone())


def _split_groups(split_model: nn.Module, spec: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, groups = paramsplit.split(split_model, spec)
    return model, torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)


def build_variant(case: Case, variant: str, batch: int) -> Runner:
    """A fresh model for ``variant``, its optimizer, and its loss closure at ``batch``."""
    base = build_base(case)
    names = target_names(case, base)
    name_set = set(names)
    inputs = make_inputs(case, batch)
    masks = random_masks(base, names) if variant in ("mask", "penalty", "hooks") else {}
    params = dict(base.named_parameters())
    targets = [params[n] for n in names]
    rest = [p for n, p in base.named_parameters() if n not in name_set]

    def plain_loss(m: nn.Module) -> Callable[[], Tensor]:
        return lambda: task_loss(case, m, inputs)

    if variant == "baseline":
        opt = torch.optim.AdamW([{"params": targets, "weight_decay": WD_HI},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR)
        return Runner(base, opt, plain_loss(base))

    if variant in ("rows", "cols"):
        make = paramsplit.rows if variant == "rows" else paramsplit.cols
        dim = 0 if variant == "rows" else 1

        def spec(name: str, p: nn.Parameter) -> Any:
            if name not in name_set:
                return None
            h = p.shape[dim] // 2
            return make({(0, h): {"weight_decay": WD_LO}, (h, None): {"weight_decay": WD_HI}})

        model, opt = _split_groups(base, spec)
        return Runner(model, opt, plain_loss(model))

    if variant == "mask":
        opts = {0: {"weight_decay": WD_LO}, 1: {"weight_decay": WD_HI}}
        model, opt = _split_groups(
            base, {n: paramsplit.Regions(masks[n], opts) for n in names})
        return Runner(model, opt, plain_loss(model))

    if variant == "penalty":
        pairs = [(torch.where(masks[n], WD_HI, WD_LO).to(p.dtype), p)
                 for n, p in zip(names, targets)]
        opt = torch.optim.AdamW([{"params": targets, "weight_decay": 0.0},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR)

        def penalty_loss() -> Tensor:
            loss = task_loss(case, base, inputs)
            return loss + 0.5 * sum((m * w**2).sum() for m, w in pairs)

        return Runner(base, opt, penalty_loss)

    if variant == "hooks":
        for n, p in zip(names, targets):
            keep = masks[n].to(p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)
        opt = torch.optim.AdamW([{"params": targets, "weight_decay": 0.0},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR)
        return Runner(base, opt, plain_loss(base))

    if variant == "parametrize":
        lo, hi = [], []
        for n, p in zip(names, targets):
            owner_name, _, attr = n.rpartition(".")
            owner = base.get_submodule(owner_name)
            parametrize.register_parametrization(owner, attr, _CatSplit(0, p.shape[0] // 2))
            plist = owner.parametrizations[attr]
            lo.append(plist.original0)
            hi.append(plist.original1)
        del targets, params
        opt = torch.optim.AdamW([{"params": lo, "weight_decay": WD_LO},
                                 {"params": hi, "weight_decay": WD_HI},
                                 {"params": rest, "weight_decay": 0.0}], lr=LR)
        return Runner(base, opt, plain_loss(base))

    raise ValueError(f"unknown variant {variant!r}")


# -- timing ------------------------------------------------------------------------------------


def time_interleaved(runners: dict[str, Runner], budget_s: float, min_rounds: int,
                     max_rounds: int) -> tuple[dict[str, list[float]], int]:
    """Per-variant step times (seconds) from interleaved, rotating rounds."""
    names = list(runners)
    for r in runners.values():  # warm-up: optimizer state, allocator, kernels
        r.step()
        r.step()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    t_start = time.perf_counter()
    rounds = 0
    try:
        # Whole rotations only (every variant in every position equally often); stop at the
        # first rotation boundary past the budget, after at least min_rounds.
        while rounds < max_rounds:
            k = rounds % len(names)
            for n in names[k:] + names[:k]:
                step = runners[n].step
                t0 = time.perf_counter()
                step()
                samples[n].append(time.perf_counter() - t0)
            rounds += 1
            if (rounds % len(names) == 0 and rounds >= min_rounds
                    and time.perf_counter() - t_start >= budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, rounds


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[0], q[2]


# -- memory ------------------------------------------------------------------------------------


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _current_kb() -> int:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mem_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh subprocess: peak-memory deltas (bytes) of the requested builds."""
    case = Case.from_json(job["case"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    tiny = TINY_CASES[case.kind]
    for v in job["variants"]:  # pay lazy initialisation before measuring
        r = build_variant(tiny, v, next(iter(tiny.seq), 2))
        r.step()
        r.step()
        del r
    gc.collect()
    gc.freeze()  # later collections skip the (many) objects of torch, transformers, ...
    can_reset = _reset_hwm()
    out: dict[str, Any] = {"hwm_reset": can_reset, "deltas": {}, "build": {}}
    first = True
    for batch in job["batches"]:
        for v in job["variants"]:
            if not can_reset and not first:
                raise RuntimeError("cannot reset the RSS high-water mark: one build per process")
            first = False
            gc.collect()
            _reset_hwm()
            rss0 = _current_kb()
            r = build_variant(case, v, batch)
            gc.collect()
            build_peak = _peak_kb()
            if can_reset:  # the step peak leaves out build-time transients (split's copy)
                _reset_hwm()
            for _ in range(job["steps"]):
                r.step()
            peak = _peak_kb()
            del r
            gc.collect()
            out["deltas"][f"{v}/{batch}"] = (peak - rss0) * 1024
            out["build"][f"{v}/{batch}"] = (build_peak - rss0) * 1024
    return out


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_mem-worker",
                           json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(case: Case, batches: list[int], variants: list[str], per_variant: bool,
                   steps: int, threads: int | None) -> tuple[dict[str, int], dict[str, int]]:
    """``{"variant/batch": bytes}`` of the step peak and of the build peak, over the RSS before
    the build."""
    jobs: list[dict[str, Any]]
    if per_variant:
        jobs = [{"variants": [v], "batches": batches} for v in variants]
    else:
        jobs = [{"variants": variants, "batches": batches}]
    deltas: dict[str, int] = {}
    builds: dict[str, int] = {}
    for job in jobs:
        job.update(case=case.to_json(), steps=steps, threads=threads)
        res = _run_worker(job)
        if not res["hwm_reset"]:  # fall back to one build per process, read ru_maxrss
            for v in job["variants"]:
                for b in batches:
                    one = _run_worker(dict(job, variants=[v], batches=[b]))
                    deltas.update(one["deltas"])
                    builds.update(one["build"])
        else:
            deltas.update(res["deltas"])
            builds.update(res["build"])
    return deltas, builds


# -- report ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "paramsplit": paramsplit.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _ok(value: float | None, target: float | None) -> str:
    if target is None or value is None:
        return "-"
    return "OK" if value <= target else "MISS"


def _fmt_target(t: float | None) -> str:
    return f"<={t:.2f}" if t is not None else "-"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "paramsplit training-step benchmark" + (" (--quick: tiny models, smoke test only)"
                                                if report["quick"] else ""),
        f"machine: {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), torch threads "
        f"{m['torch_threads']} ({'set by --threads' if report['threads'] else 'default'}), "
        f"{m['cpu']}",
        f"         torch {m['torch']}, transformers {m['transformers']}, python {m['python']}, "
        f"{m['platform']}",
        "         load average (1/5/15 min) at start "
        + "/".join(f"{x:.1f}" for x in m["loadavg_start"] or ())
        + ", at end " + "/".join(f"{x:.1f}" for x in m.get("loadavg_end") or ()),
        "step = zero_grad(set_to_none=True) + forward + loss + backward + AdamW.step",
        "time x = median(variant) / median(baseline), all variants timed interleaved (rotating "
        "order) in one process; min x = min / min;",
        "  iqr = quartiles of the per-round paired ratio variant/baseline (noise); "
        "mem x = step peak RSS over pre-build RSS, / baseline's (fresh subprocesses)",
        "targets: rows/cols time <=1.03 at batch 8, <=1.01 at batch 2048; mask time <=1.25 at "
        "batch 8, <=1.03 at batch 2048; rows/cols mem <=1.05; mask mem <= baseline + one copy "
        "of the split weights",
    ]
    for case_d in report["cases"]:
        lines.append("")
        lines.append(f"== {case_d['label']} ==")
        if case_d["kind"] == "gpt2":
            seq = ", ".join(f"batch {b}: seq {s}" for b, s in case_d["seq"].items())
            lines.append(f"   batch = sequences; sequence length scaled down at larger batch "
                         f"({seq}); split targets: every 2-D weight in transformer.h.*")
        header = ("batch", "variant", "rounds", "ms", "time x", "min x", "iqr", "target", "",
                  "peak MB", "mem x", "target", "")
        rows = [header]
        for r in report["results"]:
            if r["case"] != case_d["label"]:
                continue
            mem_mb = r["mem_bytes"] / 2**20 if r["mem_bytes"] is not None else None
            rows.append((
                str(r["batch"]), r["variant"], str(r["rounds"]), f"{r['time_ms']:.2f}",
                f"{r['time_ratio']:.3f}", f"{r['time_ratio_min']:.3f}",
                f"{r['time_ratio_q1']:.2f}-{r['time_ratio_q3']:.2f}",
                _fmt_target(r["time_target"]), _ok(r["time_ratio"], r["time_target"]),
                f"{mem_mb:.1f}" if mem_mb is not None else "-",
                f"{r['mem_ratio']:.3f}" if r["mem_ratio"] is not None else "-",
                _fmt_target(r["mem_target"]), _ok(r["mem_ratio"], r["mem_target"]),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    misses = [f"{r['model']} b{r['batch']} {r['variant']} {what} {val:.3f}>{tgt:.2f}"
              for r in report["results"]
              for what, val, tgt in (("time", r["time_ratio"], r["time_target"]),
                                     ("mem", r["mem_ratio"], r["mem_target"]))
              if tgt is not None and val is not None and val > tgt]
    lines.append("")
    lines.append(f"targets missed: {'; '.join(misses) if misses else 'none'}")
    lines.append(f"total wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


def _progress(t_start: float, what: str) -> None:
    print(f"[step {time.perf_counter() - t_start:6.1f}s] {what} ...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, few rounds, 1 thread unless --threads (< 60 s)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results.json"),
                    help="where to write the results (default: benchmarks/results.json)")
    ap.add_argument("--models", default="linear,gpt2", help="comma-separated: linear,gpt2")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed rounds per (model, batch) (default 35; --quick 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default; --quick: 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mem_worker is not None:
        print(json.dumps(_mem_worker(json.loads(args.mem_worker))))
        return 0

    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    gc.collect()
    gc.freeze()
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES)
             if c.kind in args.models.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 35.0)
    n = len(VARIANTS)
    min_rounds, max_rounds = (n, 2 * n) if args.quick else (n, 40 * n)
    report: dict[str, Any] = {
        "quick": args.quick, "threads": threads, "machine": machine_info(), "cases": [],
        "results": [], "variants": list(VARIANTS), "budget_s": budget,
        "time_targets": {f"{v}/{b}": t for (v, b), t in TIME_TARGETS.items()},
        "mem_targets": MEM_TARGETS,
    }
    for case in cases:
        report["cases"].append({"label": case.label(), "kind": case.kind, "sizes": case.sizes,
                                "seq": {b: case.seq[b] for b in batches if b in case.seq}})
        per_batch: dict[int, dict[str, Any]] = {}
        for batch in batches:
            _progress(t_start, f"timing {case.label()} batch {batch}")
            runners = {v: build_variant(case, v, batch) for v in VARIANTS}
            samples, rounds = time_interleaved(runners, budget, min_rounds, max_rounds)
            del runners
            gc.collect()
            per_batch[batch] = {"samples": samples, "rounds": rounds}
        mem: dict[str, int] = {}
        build_mem: dict[str, int] = {}
        if not args.no_memory:
            _progress(t_start, f"memory {case.label()}")
            mem, build_mem = measure_memory(case, batches, list(VARIANTS),
                                            per_variant=not args.quick, steps=2, threads=threads)
        base_model = build_base(case)
        params = dict(base_model.named_parameters())
        split_bytes = sum(params[n].numel() * params[n].element_size()
                          for n in target_names(case, base_model))
        del base_model, params
        for batch in batches:
            samples = per_batch[batch]["samples"]
            base_med = statistics.median(samples["baseline"])
            base_min = min(samples["baseline"])
            base_mem = mem.get(f"baseline/{batch}")
            for v in VARIANTS:
                med = statistics.median(samples[v])
                paired = [a / b for a, b in zip(samples[v], samples["baseline"])]
                q1, q3 = _quartiles(paired)
                vmem = mem.get(f"{v}/{batch}")
                mem_ratio = vmem / base_mem if vmem is not None and base_mem else None
                t_target = TIME_TARGETS.get((v, batch))
                m_target = MEM_TARGETS.get(v)
                if v == "mask" and base_mem:  # at most one extra copy of the split weights
                    m_target = 1.0 + split_bytes / base_mem
                report["results"].append({
                    "case": case.label(), "model": case.kind, "batch": batch,
                    "seq_len": case.seq.get(batch), "variant": v,
                    "rounds": per_batch[batch]["rounds"],
                    "time_ms": med * 1e3, "time_ratio": med / base_med,
                    "time_ratio_min": min(samples[v]) / base_min,
                    "time_ratio_q1": q1, "time_ratio_q3": q3,
                    "time_target": t_target,
                    "time_ok": None if t_target is None else med / base_med <= t_target,
                    "mem_bytes": vmem, "build_mem_bytes": build_mem.get(f"{v}/{batch}"),
                    "mem_ratio": mem_ratio, "mem_target": m_target,
                    "mem_ok": None if m_target is None or mem_ratio is None
                    else mem_ratio <= m_target,
                    "samples_ms": [x * 1e3 for x in samples[v]],
                })
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - t_start
    print(render(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
