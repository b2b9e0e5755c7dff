"""The report: one record per (case, batch, variant) with its ratios, and the printed table."""

from __future__ import annotations

import os
import platform
import statistics
import textwrap
from typing import Any

import torch

import paramsplit

from _timing import ratios
from _variants import REFERENCE, floor_of

TIME_TARGET = 1.10  # a split's step time / its floor's
MEM_TARGET = 1.05  # a split's peak memory / its floor's
#: The sparse table (project issue 12): paramsplit's sparse split at 1% trainable
SPARSE_VARIANT = "sparse_1"
SPARSE_TIME_TARGET = 0.50  # ... takes at most this share of full fine-tuning's step at batch 8
SPARSE_TARGET_BATCH = 8
SPARSE_RIVAL = "shira"  # ... and is faster than PEFT's SHiRA at every batch
#: The many table (48 small weights): each split's step time over the unsplit step's, at most
MANY_TARGETS = {"rows": 1.02, "cols": 1.05, "mask": 1.05, "sparse_1": 1.05}
#: The gpt124m tables (GPT-2 124M, bf16 autocast, fused / foreach AdamW), per variant: its step
#: time over the unsplit step's (the unsplit model is also full fine-tuning, sparse_1's reference),
#: at most
GPT124M_TIME_TARGETS = {"rows": 1.02, "cols": 1.02, "mask": 1.02, "decay": 1.02, "sparse_1": 0.95}
#: ... and its peak memory over the named variant's: at most x (``<=``), or below it (``<``). The
#: floors hold persistent buffers for the parts' values and their gradients (``_floors``): the
#: memory a copying layout cannot avoid; 1.01x leaves room for the allocator's rounding and small
#: tensors (step counts, index tensors of other sizes), not for another copy of the weights.
GPT124M_MEM_TARGETS = {"rows": ("baseline", "<=", 1.01), "cols": ("cols_floor", "<=", 1.01),
                       "mask": ("mask_floor", "<=", 1.01), "sparse_1": ("baseline", "<", 1.0)}
#: Tables judged by targets of their own (``_checks``) rather than by TIME_TARGET / MEM_TARGET
#: over a floor; their floors (gpt124m's) are reported only.
OWN_TARGETS = ("sparse", "many", "gpt124m")
#: The layout paramsplit is meant to pick for a split variant (checked in the sparse, many and
#: gpt124m tables, where the target depends on it)
LAYOUTS = {"rows": "rows", "cols": "cols", "mask": "mask", "decay": "decay",
           "sparse_1": "sparse", "sparse_10": "sparse"}


def _unsplit(ref: str) -> str:
    return "unsplit" if ref == "baseline" else ref


def _checks(case: Any, batch: int, variant: str, samples: dict[str, list[float]],
            t: dict[str, float], info: dict[str, Any],
            mem_over: Any = None) -> list[dict[str, Any]]:
    """The sparse, many and gpt124m tables' targets for ``variant``: ``{"target", "value",
    "ok"}`` each. ``mem_over(ref)``: ``variant``'s peak memory over ``ref``'s (None: not
    measured)."""
    if case.kind not in OWN_TARGETS:
        return []
    out = []
    want = LAYOUTS.get(variant)
    if want is not None:  # the layout paramsplit is meant to use
        out.append({"target": f"layout {want}", "value": info.get("layout"),
                    "ok": info.get("layout") == want})
    if case.kind == "gpt124m":
        if variant in GPT124M_TIME_TARGETS:
            x = GPT124M_TIME_TARGETS[variant]
            out.append({"target": f"time <= {x:.2f}x unsplit", "value": t["ratio"],
                        "ok": t["ratio"] <= x})
        if variant in GPT124M_MEM_TARGETS and mem_over is not None:
            ref, op, x = GPT124M_MEM_TARGETS[variant]
            m = mem_over(ref)
            if m is not None:
                out.append({"target": f"mem {op} {x:.2f}x {_unsplit(ref)}", "value": m,
                            "ok": m <= x if op == "<=" else m < x})
        return out
    if case.kind == "many":
        if variant in MANY_TARGETS:
            x = MANY_TARGETS[variant]
            out.append({"target": f"<= {x:.2f}x unsplit", "value": t["ratio"],
                        "ok": t["ratio"] <= x})
        return out
    if variant == SPARSE_VARIANT:
        if batch == SPARSE_TARGET_BATCH:
            out.append({"target": f"<= {SPARSE_TIME_TARGET:.2f}x full_ft", "value": t["ratio"],
                        "ok": t["ratio"] <= SPARSE_TIME_TARGET})
        if SPARSE_RIVAL in samples:
            x = ratios(samples, variant, SPARSE_RIVAL)["ratio"]
            out.append({"target": f"< 1x {SPARSE_RIVAL}", "value": x, "ok": x < 1.0})
    return out


