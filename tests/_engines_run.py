"""Training engines on a split model, each scenario in a process of its own, for
tests/test_engines.py: Lightning (fit, checkpoint resume, manual optimization, ``ddp_fork`` and
``ddp_spawn`` on 2 CPU processes), FSDP1 (``FullyShardedDataParallel``: training, splitting a
wrapped model, state dicts) and DeepSpeed (ZeRO 0-3, fp32, bf16, fp16), 2 gloo processes where
distributed.

    python tests/_engines_run.py OUT_DIR SCENARIO...

The runner imports torch, paramsplit and the engines the scenarios need once, then forks one
child per scenario, two at a time (each gets a fresh paramsplit registry, process group and
engine state; the imports are paid once). A scenario writes what it trained (``torch.save``) or
the exception it expects (``outcome{rank}.json``: where it got to, the exception's type and
message) into ``OUT_DIR/SCENARIO``; an unexpected exception goes to ``error*.txt``, and ``done``
marks a scenario that returned. The tests judge these in the pytest process, which never imports
Lightning or DeepSpeed.

This module's top level imports torch and paramsplit only: the tests import it for the model,
the spec, the oracle's regions and the data.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import paramsplit

WORLD = 2
LR = 0.01
CLIP = 0.05  # gradient_clip_val: below every step's gradient norm, so clipping always acts
BATCH = 8
SAMPLES = 8  # one batch an epoch (a resumed Lightning fit restarts its data loader)
STEPS = 4
SCENARIO_TIMEOUT_S = 150.0
BUILD_TIMEOUT_S = 600.0  # DeepSpeed compiles its CPU shared-memory op once (then cached)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# -- the model, its split, the oracle's regions and the data --------------------------------------

def model(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                             nn.Linear(12, 4))


def _mask() -> torch.Tensor:
    """Region ids of ``4.weight`` (4, 12): 0, 1 (FROZEN, about a third) and 2, scattered."""
    return torch.randint(0, 3, (4, 12), generator=torch.Generator().manual_seed(5))


#: parameter -> [(region, its options or None for FROZEN)], regions as (start, stop) of rows or
#: columns or as a mask id; shared by ``spec`` and the oracle's ``regions``
ROWS = [((0, 5), {"weight_decay": 0.0}), ((5, 11), {"weight_decay": 0.3, "lr": 0.02}),
        ((11, 16), None)]
COLS = [((0, 6), {"weight_decay": 0.0}), ((6, 10), None), ((10, 16), {"lr": 0.005})]
MASK = {0: {"weight_decay": 0.2}, 1: None, 2: {}}


def _plan(options: dict[str, Any] | None) -> Any:
    return paramsplit.FROZEN if options is None else options


def spec() -> dict[str, Any]:
    """rows (``0.weight``), cols (``2.weight``), mask (``4.weight``), a whole bias (``4.bias``)."""
    return {"0": paramsplit.rows({span: _plan(o) for span, o in ROWS}),
            "2": paramsplit.cols({span: _plan(o) for span, o in COLS}),
            "4": paramsplit.Regions(_mask(), {k: _plan(o) for k, o in MASK.items()}),
            "4.bias": {"weight_decay": 0.0}}


def regions() -> dict[str, list[tuple[torch.Tensor, dict[str, Any] | None]]]:
    """The oracle's view of ``spec``: parameter name -> [(boolean mask, options or None)]."""
    out: dict[str, list[tuple[torch.Tensor, dict[str, Any] | None]]] = {}
    shapes = {n: tuple(p.shape) for n, p in model().named_parameters()}
    rows = []
    for (a, b), o in ROWS:
        m = torch.zeros(shapes["0.weight"], dtype=torch.bool)
        m[a:b] = True
        rows.append((m, o))
    cols = []
    for (a, b), o in COLS:
        m = torch.zeros(shapes["2.weight"], dtype=torch.bool)
        m[:, a:b] = True
        cols.append((m, o))
    out["0.weight"], out["2.weight"] = rows, cols
    out["4.weight"] = [(_mask() == k, o) for k, o in MASK.items()]
    out["4.bias"] = [(torch.ones(shapes["4.bias"], dtype=torch.bool), {"weight_decay": 0.0})]
    return out


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(SAMPLES, 8, generator=g), torch.randn(SAMPLES, 4, generator=g)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of ``steps`` steps, in order (a non-shuffled loader, epoch after epoch)."""
    x, y = data()
    per_epoch = SAMPLES // BATCH
    return [(x[(i % per_epoch) * BATCH:][:BATCH], y[(i % per_epoch) * BATCH:][:BATCH])
            for i in range(steps)]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)  # a mean: 2 half batches average to the full batch


def _grads_named(named: list[tuple[str, nn.Parameter]], params: list[torch.Tensor]) -> list[str]:
    """The names of ``params`` with a gradient, in order ("<part>" for one not in the model)."""
    names = {id(p): n for n, p in named}
    return [names.get(id(p), "<part>") for p in params if p.grad is not None]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _outcome(out: Path, rank: int, phase: str, error: BaseException | None = None) -> None:
    """Record where a scenario that should fail got to: ``phase`` and the exception, if any."""
    record: dict[str, Any] = {"phase": phase}
    if error is not None:
        record.update(type=type(error).__name__, message=str(error),
                      traceback="".join(traceback.format_exception(error)))
    (out / f"outcome{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(fn: Callable[[int, Path], None], out: Path) -> None:
    """Run ``fn(rank, out)`` in WORLD processes forked from this one, in a gloo group; a rank's
    exception goes to ``error{rank}.txt``."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_rank_entry, args=(fn, out, port), nprocs=WORLD, start_method="fork")


