"""A split model in training engines: Lightning, FSDP1 and DeepSpeed, the real packages.

Every engine runs out of process (``_engines_run.py``, started when collection ends, beside the
rest of the suite: see conftest.py's ``background``), 2 gloo processes where distributed, and
saves what it trained or the exception it raised; the tests judge that here, where neither
Lightning nor DeepSpeed is imported. The oracle is a hand-written loop on an unsplit copy of the
model (:func:`_oracle`).

What the engines do with paramsplit's groups:

* Lightning steps the optimizer itself (``optimizer.step(closure)``, gradient clipping inside the
  closure, over the optimizer's parameters: each split weight with its whole gradient, parts
  without one, so the norm of the unsplit model). ``ddp_fork`` is the DDP flavour tested: its
  workers are forks of the process that built the module, so they need no pickling and no second
  import of torch and Lightning (0.5 s against 8 s for ``ddp_spawn``). ``ddp_spawn`` pickles the
  module into fresh interpreters, where paramsplit has split nothing: the module must split in
  ``configure_optimizers``; one test checks a module split in ``__init__`` is not silently wrong.
* FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) leaves the parameter objects in
  place but makes them 1-D views of this rank's shard of its flat parameter, so paramsplit's
  regions no longer fit: the first step must raise. Its state dicts give the original model.
* DeepSpeed ZeRO (1-3) flattens or partitions the optimizer's parameters into its own buffers: it
  must fail loudly, with paramsplit's message. Without ZeRO (stage 0, fp32) it is an all-reduce
  around the torch optimizer and trains like one process; with bf16/fp16 it steps fp32 copies of
  the optimizer's parameters, which must not be silent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import paramsplit

sys.path.insert(0, str(Path(__file__).parent))
import _engines_run as R  # noqa: E402

RUNNER = Path(__file__).parent / "_engines_run.py"
RUNNER_TIMEOUT_S = 1200.0  # a cold cache compiles DeepSpeed's op (~2 min on 2 cores) first
ATOL = 1e-6  # distributed vs one process: the gradient average is reassociated
DS_ZERO = [f"deepspeed_zero{s}{c}" for s in (1, 2, 3) for c in ("", "_client")]
DS_STAGE0 = ["deepspeed_zero0", "deepspeed_zero0_client"]
DS_MIXED = ["deepspeed_zero0_bf16", "deepspeed_zero0_fp16"]


# -- the background run ---------------------------------------------------------------------------

def _needs(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the scenarios (of ``_engines_run.SCENARIOS``) a test reads."""
    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.engine_scenarios = names  # type: ignore[attr-defined]
        return test
    return mark


def _scenarios(items: list[pytest.Item]) -> list[str]:
    """The scenarios the selected tests of this module read: their ``_needs`` and their
    ``scenario`` parameter."""
    names: list[str] = []
    for item in items:
        if getattr(getattr(item, "module", None), "__name__", None) != __name__:
            continue
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("scenario") if callspec is not None else None
        for name in (*getattr(getattr(item, "function", None), "engine_scenarios", ()),
                     *([param] if param else [])):
            if name not in names:
                names.append(name)
    return names


class _Engines:
    """What the runner left in ``out``: one folder per scenario."""

    def __init__(self, out: Path, returncode: int | None, failure: str | None) -> None:
        self.out, self.returncode, self.failure = out, returncode, failure

    def log(self, name: str | None = None, chars: int = 6000) -> str:
        path = self.out / (f"{name}/log.txt" if name else "runner.txt")
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def outputs(self, name: str) -> Path:
        """The folder of scenario ``name``; fail the test if it raised, timed out or did not
        finish (with what it printed)."""
        folder = self.out / name
        problems = [f"{p.name}:\n{p.read_text()}" for p in sorted(folder.glob("error*.txt"))]
        problems += [p.read_text() for p in folder.glob("timeout.txt")]
        if not (folder / "done").exists():
            problems.append(f"{name} did not finish (runner exit status {self.returncode}"
                            f"{'; ' + self.failure if self.failure else ''}):\n{self.log()}")
        if problems:
            pytest.fail(f"scenario {name}:\n" + "\n".join(problems) + f"\n-- its log:\n"
                        f"{self.log(name)}", pytrace=False)
        return folder

    def outcomes(self, name: str, ranks: int = R.WORLD) -> list[dict[str, Any]]:
        folder = self.outputs(name)
        return [json.loads((folder / f"outcome{rank}.json").read_text()) for rank in range(ranks)]


