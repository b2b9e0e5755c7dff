"""Slow out-of-process work runs beside the rest of the suite.

A few tests check what other processes produced: the distributed ranks, a Trainer resumed in a
new process, the benchmark's smoke run. Most of their cost is those processes starting
(interpreter, torch, transformers) while the pytest process waits. So a test module may define::

    def background(items: list[pytest.Item], out: Path) -> Callable[[], Any]:
        '''Start the processes the selected ``items`` need; return how to wait for them.'''

When collection finishes, before any test runs, conftest calls every such ``background`` of a
module with a selected test (in the pytest process's main thread: it may fork) and moves those
modules' tests to the end of the run. The module-scoped fixture ``background_result`` calls the
returned wait function once and hands over its result (its exception fails the module's tests).
``out`` is a fresh folder, removed at the end of the session.

The pytest process and the processes started here run one torch thread each
(``OMP_NUM_THREADS=1``): with more, intra-op threads that busy-wait would stall behind the other
processes on a small machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

_WAIT: dict[str, Callable[[], Any]] = {}
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
    modules = _modules(session.items)
    if not modules or session.config.option.collectonly:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for module in modules:
        out = Path(tempfile.mkdtemp(prefix=f"paramsplit-{module.__name__}-"))
        _FOLDERS.append(out)
        _WAIT[module.__name__] = module.background(list(session.items), out)


@pytest.fixture(scope="module")
def background_result(request: pytest.FixtureRequest) -> Any:
    """What this module's ``background`` produced (waits for it)."""
    wait = _WAIT.pop(request.module.__name__, None)
    assert wait is not None, f"{request.module.__name__}: background() was not started"
    return wait()


def pytest_sessionfinish() -> None:
    for wait in _WAIT.values():  # started for tests that did not run (-x, a keyboard interrupt)
        try:
            wait()
        except Exception:  # noqa: BLE001 - only reaping the processes
            pass
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