def _rank_entry(rank: int, fn: Callable[[int, Path], None], out: Path, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, out)
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported by the scenario's test
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch's teardown; everything is on disk


# -- Lightning ------------------------------------------------------------------------------------
# The LightningModules are module-level classes (``ddp_spawn`` pickles them), defined on first use
# (PEP 562 ``__getattr__``) so that importing this module does not import Lightning.

_LIGHTNING_CLASSES = ("SplitModule", "SplitInInitModule", "ManualModule", "SaveRank")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_CLASSES:
        return _lightning(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning(name: str) -> Any:
    """The Lightning class ``name`` of this module (defined once)."""
    if name not in globals():
        _define_lightning()
    return globals()[name]


def _define_lightning() -> None:
    import lightning as L

    class SplitModule(L.LightningModule):
        """The model, split in ``configure_optimizers`` (which runs in every worker process)."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            self.model = model(seed)
            self.clip_log: list[dict[str, Any]] = []  # per step: what clip_grad_norm_ sees

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            _, groups = paramsplit.split(self.model, spec())
            return torch.optim.AdamW(groups, lr=LR)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            # Lightning clips right after this hook, over every parameter of the optimizer.
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grads = [p.grad for p in params if p.grad is not None]
            self.clip_log.append({
                "with_grad": _grads_named(list(self.model.named_parameters()), params),
                "norm": torch.nn.utils.get_total_norm(grads) if grads else None})

    class SplitInInitModule(SplitModule):
        """Split in ``__init__``, the groups kept on the module for ``configure_optimizers``."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__(seed)
            _, self.groups = paramsplit.split(self.model, spec())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.groups, lr=LR)

    class ManualModule(SplitModule):
        """Manual optimization: backward, clip and step in ``training_step``."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__(seed)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            x, y = batch
            loss = loss_fn(self.model(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            params = [p for g in opt.param_groups for p in g["params"]]
            self.clip_log.append({
                "with_grad": _grads_named(list(self.model.named_parameters()), params),
                "norm": None})
            self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
            opt.step()
            return loss

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            pass  # under manual optimization Lightning calls it inside optimizer.step

    class SaveRank(L.Callback):
        """Saves what each worker process trained into ``out/ddp{rank}.pt``."""

        def __init__(self, out: Path) -> None:
            self.out = out

        def on_train_end(self, trainer: Any, module: Any) -> None:
            torch.save({"state": _state(module.model), "clip_log": module.clip_log},
                       self.out / f"ddp{trainer.global_rank}.pt")

    for cls in (SplitModule, SplitInInitModule, ManualModule, SaveRank):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


def _loader(batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()),
                                       batch_size=batch_size, shuffle=False)


def _trainer(out: Path, **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(**{"accelerator": "cpu", "max_steps": STEPS, "gradient_clip_val": CLIP,
                        "enable_progress_bar": False, "logger": False,
                        "enable_model_summary": False, "enable_checkpointing": False,
                        "default_root_dir": str(out), "num_sanity_val_steps": 0, **kwargs})


def lightning_fit(out: Path) -> None:
    """Single process: fit, checkpointing every epoch (= every step); save the weights and what
    clipping saw at each step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _lightning("SplitModule")(seed=0)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1,
                           filename="{epoch}")
    _trainer(out, enable_checkpointing=True, callbacks=[ckpt]).fit(module, _loader())
    torch.save({"state": _state(module.model), "clip_log": module.clip_log,
                "describe": paramsplit.describe(module.model)}, out / "fit.pt")


