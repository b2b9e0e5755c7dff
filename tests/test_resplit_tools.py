"""``resplit`` where people train: a Hugging Face Trainer callback, a Lightning callback, tied
parameters, every layout (the ``decay`` one included) and an LR scheduler created before.

Oracles:

* a hand-written per-element AdamW (:class:`ElementAdamW`, torch's for-loop AdamW written out
  op by op on each optimizer tensor's elements) whose membership changes at the same steps, by
  the state rule of ``paramsplit/_resplit.py``: an element that trains on keeps its moments, a
  new one starts at zero, a FROZEN one drops them; a tensor's step count is the largest among
  its elements that had state (0 when none had: a fresh tensor). The tensors are the parts
  (one per trained region), or the whole weight for the ``decay`` and ``whole`` layouts;
* for the Trainer and Lightning callbacks: the same loop written by hand, with ``resplit`` at
  the same steps, compared bitwise (float32, ``foreach=False`` AdamW).
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import paramsplit as ps
from paramsplit import FROZEN, Regions

sys.path.insert(0, str(Path(__file__).parent))
import _trainer_run  # noqa: E402  (the tiny GPT-2 and the data of the Trainer tests)

LR, B1, B2, EPS, DEFAULT_WD = 0.02, 0.9, 0.999, 1e-8, 0.05
A = {"weight_decay": 0.0}
B = {"weight_decay": 0.2}


def _adamw(params: Any, lr: float = LR) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(B1, B2), eps=EPS, weight_decay=DEFAULT_WD,
                             foreach=False)


class ElementAdamW:
    """Per-element AdamW over one weight. ``tensors`` are the optimizer's tensors of the current
    plan: ``(elements, per-element weight_decay as float64)``; each has one step count."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.w = weight
        self.m = torch.zeros_like(weight)
        self.v = torch.zeros_like(weight)
        self.had = torch.zeros(weight.shape, dtype=torch.bool)  # elements with state
        self.steps = torch.zeros(weight.shape, dtype=torch.float64)
        self.tensors: list[list[Any]] = []  # [elements, weight_decay, step]

    def resplit(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        trained = torch.zeros(self.w.shape, dtype=torch.bool)
        for sel, _ in tensors:
            assert not (trained & sel).any()
            trained |= sel
        self.m[~trained] = 0  # FROZEN elements drop their state
        self.v[~trained] = 0
        self.had &= trained
        self.tensors = []
        for sel, wd in tensors:
            old = self.had & sel
            step = float(self.steps[old].max()) if old.any() else 0.0
            self.tensors.append([sel, wd, step])

    def step(self, grad: torch.Tensor, lr: float) -> None:
        for t in self.tensors:
            sel, wd, step = t
            if not sel.any():
                continue
            t[2] = step = step + 1
            p, g, m, v = self.w[sel], grad[sel], self.m[sel], self.v[sel]
            decays = wd[sel]
            for d in decays.unique().tolist():  # decoupled decay, one python scalar per value
                if d != 0:
                    at = decays == d
                    p[at] = p[at].mul_(1 - lr * d)
            m.lerp_(g, 1 - B1)
            v.mul_(B2).addcmul_(g, g, value=1 - B2)
            step_size = lr / (1 - B1 ** step)
            denom = (v.sqrt() / (1 - B2 ** step) ** 0.5).add_(EPS)
            p.addcdiv_(m, denom, value=-step_size)
            self.w[sel], self.m[sel], self.v[sel] = p, m, v
            self.had[sel] = True
            self.steps[sel] = step


# -- plans of one (8, 12) weight in every layout, and the oracle's tensors for each ------------

SHAPE = (8, 12)


def _ids(seed: int, frozen_share: float, trained: bool = True,
         shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Region ids 0 (A), 1 (B), 2 (FROZEN, about ``frozen_share`` of the elements)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    ids = torch.where(u < 0.5 * (1 - frozen_share), 0, 1)
    return torch.where(u >= 1 - frozen_share, 2, ids) if trained else ids


def _regions(ids: torch.Tensor) -> Regions:
    opts = {0: A, 1: B, 2: FROZEN}
    return Regions(ids, {k: opts[k] for k in ids.unique().tolist()})


def _block_ids(dim: int, bounds: list[tuple[int, int, int]]) -> torch.Tensor:
    ids = torch.empty(SHAPE, dtype=torch.long)
    for a, b, r in bounds:
        ids.narrow(dim, a, b - a).fill_(r)
    return ids


def phases() -> list[tuple[str, Any, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``(layout, plan, oracle tensors)`` of each phase, in the order the tests resplit."""
    def parts(ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(ids == 0, torch.full(SHAPE, A["weight_decay"], dtype=torch.float64)),
                (ids == 1, torch.full(SHAPE, B["weight_decay"], dtype=torch.float64))]

    def whole(wd: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.ones(SHAPE, dtype=torch.bool), wd)]

    rows_ids = _block_ids(0, [(0, 3, 0), (3, 6, 1), (6, 8, 2)])
    cols_ids = _block_ids(1, [(0, 4, 1), (4, 7, 2), (7, 12, 0)])
    mask_ids, sparse_ids, mask2_ids = _ids(1, 0.3), _ids(2, 0.75), _ids(3, 0.4)
    decay_ids = _ids(4, 0.0, trained=False)
    per_element = torch.where(torch.rand(SHAPE, generator=torch.Generator().manual_seed(5)) < .5,
                              0.0, 0.2)
    rows2_ids = _block_ids(0, [(0, 2, 2), (2, 5, 0), (5, 8, 1)])
    return [
        ("rows", ps.rows({(0, 3): A, (3, 6): B, (6, None): FROZEN}), parts(rows_ids)),
        ("cols", ps.cols({(0, 4): B, (4, 7): FROZEN, (7, None): A}), parts(cols_ids)),
        ("mask", _regions(mask_ids), parts(mask_ids)),
        ("sparse", _regions(sparse_ids), parts(sparse_ids)),
        ("decay", _regions(decay_ids), whole(torch.where(decay_ids == 0, 0.0, 0.2).double())),
        ("whole", B, whole(torch.full(SHAPE, 0.2, dtype=torch.float64))),
        ("whole", FROZEN, []),
        ("decay", per_element, whole(per_element.double())),  # per-element weight_decay
        ("mask", _regions(mask2_ids), parts(mask2_ids)),
        ("rows", ps.rows({(0, 2): FROZEN, (2, 5): A, (5, None): B}), parts(rows2_ids)),
    ]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def _train_phases(chosen: list[int], lr_lambda: Any = None, steps: int = 2) -> None:
    """Split ``0`` as the first chosen phase, resplit into each next one after ``steps`` steps;
    after every step the model equals a per-element AdamW (``0.weight``, ``2.weight``) and a
    plain AdamW (everything else) bitwise. ``2.weight`` keeps a decay plan, so that every group
    a phase needs exists from the start: no resplit may add one (a warning would say so)."""
    plans = [phases()[i] for i in chosen]
    model = _mlp()
    ref = copy.deepcopy(model)
    spec2 = _regions(_ids(9, 0.0, trained=False, shape=(6, 8)))
    model, groups = ps.split(model, {"0": plans[0][1], "2": spec2})
    opt = _adamw(groups)
    ref_rest = _adamw([p for n, p in ref.named_parameters() if n not in ("0.weight", "2.weight")])
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in (opt, ref_rest)] \
        if lr_lambda else []
    oracle0, oracle2 = ElementAdamW(ref[0].weight.detach()), ElementAdamW(ref[2].weight.detach())
    oracle2.resplit([(torch.ones(6, 8, dtype=torch.bool),
                      torch.where(spec2.mask == 0, 0.0, 0.2).double())])
    g = torch.Generator().manual_seed(1)
    weight = model[0].weight
    done = 0
    for i, (layout, plan, tensors) in enumerate(plans):
        if i:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no new param group, nothing unscheduled
                ps.resplit(opt, model, {"0": plan})
        oracle0.resplit(tensors)
        assert ps._sync._SPLITS[weight].label == layout, (i, layout)
        assert weight.requires_grad == bool(tensors), i
        for step in range(steps):
            lr = LR * (lr_lambda(done) if lr_lambda else 1.0)
            for group in opt.param_groups:  # the schedule reaches every group, resplit or not
                assert group["lr"] == lr, (i, step, group["name"])
            x = torch.randn(5, 12, generator=g)
            opt.zero_grad()
            ref_rest.zero_grad()
            ref[0].weight.grad = ref[2].weight.grad = None
            model(x).square().mean().backward()
            ref(x).square().mean().backward()
            opt.step()
            ref_rest.step()
            with torch.no_grad():
                oracle0.step(ref[0].weight.grad, lr)
                oracle2.step(ref[2].weight.grad, lr)
            for sched in scheds:
                sched.step()
            done += 1
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), (i, layout, step, n)


def test_resplit_through_every_layout_equals_a_per_element_adamw():
    """rows -> cols -> mask -> sparse -> decay -> whole -> FROZEN (requires_grad off) -> decay
    (a per-element weight_decay tensor, from FROZEN) -> mask -> rows: every element's state
    carried by the rule, bitwise."""
    _train_phases(list(range(len(phases()))))


def test_an_lr_scheduler_created_before_resplit_schedules_the_resplit_groups():
    """LambdaLR built with the optimizer: after each resplit every group (those that took the
    new parts included) gets the scheduled lr, and the per-element decay of the ``decay``
    layout uses it too (bitwise the per-element AdamW at the scheduled lr)."""
    _train_phases([2, 0, 3, 4, 7], lr_lambda=lambda s: 0.8 ** s)


# -- tied parameters ------------------------------------------------------------------------------

class _Tied(nn.Module):
    """An embedding and an output layer that share one weight (as GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weight_resplits_once_and_stays_tied():
    model = _Tied()
    ref = copy.deepcopy(model)
    assert ref.head.weight is ref.emb.weight
    g = torch.Generator().manual_seed(4)
    masks = [torch.rand(20, 8, generator=g) < share for share in (0.3, 0.6, 0.2, 0.5)]
    names = ["emb", "head", "emb.weight", "head.weight"]  # either name, each resplit
    model, groups = ps.split(model, {names[0]: Regions(masks[0], {True: B, False: FROZEN})})
    opt = _adamw(groups)
    ref_rest = _adamw([ref.mid.weight, ref.mid.bias])
    oracle = ElementAdamW(ref.emb.weight.detach())
    weight = model.emb.weight
    for i, (name, mask) in enumerate(zip(names, masks)):
        plan = Regions(mask, {True: B, False: FROZEN})
        if i:
            held = [list(gr["params"]) for gr in opt.param_groups]
            with pytest.raises(ps.SpecError, match="already names"):  # both names: refused
                ps.resplit(opt, model, {"emb": plan, "head": plan})
            assert [list(gr["params"]) for gr in opt.param_groups] == held  # nothing changed
            ps.resplit(opt, model, {name: plan})
        oracle.resplit([(mask, torch.full((20, 8), 0.2, dtype=torch.float64))])
        assert model.head.weight is model.emb.weight is weight
        split = ps._sync._SPLITS[weight]
        assert split.names == ["emb.weight", "head.weight"]
        held = [p for gr in opt.param_groups for p in gr["params"]]
        assert sum(p is weight for p in held) == 1  # the weight once, with one set of parts
        parts = [p for p in held if getattr(p, ps._sync._PART, (None,))[0] is split]
        assert len(parts) == 1 and parts[0].numel() == int(mask.sum())
        assert len(held) == 1 + 1 + 2  # part, weight, mid.weight, mid.bias
        assert [line.split()[0] for line in ps.describe(model).splitlines()[1:]] == \
            ["emb.weight"] * 2
        for _ in range(2):
            ids = torch.randint(0, 20, (6, 5), generator=g)
            target = torch.randint(0, 20, (6, 5), generator=g)
            for m in (model, ref):
                nn.functional.cross_entropy(m(ids).flatten(0, 1), target.flatten()).backward()
            opt.step()
            ref_rest.step()
            with torch.no_grad():
                oracle.step(ref.emb.weight.grad, LR)
            opt.zero_grad()
            ref_rest.zero_grad()
            ref.emb.weight.grad = None
            assert torch.equal(model.emb.weight, ref.emb.weight), i
            assert torch.equal(model.mid.weight, ref.mid.weight), i
    assert model.head.weight is model.emb.weight
    assert list(model.state_dict()) == list(_Tied().state_dict())  # the model's own keys


# -- drop and grow, for the callbacks and their hand-written loops --------------------------------

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
EVERY, TOOL_STEPS, TOOL_LR = 2, 6, 1e-2


def _block_names(model: nn.Module) -> list[str]:
    return [f"transformer.h.{i}.{w}" for i in range(len(model.transformer.h)) for w in BLOCK]


def _initial_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.rand(model.get_parameter(n + ".weight").shape, generator=g) < 0.25
            for n in _block_names(model)}


def _spec(masks: dict[str, torch.Tensor]) -> dict[str, Regions]:
    return {n: Regions(m, {True: {"weight_decay": 0.1}, False: FROZEN}) for n, m in masks.items()}


def _drop_and_grow(model: nn.Module, masks: dict[str, torch.Tensor], step: int,
                   by_gradient: bool) -> dict[str, torch.Tensor]:
    """Drop the smallest-magnitude quarter of each weight's trained elements; grow as many
    FROZEN ones: by gradient magnitude (RigL) or at random (SET, a generator seeded by step)."""
    out = {}
    g = torch.Generator().manual_seed(100 + step)
    for n, mask in masks.items():
        w = model.get_parameter(n + ".weight")
        flat = mask.flatten()
        k = int(flat.sum()) // 4
        score = (w.grad.abs() if by_gradient else torch.rand(w.shape, generator=g)).flatten()
        new = flat.clone()
        new[w.detach().abs().flatten().masked_fill(~flat, math.inf).topk(k, largest=False)
            .indices] = False
        new[score.masked_fill(flat, -math.inf).topk(k).indices] = True
        out[n] = new.view_as(mask)
    return out


def _batches() -> list[dict[str, torch.Tensor]]:
    items = _trainer_run.data()  # 24 sequences: TOOL_STEPS batches of 4, in order
    return [{k: torch.stack([it[k] for it in items[i:i + 4]]) for k in items[0]}
            for i in range(0, 4 * TOOL_STEPS, 4)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_parameter(n + ".weight").detach().clone() for n in _block_names(model)}


def _check_runs(got: nn.Module, want: nn.Module, callback: Any, want_masks: list) -> None:
    """The tool's run equals the hand-written one bitwise; resplit changed the masks, the
    elements trained after the last resplit moved after it (in both runs), and the elements
    FROZEN all along did not move."""
    got_masks = callback.history
    assert len(got_masks) == len(want_masks) == TOOL_STEPS // EVERY - 1
    stale = [n for n, before in callback.snapshots[-1].items()
             if not (got.get_parameter(n + ".weight")[got_masks[-1][n]]
                     != before[got_masks[-1][n]]).all()]
    assert not stale, f"trained elements did not move after the last resplit: {stale}"
    for r, (a, b) in enumerate(zip(got_masks, want_masks)):
        assert a.keys() == b.keys()
        diverged = [n for n in a if not torch.equal(a[n], b[n])]
        assert not diverged, f"resplit {r}: the tool's run chose other masks (it diverged before)"
    initial = _trainer_run.gpt2(0)
    for n, mask in _initial_masks(initial).items():
        ever = mask.clone()
        for masks in want_masks:
            ever |= masks[n]
        assert not torch.equal(want_masks[-1][n], mask), n
        w0, w = initial.get_parameter(n + ".weight"), want.get_parameter(n + ".weight")
        assert torch.equal(w[~ever], w0[~ever]), n
        assert (w[want_masks[-1][n]] != w0[want_masks[-1][n]]).all(), n
    wrong = [k for k, v in want.state_dict().items() if not torch.equal(got.state_dict()[k], v)]
    assert not wrong, f"differs from the hand-written loop: {wrong}"


# -- Hugging Face Trainer -----------------------------------------------------------------------

class _SetCallback(transformers.TrainerCallback):
    """SET from a Trainer callback: drop and grow every EVERY steps, at the end of the step
    (after the optimizer step, the scheduler step and ``model.zero_grad()``)."""

    def __init__(self, masks: dict[str, torch.Tensor], unwrap: bool) -> None:
        self.masks, self.unwrap, self.history = masks, unwrap, []
        self.optimizers: list[Any] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []  # block weights after each resplit

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % EVERY or step >= args.max_steps:
            return
        optimizer = kwargs["optimizer"]
        if self.unwrap:  # the torch optimizer inside accelerate's AcceleratedOptimizer
            optimizer = getattr(optimizer, "optimizer", optimizer)
        self.optimizers.append(optimizer)
        model = kwargs["model"]
        with torch.no_grad():
            self.masks = _drop_and_grow(model, self.masks, step, by_gradient=False)
        ps.resplit(optimizer, model, _spec(self.masks))
        self.history.append(self.masks)
        self.snapshots.append(_snapshot(model))


def _hand_loop_like_trainer() -> tuple[nn.Module, list]:
    """What ``Trainer.train`` does (sequential batches, the summed loss over the batch's label
    count, clipping to 1.0, the linear schedule, ``model.zero_grad()``), by hand."""
    model = _trainer_run.gpt2(0)
    masks = _initial_masks(model)
    model, groups = ps.split(model, _spec(masks))
    opt = _adamw(groups, TOOL_LR)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, TOOL_STEPS)
    model.train()
    log = []
    for step, batch in enumerate(_batches(), 1):
        # Trainer's divisor: the labels it counts (all of them: this config sets no loss_type,
        # so Trainer does not shift them), over 1 device
        n = batch["labels"].ne(-100).sum() / 1
        model(**batch, num_items_in_batch=n).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.zero_grad()
        if step % EVERY == 0 and step < TOOL_STEPS:
            with torch.no_grad():
                masks = _drop_and_grow(model, masks, step, by_gradient=False)
            ps.resplit(opt, model, _spec(masks))
            log.append(masks)
    return model, log


@pytest.mark.parametrize("unwrap", [False, True],
                         ids=["optimizer-as-the-callback-gets-it", "inner-torch-optimizer"])
def test_trainer_callback_resplit_equals_the_hand_written_loop(tmp_path, unwrap):
    """``Trainer(optimizers=(AdamW(groups), None))`` (Trainer adds its linear schedule) and a
    callback that resplits through ``kwargs['optimizer']`` (accelerate's wrapper of the AdamW;
    or, second case, the AdamW inside it) at steps 2 and 4: bitwise the hand-written loop."""
    model = _trainer_run.gpt2(0)
    callback = _SetCallback(_initial_masks(model), unwrap)
    model, groups = ps.split(model, _spec(callback.masks))
    opt = _adamw(groups, TOOL_LR)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=TOOL_STEPS, per_device_train_batch_size=4,
        learning_rate=TOOL_LR, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=100, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        train_sampling_strategy="sequential")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_trainer_run.data(),
                                   optimizers=(opt, None), callbacks=[callback])
    trainer.train()
    assert callback.optimizers and all(o is (opt if unwrap else trainer.optimizer)
                                       for o in callback.optimizers)
    want, want_log = _hand_loop_like_trainer()
    _check_runs(model, want, callback, want_log)


# -- Lightning ----------------------------------------------------------------------------------

def _lightning_classes() -> tuple[type, type]:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, model: nn.Module, groups: list, manual: bool) -> None:
            super().__init__()
            self.model, self.groups = model, groups
            self.automatic_optimization = not manual

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            if self.automatic_optimization:
                return self.model(**batch).loss
            opt = self.optimizers()
            opt.zero_grad()
            loss = self.model(**batch).loss
            self.manual_backward(loss)
            opt.step()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _adamw(self.groups, TOOL_LR)

    class RigL(L.Callback):
        """RigL from a Lightning callback: drop, and grow by the dense gradient of the step
        that just ran, every EVERY steps, through ``trainer.optimizers[0]``."""

        def __init__(self, masks: dict[str, torch.Tensor]) -> None:
            self.masks, self.history = masks, []
            self.snapshots: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % EVERY or step >= TOOL_STEPS:
                return
            with torch.no_grad():
                self.masks = _drop_and_grow(pl_module.model, self.masks, step, by_gradient=True)
            ps.resplit(trainer.optimizers[0], pl_module.model, _spec(self.masks))
            self.history.append(self.masks)
            self.snapshots.append(_snapshot(pl_module.model))

    return Module, RigL


