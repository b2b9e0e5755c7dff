"""Process memory readings shared by the benchmark scripts (Linux ``/proc``; None elsewhere)."""

from __future__ import annotations


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