def lightning_resume(out: Path) -> None:
    """Resume ``lightning_fit``'s checkpoint of epoch 1 (step 2 of 4) in a fresh Trainer and a
    fresh model of other initial weights; save what it trained."""
    ckpt = out.parent / "lightning_fit" / "ckpt" / "epoch=1.ckpt"
    if not ckpt.exists():
        raise RuntimeError(f"lightning_fit wrote no checkpoint {ckpt}")
    module = _lightning("SplitModule")(seed=123)
    initial = _state(module.model)
    _trainer(out).fit(module, _loader(), ckpt_path=str(ckpt))
    torch.save({"state": _state(module.model), "initial": initial, "clip_log": module.clip_log},
               out / "resume.pt")


def lightning_manual(out: Path) -> None:
    """Single process, manual optimization (``self.clip_gradients``, ``opt.step()``)."""
    module = _lightning("ManualModule")(seed=0)
    _trainer(out, gradient_clip_val=None).fit(module, _loader())
    torch.save({"state": _state(module.model), "clip_log": module.clip_log}, out / "fit.pt")


def _lightning_ddp(out: Path, strategy: str, module_class: str) -> None:
    """``strategy`` on 2 CPU processes (gloo), each a half batch (Lightning's DistributedSampler):
    every rank saves what it trained; a raise in ``fit`` is recorded."""
    module = _lightning(module_class)(seed=0)
    trainer = _trainer(out, strategy=strategy, devices=WORLD,
                       callbacks=[_lightning("SaveRank")(out)])
    try:
        trainer.fit(module, _loader(BATCH // WORLD))
    except Exception as e:  # noqa: BLE001 - the outcome the test checks
        _outcome(out, 0, "fit", e)
        return
    _outcome(out, 0, "trained")
    torch.save({"state": _state(module.model)}, out / "ddp_main.pt")  # rank 0's, sent back


def lightning_ddp(out: Path) -> None:
    """``ddp_fork``: the workers are forks of this process (no pickling, no second import)."""
    _lightning_ddp(out, "ddp_fork", "SplitModule")


def lightning_ddp_spawn_split_in_init(out: Path) -> None:
    """``ddp_spawn`` with a module split in ``__init__``: the workers get a pickled copy."""
    _lightning_ddp(out, "ddp_spawn", "SplitInInitModule")


# -- FSDP1 ----------------------------------------------------------------------------------------

def _fsdp1(m: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(m, use_orig_params=True, device_id=torch.device("cpu"))


def _fsdp1_train_rank(rank: int, out: Path) -> None:
    """Split, wrap, build AdamW from the groups, train on this rank's half batches. Records where
    it got to; a raise is recorded and ends the run (the peer raises at the same step)."""
    split_model, groups = paramsplit.split(model(), spec())
    initial = _state(split_model)
    wrapped = _fsdp1(split_model)
    opt = torch.optim.AdamW(groups, lr=LR)
    step = 0
    try:
        for step, (x, y) in enumerate(batches(), 1):
            loss_fn(wrapped(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
            opt.step()
            opt.zero_grad()
        _outcome(out, rank, "trained")
    except Exception as e:  # noqa: BLE001 - the outcome the test checks
        _outcome(out, rank, f"step {step}", e)
    torch.save({"initial": initial, "after": _fsdp1_full(wrapped)}, out / f"fsdp{rank}.pt")


def _fsdp1_full(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
        return {k: v.detach().clone() for k, v in wrapped.state_dict().items()}


def fsdp1_train(out: Path) -> None:
    _ranks(_fsdp1_train_rank, out)


def _fsdp1_split_after_wrap_rank(rank: int, out: Path) -> None:
    """Wrap first, then split ``2.weight`` (12, 16) by the name the wrapper shows: rows 0:4
    FROZEN. FSDP1 has flattened it (this rank's shard of the flat parameter) by then. If split
    accepts, one step is taken and the model's full state saved."""
    wrapped = _fsdp1(model())
    initial = _fsdp1_full(wrapped)
    try:
        _, groups = paramsplit.split(
            wrapped, {"_fsdp_wrapped_module.2": paramsplit.rows({(0, 4): paramsplit.FROZEN})})
    except Exception as e:  # noqa: BLE001 - the outcome the test checks
        _outcome(out, rank, "split", e)
        return
    describe = paramsplit.describe(wrapped)
    opt = torch.optim.AdamW(groups, lr=LR)
    x, y = batches(1)[0]
    loss_fn(wrapped(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
    opt.step()
    _outcome(out, rank, "split accepted, stepped")
    torch.save({"describe": describe, "initial": initial, "after": _fsdp1_full(wrapped)},
               out / f"fsdp{rank}.pt")


def fsdp1_split_after_wrap(out: Path) -> None:
    _ranks(_fsdp1_split_after_wrap_rank, out)


def _fsdp1_state_dict_rank(rank: int, out: Path) -> None:
    """The model's full and sharded state dicts under FSDP1 (split before wrapping)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    result: dict[str, Any] = {}
    a = _fsdp1(paramsplit.split(model(seed=0), spec())[0])
    result["full"] = _fsdp1_full(a)
    # full load: the weights of another seed, through the FULL_STATE_DICT path
    b = _fsdp1(paramsplit.split(model(seed=5), spec())[0])
    with FSDP.state_dict_type(b, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
        b.load_state_dict(model(seed=0).state_dict())
    result["full_loaded"] = _fsdp1_full(b)
    # sharded: save ``a`` with DCP from its SHARDED_STATE_DICT, load into a fresh seed-7 model
    ckpt = out / "sharded"
    with FSDP.state_dict_type(a, StateDictType.SHARDED_STATE_DICT):
        sharded = a.state_dict()
        result["sharded_keys"] = sorted(sharded)
        result["sharded_types"] = sorted({type(v).__name__ for v in sharded.values()})
        dcp.save({"model": sharded}, checkpoint_id=str(ckpt))
    c = _fsdp1(paramsplit.split(model(seed=7), spec())[0])
    result["fresh"] = _fsdp1_full(c)
    with FSDP.state_dict_type(c, StateDictType.SHARDED_STATE_DICT):
        state = {"model": c.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))
        c.load_state_dict(state["model"])
    result["sharded_loaded"] = _fsdp1_full(c)
    # torch.distributed.checkpoint.state_dict's API, full
    full = get_model_state_dict(a, options=StateDictOptions(full_state_dict=True))
    result["dcp_api_full"] = {k: v.detach().clone() for k, v in full.items()}
    d = _fsdp1(paramsplit.split(model(seed=9), spec())[0])
    set_model_state_dict(d, full, options=StateDictOptions(full_state_dict=True))
    result["dcp_api_loaded"] = _fsdp1_full(d)
    torch.save(result, out / f"state{rank}.pt")


def fsdp1_state_dict(out: Path) -> None:
    _ranks(_fsdp1_state_dict_rank, out)


# -- DeepSpeed ------------------------------------------------------------------------------------

def _ds_config(stage: int, client: bool, precision: str) -> dict[str, Any]:
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": BATCH // WORLD,
                              "gradient_accumulation_steps": 1,
                              "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
                              "steps_per_print": 10 ** 6, "wall_clock_breakdown": False}
    if not client:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}
    if stage:
        config["zero_force_ds_cpu_optimizer"] = False  # a torch optimizer under ZeRO
    if precision != "fp32":
        config[precision] = {"enabled": True}
    return config


def _deepspeed_rank(rank: int, out: Path, stage: int, client: bool, precision: str) -> None:
    """deepspeed.initialize with paramsplit's groups (``model_parameters`` and the config's
    AdamW, or a client torch AdamW), then train on this rank's half batches; record where it got
    to."""
    import deepspeed

    split_model, groups = paramsplit.split(model(), spec())
    initial = _state(split_model)
    kwargs: dict[str, Any] = ({"optimizer": torch.optim.AdamW(groups, lr=LR)} if client
                              else {"model_parameters": groups})
    try:
        engine, optimizer, _, _ = deepspeed.initialize(
            model=split_model, config=_ds_config(stage, client, precision),
            dist_init_required=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the outcome the test checks
        _outcome(out, rank, "initialize", e)
        return
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    step = 0
    try:
        for step, (x, y) in enumerate(batches(), 1):
            loss = loss_fn(engine(x.chunk(WORLD)[rank].to(dtype)), y.chunk(WORLD)[rank].to(dtype))
            engine.backward(loss)
            engine.step()
    except Exception as e:  # noqa: BLE001 - the outcome the test checks
        _outcome(out, rank, f"step {step}", e)
        return
    _outcome(out, rank, "trained")
    torch.save({"initial": initial, "state": _state(split_model),
                "optimizer": type(optimizer).__name__}, out / f"ds{rank}.pt")


def _deepspeed(stage: int, client: bool, precision: str = "fp32") -> Callable[[Path], None]:
    def run(out: Path) -> None:
        def rank_fn(rank: int, out: Path) -> None:
            _deepspeed_rank(rank, out, stage, client, precision)
        _ranks(rank_fn, out)
    return run


def deepspeed_ops(out: Path) -> None:
    """Compile DeepSpeed's CPU shared-memory op, which every rank's ``deepspeed.initialize``
    loads (torch's extension cache keeps it: only a first run compiles), before the DeepSpeed
    scenarios start: their ranks then only load it."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


# -- the runner -----------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Path], None]] = {
    "lightning_fit": lightning_fit,
    "lightning_resume": lightning_resume,
    "lightning_manual": lightning_manual,
    "lightning_ddp": lightning_ddp,
    "lightning_ddp_spawn_split_in_init": lightning_ddp_spawn_split_in_init,
    "fsdp1_train": fsdp1_train,
    "fsdp1_split_after_wrap": fsdp1_split_after_wrap,
    "fsdp1_state_dict": fsdp1_state_dict,
    **{f"deepspeed_zero{s}{'_client' if c else ''}": _deepspeed(s, c)
       for s in (0, 1, 2, 3) for c in (False, True)},
    "deepspeed_zero0_bf16": _deepspeed(0, False, "bf16"),
    "deepspeed_zero0_fp16": _deepspeed(0, False, "fp16"),
}
#: scenario -> the scenario that must finish before it starts (it reads its output, or it
#: compiles what it loads)
AFTER = {"lightning_resume": "lightning_fit",
         **{n: "deepspeed_ops" for n in SCENARIOS if n.startswith("deepspeed")}}
SCENARIOS["deepspeed_ops"] = deepspeed_ops
#: started first: the longest (a cold build of DeepSpeed's op; ddp_spawn imports torch and
#: Lightning again in its 2 workers)
FIRST = ("deepspeed_ops", "lightning_ddp_spawn_split_in_init")


def _child(name: str, out: Path) -> int:
    """Fork a child that runs scenario ``name`` (output to ``out/log.txt``); its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        fd = os.open(out / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115
        SCENARIOS[name](out)
        (out / "done").touch()
    except BaseException:  # noqa: BLE001 - reported by the scenario's test
        (out / "error.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(out: Path, names: list[str], lanes: int = 2) -> None:
    """Run the scenarios ``names`` (and those they need), ``lanes`` at a time, each in a child
    of this process; ``out/timings.json`` says how long each took."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    t0 = time.monotonic()
    names = list(dict.fromkeys([AFTER[n] for n in names if n in AFTER] + names))
    names.sort(key=lambda n: n not in FIRST)  # stable: otherwise in the order given
    if any(n.startswith("lightning") for n in names):
        import lightning  # noqa: F401 - imported once, before the forks
    if any(n.startswith("deepspeed") for n in names):
        import deepspeed  # noqa: F401

        # imported by the first optimizer and by ZeRO's optimizer check (2 s each a scenario)
        for module in ("torch._dynamo", "deepspeed.runtime.zero.muon.muon_optimizer"):
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    timings: dict[str, float] = {"imports": time.monotonic() - t0}
    pending = list(names)
    running: dict[int, tuple[str, float]] = {}
    while pending or running:
        busy = {n for n, _ in running.values()}
        for name in [n for n in pending if AFTER.get(n) not in set(pending) | busy]:
            if len(running) >= lanes:
                break
            pending.remove(name)
            (out / name).mkdir(parents=True, exist_ok=True)
            running[_child(name, out / name)] = (name, time.monotonic())
        time.sleep(0.05)
        for pid, (name, start) in list(running.items()):
            timeout = BUILD_TIMEOUT_S if name == "deepspeed_ops" else SCENARIO_TIMEOUT_S
            if os.waitpid(pid, os.WNOHANG)[0]:
                timings[name] = time.monotonic() - start
                del running[pid]
            elif time.monotonic() - start > timeout:
                _kill_tree(pid)
                os.waitpid(pid, 0)
                (out / name / "timeout.txt").write_text(f"killed after {timeout} s")
                timings[name] = time.monotonic() - start
                del running[pid]
    timings["total"] = time.monotonic() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch's teardown


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and its children (the ranks it forked), by pid."""
    children: list[int] = []
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for c in children:
        _kill_tree(c)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
