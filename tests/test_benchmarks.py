"""The benchmark scripts run and report sane numbers (smoke tests: no timing assertions).

To stay fast, ``benchmarks/gpu_check.sh`` in its CPU quick mode (which runs ``step.py --quick``)
runs beside the rest of the suite (``background``, see conftest.py), and ``split_time.py
--quick`` runs in this process (in a full test run torch and transformers are imported already).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"

ALL = {"baseline", "rows", "cols_floor", "cols", "forum", "mask_floor", "mask", "decay", "penalty",
       "hooks", "parametrize"}
SPARSE = {"full_ft", "sparse_1", "hooks_1", "sparse_10", "hooks_10"}
MANY = {"baseline", "rows_by_hand", "rows", "cols_floor", "cols", "mask_floor", "mask", "decay",
        "sparse_1", "penalty", "hooks"}
GPT124M = {"baseline", "rows", "cols_floor", "cols", "mask_floor", "mask", "decay", "sparse_1",
           "penalty", "hooks"}

def _have_shira() -> bool:
    """As benchmarks/_cases.have_peft: peft >= 0.17 (SHiRA) installed."""
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) if x.isdigit() else 0 for x in version.split(".")[:2]) >= (0, 17)


HAVE_SHIRA = _have_shira()
GROUPS = {"linear": ALL, "gpt2": ALL - {"forum"}, "generate": {"baseline", "mask"},
          "sparse": SPARSE | ({"shira"} if HAVE_SHIRA else set()), "many": MANY,
          "gpt124m": GPT124M}
NEEDS_TRANSFORMERS = {"gpt2", "generate", "many", "gpt124m"}
REFERENCE = {"sparse": "full_ft"}  # the others: "baseline"
FLOORS = {"rows": "baseline", "cols": "cols_floor", "forum": "cols_floor", "mask": "mask_floor",
          "decay": "baseline"}
#: per table, floors other than FLOORS: generate runs no optimizer step (the mask split's floor is
#: the unsplit model); many is judged against the unsplit step by targets of its own
KIND_FLOORS = {"generate": {"mask": "baseline"}, "many": {}}
#: the layout of each split variant, from paramsplit.describe: rows, cols, forum and mask differ
#: only in weight_decay and split with per_element_decay=False (they measure the parts); decay is
#: the same kind of plan kept whole
LAYOUT = {"rows": "rows", "cols": "cols", "forum": "cols", "mask": "mask", "decay": "decay",
          "sparse_1": "sparse", "sparse_10": "sparse"}
MANY_TARGETS = {"rows": 1.02, "cols": 1.05, "mask": 1.05, "sparse_1": 1.05}
#: tables judged by targets of their own, not by 1.10x / 1.05x their floor (gpt124m reports its
#: floors' ratios without judging them)
OWN_TARGETS = {"sparse", "many", "gpt124m"}
#: the gpt124m tables' targets: step time over the unsplit step's; peak memory over a variant's
GPT124M_TIME = {"rows": 1.02, "cols": 1.02, "mask": 1.02, "decay": 1.02, "sparse_1": 0.95}
GPT124M_MEM = {"rows": "mem <= 1.01x unsplit", "cols": "mem <= 1.01x cols_floor",
               "mask": "mem <= 1.01x mask_floor", "sparse_1": "mem < 1.00x unsplit"}
GPT124M_MEM_REF = {"rows": "baseline", "cols": "cols_floor", "mask": "mask_floor",
                   "sparse_1": "baseline"}


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def background(items: list[pytest.Item], out: Path) -> Callable[[], SimpleNamespace]:
    """Start gpu_check.sh, forced into its CPU quick mode (see conftest.py)."""
    env = dict(os.environ, OUT=str(out), PARAMSPLIT_GPU_CHECK_CPU="1", PYTHON=sys.executable)
    log = open(out / "stdout.txt", "w")  # noqa: SIM115 - closed by wait()
    proc = subprocess.Popen(["bash", str(BENCH / "gpu_check.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)

    def wait() -> SimpleNamespace:
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        return SimpleNamespace(out=out, rc=proc.returncode,
                               output=(out / "stdout.txt").read_text())
    return wait


@pytest.fixture(scope="module")
def gpu_check(background_result: SimpleNamespace) -> SimpleNamespace:
    return background_result


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"paramsplit_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # the scripts import their helpers (_memory, ...)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_step_device_cuda_refused_without_cuda(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: gpu_check.sh runs step.py --device cuda")
    assert _load("step").main(["--device", "cuda", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err
    assert not (tmp_path / "r.json").exists()


def test_split_time_quick(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert _load("split_time").main(["--quick", "--json", str(tmp_path / "st.json")]) == 0
    assert "split time (median)" in capsys.readouterr().out
    data = json.loads((tmp_path / "st.json").read_text())
    assert data["quick"] and len(data["runs"]) == 1
    run = data["runs"][0]
    assert _positive(run["split_s"])
    assert isinstance(run["extra_peak_bytes"], int)  # in-process RSS: reused memory may read 0
    assert run["split_params"] == 2 * 4 + 2  # c_attn, c_proj, c_fc, mlp.c_proj per layer; wte, wpe
    assert run["groups"] == ["default", "weight_decay=0.0", "weight_decay=0.1"]
    assert run["layouts"] == ["rows"]  # parts: split with per_element_decay=False


def test_resplit_time_quick(tmp_path, capsys):
    """``resplit_time.py --quick``: a 2-layer GPT-2's 8 block weights, a random 5% mask each,
    resplit at every changed share after a training step; every figure present and positive,
    the verdicts consistent with the figures."""
    pytest.importorskip("transformers")
    assert _load("resplit_time").main(["--quick", "--json", str(tmp_path / "rt.json")]) == 0
    out = capsys.readouterr().out
    assert "claim 'a RigL update every 100 steps costs under 1% of training time'" in out
    assert "break-even: the claim holds once a training step takes more than" in out
    data = json.loads((tmp_path / "rt.json").read_text())
    assert data["quick"] and data["split_weights"] == 2 * 4
    assert data["layouts"] == data["layouts_after"] == ["sparse"]
    assert data["trained_elements"] == pytest.approx(0.05 * data["split_elements"], rel=0.1)
    assert _positive(data["step_s"]) and len(data["step_samples"]) == 3
    assert [f["fraction"] for f in data["fractions"]] == [0.01, 0.1, 0.2, 0.5]
    changed = [f["changed_elements"] for f in data["fractions"]]
    assert changed == sorted(changed) and changed[0] > 0
    for f in data["fractions"]:
        assert len(f["resplit_samples"]) == len(f["masks_samples"]) == data["repeats"] == 2
        for key in ("resplit_s", "masks_s", "resplit_over_step", "update_over_step",
                    "share_every_100", "resplit_share_every_100"):
            assert _positive(f[key]), (f["fraction"], key)
        assert f["ok"] == (f["share_every_100"] < 0.01)
        assert f["resplit_ok"] == (f["resplit_share_every_100"] < 0.01)
    claim = next(f for f in data["fractions"] if f["fraction"] == 0.2)
    assert data["claim_holds"] == claim["ok"]
    assert ("holds here" if claim["ok"] else "does NOT hold here") in out


def test_phases_prints_every_variant(capsys):
    _load("phases").main(["--quick", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("phases of a step, nn.Linear(128, 512), batch 8, cpu")
    rows = lines[2:]
    assert sorted(r.split()[0] for r in rows) == sorted(GROUPS["linear"])
    for r in rows:
        name, groups, *ms = r.split()
        # the unsplit model and the floors: targets + the rest; parts: a group per weight_decay
        # + the rest; decay: the per-element weight_decay group + the rest
        want = 3 if name in ("rows", "cols", "forum", "mask", "parametrize") else 2
        assert int(groups) == want, name
        assert all(_positive(float(v)) for v in ms)


def test_phases_times_a_gpt124m_table_with_one_adamw_implementation(capsys):
    _load("phases").main(["--quick", "--rounds", "1", "--models", "gpt124m", "--adamw", "foreach",
                          "--variants", "baseline,sparse_1", "--profile", "sparse_1"])
    lines = capsys.readouterr().out.splitlines()
    assert "AdamW(foreach=True)" in lines[0] and "bf16 autocast" in lines[0]
    assert [r.split()[0] for r in lines[2:4]] == ["baseline", "sparse_1"]
    assert lines[4] == "profile of 20 updates of sparse_1:" and lines[5].startswith("ncalls")
    assert len(lines) == 6 + 12  # the top 12 functions by their own time


def test_gpu_check_cpu_mode_writes_log_and_json(gpu_check):
    assert gpu_check.rc == 0, gpu_check.output[-6000:]
    log = (gpu_check.out / "gpu_check.log").read_text()
    assert "mode cpu-quick" in log
    assert "step.py --quick --json" in log
    assert "--models linear,gpt2,generate,sparse,many,gpt124m" in log  # every table
    assert "tests on cuda" not in log and "-m pytest" not in log  # no test run without CUDA
    assert "targets missed:" in log  # step.py's report went into the log
    assert "every stage passed" in log.splitlines()[-1]
    assert log == gpu_check.output  # what it printed, it logged
    report = json.loads((gpu_check.out / "step_cpu_quick.json").read_text())
    assert report["quick"] and report["device"] == "cpu" and report["complete"] is True
    assert report["memory"] == "RSS, fresh processes, concurrently with the timing"


def test_step_quick_reports_every_variant_against_its_floor(gpu_check):
    report = json.loads((gpu_check.out / "step_cpu_quick.json").read_text())
    results = report["results"]
    kinds = {r["model"] for r in results}
    skipped = " ".join(s["label"] for s in report["skipped"])
    assert kinds | (NEEDS_TRANSFORMERS if "GPT-2" in skipped else set()) == set(GROUPS)
    assert {c["label"] for c in report["cases"]} == {r["case"] for r in results}
    for case in report["cases"]:
        kind = case["kind"]
        mine = [r for r in results if r["case"] == case["label"]]
        batches = {r["batch"] for r in mine}
        assert batches
        floors = KIND_FLOORS.get(kind, FLOORS)
        for batch in batches:
            got = {r["variant"]: r for r in mine if r["batch"] == batch}
            assert set(got) == GROUPS[kind], (case["label"], batch)
            assert len([r for r in mine if r["batch"] == batch]) == len(got)
            ref = REFERENCE.get(kind, "baseline")
            assert got[ref]["time_ratio"] == 1.0 and got[ref]["mem_ratio"] == 1.0
            for v, r in got.items():
                where = (case["label"], batch, v)
                assert r["model"] == kind and r["adamw"] == case["adamw"], where
                assert len(r["samples_ms"]) == r["rounds"] >= len(got), where
                for key in ("time_ratio", "time_ratio_min", "mem_ratio"):
                    assert _positive(r[key]), (where, key, r[key])
                assert r["mem_bytes"] > 0 and r["build_mem_bytes"] is not None, where
                assert r["floor"] == floors.get(v), where
                # every split records the layout paramsplit.describe gives its weights
                assert r["layout"] == LAYOUT.get(v), where
                if v in floors:
                    assert r["floor"] in got
                    for key in ("time_ratio_floor", "mem_ratio_floor"):
                        assert _positive(r[key]), (where, key, r[key])
                    if kind in OWN_TARGETS:  # floors reported, not judged
                        assert r["time_target"] is None and r["mem_target"] is None, where
                        assert r["time_ok"] is None and r["mem_ok"] is None, where
                    else:
                        assert r["time_target"] == 1.10 and r["mem_target"] == 1.05
                        assert isinstance(r["time_ok"], bool) and isinstance(r["mem_ok"], bool)
                else:
                    assert r["time_ratio_floor"] is None and r["time_ok"] is None, where
                if v in ("rows", "decay") and r["floor"]:  # its floor is the unsplit step
                    assert r["time_ratio_floor"] == r["time_ratio"]


def test_step_quick_has_the_sparse_table(gpu_check):
    report = json.loads((gpu_check.out / "step_cpu_quick.json").read_text())
    results = [r for r in report["results"] if r["model"] == "sparse"]
    assert results, "no sparse table in the quick run"
    assert "== sparse fine-tuning, nn.Linear(" in gpu_check.output
    assert any(s["label"].startswith("shira") for s in report["skipped"]) == (not HAVE_SHIRA)
    for r in results:
        where = (r["batch"], r["variant"])
        assert r["reference"] == "full_ft" and r["floor"] is None, where
        assert 0 < r["trained"] <= 1, where
        layout = LAYOUT.get(r["variant"])
        assert r["layout"] == layout, where  # paramsplit chose the sparse layout by itself
        checks = {c["target"]: c for c in r["checks"]}
        if layout:
            assert checks.pop(f"layout {layout}")["ok"] is True, where
        if r["variant"] == "sparse_1":
            if r["batch"] == 8:
                assert _positive(checks.pop("<= 0.50x full_ft")["value"]), where
            if HAVE_SHIRA:
                assert _positive(checks.pop("< 1x shira")["value"]), where
        assert not checks, where
    # the printed row of sparse_1 at batch 8 carries its targets' verdicts
    row = re.search(r"^ +8  sparse_1 .*$", gpu_check.output, re.MULTILINE)
    assert row and re.search(r"(OK|MISS) [\d.]+x \(target <= 0\.50x full_ft\)", row[0]), row


def test_step_quick_has_the_many_table(gpu_check):
    """48 small weights of a 12-layer GPT-2, one thread, every ratio over the unsplit step."""
    pytest.importorskip("transformers")
    report = json.loads((gpu_check.out / "step_cpu_quick.json").read_text())
    (case,) = [c for c in report["cases"] if c["kind"] == "many"]
    assert case["label"] == "many small weights, GPT-2 n_layer=12 n_embd=64 vocab=1000"
    assert case["sizes"]["n_head"] == 4 and case["sizes"]["n_positions"] == 64
    assert case["seq"] == {"2": 32}  # batch 2 x 32 tokens (JSON keys are strings)
    assert case["n_split"] == 48 and case["threads"] == 1
    assert f"== {case['label']} ==" in gpu_check.output
    assert "split: 48 weights in transformer.h.*; torch threads 1" in gpu_check.output
    results = {r["variant"]: r for r in report["results"] if r["model"] == "many"}
    assert set(results) == MANY
    for v, r in results.items():
        assert r["batch"] == 2 and r["reference"] == "baseline" and r["floor"] is None, v
        assert r["time_ratio_floor"] is None and r["time_ok"] is None, v
        checks = {c["target"]: c for c in r["checks"]}
        if v in LAYOUT:
            assert checks.pop(f"layout {LAYOUT[v]}")["ok"] is True, v
        if v in MANY_TARGETS:
            check = checks.pop(f"<= {MANY_TARGETS[v]:.2f}x unsplit")
            assert check["value"] == r["time_ratio"] and _positive(check["value"]), v
            assert check["ok"] == (r["time_ratio"] <= MANY_TARGETS[v]), v
        assert not checks, (v, checks)
    assert results["sparse_1"]["trained"] == pytest.approx(0.01, abs=0.002)
    # the printed rows carry their targets' verdicts
    for v, x in MANY_TARGETS.items():
        row = re.search(rf"^ +2  {v} .*$", gpu_check.output.split(f"== {case['label']} ==")[1],
                        re.MULTILINE)
        assert row and re.search(rf"(OK|MISS) [\d.]+x \(target <= {x:.2f}x unsplit\)", row[0]), v


def test_step_quick_has_the_gpt124m_tables(gpu_check):
    """GPT-2 124M's tables, in --quick tiny (2 layers of n_embd 64, batch 2 x 16 tokens): bf16
    autocast, one table per AdamW implementation, every layout, the penalty and hooks beside
    them; every ratio over the unsplit step, cols / mask also over their floors; the issue's
    targets as checks."""
    pytest.importorskip("transformers")
    report = json.loads((gpu_check.out / "step_cpu_quick.json").read_text())
    cases = [c for c in report["cases"] if c["kind"] == "gpt124m"]
    assert [c["adamw"] for c in cases] == ["fused", "foreach"]
    for case in cases:
        assert case["autocast"] == "bfloat16" and case["n_split"] == 2 * 4
        assert case["sizes"] == {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab": 500,
                                 "n_positions": 16}
        assert case["seq"] == {"2": 16}
        assert case["label"] == ("GPT-2 n_layer=2 n_embd=64 vocab=500, bf16 autocast, "
                                 f"AdamW({case['adamw']}=True)")
        assert f"== {case['label']} ==" in gpu_check.output
        results = {r["variant"]: r for r in report["results"] if r["case"] == case["label"]}
        assert set(results) == GPT124M
        for v, r in results.items():
            where = (case["adamw"], v)
            assert r["model"] == "gpt124m" and r["autocast"] == "bfloat16", where
            assert r["batch"] == 2 and r["seq_len"] == 16 and r["reference"] == "baseline", where
            assert r["layout"] == LAYOUT.get(v), where
            for key in ("time_ms", "time_ratio", "time_ratio_min", "paired_q1", "paired_q3",
                        "mem_ratio"):
                assert _positive(r[key]), (where, key, r[key])
            assert all(_positive(x) for x in r["samples_ms"]), where
            assert isinstance(r["mem_bytes"], int) and r["mem_bytes"] > 0, where
            if v in ("cols", "mask"):
                assert r["floor"] == f"{v}_floor", where
                assert _positive(r["time_ratio_floor"]) and _positive(r["mem_ratio_floor"]), where
            checks = {c["target"]: c for c in r["checks"]}
            if v in LAYOUT:
                assert checks.pop(f"layout {LAYOUT[v]}")["ok"] is True, where
            if v in GPT124M_TIME:
                check = checks.pop(f"time <= {GPT124M_TIME[v]:.2f}x unsplit")
                assert check["value"] == r["time_ratio"], where
                assert check["ok"] == (r["time_ratio"] <= GPT124M_TIME[v]), where
            if v in GPT124M_MEM:
                check = checks.pop(GPT124M_MEM[v])
                over = r["mem_bytes"] / results[GPT124M_MEM_REF[v]]["mem_bytes"]
                assert check["value"] == pytest.approx(over) and _positive(over), where
            assert not checks, (where, checks)
        assert results["sparse_1"]["trained"] == pytest.approx(0.01, abs=0.004)
        # the printed rows carry their targets' verdicts
        table = gpu_check.output.split(f"== {case['label']} ==")[1].split("\n\n")[0]
        for v, x in GPT124M_TIME.items():
            row = re.search(rf"^ +2  {v} .*$", table, re.MULTILINE)
            assert row and re.search(rf"(OK|MISS) [\d.]+x \(target time <= {x:.2f}x unsplit\)",
                                     row[0]), v
            if v in GPT124M_MEM:
                assert re.search(rf"(OK|MISS) [\d.]+x \(target {GPT124M_MEM[v]}\)", row[0]), v
    # a miss names its table's AdamW implementation
    misses = gpu_check.output.split("targets missed: ")[1].splitlines()[0]
    assert "gpt124m b" not in misses


def test_in_process_memory_reading(monkeypatch):
    """The CUDA runs' memory reading (in the timing process, as each variant is built), here on
    the CPU with the quick gpt124m case: a runner that steps, two byte counts."""
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(BENCH))  # as the scripts import them
    memory, cases = importlib.import_module("_memory"), importlib.import_module("_cases")
    case = cases.GPT124M_QUICK[0]
    memory.warm_up(case, ["baseline", "rows"], "cpu")
    for v in ("baseline", "rows"):
        runner, build_peak, step_peak = memory.build_measured(case, v, 2, "cpu", 2,
                                                              memory.meter_for("cpu"))
        assert isinstance(build_peak, int) and isinstance(step_peak, int), v
        runner.step()
    assert type(memory.meter_for("cuda")).__name__ == "_Cuda"


def test_step_default_tables(monkeypatch):
    """gpt124m runs by default on CUDA only; --models names known tables."""
    monkeypatch.syspath_prepend(str(BENCH))
    step = _load("step")
    cpu = "linear,gpt2,generate,sparse,many"
    assert step._args([]).models == step._args(["--quick"]).models == cpu
    assert step._args(["--device", "cuda"]).models == cpu + ",gpt124m"
    assert step._args(["--models", "gpt124m"]).models == "gpt124m"
    with pytest.raises(SystemExit):
        step._args(["--models", "gpt2,gpt125m"])


def test_gpu_check_cuda_branch_dry(tmp_path):
    """gpu_check.sh parses, and its CUDA branch runs the planned commands: a stub ``nvidia-smi``
    that lists a GPU and a stub ``python`` that echoes its arguments stand in for the machine."""
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stub H200 (UUID: GPU-0)'\n")
    (stubs / "python").write_text('#!/bin/sh\necho "stub-python $*"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PARAMSPLIT_GPU_CHECK_CPU", "PARAMSPLIT_IN_GPU_CHECK")}
    env.update(PATH=f"{stubs}:{env.get('PATH', '')}", PYTHON=str(stubs / "python"),
               OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mode cuda (CUDA available)" in log
    assert "stub-python -c import torch, transformers; print(torch.__version__, " \
           "transformers.__version__, torch.cuda.get_device_name())" in log
    assert "stub-python -m pip list" in log
    stages = [ln for ln in log.splitlines() if ln.startswith("gpu_check: == ") and "(timeout" in ln]
    assert len(stages) == 3
    assert stages[0].endswith("env PARAMSPLIT_TEST_DEVICE=cuda " + str(stubs / "python")
                              + " -m pytest -q -p no:cacheprovider tests/test_device.py")
    assert stages[1].endswith(" benchmarks/step.py --device cuda --models gpt124m,many --budget 8 "
                              f"--json {tmp_path / 'out' / 'step_cuda.json'}")
    assert stages[2].endswith(" benchmarks/phases.py --device cuda --models gpt124m,many "
                              "--variants baseline,rows,cols,mask,decay,sparse_1 --rounds 20 "
                              "--profile rows,mask")
    timeouts = [int(re.search(r"\(timeout (\d+) s\)", ln)[1]) for ln in stages]
    # 7 minutes in all, the phases' share kept from the benchmark's (the stubs take no time)
    assert timeouts[0] <= 180 and timeouts[1] <= 420 - 90 and 90 <= timeouts[2] <= 420
    assert "every stage passed" in log.splitlines()[-1]


def test_floors_copy_values_and_gradient_in_and_values_back():
    """The cols and mask floors: the trained elements' values and gradient into buffers before
    the optimizer step, the values back into the weight after it (3 weight-sized copies)."""
    torch = pytest.importorskip("torch")
    floors = _load("_floors")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    mask = torch.rand(4, 6) < 0.5
    for make, names in ((floors.cols_floor, ["weight"]), (floors.mask_floor, ["weight"])):
        before, after = make(model, names, torch.device("cpu"), {"weight": mask})
        w = model.weight
        w.grad = torch.randn_like(w)
        before()
        if make is floors.cols_floor:
            got_v = torch.cat(_cell(before, "values"), 1)
            got_g = torch.cat(_cell(before, "grads"), 1)
            assert torch.equal(got_v, w.detach()) and torch.equal(got_g, w.grad)
        else:
            perm = torch.argsort(mask.reshape(-1).to(torch.uint8), stable=True)
            assert torch.equal(_cell(after, "invs")[0][perm], torch.arange(24).int())
            assert torch.equal(_cell(before, "values")[0], w.detach().reshape(-1)[perm])
            assert torch.equal(_cell(before, "grads")[0], w.grad.reshape(-1)[perm])
        saved = w.detach().clone()
        with torch.no_grad():
            w.add_(1.0)  # the optimizer's update ...
        after()
        assert torch.equal(w.detach(), saved)  # ... overwritten by the copy back (a cost model)


def _cell(fn, name):
    """The closure variable ``name`` of ``fn``."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents
