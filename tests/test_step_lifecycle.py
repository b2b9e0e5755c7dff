"""Steps that are not one plain ``optimizer.step()``: a wrapper stepping the optimizer it wraps
(Lookahead, SAM), a step that raised, a compiled step, a weight-decay schedule. Each against
the unsplit model stepped the same way, on every layout (regions with equal options)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import paramsplit
from test_core import EQUAL_LAYOUTS, _equal_options_plan, _mlp, _split_equal


def _pair(layout, seed=4):
    """(split model, its groups, the unsplit copy, the FROZEN mask of 0.weight)."""
    model = _mlp(seed=seed)
    ref = copy.deepcopy(model)
    plan = _equal_options_plan(layout)
    split_model, groups = _split_equal(model, {"0.weight": plan}, layout)
    frozen = ~plan.mask if layout == "sparse" else torch.zeros(9, 12, dtype=torch.bool)
    return split_model, groups, ref, frozen


def _loss(model, x):
    return model(x).pow(2).mean()


def _train_pair(model, opt, ref, ref_opt, frozen, steps, clamp=None, step=None):
    """``steps`` steps of the split model and the unsplit one on the same batches; the oracle's
    FROZEN elements are put back by hand after each (clamped to ``clamp`` if given, as the
    optimizer clamps every element). ``step``: optimizer -> what steps it (``opt.step``)."""
    for _ in range(steps):
        x = torch.randn(8, 12)
        kept = ref[0].weight.detach()[frozen].clone()
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x).backward()
            (step(o) if step else o.step)()
        with torch.no_grad():
            ref[0].weight[frozen] = kept if clamp is None else kept.clamp(-clamp, clamp)


def _assert_same(model, ref):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_lookahead_steps_the_optimizer_it_wraps_over_the_parts(layout):
    """pytorch_optimizer's Lookahead steps the AdamW it wraps inside its own step: the weights
    stay handed over for both (the inner step took the gradients away before, and trained
    nothing), and the per-element decay is left to the AdamW."""
    po = pytest.importorskip("pytorch_optimizer")
    model, groups, ref, frozen = _pair(layout)
    opt = po.Lookahead(torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05), k=2)
    ref_opt = po.Lookahead(torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05), k=2)
    before = model[0].weight.detach().clone()
    _train_pair(model, opt, ref, ref_opt, frozen, 5)
    assert not torch.equal(model[0].weight, before)
    _assert_same(model, ref)


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_sam_with_a_closure_perturbs_the_model_and_steps_from_there(layout):
    """SAM's ``step(closure)`` perturbs the weights by the gradient already there, zeroes it,
    runs the closure on the perturbed model, restores the weights and steps the optimizer it
    wraps. The weights are handed over before the closure (so the perturbation and the
    zero_grad reach the model), back for it, and over again after it. Equal to the unsplit
    model up to the order SAM sums its global gradient norm in. (SAM perturbs the tensors it
    holds: FROZEN elements are not among them, so with ``sparse`` the unsplit model, which
    perturbs them, is no oracle; there they stay put.)"""
    po = pytest.importorskip("pytorch_optimizer")
    model, groups, ref, frozen = _pair(layout)
    opt = po.SAM(groups, base_optimizer=torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.05)
    ref_opt = po.SAM(ref.parameters(), base_optimizer=torch.optim.AdamW, rho=0.05, lr=1e-2,
                     weight_decay=0.05)
    before = model[0].weight.detach().clone()
    for _ in range(4):
        x = torch.randn(8, 12)
        kept = ref[0].weight.detach()[frozen].clone()
        for m, o in ((model, opt), (ref, ref_opt)):
            _loss(m, x).backward()
            o.step(lambda m=m: _loss(m, x).backward())
            o.zero_grad()
        with torch.no_grad():
            ref[0].weight[frozen] = kept
    assert torch.equal(model[0].weight[frozen], before[frozen])
    assert not torch.equal(model[0].weight, before)
    if layout != "sparse":
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def _bomb():
    """A tensor for a group of its own, first: a sparse gradient on it makes AdamW raise inside
    its step, before it updates anything (as an out-of-memory would)."""
    return torch.zeros(1, requires_grad=True)


@pytest.mark.parametrize("recovery", ["zero_grad", "retry"])
@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_a_step_that_raised_is_abandoned_at_the_next(layout, recovery):
    """A step that raises inside the optimizer never reaches the hand-back. The next step
    abandons it: the weight gets its gradient back unless it was cleared since, and is stepped
    by its regions again (it was stepped whole, FROZEN elements included). Recovered by
    skipping the batch (``zero_grad``) or by stepping again. The decay layout's hand-over
    decays the weight, as AdamW's step does first: the failed step keeps that decay, and a
    retry does not decay again."""
    model, groups, ref, frozen = _pair(layout)
    bomb, ref_bomb = _bomb(), _bomb()
    opt = torch.optim.AdamW([{"params": [bomb]}, *groups], lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW([{"params": [ref_bomb]}, {"params": list(ref.parameters())}],
                                lr=1e-2, weight_decay=0.05)
    raised = 0
    for i in range(5):
        x = torch.randn(8, 12)
        kept = ref[0].weight.detach()[frozen].clone()
        for m, o, b in ((model, opt, bomb), (ref, ref_opt, ref_bomb)):
            o.zero_grad()
            _loss(m, x).backward()
            b.grad = torch.zeros(1).to_sparse() if i == 2 else torch.zeros(1)
            try:
                o.step()
            except RuntimeError as e:
                assert "sparse" in str(e)
                raised += 1
                if o is ref_opt and layout.startswith("decay"):
                    with torch.no_grad():  # the decay the split's failed step applied
                        ref[0].weight.mul_(1 - 1e-2 * 0.05)
                if recovery == "retry":
                    b.grad = torch.zeros(1)
                    o.step()
        with torch.no_grad():
            ref[0].weight[frozen] = kept
    assert raised == 2
    _assert_same(model, ref)


def test_a_step_that_raised_gives_the_weights_back_to_another_optimizer():
    """An optimizer whose step raised and that is then dropped (a new one built from
    ``param_groups``) leaves the weights to the new one: it steps them by their regions."""
    model = _mlp(seed=4)
    plan = paramsplit.rows({(0, 2): paramsplit.FROZEN, (2, 3): {"momentum": 0.0},
                            (3, 4): {"lr": 0.0}})
    model, groups = paramsplit.split(model, {"0.weight": plan})
    bomb = _bomb()
    opt = torch.optim.SGD([{"params": [bomb]}, *groups], lr=0.1, momentum=0.9)
    _loss(model, torch.randn(8, 12)).backward()
    bomb.grad = torch.zeros(1).to_sparse()
    with pytest.raises(RuntimeError):
        torch.optim.AdamW([{"params": [bomb]}, *groups], lr=0.1).step()
    del opt
    before = model[0].weight.detach().clone()
    new = torch.optim.SGD(paramsplit.param_groups(model), lr=0.1, momentum=0.9)
    new.zero_grad()
    _loss(model, torch.randn(8, 12)).backward()
    new.step()
    moved = (model[0].weight != before).any(dim=1)[:4].tolist()
    assert moved == [False, False, True, False]


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_a_compiled_optimizer_step_runs_the_hooks_eagerly(layout):
    """``torch.compile(optimizer.step)`` (torch's recipe): paramsplit's hooks run as graph
    breaks, so the compiled step steps the parts. Equal to the unsplit model's compiled step."""
    model, groups, ref, frozen = _pair(layout)
    torch._dynamo.reset()
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    compiled = {o: torch.compile(o.step, backend="eager") for o in (opt, ref_opt)}
    _train_pair(model, opt, ref, ref_opt, frozen, 3, step=compiled.get)
    _assert_same(model, ref)


def test_a_compiled_step_of_an_unsplit_optimizer_breaks_no_more_with_paramsplit():
    """paramsplit's global hooks do nothing under torch.compile while no model is split (here,
    in fresh processes): a compiled step of any optimizer has the graph breaks it has without
    paramsplit (torch's AdamW has one of its own)."""
    import subprocess
    import sys

    code = ("import torch{}\n"
            "from torch._dynamo.utils import counters\n"
            "model = torch.nn.Linear(4, 3)\n"
            "opt = torch.optim.AdamW(model.parameters(), lr=0.1)\n"
            "model(torch.randn(2, 4)).sum().backward()\n"
            "torch.compile(opt.step, backend='eager')()\n"
            "print(sum(counters['graph_break'].values()))\n")
    breaks = [subprocess.run([sys.executable, "-c", code.format(extra)], capture_output=True,
                             text=True, check=True).stdout.split()[-1]
              for extra in ("", ", paramsplit")]
    assert breaks[0] == breaks[1], breaks


@pytest.mark.parametrize("rows_or_mask", ["rows", "mask"])
def test_a_weight_decay_schedule_on_every_group_steps_a_decay_weight_whole(rows_or_mask):
    """A schedule that sets every group's ``weight_decay`` (DINO's recipe) also sets it on the
    per-element weight_decay group: the optimizer then decays that weight as a whole, with the
    scheduled value, as it decays the regions' parts (``per_element_decay=False``: the oracle),
    and paramsplit stops decaying it per element (it did twice), with a warning; also once the
    schedule comes back to 0."""
    g = torch.Generator().manual_seed(2)
    plan = (paramsplit.rows({(0, 4): {"weight_decay": 0.0}, (4, None): {"weight_decay": 0.5}})
            if rows_or_mask == "rows" else
            paramsplit.Regions(torch.rand(9, 12, generator=g) < 0.5,
                               {True: {"weight_decay": 0.5}, False: {"weight_decay": 0.0}}))
    runs = []
    for per_element_decay in (True, False):
        model = _mlp(seed=6)
        model, groups = paramsplit.split(model, {"0.weight": plan},
                                         per_element_decay=per_element_decay)
        opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for it in range(6):
                if it >= 2:  # ... and back to 0 at the end (a schedule's last value)
                    for group in opt.param_groups:
                        group["weight_decay"] = 0.1 * it if it < 5 else 0.0
                opt.zero_grad()
                _loss(model, torch.randn(8, 12, generator=torch.Generator().manual_seed(it))
                      ).backward()
                opt.step()
        runs.append(model)
        if per_element_decay:
            assert any("as a whole tensor" in str(w.message) for w in caught)
    _assert_same(*runs)


class _Clamped(torch.optim.AdamW):
    """An AdamW subclass whose step clamps every tensor it holds after ``super().step()``."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.clamp_(-0.2, 0.2)
        return loss


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_a_subclass_step_calling_super_step_keeps_the_weights_handed_over(layout):
    """torch runs the step hooks around the subclass's ``step`` and again around the
    ``super().step()`` it calls (once both classes have been instantiated): the inner call
    neither hands over again nor back, so what the subclass does to the parts after it reaches
    the model. (A subclass with a step of its own may decay as it likes: per-element decay
    refuses it, naming it.)"""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # AdamW.step gets its hooks too
    model, groups, ref, frozen = _pair(layout)
    opt = _Clamped(groups, lr=0.05, weight_decay=0.05)
    if layout.startswith("decay"):
        _loss(model, torch.randn(8, 12)).backward()
        with pytest.raises(RuntimeError, match="does not know how _Clamped applies weight decay"):
            opt.step()
        return
    ref_opt = _Clamped(ref.parameters(), lr=0.05, weight_decay=0.05)
    _train_pair(model, opt, ref, ref_opt, frozen, 6, clamp=0.2)
    assert model[0].weight.abs().max() <= 0.2
    _assert_same(model, ref)


def _nanogpt_groups(params, decay=0.1):
    """nanoGPT's ``configure_optimizers``: decay the tensors of 2 or more dims, not the others."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_regrouping_by_ndim_treats_parts_as_their_weight(layout):
    """Every part has its weight's ndim (a mask part of a 2-D weight is 1 x n), so nanoGPT's
    decay rule, applied to the groups' tensors, decays a split 2-D weight's parts as it decays
    the unsplit weight (mask parts were 1-D, and went undecayed)."""
    model, groups, ref, frozen = _pair(layout)
    params = [p for g in groups for p in g["params"]]
    split = paramsplit._sync._SPLITS.get(model[0].weight)
    assert all(p.dim() == 2 for p in (split.parts if split else []))
    opt = torch.optim.AdamW(_nanogpt_groups(params), lr=1e-2)
    ref_opt = torch.optim.AdamW(_nanogpt_groups(ref.parameters()), lr=1e-2)
    _train_pair(model, opt, ref, ref_opt, frozen, 4)
    # (decay layouts: regrouped out of the per-element weight_decay group, the weight is decayed
    # whole with its new group's weight_decay, like the unsplit one, and paramsplit warns)
    _assert_same(model, ref)


def test_optimizer_state_of_one_dimensional_mask_parts_is_loaded_into_their_shape():
    """paramsplit 0.3.0 made mask parts 1-D; an optimizer state saved then loads into the
    parts' shape now (1 x n) and the run goes on as it would have."""
    runs = []
    for old in (False, True):
        model, groups, _, _ = _pair("mask")
        opt = torch.optim.AdamW(groups, lr=1e-2)
        for i in range(2):
            opt.zero_grad()
            _loss(model, torch.randn(8, 12, generator=torch.Generator().manual_seed(i))
                  ).backward()
            opt.step()
        saved = opt.state_dict()
        if old:  # as 0.3.0 saved it
            for state in saved["state"].values():
                for k, v in state.items():
                    if k != "step" and v.dim() == 2 and v.shape[0] == 1:
                        state[k] = v.reshape(-1).clone()
        fresh = torch.optim.AdamW(paramsplit.param_groups(model), lr=1e-2)
        fresh.load_state_dict(saved)
        opt.zero_grad()
        _loss(model, torch.randn(8, 12, generator=torch.Generator().manual_seed(9))).backward()
        fresh.step()
        runs.append(model)
    _assert_same(*runs)


@pytest.mark.parametrize("layout", ["rows", "cols", "mask", "decay-mask"])
def test_merged_state_goes_to_the_whole_weight_of_an_optimizer_that_steps_it_whole(layout):
    """An optimizer built from ``model.parameters()`` of a split model steps each weight whole
    (and warns): the merged state of a split run loads into the weight itself (it went to the
    parts, which that optimizer does not hold, and was dropped), and is read back from it."""
    model, groups, ref, _ = _pair(layout)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)

    def step(m, o, i):
        o.zero_grad()
        _loss(m, torch.randn(8, 12, generator=torch.Generator().manual_seed(i))).backward()
        o.step()

    for i in range(3):
        step(model, opt, i)
        step(ref, ref_opt, i)
    whole = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    paramsplit.load_merged_optimizer_state(whole, model,
                                           paramsplit.merged_optimizer_state(opt, model))
    assert set(whole.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.warns(UserWarning, match="as a whole tensor"):
        step(model, whole, 3)
    step(ref, ref_opt, 3)
    _assert_same(model, ref)
    back = paramsplit.merged_optimizer_state(whole, model)["0.weight"]
    assert torch.equal(back["exp_avg"], ref_opt.state[ref[0].weight]["exp_avg"])


@pytest.mark.parametrize("layout", ["decay-rows", "decay-mask"])
def test_per_element_decay_refuses_a_fused_step_driven_by_grad_scaler(layout):
    """GradScaler hands a fused optimizer its scale and inf flag (the kernel unscales and skips
    inside): paramsplit's decay, applied before, would decay a scaled gradient or a skipped
    step. It refuses, naming the remedy, and leaves the weight as it was."""
    model, groups, _, _ = _pair(layout)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    before = model[0].weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, torch.randn(8, 12))
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match=r"GradScaler steps this fused AdamW .*fused=False"):
        scaler.step(opt)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("layout", ["rows", "cols", "mask", "sparse"])
def test_optimizers_stepping_in_two_threads_leave_each_other_alone(layout):
    """Two split models trained at once in two threads: a step under way in one thread is not
    taken for a step that raised by the other (its hand-over is on the other thread's stack),
    so each trains exactly as it does alone."""
    import threading

    def train(model, opt, seed, steps=30):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, torch.randn(8, 12, generator=g)).backward()
            opt.step()

    runs = {}
    for threaded in (False, True):
        pairs = [_pair(layout, seed=s)[:2] for s in (4, 5)]
        opts = [torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05) for _, g in pairs]
        jobs = [threading.Thread(target=train, args=(m, o, i))
                for i, ((m, _), o) in enumerate(zip(pairs, opts))]
        if threaded:
            for j in jobs:
                j.start()
            for j in jobs:
                j.join()
        else:
            for j in jobs:
                j.run()
        runs[threaded] = [m for m, _ in pairs]
    for a, b in zip(runs[False], runs[True]):
        _assert_same(a, b)


def test_a_compiled_step_that_raised_leaves_decay_weights_to_the_next_optimizer():
    """Under torch.compile there is no frame to tell a step that raised: the decay layout's
    weights (whose gradient the hand-over does not hide) are told by their gradient changing
    since. A new optimizer then decays them per element (they were held for good, and stepped
    whole with no decay): as parts with those decays are stepped, from the same weights."""
    torch._dynamo.reset()
    plan = paramsplit.rows({(0, 4): {"weight_decay": 0.0}, (4, None): {"weight_decay": 0.3}})
    model, groups = paramsplit.split(_mlp(seed=6), {"0.weight": plan})
    ref, _ = paramsplit.split(_mlp(seed=6), {"0.weight": plan}, per_element_decay=False)
    bomb = _bomb()
    failing = torch.optim.AdamW([{"params": [bomb]}, *groups], lr=1e-2)
    _loss(model, torch.randn(8, 12)).backward()
    bomb.grad = torch.zeros(1).to_sparse()
    with pytest.raises(Exception, match="sparse"):
        torch.compile(failing.step, backend="eager")()
    with torch.no_grad():
        ref.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.AdamW(paramsplit.param_groups(m), lr=1e-2) for m in (model, ref))
    _train_pair(model, opt, ref, ref_opt, torch.zeros(9, 12, dtype=torch.bool), 3)
    _assert_same(model, ref)


