"""``resplit``: regions that change during training, against hand-written per-element optimizers
whose element membership changes at the same steps, with the state rule of ``_resplit``:
elements that train on keep their state, new ones start at zero, FROZEN ones drop it, and a
region's step count is the largest among its elements that trained before (0 if none)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import paramsplit as ps

SHAPE = (9, 12)
LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8
WD = {0: 0.0, 1: 0.3}  # options of region ids 0 and 1; id 2 is FROZEN


def region_maps(kind: str, seed: int) -> torch.Tensor:
    """Region ids (0, 1: trained with WD[id]; 2: FROZEN) of ``SHAPE`` for one phase."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mask":
        return torch.randint(0, 3, SHAPE, generator=g)
    if kind == "decay":  # every element trains: regions differ in weight_decay only
        return torch.randint(0, 2, SHAPE, generator=g)
    ids = torch.full(SHAPE, 2)
    a, b = sorted(torch.randperm(SHAPE[0 if kind == "rows" else 1], generator=g)[:2].tolist())
    b = max(b, a + 1)
    cut = (slice(None),) * (0 if kind == "rows" else 1)
    ids[cut + (slice(0, a),)] = 0
    ids[cut + (slice(a, b),)] = 1
    return ids


def plan_of(kind: str, ids: torch.Tensor):
    opts = {0: {"weight_decay": WD[0]}, 1: {"weight_decay": WD[1]}, 2: ps.FROZEN}
    if kind in ("rows", "cols"):
        line = ids[:, 0] if kind == "rows" else ids[0]
        blocks, start = {}, 0
        for i in range(1, len(line) + 1):
            if i == len(line) or line[i] != line[start]:
                blocks[(start, i)] = opts[int(line[start])]
                start = i
        return (ps.rows if kind == "rows" else ps.cols)(blocks)
    return ps.Regions(ids, {k: v for k, v in opts.items() if bool((ids == k).any())})


class Oracle:
    """Per-element AdamW or SGD-momentum over one weight, written out op by op as torch's
    for-loop implementations do, on each region's elements gathered in flat order."""

    def __init__(self, weight: torch.Tensor, kind: str) -> None:
        self.w, self.kind = weight, kind
        self.m = torch.zeros_like(weight)
        self.v = torch.zeros_like(weight)
        self.had = torch.zeros_like(weight, dtype=torch.bool)  # elements with state
        self.steps = torch.zeros(weight.shape, dtype=torch.float64)
        self.ids = torch.full(weight.shape, 2)
        self.step_of: dict[int, int] = {}

    def resplit(self, ids: torch.Tensor) -> None:
        trained = ids != 2
        self.m[~trained] = 0
        self.v[~trained] = 0
        self.had &= trained
        self.step_of = {}
        for r in (0, 1):
            sel = ids == r
            if self.kind == "decay":  # one tensor, one step count
                sel = trained
            old = self.had & sel
            self.step_of[r] = int(self.steps[old].max()) if old.any() else 0
        self.ids = ids

    def step(self, grad: torch.Tensor, opt_name: str) -> None:
        for r in (0, 1):
            sel = self.ids == r
            if not sel.any():
                continue
            p, g, m, v = self.w[sel], grad[sel], self.m[sel], self.v[sel]
            first = not bool(self.had[sel].any())
            if opt_name == "adamw":
                step = self.step_of[r] + 1
                p.mul_(1 - LR * WD[r])
                m.lerp_(g, 1 - B1)
                v.mul_(B2).addcmul_(g, g, value=1 - B2)
                denom = (v.sqrt() / math.sqrt(1 - B2 ** step)).add_(EPS)
                p.addcdiv_(m, denom, value=-(LR / (1 - B1 ** step)))
            else:  # SGD, momentum 0.9, coupled decay
                step = self.step_of[r] + 1
                d = g.add(p, alpha=WD[r]) if WD[r] else g
                m = d.clone() if first else m.mul_(0.9).add_(d)
                p.add_(m, alpha=-LR)
            self.w[sel], self.m[sel], self.v[sel] = p, m, v
            self.had[sel] = True
            self.steps[sel] = step
        self.step_of = {r: self.step_of[r] + 1 for r in (0, 1)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("kind", ["mask", "rows", "cols", "decay"])
def test_three_resplits_equal_a_per_element_optimizer(kind, opt_name):
    model = make_model()
    ref = copy.deepcopy(model)
    ids = region_maps(kind, 0)
    model, groups = ps.split(model, {"0": plan_of(kind, ids)})
    make = (lambda g: torch.optim.AdamW(g, lr=LR, betas=(B1, B2), eps=EPS, foreach=False)) \
        if opt_name == "adamw" else \
        (lambda g: torch.optim.SGD(g, lr=LR, momentum=0.9, foreach=False))
    opt = make(groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # stays usable (lr unchanged)
    ref_rest = make([p for n, p in ref.named_parameters() if n != "0.weight"])
    oracle = Oracle(ref[0].weight.detach(), kind)
    oracle.resplit(ids)
    g = torch.Generator().manual_seed(1)
    for phase in range(4):
        if phase:
            ids = region_maps(kind, phase)
            ps.resplit(opt, model, {"0": plan_of(kind, ids)})
            oracle.resplit(ids)
        for _ in range(3):
            x = torch.randn(5, 12, generator=g)
            opt.zero_grad()
            ref_rest.zero_grad()
            ref[0].weight.grad = None
            model(x).square().mean().backward()
            ref(x).square().mean().backward()
            opt.step()
            sched.step()
            ref_rest.step()
            with torch.no_grad():
                oracle.step(ref[0].weight.grad, opt_name)
            assert torch.equal(model[0].weight, ref[0].weight), (phase, kind)
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), n
    label = ps._sync._SPLITS[model[0].weight].label
    assert label == kind or (kind == "mask" and label == "sparse")


def test_frozen_elements_drop_state_and_never_change_after_resplit():
    model = make_model()
    ids = region_maps("mask", 0)
    model, groups = ps.split(model, {"0": plan_of("mask", ids)})
    opt = torch.optim.AdamW(groups, lr=LR)
    x = torch.randn(5, 12)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    ids2 = region_maps("mask", 5)
    ps.resplit(opt, model, {"0": plan_of("mask", ids2)})
    state = ps.merged_optimizer_state(opt, model)["0.weight"]
    assert torch.equal(state["exp_avg"][ids2 == 2], torch.zeros(int((ids2 == 2).sum())))
    newly = (ids == 2) & (ids2 != 2)
    assert torch.equal(state["exp_avg"][newly], torch.zeros(int(newly.sum())))
    kept = (ids != 2) & (ids2 != 2)
    assert (state["exp_avg"][kept] != 0).all()
    frozen_before = model[0].weight.detach()[ids2 == 2].clone()
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight.detach()[ids2 == 2], frozen_before)


