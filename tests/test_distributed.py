"""Split models under torch.distributed: DDP and FSDP2 (``fully_shard``).

Every scenario runs in 2 CPU processes that talk over gloo on 127.0.0.1 and compares what they
train with single-process training of an identically split model on the full batch. The losses
are means, so DDP's / FSDP's gradient averaging over the 2 half batches matches the full batch.

Starting the 2 processes costs more than any scenario, so the module starts them once, when
collection finishes, forked from the pytest process (which has imported everything they need),
and they run beside the rest of the suite (``background``, see conftest.py). Each rank runs the
workers of every selected scenario in turn, each in a fresh process group from the same RNG state
(seed 0), and ``torch.save``-s its results into that scenario's own folder (the workers only
assert their own setup). One test per scenario checks its results in the pytest process. A
worker's exception is recorded per scenario and rank and fails that scenario's test only. Every
scenario has a deadline (:data:`TIMEOUT_S`, watched while the tests wait) and every collective a
gloo timeout, so a hang fails the tests of the scenarios it stopped instead of blocking the run.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import paramsplit

WORLD = 2
TIMEOUT_S = 90.0  # deadline for one scenario, process start included (normal: seconds)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
STEPS = 3
LR = 0.01
ATOL = 1e-6  # distributed vs single process: the gradient sum is reassociated
MASK_SEED = 1
BATCH = 8


# -- the model, its split and the data (identical in every process) ------------------------------

def _mask() -> torch.Tensor:
    """Region ids of ``2.weight`` (shape (4, 32)): region 1 is FROZEN."""
    return torch.randint(0, 2, (4, 32), generator=torch.Generator().manual_seed(MASK_SEED))


def _model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _spec() -> dict[str, Any]:
    return {
        "0": paramsplit.rows({(0, 16): {"weight_decay": 0.0}, (16, None): {"weight_decay": 0.3}}),
        "2": paramsplit.Regions(_mask(), {0: {"weight_decay": 0.1, "lr": 0.02},
                                          1: paramsplit.FROZEN}),
    }


def _split(seed: int = 0, decay: bool = False) -> tuple[nn.Module, list[dict[str, Any]]]:
    """``_spec``'s split: ``0.weight`` (regions that differ only in weight_decay) in row parts,
    or with ``decay`` kept whole (the decay layout); ``2.weight`` in parts (FROZEN: sparse)."""
    model, groups = paramsplit.split(_model(seed), _spec(), per_element_decay=decay)
    layouts = {line.split()[0]: line.split()[-1]
               for line in paramsplit.describe(model).splitlines()[1:]}
    assert layouts == {"0.weight": "decay" if decay else "rows", "2.weight": "sparse"}, layouts
    return model, groups


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 4, generator=g)


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.mse_loss(model(x), y)  # a mean over the batch
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _reference(steps: int = STEPS, seed: int = 0, decay: bool = False) -> dict[str, torch.Tensor]:
    """Merged weights of single-process training on the full batch."""
    split_model, groups = _split(seed, decay)
    opt = torch.optim.AdamW(groups, lr=LR)
    x, y = _batch()
    for _ in range(steps):
        _step(split_model, opt, x, y)
    return paramsplit.merged_state_dict(split_model)


def _assert_close_dicts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def _assert_frozen_unchanged(merged: dict[str, torch.Tensor], seed: int = 0) -> None:
    """FROZEN elements kept the values of ``_model(seed)``; training moved everything else."""
    frozen = _mask() == 1
    assert frozen.any() and (~frozen).any()
    initial = _model(seed).state_dict()
    assert torch.equal(merged["2.weight"][frozen], initial["2.weight"][frozen]), "FROZEN changed"
    assert not torch.equal(merged["2.weight"][~frozen], initial["2.weight"][~frozen])
    assert not torch.equal(merged["0.weight"], initial["0.weight"])


# -- the run: one pair of processes runs every scenario ---------------------------------------

Worker = Callable[[int, Path], None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_scenario(rank: int, index: int, fn: Worker, store: dist.Store, out: Path,
                  rng_state: torch.Tensor) -> None:
    """Run ``fn(rank, out)`` in a process group of its own; record an exception in ``out``."""
    # Both ranks start together (the peer may still be timing out of the previous scenario).
    store.set(f"enter/{index}/{rank}", "1")
    store.wait([f"enter/{index}/{r}" for r in range(WORLD)],
               datetime.timedelta(seconds=2 * TIMEOUT_S))
    (out / f"started{rank}").touch()
    torch.set_rng_state(rng_state)  # every scenario starts from the same state, whatever ran before
    # A fresh group: a failed scenario's pending collectives cannot reach the next one.
    dist.init_process_group("gloo", store=dist.PrefixStore(f"scenario{index}/", store),
                            rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, out)
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported by the scenario's test
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
    # Outside the except block: the traceback no longer holds the scenario's models, so the
    # group's connections close now and a peer blocked in a collective fails at once.
    dist.destroy_process_group()
    gc.collect()
    (out / f"finished{rank}").touch()


def _entry(rank: int, workers: list[Worker], port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=2 * TIMEOUT_S))
    for index, fn in enumerate(workers):
        _run_scenario(rank, index, fn, store, Path(out) / fn.__name__, rng_state)
    # The master's store must outlive the other ranks' last use of it: they say goodbye last.
    if rank:
        store.set(f"exit/{rank}", "1")
    else:
        store.wait([f"exit/{r}" for r in range(1, WORLD)],
                   datetime.timedelta(seconds=2 * TIMEOUT_S))
    # Everything is on disk: skip the interpreter's teardown of torch (~1.5 s), unless coverage
    # is measuring this process and writes its data at exit.
    if "coverage" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _Run:
    """The outputs of the one run of ``workers``; why it ended early, if it did."""

    def __init__(self, out: Path, workers: list[Worker]) -> None:
        self.out, self.workers = out, workers
        self.failure: str | None = None
        for fn in workers:
            (out / fn.__name__).mkdir()

    def _finished(self) -> int:
        return sum(1 for fn in self.workers for rank in range(WORLD)
                   if (self.out / fn.__name__ / f"finished{rank}").exists())

    def _running(self) -> str:
        where = []
        for rank in range(WORLD):
            running = [fn.__name__ for fn in self.workers
                       if (self.out / fn.__name__ / f"started{rank}").exists()
                       and not (self.out / fn.__name__ / f"finished{rank}").exists()]
            where.append(f"rank {rank} in {running[0]}" if running
                         else f"rank {rank} outside any scenario")
        return ", ".join(where)

    def start(self) -> None:
        """Start the workers in WORLD processes, forked from this one (it has imported
        everything they need; it is called before any test runs, in the main thread)."""
        self._ctx = mp.start_processes(_entry, args=(self.workers, _free_port(), str(self.out)),
                                       nprocs=WORLD, join=False, start_method="fork")

    def wait(self) -> _Run:
        """Wait for the workers; stop on a crash or when a scenario is past its deadline
        (TIMEOUT_S without a scenario finishing on some rank)."""
        ctx = self._ctx
        finished, deadline = 0, time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=0.5):
                if self._finished() > finished:
                    finished, deadline = self._finished(), time.monotonic() + TIMEOUT_S
                elif time.monotonic() > deadline:
                    self.failure = (f"distributed workers did not finish within {TIMEOUT_S} s "
                                    f"(hang? {self._running()})")
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    for p in ctx.processes:
                        p.join(5)
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            self.failure = f"a distributed worker process failed ({self._running()}):\n{e}"
        return self

    def outputs(self, fn: Worker) -> Path:
        """The folder of ``fn``'s outputs; fail if a rank raised or did not finish it."""
        assert fn in self.workers, f"{fn.__name__} was not run: _scenarios() missed its test"
        out = self.out / fn.__name__
        failures = [f"rank {rank} raised in {fn.__name__}:\n{error.read_text()}"
                    for rank in range(WORLD) if (error := out / f"error{rank}.txt").exists()]
        missing = [rank for rank in range(WORLD) if not (out / f"finished{rank}").exists()]
        if missing:
            failures.append(f"{fn.__name__} did not finish on rank(s) {missing}: {self.failure}")
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return out