def test_a_subclass_instantiated_before_its_base_is_known_as_its_base():
    """torch copies a base's step (wrapped with its hooks) onto a subclass that is instantiated
    before the base ever was: the subclass still runs the base's step, and per-element decay
    and the element-wise list know it as the base (in a fresh process, where AdamW was not
    instantiated yet)."""
    import subprocess
    import sys

    code = ("import warnings, torch, paramsplit\n"
            "warnings.simplefilter('error')\n"
            "class MyAdamW(torch.optim.AdamW):\n    pass\n"
            "for decay in (True, False):\n"
            "    model = torch.nn.Linear(6, 4)\n"
            "    plan = paramsplit.rows({(0, 2): {'weight_decay': 0.0}, (2, None): "
            "{'weight_decay': 0.5}})\n"
            "    model, groups = paramsplit.split(model, {'weight': plan}, "
            "per_element_decay=decay)\n"
            "    opt = MyAdamW(groups, lr=0.1)\n"
            "    model(torch.randn(3, 6)).sum().backward()\n"
            "    opt.step()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
def test_a_plain_step_gives_the_weight_its_own_gradient_back_untouched(layout):
    """After a step that did nothing to the parts' gradients, the weight gets back the very
    gradient it had, not written to (the hand-back checks whether the step changed the parts'
    gradients, and copies them back only then: a weight-sized copy per step otherwise)."""
    model, groups, _, _ = _pair(layout)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    _loss(model, torch.randn(8, 12)).backward()
    grad = model[0].weight.grad
    version, before = grad._version, grad.clone()
    opt.step()
    assert model[0].weight.grad is grad and torch.equal(grad, before)
    assert grad._version == version