def background(items: list[pytest.Item], out: Path) -> Callable[[], _Engines]:
    """Start ``_engines_run.py`` on the scenarios the selected tests read (see conftest.py), with
    this process's paramsplit."""
    names = _scenarios(items)
    if not names:
        return lambda: _Engines(out, None, "no scenario selected")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(paramsplit.__file__).resolve().parents[1]),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = open(out / "runner.txt", "w")  # noqa: SIM115 - closed by wait()
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(out), *names], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait() -> _Engines:
        failure = None
        try:
            proc.wait(timeout=RUNNER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            failure = f"the runner did not finish within {RUNNER_TIMEOUT_S} s"
        finally:
            if proc.poll() is None:  # its session: the runner, its scenarios and their ranks
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        return _Engines(out, proc.returncode, failure)
    return wait


@pytest.fixture(scope="module")
def engines(background_result: _Engines) -> _Engines:
    return background_result


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


# -- the oracle -----------------------------------------------------------------------------------

def _oracle(steps: int = R.STEPS, clip_order: list[str] | None = None,
            ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The weights after ``steps`` steps of a hand-written loop on an unsplit copy of the model,
    and the gradient norm clipping saw at each step.

    Each step: the mean loss of the full batch, backward, ``clip_grad_norm_(max_norm=CLIP)`` over
    the parameters named in ``clip_order`` (the order the engine's optimizer holds them; default
    the model's), then an AdamW step per region: a parameter no spec names steps with the
    defaults; each trained region of a planned parameter with its own ``torch.optim.AdamW`` (the
    region's options) over a full-size copy of the parameter, of which the region's elements are
    kept (AdamW is elementwise: those elements see exactly that region's optimizer); FROZEN
    regions never change. No paramsplit code runs.
    """
    model = R.model()
    params = dict(model.named_parameters())
    plans = R.regions()
    plain = torch.optim.AdamW([p for n, p in params.items() if n not in plans], lr=R.LR)
    shadows = []
    for name, regions in plans.items():
        for mask, options in regions:
            if options is not None:
                copy = torch.nn.Parameter(params[name].detach().clone())
                shadows.append((name, mask, copy,
                                torch.optim.AdamW([copy], **{"lr": R.LR, **options})))
    norms = []
    for x, y in R.batches(steps):
        model.zero_grad(set_to_none=True)
        R.loss_fn(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(
            [params[n] for n in (clip_order or list(params))], R.CLIP))
        plain.step()
        with torch.no_grad():
            for name, _, copy, opt in shadows:
                copy.copy_(params[name])
                copy.grad = params[name].grad
                opt.step()
            for name, mask, copy, _ in shadows:
                params[name][mask] = copy[mask]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def _label(options: dict[str, Any] | None) -> str:
    return "FROZEN" if options is None else (", ".join(f"{k}={v}" for k, v in options.items())
                                             or "defaults")


def _assert_like(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0,
                 what: str = "") -> None:
    """``got`` equals ``want`` (bitwise when ``atol`` is 0), reported region by region."""
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    plans = R.regions()
    wrong = []
    for name in want:
        for mask, options in plans.get(name, [(torch.ones_like(want[name], dtype=torch.bool),
                                               {})]):
            a, b = got[name][mask].float(), want[name][mask].float()
            if not (torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol)):
                wrong.append(f"  {name} region {_label(options)}: max |difference| "
                             f"{(a - b).abs().max().item():.3g}")
    assert not wrong, (f"{what}: differs from the oracle{' bitwise' if atol == 0 else ''} in\n"
                       + "\n".join(wrong))


def _frozen_moved(state: dict[str, torch.Tensor]) -> list[str]:
    """The planned parameters whose FROZEN elements differ from the initial model's."""
    initial = R.model().state_dict()
    return [name for name, regions in R.regions().items() for mask, options in regions
            if options is None and not torch.equal(state[name][mask].float(),
                                                   initial[name][mask].float())]


def test_oracle_is_a_real_oracle() -> None:
    """The oracle trains every region and keeps FROZEN elements: the tests below compare with
    something that moved, and paramsplit (a hand-driven loop) agrees with it bitwise."""
    want, norms = _oracle()
    initial = R.model().state_dict()
    assert all(n > R.CLIP for n in norms), "clipping must act at every step"
    assert not _frozen_moved(want)
    for name, regions in R.regions().items():
        for mask, options in regions:
            if options is not None:
                assert not torch.equal(want[name][mask], initial[name][mask]), name
    model, groups = paramsplit.split(R.model(), R.spec())
    layouts = {line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]}
    assert layouts == {"rows", "cols", "mask", "whole"}
    opt = torch.optim.AdamW(groups, lr=R.LR)
    held = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in held if id(p) in names]
    for x, y in R.batches():
        opt.zero_grad()
        R.loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(held, R.CLIP)
        opt.step()
    _assert_like(model.state_dict(), _oracle(clip_order=order)[0], what="paramsplit by hand")


# -- Lightning ------------------------------------------------------------------------------------

def _check_clip_log(log: list[dict[str, Any]]) -> list[str]:
    """At every step, the optimizer's parameters with a gradient are the model's trainable
    parameters (each split weight carrying its whole gradient), no part: their order."""
    trainable = [n for n, p in R.model().named_parameters()]
    assert len(log) == R.STEPS
    for step, entry in enumerate(log, 1):
        assert "<part>" not in entry["with_grad"], f"step {step}: a part has a gradient"
        assert sorted(entry["with_grad"]) == sorted(trainable), (step, entry["with_grad"])
        assert entry["with_grad"] == log[0]["with_grad"]
    return log[0]["with_grad"]


@_needs("lightning_fit")
def test_lightning_fit_equals_a_hand_written_loop(engines: _Engines) -> None:
    """``Trainer(max_steps, gradient_clip_val).fit`` of a module that splits in
    ``configure_optimizers`` and returns ``torch.optim.AdamW(groups)``: bitwise the oracle,
    clipping included (the same norm at every step)."""
    fit = _load(engines.outputs("lightning_fit") / "fit.pt")
    layouts = {line.split()[-1] for line in fit["describe"].splitlines()[1:]}
    assert layouts == {"rows", "cols", "mask", "whole"}
    order = _check_clip_log(fit["clip_log"])
    want, norms = _oracle(clip_order=order)
    _assert_like(fit["state"], want, what="Lightning fit")
    for step, (entry, norm) in enumerate(zip(fit["clip_log"], norms), 1):
        assert norm > R.CLIP
        assert torch.equal(entry["norm"], norm), f"step {step}: norm {entry['norm']} != {norm}"


@_needs("lightning_fit", "lightning_resume")
def test_lightning_resume_from_checkpoint_is_bitwise(engines: _Engines) -> None:
    """Resuming the checkpoint of step 2 (``fit(ckpt_path=...)``) in a fresh Trainer and a fresh
    module of other initial weights ends bitwise where the uninterrupted run ended."""
    fit = _load(engines.outputs("lightning_fit") / "fit.pt")
    resumed = _load(engines.outputs("lightning_resume") / "resume.pt")
    initial = R.model().state_dict()
    assert not any(torch.equal(resumed["initial"][k], initial[k]) for k in initial)
    assert len(resumed["clip_log"]) == R.STEPS - 2
    for a, b in zip(resumed["clip_log"], fit["clip_log"][2:]):
        assert torch.equal(a["norm"], b["norm"])
    for key, value in fit["state"].items():
        assert torch.equal(resumed["state"][key], value), key


@_needs("lightning_manual")
def test_lightning_manual_optimization_equals_a_hand_written_loop(engines: _Engines) -> None:
    """``automatic_optimization = False``: ``manual_backward``, ``self.clip_gradients``,
    ``opt.step()``: bitwise the oracle."""
    fit = _load(engines.outputs("lightning_manual") / "fit.pt")
    order = _check_clip_log(fit["clip_log"])
    _assert_like(fit["state"], _oracle(clip_order=order)[0], what="Lightning manual optimization")


@_needs("lightning_fit", "lightning_ddp")
def test_lightning_ddp_fork_matches_single_process(engines: _Engines) -> None:
    """``strategy="ddp_fork"``, 2 CPU processes on half batches: both ranks end bitwise alike,
    the main process gets rank 0's weights, and they match the single-process fit (itself
    checked against the oracle above) up to the reassociated gradient average."""
    folder = engines.outputs("lightning_ddp")
    assert engines.outcomes("lightning_ddp", ranks=1)[0]["phase"] == "trained"
    single = _load(engines.outputs("lightning_fit") / "fit.pt")
    ranks = [_load(folder / f"ddp{rank}.pt") for rank in range(R.WORLD)]
    main = _load(folder / "ddp_main.pt")["state"]
    for key in single["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        assert torch.equal(main[key], ranks[0]["state"][key]), key
    for rank in ranks:
        _check_clip_log(rank["clip_log"])
        _assert_like(rank["state"], single["state"], atol=ATOL, what="ddp_fork vs one process")
        for a, b in zip(rank["clip_log"], single["clip_log"]):
            torch.testing.assert_close(a["norm"], b["norm"], rtol=0, atol=ATOL)


@_needs("lightning_ddp_spawn_split_in_init")
def test_lightning_ddp_spawn_of_a_module_split_in_init_is_not_silent(engines: _Engines) -> None:
    """``ddp_spawn`` pickles the module, split in ``__init__`` with its groups kept on it, into
    fresh processes where paramsplit has split nothing (its parts arrive as plain tensors): it
    must train like the oracle or fail loudly, never step the weights whole."""
    folder = engines.outputs("lightning_ddp_spawn_split_in_init")
    outcome = engines.outcomes("lightning_ddp_spawn_split_in_init", ranks=1)[0]
    if outcome["phase"] != "trained":  # a worker's error, re-raised by Lightning's launcher
        assert "paramsplit:" in outcome["message"], outcome["traceback"]
        return
    for rank in range(R.WORLD):
        state = _load(folder / f"ddp{rank}.pt")["state"]
        _assert_like(state, _oracle()[0], atol=ATOL,
                     what=f"ddp_spawn, module split in __init__, rank {rank} (FROZEN moved in "
                          f"{_frozen_moved(state)})")


# -- FSDP1 ----------------------------------------------------------------------------------------

@_needs("fsdp1_train")
def test_fsdp1_training_fails_loudly_at_the_first_step(engines: _Engines) -> None:
    """Split, wrap in ``FullyShardedDataParallel(use_orig_params=True)``, AdamW(groups): the
    first step raises paramsplit's error on every rank (the weights are flat shards now), and
    nothing was stepped."""
    folder = engines.outputs("fsdp1_train")
    for rank, outcome in enumerate(engines.outcomes("fsdp1_train")):
        assert outcome["phase"] == "step 1", f"rank {rank}: {outcome}"
        assert outcome["type"] == "RuntimeError", outcome["traceback"]
        assert outcome["message"].startswith("paramsplit: parameter "), outcome["message"]
        assert "flattened by an engine such as FSDP1" in outcome["message"]
        result = _load(folder / f"fsdp{rank}.pt")
        assert list(result["after"]) == list(R.model().state_dict())
        for key, value in result["initial"].items():
            assert torch.equal(result["after"][key], value), key


@_needs("fsdp1_split_after_wrap")
def test_fsdp1_split_after_wrapping_is_loud(engines: _Engines) -> None:
    """Splitting a model FSDP1 has already wrapped (as Lightning's FSDPStrategy does before it
    calls ``configure_optimizers``) sees 1-D shards of the flat parameter: ``rows`` of
    ``2.weight`` would cut the shard's first elements, not the weight's rows. Must raise."""
    folder = engines.outputs("fsdp1_split_after_wrap")
    for rank, outcome in enumerate(engines.outcomes("fsdp1_split_after_wrap")):
        if outcome["phase"] == "split":  # a SpecError naming the key, FSDP1 and the remedy
            assert outcome["message"].startswith("spec['_fsdp_wrapped_module.2']") and \
                "FSDP1" in outcome["message"] and "fully_shard" in outcome["message"], \
                outcome["traceback"]
            continue
        result = _load(folder / f"fsdp{rank}.pt")
        moved = not torch.equal(result["after"]["2.weight"][:4], result["initial"]["2.weight"][:4])
        pytest.fail(f"rank {rank}: split accepted the FSDP1-wrapped model silently:\n"
                    f"{result['describe']}\nafter one step, rows 0:4 of 2.weight (FROZEN) "
                    f"changed: {moved}")


@_needs("fsdp1_state_dict")
def test_fsdp1_full_and_sharded_state_dicts_are_the_original_model(engines: _Engines) -> None:
    """Under FSDP1 a split model's state dict is the original model's: FULL_STATE_DICT saves and
    loads it (original keys, values), SHARDED_STATE_DICT round-trips through
    ``torch.distributed.checkpoint`` into a fresh split model, and so does
    ``get_model_state_dict``/``set_model_state_dict``."""
    folder = engines.outputs("fsdp1_state_dict")
    initial = R.model().state_dict()
    for rank in range(R.WORLD):
        result = _load(folder / f"state{rank}.pt")
        assert result["sharded_keys"] == sorted(initial)
        assert result["sharded_types"] in (["ShardedTensor"], ["DTensor"])  # really sharded
        for key in ("full", "full_loaded", "sharded_loaded", "dcp_api_full", "dcp_api_loaded"):
            assert list(result[key]) == list(initial), (key, list(result[key]))
            for name, value in initial.items():
                assert torch.equal(result[key][name], value), (rank, key, name)
        assert not torch.equal(result["fresh"]["0.weight"], initial["0.weight"])


# -- DeepSpeed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", DS_ZERO)
def test_deepspeed_zero_fails_loudly(engines: _Engines, scenario: str) -> None:
    """ZeRO 1, 2 and 3 (the config's torch AdamW, or a client one) on 2 CPU processes: paramsplit's
    RuntimeError naming DeepSpeed ZeRO, at ``deepspeed.initialize`` or the first step."""
    for rank, outcome in enumerate(engines.outcomes(scenario)):
        assert outcome["phase"] in ("initialize", "step 1"), (
            f"rank {rank} got to {outcome['phase']!r} with DeepSpeed ZeRO: not loud")
        assert outcome["type"] == "RuntimeError" and outcome["message"].startswith(
            "paramsplit:"), f"rank {rank}: not paramsplit's error:\n{outcome['traceback']}"
        assert "DeepSpeed ZeRO" in outcome["message"], outcome["message"]


@pytest.mark.parametrize("scenario", DS_STAGE0)
def test_deepspeed_stage0_matches_single_process(engines: _Engines, scenario: str) -> None:
    """No ZeRO, fp32, ``gradient_clipping``: DeepSpeed all-reduces the weights' gradients and
    steps the torch AdamW, whose hooks step the parts: both ranks end alike and match the
    oracle (full batch, one process)."""
    folder = engines.outputs(scenario)
    assert [o["phase"] for o in engines.outcomes(scenario)] == ["trained"] * R.WORLD
    states = [_load(folder / f"ds{rank}.pt") for rank in range(R.WORLD)]
    assert states[0]["optimizer"] == "AdamW"  # DeepSpeed steps the torch optimizer itself
    for key, value in states[0]["state"].items():
        assert torch.equal(states[1]["state"][key], value), key
    assert not _frozen_moved(states[0]["state"])
    _assert_like(states[0]["state"], _oracle()[0], atol=ATOL, what=scenario)


@pytest.mark.parametrize("scenario", DS_MIXED)
def test_deepspeed_stage0_mixed_precision_is_not_silent(engines: _Engines, scenario: str) -> None:
    """No ZeRO with bf16 or fp16: DeepSpeed's optimizer wrapper replaces the param groups'
    tensors by fp32 copies and steps those (the parts get zero gradients, each weight is stepped
    whole). Must fail loudly with paramsplit's error."""
    folder = engines.outputs(scenario)
    for rank, outcome in enumerate(engines.outcomes(scenario)):
        if outcome["phase"] == "trained":
            state = _load(folder / f"ds{rank}.pt")
            pytest.fail(f"rank {rank}: {scenario} trained silently with "
                        f"{state['optimizer']}; FROZEN elements moved in "
                        f"{_frozen_moved(state['state'])}")
        assert outcome["message"].startswith("paramsplit:"), outcome["traceback"]