def test_resplit_refuses_a_bad_spec_or_an_optimizer_without_the_weight_changing_nothing():
    model = make_model()
    model, groups = ps.split(model, {"0": plan_of("mask", region_maps("mask", 0))})
    opt = torch.optim.AdamW(groups, lr=LR)
    before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ps.SpecError, match=r"spec\['0.wieght'\]"):
        ps.resplit(opt, model, {"0.wieght": ps.FROZEN})
    assert [list(g["params"]) for g in opt.param_groups] == before
    # paramsplit's groups, but not those holding 0.weight and its parts
    mine = {id(model[0].weight)} | {id(p) for p in ps._sync._SPLITS[model[0].weight].parts}
    other = torch.optim.AdamW([g for g in ps.param_groups(model)
                               if not any(id(p) in mine for p in g["params"])], lr=LR)
    with pytest.raises(ValueError, match="holds neither '0.weight'"):
        ps.resplit(other, model, {"0": plan_of("mask", region_maps("mask", 1))})


@pytest.mark.parametrize("how", ["by ndim", "model.parameters()"])
def test_resplit_refuses_groups_that_are_not_paramsplits(how):
    """Regrouped (decay / no-decay) or plain groups: resplit cannot place new parts without
    changing other tensors' options, so it raises and changes nothing."""
    model = make_model()
    model, groups = ps.split(model, {"0": plan_of("mask", region_maps("mask", 0))})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
                            if how == "by ndim" else model.parameters(), lr=LR)
    before = [(list(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="not the ones paramsplit.split returned"):
        ps.resplit(opt, model, {"0": plan_of("mask", region_maps("mask", 1))})
    assert [(list(g["params"]), g["weight_decay"]) for g in opt.param_groups] == before


def test_new_options_get_a_new_group_with_a_warning():
    model = make_model()
    model, groups = ps.split(model, {"0": ps.rows({(0, 4): {"weight_decay": 0.3}})})
    opt = torch.optim.AdamW(groups, lr=LR)
    with pytest.warns(UserWarning, match="added param group 'lr=0.01'"):
        ps.resplit(opt, model, {"0": ps.rows({(0, 4): {"lr": 0.01}})})
    assert opt.param_groups[-1]["lr"] == 0.01
    model(torch.randn(2, 12)).sum().backward()
    opt.step()


def _resplit_run(folder: str, resume_at: int | None, steps: int = 8) -> list[torch.Tensor]:
    """Train with resplits at steps 2 and 5; at ``resume_at``, save a checkpoint and stop."""
    model = make_model()
    ids = region_maps("mask", 0)
    model, groups = ps.split(model, {"0": plan_of("mask", ids)})
    opt = torch.optim.AdamW(groups, lr=LR)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        if step in (2, 5):
            ids = region_maps("mask", step)
            ps.resplit(opt, model, {"0": plan_of("mask", ids)})
        if step == resume_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ids": ids,
                        "rng": g.get_state()}, f"{folder}/ck.pt")
            return []
        x = torch.randn(5, 12, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _resume(folder: str, steps: int = 8, resume_at: int = 6) -> None:
    """In a new process: the recipe, i.e. ``split(model, the saved spec)``, load, continue."""
    ck = torch.load(f"{folder}/ck.pt", weights_only=True)
    model, groups = ps.split(make_model(), {"0": plan_of("mask", ck["ids"])})
    model.load_state_dict(ck["model"])
    opt = torch.optim.AdamW(groups, lr=LR)
    opt.load_state_dict(ck["opt"])
    g = torch.Generator()
    g.set_state(ck["rng"])
    for _ in range(resume_at, steps):
        x = torch.randn(5, 12, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], f"{folder}/resumed.pt")


def test_checkpoint_after_resplit_resumes_bitwise_in_a_new_process(tmp_path):
    """The recipe: save the current spec (here its masks) with the checkpoint; resume with
    ``split(model, that spec)`` and ``load_state_dict``, in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    straight = _resplit_run(str(tmp_path), None)
    _resplit_run(str(tmp_path), 6)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_resplit; test_resplit._resume({str(tmp_path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                                                                  "OMP_NUM_THREADS": "1"})
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert len(resumed) == len(straight)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