def _scenario(fn: Worker) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the worker of a test that is not parametrized by ``worker``."""
    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.dist_worker = fn  # type: ignore[attr-defined]
        return test
    return mark


def _scenarios(items: list[pytest.Item]) -> list[Worker]:
    """The workers the selected tests of this module need, in the order of their tests."""
    workers: list[Worker] = []
    for item in items:
        if getattr(getattr(item, "module", None), "__name__", None) != __name__:
            continue
        callspec = getattr(item, "callspec", None)
        fn = (callspec.params.get("worker") if callspec is not None else None) \
            or getattr(getattr(item, "function", None), "dist_worker", None)
        if fn is not None and fn not in workers:
            workers.append(fn)
    return workers


def background(items: list[pytest.Item], out: Path) -> Callable[[], _Run]:
    """Start the module's one run (see conftest.py): its 2 ranks run the workers of every
    selected scenario."""
    run = _Run(out, _scenarios(items))
    run.start()
    return run.wait


@pytest.fixture(scope="module")
def dist_run(background_result: _Run) -> _Run:
    return background_result


def _load(out: Path, name: str) -> list[Any]:
    return [torch.load(out / f"{name}{rank}.pt", weights_only=True) for rank in range(WORLD)]


# -- DDP ----------------------------------------------------------------------------------------

def _ddp_worker(rank: int, out: Path, **ddp_kwargs: Any) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    split_model, groups = _split(decay=ddp_kwargs.pop("decay", False))
    micro = ddp_kwargs.pop("micro_batches", 1)
    amp = ddp_kwargs.pop("grad_scaler", False)
    ddp = DDP(split_model, **ddp_kwargs)
    opt = torch.optim.AdamW(groups, lr=LR)  # DDP keeps the Parameter objects: groups stay valid
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if amp else None
    x, y = _batch()
    xs, ys = _half(x, rank).chunk(micro), _half(y, rank).chunk(micro)
    for _ in range(STEPS):
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            last = i == micro - 1
            with ddp.no_sync() if not last else torch.enable_grad():
                loss = nn.functional.mse_loss(ddp(xm), ym) / micro
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1e3)  # large: only the path
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    torch.save(paramsplit.merged_state_dict(ddp.module), out / f"ddp{rank}.pt")


def _ddp_worker_plain(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, gradient_as_bucket_view=False)


def _ddp_worker_bucket_view(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, gradient_as_bucket_view=True)


def _ddp_worker_no_sync(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, micro_batches=2)


def _ddp_worker_static_graph(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, static_graph=True)


def _ddp_worker_find_unused(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, find_unused_parameters=True)


def _ddp_worker_grad_scaler(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, grad_scaler=True)


def _ddp_worker_decay(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, decay=True)


def _ddp_worker_decay_grad_scaler(rank: int, out: Path) -> None:
    _ddp_worker(rank, out, decay=True, grad_scaler=True)


@pytest.mark.parametrize("worker,decay", [
    (_ddp_worker_plain, False), (_ddp_worker_bucket_view, False), (_ddp_worker_no_sync, False),
    (_ddp_worker_static_graph, False), (_ddp_worker_find_unused, False),
    (_ddp_worker_grad_scaler, False), (_ddp_worker_decay, True),
    (_ddp_worker_decay_grad_scaler, True)],
    ids=["grad-copy", "gradient_as_bucket_view", "no_sync-accumulation", "static_graph",
         "find_unused_parameters", "grad-scaler-clip", "decay-layout",
         "decay-layout-grad-scaler-clip"])
def test_ddp_matches_single_process(dist_run: _Run, worker: Worker, decay: bool) -> None:
    merged = _load(dist_run.outputs(worker), "ddp")
    want = _reference(decay=decay)
    for rank in range(WORLD):
        _assert_close_dicts(merged[rank], want)
        _assert_frozen_unchanged(merged[rank])
    for key in want:  # DDP replicas stay bitwise in sync
        assert torch.equal(merged[0][key], merged[1][key]), key


# -- DDP with resplit --------------------------------------------------------------------------

RESPLIT_STEPS = 6
RESPLIT_AFTER = (2, 4)  # the steps after which every rank resplits


def _top_half(weight: torch.Tensor) -> torch.Tensor:
    """The larger-magnitude half of ``weight``'s elements (a mask of its shape)."""
    flat = weight.detach().abs().flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[flat.topk(flat.numel() // 2).indices] = True
    return mask.view(weight.shape)


def _resplit_spec(mask: torch.Tensor, step: int) -> dict[str, Any]:
    """The spec of the resplit after ``step``: ``2.weight`` trains ``mask`` (sparse), the row
    blocks of ``0.weight`` move (rows: resplit keeps parts, as ``_split`` does)."""
    cut = 16 + 2 * step
    return {"0": paramsplit.rows({(0, cut): {"weight_decay": 0.0},
                                  (cut, None): {"weight_decay": 0.3}}),
            "2": paramsplit.Regions(mask, {True: {"weight_decay": 0.1, "lr": 0.02},
                                           False: paramsplit.FROZEN})}


def _ddp_resplit_worker(rank: int, out: Path) -> None:
    """Every rank resplits after the same steps, with the spec it computes from the weight DDP
    keeps replicated (``_top_half`` of ``2.weight``); each saves its masks and what it trained."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    split_model, groups = _split()
    ddp = DDP(split_model)
    opt = torch.optim.AdamW(groups, lr=LR)
    x, y = _batch()
    masks = []
    for step in range(1, RESPLIT_STEPS + 1):
        _step(ddp, opt, _half(x, rank), _half(y, rank))
        if step in RESPLIT_AFTER:
            masks.append(_top_half(ddp.module[2].weight))
            paramsplit.resplit(opt, ddp.module, _resplit_spec(masks[-1], step),
                               per_element_decay=False)
    labels = {line.split()[0]: line.split()[-1]
              for line in paramsplit.describe(ddp.module).splitlines()[1:]}
    assert labels == {"0.weight": "rows", "2.weight": "sparse"}, labels
    torch.save({"masks": masks, "state": paramsplit.merged_state_dict(ddp.module)},
               out / f"resplit{rank}.pt")


def _resplit_reference(masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Single-process training on the full batch with the same resplits (``masks``), each of
    which is also what this run computes from its own weight at that step."""
    model, groups = _split()
    opt = torch.optim.AdamW(groups, lr=LR)
    x, y = _batch()
    for step in range(1, RESPLIT_STEPS + 1):
        _step(model, opt, x, y)
        if step in RESPLIT_AFTER:
            mask = masks[RESPLIT_AFTER.index(step)]
            assert torch.equal(_top_half(model[2].weight), mask), step
            paramsplit.resplit(opt, model, _resplit_spec(mask, step), per_element_decay=False)
    return paramsplit.merged_state_dict(model)


@_scenario(_ddp_resplit_worker)
def test_ddp_resplit_on_every_rank_matches_single_process(dist_run: _Run) -> None:
    """Both ranks resplit alike at the same steps (the README's rule); training equals
    single-process training with the same resplits, and the replicas stay bitwise in sync."""
    results = _load(dist_run.outputs(_ddp_resplit_worker), "resplit")
    masks = results[0]["masks"]
    assert len(masks) == len(RESPLIT_AFTER)
    for a, b in zip(masks, results[1]["masks"]):
        assert torch.equal(a, b)  # the same spec on every rank
    first = _mask() == 0
    assert not torch.equal(masks[0], first) and not torch.equal(masks[1], masks[0])
    want = _resplit_reference(masks)
    for result in results:
        _assert_close_dicts(result["state"], want)
    for key in want:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key
    never = ~(first | masks[0] | masks[1])  # FROZEN all along
    assert never.any()
    initial = _model().state_dict()["2.weight"]
    assert torch.equal(results[0]["state"]["2.weight"][never], initial[never])
    assert (results[0]["state"]["2.weight"][masks[1]] != initial[masks[1]]).all()


# -- FSDP2 --------------------------------------------------------------------------------------

def _fsdp_split(seed: int = 0) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A split model sharded per layer then at the root, and AdamW groups for it.

    ``fully_shard`` replaces every parameter by a new DTensor Parameter, so the groups
    ``paramsplit.split`` returned point to the old objects: ``param_groups`` after sharding
    gives the new ones, with the same parts (now cut from this rank's shard).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, _ = _split(seed)  # parts: the decay layout refuses DTensors (see below)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    groups = paramsplit.param_groups(model)
    held = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in held for p in params.values())  # every weight, the carriers included
    for g in groups:  # parts (plain tensors) and DTensors never share a group (foreach)
        assert len({isinstance(p, DTensor) for p in g["params"]}) == 1, g["name"]
        assert g["name"].endswith("(shards)") == (not isinstance(g["params"][0], DTensor))
    return model, groups


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def _fsdp_train(rank: int, out: Path, model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Train a sharded split model on this rank's half batch; save its full state."""
    opt = torch.optim.AdamW(groups, lr=LR)
    x, y = _batch()
    for _ in range(STEPS):
        _step(model, opt, _half(x, rank), _half(y, rank))
    torch.save(_full_state(model), out / f"fsdp{rank}.pt")


def _fsdp_train_worker(rank: int, out: Path) -> None:
    _fsdp_train(rank, out, *_fsdp_split())


def _fsdp_to_worker(rank: int, out: Path) -> None:
    """``model.to(...)`` after ``fully_shard`` changes nothing paramsplit relies on."""
    model, groups = _fsdp_split()
    model.to(torch.float32)
    _fsdp_train(rank, out, model, groups)


def _fsdp_load_merged_worker(rank: int, out: Path) -> None:
    """An original-format checkpoint loads into a sharded split model."""
    model, groups = _fsdp_split(seed=3)
    paramsplit.load_merged_state_dict(model, _model(seed=7).state_dict())
    _fsdp_train(rank, out, model, groups)


@pytest.mark.parametrize("worker,seed", [(_fsdp_train_worker, 0), (_fsdp_to_worker, 0),
                                         (_fsdp_load_merged_worker, 7)],
                         ids=["train", "module-to-after-fully-shard", "load-merged-state-dict"])
def test_fsdp2_matches_single_process(dist_run: _Run, worker: Worker, seed: int) -> None:
    """Training (from ``_model(seed)``'s weights) matches single-process training."""
    out = dist_run.outputs(worker)
    want = _reference(seed=seed)
    for state in _load(out, "fsdp"):
        _assert_close_dicts(state, want)
        _assert_frozen_unchanged(state, seed)


def _fsdp_checkpoint_worker(rank: int, out: Path) -> None:
    """The README's recipe: the model through ``torch.distributed.checkpoint`` (the model's
    own DTensors), the optimizer (whose parts are this rank's plain tensors, which DCP's
    ``get_optimizer_state_dict`` cannot name) as one ``optimizer.state_dict()`` per rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    x, y = _batch()
    xs, ys = _half(x, rank), _half(y, rank)
    ckpt = out / "ckpt"

    # run A: step 1, save, steps 2..STEPS
    model, groups = _fsdp_split()
    opt = torch.optim.AdamW(groups, lr=LR)
    _step(model, opt, xs, ys)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(ckpt))
    torch.save(opt.state_dict(), ckpt / f"optim.rank{rank}.pt")
    for _ in range(STEPS - 1):
        _step(model, opt, xs, ys)
    uninterrupted = _full_state(model)

    # run B: a fresh sharded split model (other initial weights) loads the checkpoint, continues
    fresh, fresh_groups = _fsdp_split(seed=99)
    fresh_opt = torch.optim.AdamW(fresh_groups, lr=LR)
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(fresh, state["model"])
    fresh_opt.load_state_dict(torch.load(ckpt / f"optim.rank{rank}.pt", weights_only=True))
    after_load = _full_state(fresh)
    for _ in range(STEPS - 1):
        _step(fresh, fresh_opt, xs, ys)
    resumed = _full_state(fresh)
    torch.save({"uninterrupted": uninterrupted, "after_load": after_load, "resumed": resumed},
               out / f"ckpt{rank}.pt")


def _fsdp_decay_worker(rank: int, out: Path) -> None:
    """The decay layout on a sharded weight: the step refuses it, naming the weight and the
    remedy, and moves no weight."""
    from torch.distributed.fsdp import fully_shard

    model, _ = _split(decay=True)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(paramsplit.param_groups(model), lr=LR)
    x, y = _batch()
    before = _full_state(model)
    nn.functional.mse_loss(model(_half(x, rank)), _half(y, rank)).backward()

    def grads() -> dict[str, torch.Tensor | None]:
        return {n: None if p.grad is None else p.grad.full_tensor().clone()
                for n, p in model.named_parameters()}

    grads_before = grads()
    try:
        opt.step()
    except RuntimeError as e:
        error = str(e)
    else:
        error = None
    torch.save({"error": error, "before": before, "after": _full_state(model),
                "grads_before": grads_before, "grads_after": grads()}, out / f"decay{rank}.pt")


@_scenario(_fsdp_decay_worker)
def test_fsdp2_refuses_the_decay_layout_at_the_step(dist_run: _Run) -> None:
    for result in _load(dist_run.outputs(_fsdp_decay_worker), "decay"):
        assert result["error"] is not None, "the step ran"
        assert "'0.weight'" in result["error"] and "per_element_decay=False" in result["error"]
        for key, value in result["before"].items():
            assert torch.equal(result["after"][key], value), key


@_scenario(_fsdp_decay_worker)
def test_fsdp2_refused_decay_step_leaves_every_gradient_in_place(dist_run: _Run) -> None:
    """After the refusal every weight's .grad is still its gradient (the weights of other
    plans included: 2.weight's parts layout must not be left mid-step, its gradient hidden)."""
    for result in _load(dist_run.outputs(_fsdp_decay_worker), "decay"):
        for key, value in result["grads_before"].items():
            got = result["grads_after"][key]
            assert value is not None and got is not None and torch.equal(got, value), key


@_scenario(_fsdp_checkpoint_worker)
def test_fsdp2_sharded_checkpoint_save_load(dist_run: _Run) -> None:
    out = dist_run.outputs(_fsdp_checkpoint_worker)
    want = _reference()
    after_one_step = _reference(steps=1)
    for result in _load(out, "ckpt"):
        _assert_close_dicts(result["after_load"], after_one_step)
        for key, value in result["uninterrupted"].items():  # resuming changes nothing at all
            assert torch.equal(result["resumed"][key], value), key
        _assert_close_dicts(result["resumed"], want)
        _assert_frozen_unchanged(result["resumed"])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-v"]))

