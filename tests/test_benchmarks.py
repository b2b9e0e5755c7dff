"""benchmarks/step.py --quick runs and reports every variant (no timing assertions)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

STEP = Path(__file__).parent.parent / "benchmarks" / "step.py"
VARIANTS = {"baseline", "rows", "cols", "mask", "penalty", "hooks", "parametrize"}


def test_step_quick_writes_every_variant(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(STEP), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "targets missed" in proc.stdout
    report = json.loads(out.read_text())
    results = report["results"]
    assert {r["model"] for r in results} == {"linear", "gpt2"}
    for model in ("linear", "gpt2"):
        for batch in (8, 128, 2048):
            got = {r["variant"]: r for r in results if r["model"] == model and r["batch"] == batch}
            assert set(got) == VARIANTS, (model, batch)
            for variant, r in got.items():
                for key in ("time_ratio", "mem_ratio"):
                    value = r[key]
                    assert isinstance(value, float) and math.isfinite(value) and value > 0, (
                        model, batch, variant, key, value)
            assert got["baseline"]["time_ratio"] == 1.0
            assert got["baseline"]["mem_ratio"] == 1.0
