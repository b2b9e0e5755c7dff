"""Peak memory of a variant's build and steps: in fresh processes (CPU), in the timing one (CUDA).

A job names a case, its variants and batches; for each (batch, variant) the probe builds the
variant (:func:`build_measured`), runs ``steps`` steps and reports two peaks over the memory in
use just before the build:

* the step peak: parameters, gradients, optimizer state, saved activations, inputs and every
  transient of the steps (the build's transients left out: the peak is reset after the build);
* the build peak (``build``): e.g. the parts ``paramsplit.split`` makes (dense copies of the
  trained elements for ``cols`` and masks, views for ``rows``); parts that persist count in the
  step peak too.

Lazy initialisation (code pages, thread pools, allocator and cuBLAS workspaces) is paid first by
running every variant on a tiny case of the same kind, stepped the same way (:func:`warm_up`).
Readings:

* CPU: resident set size from ``/proc/self/status`` (``VmRSS``, high-water mark ``VmHWM``, reset
  through ``/proc/self/clear_refs``), with glibc's mmap threshold pinned low (``mallopt``) so that
  freed tensors go back to the OS and RSS tracks live tensor bytes. Where the high-water mark
  cannot be reset, each (batch, variant) gets a process of its own.
* CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated``, reset with
  ``reset_peak_memory_stats``.

Processes: on the CPU, :class:`Probe` forks a server right after ``step.py``'s imports, before any
tensor work, and every job runs in a child forked from that pristine server (a fresh process that
does not pay the imports again). Where ``fork`` is missing, every job runs in a new interpreter:
``python benchmarks/_memory.py JOB_JSON``.

On CUDA ``step.py`` uses no probe: it builds the variants it times one at a time with
:func:`build_measured` (after :func:`warm_up`), in the timing process, and keeps them. The
allocator's counters count the bytes of live tensors exactly (what the variants built before hold
is in the base and drops out), so the reading is the fresh process's, and no model is built twice:
building the ``gpt124m`` tables' GPT-2 124M variants takes seconds each, on the CPU.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import traceback
from collections import deque
from typing import Any

MMAP_THRESHOLD = 16384  # bytes; allocations above it are mmap'ed and unmapped when freed


def _status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` or ``VmHWM``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _pin_mmap_threshold() -> None:
    try:
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (glibc)
    except (OSError, AttributeError):
        pass


class _Rss:
    def start(self) -> None:
        _reset_hwm()
        self.base = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak(self) -> int:
        hwm = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (hwm - self.base) * 1024

    def reset_peak(self) -> None:
        _reset_hwm()


class _Cuda:
    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda

    def start(self) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()
        self.base = self.cuda.memory_allocated()

    def peak(self) -> int:
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated() - self.base

    def reset_peak(self) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()


Meter = Any  # _Rss | _Cuda


def meter_for(device: str) -> Meter:
    """The reading for ``device``: ``_Cuda`` on CUDA, else ``_Rss`` (exact only with the mmap
    threshold pinned, as in the probe's processes)."""
    return _Cuda() if device.startswith("cuda") else _Rss()


def warm_up(case: Any, variants: list[str], device: str) -> None:
    """Every variant of ``variants`` built on the tiny case of ``case``'s kind (``_cases.tiny_of``:
    the same autocast and AdamW implementation) and stepped twice: lazy initialisation paid."""
    from _cases import tiny_of
    from _variants import build

    tiny = tiny_of(case)
    for v in variants:
        r = build(tiny, v, tiny.batches[0], device)
        r.step()
        r.step()
        del r
    gc.collect()


def build_measured(case: Any, variant: str, batch: int, device: str, steps: int,
                   meter: Meter) -> tuple[Any, int, int]:
    """``(runner, build peak, step peak)``: ``_variants.build`` of ``variant``, then ``steps``
    steps; both peaks in bytes over the memory in use just before the build."""
    from _variants import build

    gc.collect()
    meter.start()
    r = build(case, variant, batch, device)
    gc.collect()
    build_peak = meter.peak()
    meter.reset_peak()
    for _ in range(steps):
        r.step()
    return r, build_peak, meter.peak()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: ``{"mem": {"variant/batch": bytes}, "build": {...}}``."""
    import torch

    from _cases import Case

    case = Case.from_json(job["case"])
    device = job["device"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    cuda = device.startswith("cuda")
    if cuda and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    if not cuda:
        _pin_mmap_threshold()
    warm_up(case, job["variants"], device)
    gc.freeze()  # later collections skip the (many) objects of torch, transformers, ...
    meter = meter_for(device)
    out: dict[str, Any] = {"mem": {}, "build": {}, "reading": "cuda" if cuda else "rss"}
    for batch in job["batches"]:
        for v in job["variants"]:
            r, out["build"][f"{v}/{batch}"], out["mem"][f"{v}/{batch}"] = build_measured(
                case, v, batch, device, job["steps"], meter)
            del r
            gc.collect()
    return out


def _in_child(job: dict[str, Any]) -> dict[str, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the measuring process
        os.close(r)
        try:
            res = measure(job)
        except BaseException:
            res = {"error": traceback.format_exc()}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(res))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": f"memory probe died (wait status {status})"}


def _serve(jobs_fd: int, results_fd: int) -> None:
    code = 0
    try:
        with os.fdopen(jobs_fd) as jobs, os.fdopen(results_fd, "w") as results:
            for line in jobs:
                results.write(json.dumps(_in_child(json.loads(line))) + "\n")
                results.flush()
    except BaseException:
        code = 1
    finally:
        os._exit(code)


class Probe:
    """Runs jobs in fresh processes: ``submit`` now, ``result`` later, in order."""

    def __init__(self, device: str) -> None:
        self.fork = device == "cpu" and hasattr(os, "fork")
        self.one_per_build = self.fork and not _reset_hwm()
        self._pending: deque[Any] = deque()
        if self.fork:
            sys.stdout.flush()
            sys.stderr.flush()
            jobs_r, jobs_w = os.pipe()
            results_r, results_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(jobs_w)
                os.close(results_r)
                _serve(jobs_r, results_w)
            os.close(jobs_r)
            os.close(results_w)
            self._server = pid
            self._jobs = os.fdopen(jobs_w, "w")
            self._results = os.fdopen(results_r)

    def submit(self, job: dict[str, Any]) -> None:
        jobs = [job]
        if self.one_per_build:
            jobs = [dict(job, variants=[v], batches=[b])
                    for b in job["batches"] for v in job["variants"]]
        for j in jobs:
            if self.fork:
                self._jobs.write(json.dumps(j) + "\n")
                self._jobs.flush()
                self._pending.append(None)
            else:
                self._pending.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), json.dumps(j)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))))
        self._pending.append(len(jobs))

    def result(self) -> dict[str, Any]:
        """The next submitted job's merged result; raises if its process failed."""
        parts = []
        while not isinstance(self._pending[0], int):
            proc = self._pending.popleft()
            if proc is None:
                res = json.loads(self._results.readline() or '{"error": "memory server died"}')
            else:
                stdout, stderr = proc.communicate()
                lines = stdout.strip().splitlines()
                res = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                       else {"error": stderr[-4000:]})
            if "error" in res:
                raise RuntimeError(f"memory probe failed:\n{res['error']}")
            parts.append(res)
        self._pending.popleft()
        merged: dict[str, Any] = {"mem": {}, "build": {}, "reading": parts[0]["reading"]}
        for res in parts:
            merged["mem"].update(res["mem"])
            merged["build"].update(res["build"])
        return merged

    def close(self) -> None:
        if self.fork:
            self._jobs.close()
            os.waitpid(self._server, 0)
            self._results.close()
            self.fork = False


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