def _hand_loop_like_lightning() -> tuple[nn.Module, list]:
    model = _trainer_run.gpt2(0)
    masks = _initial_masks(model)
    model, groups = ps.split(model, _spec(masks))
    opt = _adamw(groups, TOOL_LR)
    model.train()
    log = []
    for step, batch in enumerate(_batches(), 1):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        if step % EVERY == 0 and step < TOOL_STEPS:
            with torch.no_grad():
                masks = _drop_and_grow(model, masks, step, by_gradient=True)
            ps.resplit(opt, model, _spec(masks))
            log.append(masks)
    return model, log


@pytest.mark.parametrize("manual", [False, True],
                         ids=["automatic-optimization", "manual-optimization"])
def test_lightning_callback_resplit_equals_the_hand_written_loop(tmp_path, manual):
    """``on_train_batch_end`` resplits ``trainer.optimizers[0]`` at steps 2 and 4 (RigL, growing
    by ``weight.grad``): bitwise the hand-written loop. Automatic optimization steps through
    ``optimizer.step(closure)``; manual optimization calls backward before ``opt.step()``."""
    import lightning as L

    Module, RigL = _lightning_classes()
    model = _trainer_run.gpt2(0)
    callback = RigL(_initial_masks(model))
    model, groups = ps.split(model, _spec(callback.masks))
    loader = torch.utils.data.DataLoader(_trainer_run.data(), batch_size=4, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=TOOL_STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.fit(Module(model, groups, manual), loader)
    assert trainer.global_step == TOOL_STEPS
    want, want_log = _hand_loop_like_lightning()
    _check_runs(model, want, callback, want_log)