def record(case: Any, batch: int, variant: str, samples: dict[str, list[float]], rounds: int,
           mem: dict[str, int], build_mem: dict[str, int],
           info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result. Ratios ``x`` are over the case's reference variant (``REFERENCE``: the
    unsplit model, or full fine-tuning in the sparse table); ``info``: the variant's own facts
    (``layout``, ``trained``: the share of the weights' elements it trains)."""
    info = info or {}
    ref = REFERENCE[case.kind]
    floor = floor_of(case.kind, variant)
    t = ratios(samples, variant, ref)
    tf = ratios(samples, variant, floor) if floor else None
    key = f"{variant}/{batch}"
    m, m_base = mem.get(key), mem.get(f"{ref}/{batch}")
    m_floor = mem.get(f"{floor}/{batch}") if floor else None
    mem_ratio = m / m_base if m is not None and m_base else None
    mem_ratio_floor = m / m_floor if m is not None and m_floor else None
    judged = floor is not None and case.kind not in OWN_TARGETS  # by TIME_TARGET, MEM_TARGET
    time_ok = None if tf is None or not judged else tf["ratio"] <= TIME_TARGET
    mem_ok = None if mem_ratio_floor is None or not judged else mem_ratio_floor <= MEM_TARGET
    noise = t if case.kind in OWN_TARGETS else tf or t  # of the ratio that is judged

    def mem_over(other: str) -> float | None:
        m_other = mem.get(f"{other}/{batch}")
        return m / m_other if m is not None and m_other else None

    return {
        "case": case.label(), "model": case.kind, "batch": batch, "seq_len": case.seq.get(batch),
        "autocast": case.autocast, "adamw": case.adamw,
        "variant": variant, "reference": ref, "floor": floor, "rounds": rounds,
        "layout": info.get("layout"), "trained": info.get("trained"),
        "time_ms": statistics.median(samples[variant]) * 1e3,
        "time_ratio": t["ratio"], "time_ratio_min": t["min"],
        "time_ratio_floor": tf["ratio"] if tf else None,
        "time_ratio_floor_min": tf["min"] if tf else None,
        "paired_q1": noise["q1"], "paired_q3": noise["q3"],
        "time_target": TIME_TARGET if judged else None, "time_ok": time_ok,
        "mem_bytes": m, "build_mem_bytes": build_mem.get(key),
        "mem_ratio": mem_ratio, "mem_ratio_floor": mem_ratio_floor,
        "mem_target": MEM_TARGET if judged else None, "mem_ok": mem_ok,
        "checks": _checks(case, batch, variant, samples, t, info, mem_over),
        "samples_ms": [x * 1e3 for x in samples[variant]],
    }


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "transformers": tf_version, "paramsplit": paramsplit.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ok(ok: bool | None) -> str:
    return "" if ok is None else ("OK" if ok else "MISS")


def _table(rows: list[tuple[str, ...]], left: tuple[int, ...] = (1, 2)) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = "/".join(f"{x:.1f}" for x in m["loadavg_start"] or ())
    load_end = "/".join(f"{x:.1f}" for x in m.get("loadavg_end") or ())
    lines = [
        "paramsplit step benchmark on " + report["device"]
        + (" (--quick: small models, smoke test only"
           + ("; memory measured while timing)" if report.get("memory") else ")")
           if report["quick"] else ""),
        f"machine: {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), {m['cpu']}"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"; torch threads {m['torch_threads']}"
        + f" ({'set' if report['threads'] else 'default'}); load average {load} -> {load_end}",
        f"         torch {m['torch']}, transformers {m['transformers']}, python {m['python']}, "
        f"{m['platform']}",
        "x unsplit / x floor: median step time over the unsplit model's / the floor's, all "
        "variants of a table timed interleaved in one process; iqr: quartiles of the per-round",
        "  paired ratio (noise); mem x: peak memory of the steps over the unsplit model's / the "
        f"floor's ({report.get('memory') or 'not measured'}).",
        f"Targets: a split <= {TIME_TARGET:.2f}x its floor's time, <= {MEM_TARGET:.2f}x its "
        "floor's memory; the sparse, many and gpt124m tables: their own (listed with them).",
    ]
    lines += textwrap.wrap("; ".join(f"{v}: {d['what']}" for v, d in report["variants"].items()),
                           width=110, initial_indent="variants: ", subsequent_indent="  ")
    header = ("batch", "variant", "floor", "rounds", "ms", "x unsplit", "x floor", "iqr", "",
              "peak MB", "mem x unsplit", "mem x floor", "")
    for c in report["cases"]:
        lines += ["", f"== {c['label']} =="]
        if c["kind"] not in ("linear", "sparse"):
            seq = ", ".join(f"batch {b}: {s}" for b, s in c["seq"].items())
            what = "prompt length" if c["kind"] == "generate" else "sequence length"
            n = f"{c['n_split']} weights" if c.get("n_split") else "every 2-D weight"
            threads = f"; torch threads {c['threads']}" if c.get("threads") else ""
            lines.append(f"   {what} {seq}; split: {n} in transformer.h.*{threads}")
        if c["kind"] in OWN_TARGETS:
            lines += _reference_table(report, c)
            continue
        rows = [header]
        for r in report["results"]:
            if r["case"] != c["label"]:
                continue
            mb = r["mem_bytes"] / 2**20 if r["mem_bytes"] is not None else None
            rows.append((
                str(r["batch"]), r["variant"], r["floor"] or "", str(r["rounds"]),
                _f(r["time_ms"]), _f(r["time_ratio"], "{:.3f}"), _f(r["time_ratio_floor"], "{:.3f}"),
                f"{r['paired_q1']:.2f}-{r['paired_q3']:.2f}", _ok(r["time_ok"]), _f(mb, "{:.1f}"),
                _f(r["mem_ratio"], "{:.3f}"), _f(r["mem_ratio_floor"], "{:.3f}"), _ok(r["mem_ok"])))
        lines += _table(rows)
    for s in report["skipped"]:
        lines += ["", f"skipped {s['label']}: {s['reason']}"]
    misses = [f"{_tag(r)} b{r['batch']} {r['variant']} {what} {val:.3f}x floor"
              for r in report["results"]
              for what, val, ok in (("time", r["time_ratio_floor"], r["time_ok"]),
                                    ("mem", r["mem_ratio_floor"], r["mem_ok"]))
              if ok is False]
    misses += [f"{_tag(r)} b{r['batch']} {r['variant']} {_check(ck)}"
               for r in report["results"] for ck in r.get("checks", ()) if not ck["ok"]]
    lines += ["", f"targets missed: {'; '.join(misses) if misses else 'none'}",
              f"total wall time {report['wall_s']:.1f} s"]
    return "\n".join(lines)


def _tag(r: dict[str, Any]) -> str:
    """A record's table in the list of misses: its kind, and its AdamW implementation if set."""
    return r["model"] + (f"/{r['adamw']}" if r.get("adamw") else "")


def _check(ck: dict[str, Any]) -> str:
    v = ck["value"]
    val = f"{v:.3f}x" if isinstance(v, float) else str(v)
    return f"{val} (target {ck['target']})"


def _reference_table(report: dict[str, Any], c: dict[str, Any]) -> list[str]:
    """The sparse fine-tuning, many-weights and GPT-2 124M tables: every variant against the
    reference (full fine-tuning; the unsplit model), gpt124m's also against its floor, and its
    targets."""
    ref = REFERENCE[c["kind"]]
    floors = c["kind"] == "gpt124m"
    if c["kind"] == "sparse":
        targets = (f"{SPARSE_VARIANT} <= {SPARSE_TIME_TARGET:.2f}x {ref} at batch "
                   f"{SPARSE_TARGET_BATCH} and faster than {SPARSE_RIVAL} at every batch; "
                   "sparse_* on the sparse layout")
    elif c["kind"] == "many":
        targets = (", ".join(f"{v} <= {x:.2f}x" for v, x in MANY_TARGETS.items())
                   + f" {ref} (the unsplit step, also full fine-tuning: the reference of "
                   "sparse_1); each split on its layout")
    else:
        mem_targets = ", ".join(f"{v} {op} {x:.2f}x {_unsplit(r)}"
                                for v, (r, op, x) in GPT124M_MEM_TARGETS.items())
        targets = (
            "step time " + ", ".join(f"{v} <= {x:.2f}x" for v, x in GPT124M_TIME_TARGETS.items())
            + f" {ref} (the unsplit step, also full fine-tuning: the reference of sparse_1); "
            f"peak memory {mem_targets} (the floors hold persistent buffers for the parts' "
            "values and gradients: what a copying layout needs); each split on its layout; "
            "the x floor columns are reported, not judged")
    floor_text = " (x floor, mem x floor: over the floor's)" if floors else ""
    lines = textwrap.wrap(
        f"x {ref} / mem x {ref}: median step time / peak memory over {ref}'s{floor_text}, all "
        "timed interleaved; iqr: quartiles of the per-round paired ratio; trained: the share of "
        "the split weights' elements trained; layout: paramsplit.describe's. Targets: "
        f"{targets} (a miss is listed).", width=110, initial_indent="   ",
        subsequent_indent="   ")
    head: tuple[str, ...] = ("batch", "variant", "trained", "layout", "rounds", "ms", f"x {ref}")
    head += ("floor", "x floor") if floors else ()
    head += ("iqr", "peak MB", f"mem x {ref}") + (("mem x floor",) if floors else ()) + ("targets",)
    rows = [head]
    for r in report["results"]:
        if r["case"] != c["label"]:
            continue
        mb = r["mem_bytes"] / 2**20 if r["mem_bytes"] is not None else None
        trained = r.get("trained")
        checks = "; ".join(f"{'OK' if ck['ok'] else 'MISS'} {_check(ck)}"
                           for ck in r.get("checks", ()) if not ck["target"].startswith("layout")
                           or not ck["ok"])
        floor_of_r = r["floor"] if r["floor"] != ref else None  # rows, decay: the x ref column
        row: tuple[str, ...] = (
            str(r["batch"]), r["variant"], "-" if trained is None else f"{trained:.2%}",
            r.get("layout") or "-", str(r["rounds"]), _f(r["time_ms"]),
            _f(r["time_ratio"], "{:.3f}"))
        row += ((floor_of_r or "", _f(r["time_ratio_floor"] if floor_of_r else None, "{:.3f}"))
                if floors else ())
        row += (f"{r['paired_q1']:.2f}-{r['paired_q3']:.2f}", _f(mb, "{:.1f}"),
                _f(r["mem_ratio"], "{:.3f}"))
        row += ((_f(r["mem_ratio_floor"] if floor_of_r else None, "{:.3f}"),) if floors else ())
        rows.append(row + (checks,))
    lines += _table(rows, left=(1, 3, 7, len(head) - 1) if floors else (1, 3, 10))
    return lines
