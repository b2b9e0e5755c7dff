"""Slow out-of-process work runs beside the rest of the suite.

A few tests check what other processes produced: the distributed ranks, a Trainer resumed in a
new interpreter, the benchmark's smoke run. Most of their cost is those processes starting
(interpreter, torch, transformers), and the pytest process only waits for them. So a test module
may define::

    def background(items: list[pytest.Item], out: Path) -> Any:
        '''Runs in a worker thread of the pytest process; ``items`` are the selected tests.'''

When collection finishes, the ``background`` of every module with a selected test is started in
a pool of two worker threads, and those modules' tests are moved to the end of the run. The
pytest process and the processes started here run one torch thread each (``OMP_NUM_THREADS=1``):
with more, intra-op threads that busy-wait would stall behind the other processes. The
module-scoped fixture ``background_result`` waits for the module's result (re-raising its
exception) and hands it over. ``out`` is a fresh folder, removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

_POOL: ThreadPoolExecutor | None = None
_JOBS: dict[str, Future[Any]] = {}
_FOLDERS: list[Path] = []


def _modules(items: list[pytest.Item]) -> list[ModuleType]:
    """The modules of ``items`` that define ``background``, in the order of their first test."""
    seen: dict[str, ModuleType] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and callable(getattr(module, "background", None)):
            seen.setdefault(module.__name__, module)
    return list(seen.values())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    waiting = {m.__name__ for m in _modules(items)}
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", "") in waiting)


def pytest_collection_finish(session: pytest.Session) -> None:
    global _POOL
    modules = _modules(session.items)
    if not modules or session.config.option.collectonly:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="paramsplit-background")
    for module in modules:
        out = Path(tempfile.mkdtemp(prefix=f"paramsplit-{module.__name__}-"))
        _FOLDERS.append(out)
        _JOBS[module.__name__] = _POOL.submit(module.background, list(session.items), out)



@pytest.fixture(scope="module")
def background_result(request: pytest.FixtureRequest) -> Any:
    """What this module's ``background`` returned (it waits for it)."""
    job = _JOBS.get(request.module.__name__)
    assert job is not None, f"{request.module.__name__} defines no background() or it was not started"
    return job.result()


def pytest_sessionfinish() -> None:
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
