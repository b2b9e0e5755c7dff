"""A split model is a drop-in: everything but the optimizer sees the original model.

``paramsplit.split`` hands back the model itself, untouched; only the optimizer's groups hold
the parts. Oracle everywhere: a deep copy of the model, unsplit, given the same calls (its
FROZEN elements put back after each step, since a plain optimizer cannot leave them alone), or a
hand-written per-region optimizer where regions have options of their own.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows

KINDS = ["rows", "cols", "mask", "sparse"]  # the part layouts
#: and the decay layout (regions that differ only in weight_decay: the weight stays whole), for
#: the behaviours that do not depend on how the optimizer sees the weight
ALL_KINDS = KINDS + ["decay"]
SHAPE = (9, 12)
WD = 0.05  # the optimizers' default weight_decay below: regions given it differ in form only


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5))


def _ids(shape=SHAPE, seed=3):
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed))


def _sparse_mask(shape=SHAPE, seed=3):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.25


def _plan(kind):
    """Regions with options of their own (``describe``, groups, layouts)."""
    if kind == "rows":
        return rows({(0, 4): {"weight_decay": 0.0}, (4, None): FROZEN})
    if kind == "cols":
        return cols({(2, 7): {"weight_decay": 0.3}})
    if kind == "mask":
        return Regions(_ids(), {0: {"lr": 0.01}, 1: {"weight_decay": 0.2}, 2: FROZEN})
    if kind == "decay":
        return Regions(_ids(), {0: {"weight_decay": 0.0}, 1: {}, 2: {"weight_decay": 0.2}})
    return Regions(_sparse_mask(), {True: {"weight_decay": 0.2}, False: FROZEN})


def _oracle_plan(kind):
    """Every part layout with a FROZEN region and trained regions whose options equal the
    optimizer's defaults (``WD``) in value: the unsplit model, FROZEN elements put back, is the
    oracle. The decay layout has no FROZEN region (it would make parts)."""
    if kind == "rows":
        return rows({(0, 3): FROZEN, (3, 6): {"weight_decay": WD}, (6, None): {}})
    if kind == "cols":
        return cols({(0, 2): {"weight_decay": WD}, (2, 7): FROZEN, (7, None): {}})
    if kind == "mask":
        return Regions(_ids(), {0: {"weight_decay": WD}, 1: {}, 2: FROZEN})
    if kind == "decay":
        return Regions(_ids(), {0: {"weight_decay": WD}, 1: {}, 2: {"weight_decay": WD}})
    return Regions(_sparse_mask(), {True: {"weight_decay": WD}, False: FROZEN})


def _frozen(kind, shape=SHAPE):
    """The FROZEN elements of ``_oracle_plan(kind)``."""
    out = torch.zeros(shape, dtype=torch.bool)
    if kind == "rows":
        out[:3] = True
    elif kind == "cols":
        out[:, 2:7] = True
    elif kind == "mask":
        out = _ids(shape) == 2
    elif kind == "decay":
        pass
    else:
        out = ~_sparse_mask(shape)
    return out


def _split(model, spec, kind):
    """``paramsplit.split`` in layout ``kind``: the part layouts with per_element_decay=False
    (plans such as ``cols({(2, 7): {"weight_decay": 0.3}})`` differ only in weight_decay, which
    would keep the weight whole), the decay layout without."""
    out = paramsplit.split(model, spec, per_element_decay=kind == "decay")
    assert paramsplit.describe(model).split()[-1] == kind
    return out


def _pair(kind, seed=0, plan=None):
    """(unsplit copy, split model, groups); ``split`` returns the very model it was given."""
    model = _linear(seed)
    ref = copy.deepcopy(model)
    split_model, groups = _split(model, {"0.weight": plan or _plan(kind)}, kind)
    assert split_model is model
    return ref, split_model, groups


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=WD)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=WD)


class _Oracle:
    """A split model (``_oracle_plan``) and its unsplit copy, trained step by step in lockstep
    and compared bitwise after every step."""

    def __init__(self, kind, make_opt=_adamw, seed=0):
        self.kind = kind
        self.ref, self.sm, groups = _pair(kind, seed, _oracle_plan(kind))
        self.frozen = _frozen(kind)
        self.opt, self.ref_opt = make_opt(groups), make_opt(self.ref.parameters())
        self.g = torch.Generator().manual_seed(seed + 100)

    def step(self):
        x = torch.randn(4, 12, generator=self.g)
        for model, opt in ((self.sm, self.opt), (self.ref, self.ref_opt)):
            opt.zero_grad()
            model(x).square().mean().backward()
        grads = (self.sm[0].weight.grad, self.ref[0].weight.grad)
        assert grads == (None, None) if grads[1] is None else torch.equal(*grads)
        before = self.ref[0].weight.detach().clone()
        self.opt.step()
        self.ref_opt.step()
        with torch.no_grad():  # the plain optimizer moved the FROZEN elements: put them back
            self.ref[0].weight[self.frozen] = before[self.frozen]
        _assert_same(self.sm, self.ref)


def _assert_same(split_model, ref, x=None):
    """Bitwise the same forward, parameters and state dict (keys, order, shapes, values)."""
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(11)) if x is None else x
    with torch.no_grad():
        assert torch.equal(split_model(x), ref(x))
    names = [n for n, _ in split_model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    for (n, p), q in zip(split_model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    sd, want = split_model.state_dict(), ref.state_dict()
    assert list(sd) == list(want)
    for k in want:
        assert sd[k].shape == want[k].shape and sd[k].dtype == want[k].dtype, k
        assert torch.equal(sd[k], want[k]), k


# -- the model is the original model ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_split_returns_the_model_itself_with_its_own_parameters(kind):
    model = _linear()
    params = list(model.named_parameters())
    classes = [type(m) for m in model.modules()]
    split_model, groups = _split(model, {"0.weight": _plan(kind)}, kind)
    assert split_model is model
    assert [(n, id(p)) for n, p in split_model.named_parameters()] == \
        [(n, id(p)) for n, p in params]
    assert [type(m) for m in split_model.modules()] == classes
    assert not any("__" in k for k in split_model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in split_model.modules())
    assert kind in paramsplit.describe(split_model)
    # the groups hold parts that are not in the model, plus the weight that carries their grad
    in_model = {id(p) for p in split_model.parameters()}
    held = [p for g in groups for p in g["params"]]
    assert any(id(p) not in in_model for p in held)
    assert sum(p is split_model[0].weight for p in held) == 1


# -- state dict: the original format ------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_state_dict_has_the_original_keys_and_loads_strict_both_ways(kind):
    ref, sm, _ = _pair(kind)
    _assert_same(sm, ref)
    other = _linear(seed=5)
    assert sm.load_state_dict(other.state_dict()) is not None  # strict, original format
    _assert_same(sm, other)
    fresh = _linear(seed=9)
    fresh.load_state_dict(sm.state_dict())
    _assert_same(sm, fresh)
    # also after training: the state dict holds the trained values, in the original format
    oracle = _Oracle(kind)
    for _ in range(2):
        oracle.step()
    fresh = _linear(seed=9)
    fresh.load_state_dict(oracle.sm.state_dict())
    _assert_same(fresh, oracle.ref)
    again = _Oracle(kind, seed=4)
    again.sm.load_state_dict(oracle.ref.state_dict())
    _assert_same(again.sm, oracle.ref)


def _two_masks():
    """Two scattered masks (the mask layout) with equal region sizes: equal part shapes."""
    a = (torch.arange(9)[:, None] + torch.arange(12)) % 2
    opts = {0: {"weight_decay": 0.0}, 1: {"weight_decay": 0.1}}
    return Regions(a, opts), Regions(1 - a, opts)


def test_checkpoint_of_another_mask_loads_by_position_not_by_part():
    """Two masks with equal region sizes: the weights land where they belong."""
    model = _linear()
    a, b = _two_masks()
    sm_a, _ = _split(model, {"0": a}, "mask")
    sm_b, _ = _split(_linear(seed=1), {"0": b}, "mask")
    sm_b.load_state_dict(sm_a.state_dict())
    _assert_same(sm_b, model)


def test_a_0_2_checkpoint_with_part_keys_is_refused_not_loaded():
    """paramsplit 0.2 saved ``weight__i`` keys: a strict load refuses them and changes nothing."""
    ref, sm, _ = _pair("mask")
    bad = {k: v for k, v in sm.state_dict().items() if k != "0.weight"}
    bad.update({f"0.weight__{i}": torch.zeros(n) for i, n in enumerate((40, 30, 38))})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.weight\""):
        sm.load_state_dict(bad)
    missing, unexpected = sm.load_state_dict(bad, strict=False)
    assert missing == ["0.weight"] and unexpected == [f"0.weight__{i}" for i in range(3)]
    _assert_same(sm, ref)  # nothing was loaded


# -- optimizer state of a run split another way -------------------------------------------------

_OPTS = {"weight_decay": 0.1}
#: pairs of plans whose part shapes (and group structure) are equal, so torch's
#: ``Optimizer.load_state_dict`` cannot tell them apart
_OTHER_LAYOUTS = {
    "rows": (rows({(0, 3): _OPTS, (3, None): FROZEN}),
             rows({(0, 3): FROZEN, (3, 6): _OPTS, (6, None): FROZEN})),
    "cols": (cols({(0, 4): _OPTS, (4, None): FROZEN}),
             cols({(0, 8): FROZEN, (8, None): _OPTS})),
    "mask": _two_masks(),
    "sparse": (Regions(torch.arange(108).view(9, 12) % 5 == 0, {True: _OPTS, False: FROZEN}),
               Regions(torch.arange(108).view(9, 12) % 5 == 1, {True: _OPTS, False: FROZEN})),
    "rows-vs-cols": (rows({(0, 3): _OPTS, (3, None): FROZEN}),  # parts (3, 12) and (9, 4)
                     cols({(0, 4): _OPTS, (4, None): FROZEN})),
    "mask-vs-sparse": (Regions(torch.arange(108).view(9, 12) % 3 != 0,  # parts (72,), (22,)
                               {True: _OPTS, False: FROZEN}),
                       Regions(torch.arange(108).view(9, 12) % 5 == 0,
                               {True: _OPTS, False: FROZEN})),
}


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(3, 12, generator=g)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("pair", list(_OTHER_LAYOUTS))
def test_optimizer_state_of_another_layout_is_refused_at_the_first_step(pair):
    a, b = _OTHER_LAYOUTS[pair]
    kind_a, kind_b = (pair.split("-vs-") * 2)[:2]
    sm_a, groups_a = _split(_linear(), {"0": a}, kind_a)
    opt_a = torch.optim.AdamW(groups_a, lr=1e-2)
    _steps(sm_a, opt_a, 2, seed=1)
    saved = copy.deepcopy(opt_a.state_dict())  # torch loads state tensors without a copy

    sm_b, groups_b = _split(_linear(), {"0": b}, kind_b)
    opt_b = torch.optim.AdamW(groups_b, lr=1e-2)
    if pair.endswith("-vs-cols") or pair.endswith("-vs-sparse"):
        assert [len(g["params"]) for g in groups_a] == [len(g["params"]) for g in groups_b]
    opt_b.load_state_dict(saved)  # torch checks only the group sizes
    before = sm_b.state_dict()["0.weight"].clone()
    sm_b(torch.randn(3, 12)).sum().backward()
    with pytest.raises(RuntimeError, match=r"split another way[\s\S]*'0.weight'"):
        opt_b.step()
    assert torch.equal(sm_b.state_dict()["0.weight"], before)  # nothing was stepped

    # the same layout loads and continues exactly like the run that saved it
    sm_c, groups_c = _split(_linear(seed=7), {"0": a}, kind_a)
    sm_c.load_state_dict(sm_a.state_dict())
    opt_c = torch.optim.AdamW(groups_c, lr=1e-2)
    opt_c.load_state_dict(saved)
    _steps(sm_c, opt_c, 2, seed=2)
    _steps(sm_a, opt_a, 2, seed=2)
    _assert_same(sm_c, sm_a)


# -- writes into the weight between steps land, and the next step starts from them --------------

def _no_grad(fn):
    with torch.no_grad():
        fn()


WRITES = {
    "init.normal_": lambda m: nn.init.normal_(m[0].weight),
    "init.orthogonal_": lambda m: nn.init.orthogonal_(m[0].weight),
    "reset_parameters": lambda m: m[0].reset_parameters(),
    "no_grad mul_": lambda m: _no_grad(lambda: m[0].weight.mul_(0.5)),
    "no_grad setitem": lambda m: _no_grad(lambda: m[0].weight.__setitem__(0, 3.0)),
    "no_grad copy_": lambda m: _no_grad(lambda: m[0].weight.copy_(torch.randn(9, 12))),
    "data.normal_": lambda m: m[0].weight.data.normal_(),
    "data.copy_": lambda m: m[0].weight.data.copy_(torch.arange(108.0).view(9, 12) / 100),
    "data.setitem": lambda m: m[0].weight.data.__setitem__((slice(None), 3), -1.0),
    "data = t": lambda m: setattr(m[0].weight, "data", torch.full((9, 12), 0.25)),
    "data = strided t": lambda m: setattr(m[0].weight, "data",
                                          torch.randn(12, 9).t()),  # new memory, other strides
    "load_state_dict": lambda m: m.load_state_dict(_linear(seed=6).state_dict()),
    "load_state_dict of a split model": lambda m: m.load_state_dict(
        _Oracle("mask", seed=6).sm.state_dict()),
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("make_opt", [_adamw, _sgd], ids=["AdamW", "SGD-momentum"])
def test_writes_into_the_weight_between_steps_land_and_the_next_step_starts_from_them(
        kind, write, make_opt):
    oracle = _Oracle(kind, make_opt)
    held = oracle.sm[0].weight  # a reference kept across steps sees every step and write
    oracle.step()
    for model in (oracle.sm, oracle.ref):
        torch.manual_seed(7)
        WRITES[write](model)
    _assert_same(oracle.sm, oracle.ref)  # the write landed
    for _ in range(2):
        oracle.step()  # ... and each step starts from it
    assert held is oracle.sm[0].weight and torch.equal(held, oracle.ref[0].weight)
    with torch.no_grad():  # a write through the held reference lands too
        held.add_(1.0)
        oracle.ref[0].weight.add_(1.0)
    oracle.step()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_parameter_assigned_after_split_is_taken_over_by_the_next_step(kind):
    """``module.weight = nn.Parameter(t)`` (what ``load_state_dict(assign=True)`` does): the
    optimizer steps the new weight and keeps its state. Oracle: the unsplit optimizer with the
    new parameter (and its state) swapped in by hand."""
    oracle = _Oracle(kind)
    oracle.step()
    new = torch.randn(9, 12, generator=torch.Generator().manual_seed(5))
    old_ref = oracle.ref[0].weight
    oracle.sm[0].weight = nn.Parameter(new.clone())
    oracle.ref[0].weight = nn.Parameter(new.clone())
    for g in oracle.ref_opt.param_groups:
        g["params"] = [oracle.ref[0].weight if p is old_ref else p for p in g["params"]]
    oracle.ref_opt.state[oracle.ref[0].weight] = oracle.ref_opt.state.pop(old_ref)
    _assert_same(oracle.sm, oracle.ref)
    for _ in range(2):
        oracle.step()
    # the same object assigned back (a tie_weights): nothing changes
    oracle.sm[0].weight = oracle.sm[0].weight
    oracle.step()
    # a weight of another shape cannot be taken over: the step says so and what to do
    oracle.sm[0].weight = nn.Parameter(torch.zeros(9, 13))
    oracle.sm[0].weight.grad = torch.zeros(9, 13)
    with pytest.raises(RuntimeError, match=r"'0\.weight'[\s\S]*paramsplit\.split"):
        oracle.opt.step()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fused_adamw_step_lands_in_the_weight_the_forward_reads(kind):
    """A fused step bumps no version counter: the weight, a no-grad read and the forward all see
    it. Oracle: an unsplit fused AdamW (close: fused kernels round by position on CPU)."""
    ref, sm, groups = _pair(kind, plan=_oracle_plan(kind))
    frozen = _frozen(kind)
    opts = [torch.optim.AdamW(groups, lr=0.1, weight_decay=WD, fused=True),
            torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=WD, fused=True)]
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = sm[0].weight.clone()
    for model, opt in zip((sm, ref), opts):
        model(x).square().sum().backward()
        opt.step()
    with torch.no_grad():
        ref[0].weight[frozen] = before[frozen]
        read = sm[0].weight.clone()
        out = sm(x)
    assert torch.equal(read, sm.state_dict()["0.weight"])
    assert torch.equal(read[frozen], before[frozen])
    assert (read != before)[~frozen].all()
    assert torch.equal(out, sm[2](torch.tanh(nn.functional.linear(x, read, sm[0].bias))))
    torch.testing.assert_close(read, ref[0].weight, rtol=0, atol=1e-6)


# -- max_norm embeddings renormalise the weight in place during forward -------------------------

def _embedding_plan(kind):
    frozen = torch.zeros(20, 6, dtype=torch.bool)
    if kind == "rows":
        plan, frozen[:8] = rows({(0, 8): FROZEN}), True
    elif kind == "cols":
        plan, frozen[:, :2] = cols({(0, 2): FROZEN}), True
    elif kind == "mask":
        frozen = torch.rand(20, 6, generator=torch.Generator().manual_seed(1)) < 0.4
        plan = Regions(frozen, {True: FROZEN, False: {}})
    else:
        frozen = torch.rand(20, 6, generator=torch.Generator().manual_seed(1)) < 0.8
        plan = Regions(frozen, {True: FROZEN, False: {}})
    return plan, frozen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_embedding_max_norm_trains_bitwise_like_unsplit(kind, opt_cls):
    """``max_norm`` renormalises looked-up rows in place during forward, FROZEN elements
    included: each step must start from the renormalised weight."""
    torch.manual_seed(0)
    ref = nn.Embedding(20, 6, max_norm=1.0)
    with torch.no_grad():
        ref.weight.mul_(3)
    plan, frozen = _embedding_plan(kind)
    sm, groups = paramsplit.split(ref, {"weight": plan})
    assert kind in paramsplit.describe(sm)
    ref = copy.deepcopy(ref)
    kw = {"lr": 0.1} if opt_cls is torch.optim.SGD else {"lr": 0.1, "weight_decay": 0.0}
    opts = [opt_cls(groups, **kw), opt_cls(ref.parameters(), **kw)]
    g = torch.Generator().manual_seed(1)
    renormed = False
    for _ in range(4):
        idx = torch.randint(0, 20, (3, 5), generator=g)
        for model, opt in zip((sm, ref), opts):
            opt.zero_grad()
            start = model.weight.detach().clone()
            model(idx).pow(2).sum().backward()
            renormed |= not torch.equal(model.weight[frozen], start[frozen])
            before = model.weight.detach().clone()  # after the renormalisation
            opt.step()
            if model is ref:
                with torch.no_grad():
                    ref.weight[frozen] = before[frozen]
            else:  # FROZEN elements changed by the renormalisation only
                assert torch.equal(sm.weight[frozen], before[frozen])
        assert torch.equal(sm.state_dict()["weight"], ref.weight)
        assert torch.equal(sm.weight, ref.weight)
    assert renormed  # the test did exercise the in-place renormalisation of FROZEN elements


# -- freezing idioms ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_requires_grad_false_freezes_like_unsplit(kind):
    oracle = _Oracle(kind)
    sm, ref = oracle.sm, oracle.ref
    groups = paramsplit.param_groups(sm)
    oracle.step()
    # the whole model off: no graph, nothing to step
    x = torch.randn(3, 12)
    for model in (sm, ref):
        model.requires_grad_(False)
        out = model(x)
        assert not out.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            out.sum().backward()
    assert paramsplit.param_groups(sm) == []
    sm.requires_grad_(True)
    ref.requires_grad_(True)
    oracle.step()  # FROZEN regions stay frozen when the model is re-enabled
    # the split weight alone off: it keeps its values while everything else trains
    for model in (sm, ref):
        model[0].weight.requires_grad_(False)
    frozen_value = sm[0].weight.detach().clone()
    held = {id(p) for g in paramsplit.param_groups(sm) for p in g["params"]}
    assert id(sm[0].weight) not in held and len(held) == 3  # only the other parameters
    oracle.step()
    assert sm[0].weight.grad is None and sm[0].bias.grad is not None
    assert torch.equal(sm[0].weight, frozen_value)
    for model in (sm, ref):
        model[0].weight.requires_grad = True
    assert [[id(p) for p in g["params"]] for g in paramsplit.param_groups(sm)] == \
        [[id(p) for p in g["params"]] for g in groups]
    oracle.step()
    assert not torch.equal(sm[0].weight, frozen_value)


@pytest.mark.parametrize("plan", [
    FROZEN,
    cols({(0, 2): FROZEN, (2, None): FROZEN}),
    rows({(0, 3): FROZEN, (3, None): FROZEN}),
    Regions(torch.arange(24).view(6, 4) % 3, {0: FROZEN, 1: FROZEN, 2: FROZEN}),
], ids=["FROZEN", "cols all FROZEN", "rows all FROZEN", "mask all FROZEN"])
def test_a_plan_frozen_in_every_region_freezes_the_weight(plan):
    """A parameter with no trained element gets ``requires_grad=False``, is in no group, and
    never moves; the user can turn it back on like any parameter."""
    torch.manual_seed(0)
    sm = nn.Linear(4, 6)
    ref = copy.deepcopy(sm)
    out, groups = paramsplit.split(sm, {"weight": plan})
    assert out is sm
    assert not sm.weight.requires_grad and sm.bias.requires_grad
    assert [p for g in groups for p in g["params"]] == [sm.bias]
    opt = torch.optim.SGD(groups, lr=0.1)
    x = torch.randn(3, 4)
    sm(x).sum().backward()
    opt.step()
    assert sm.weight.grad is None and torch.equal(sm.weight, ref.weight)
    assert not torch.equal(sm.bias, ref.bias)
    with torch.no_grad():
        assert not sm.weight.requires_grad
    sm.weight.requires_grad_(True)
    assert sm.weight.requires_grad
    sm(x).sum().backward()
    ref(x).sum().backward()
    assert torch.equal(sm.weight.grad, ref.weight.grad)


# -- the gradient between steps: W.grad, the unsplit gradient ------------------------------------

@pytest.mark.parametrize("make_opt", [_adamw, _sgd], ids=["AdamW", "SGD-momentum"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_weight_grad_after_backward_is_the_unsplit_gradient(kind, make_opt):
    """Also around a step that decays per element through the gradient (SGD, decay layout)."""
    ref, sm, groups = _pair(kind)
    opt = make_opt(groups)
    parts = [p for g in groups for p in g["params"]
             if all(p is not q for q in sm.parameters())]
    assert bool(parts) == (kind != "decay")  # the decay layout has no parts
    x, x2 = torch.randn(5, 12), torch.randn(5, 12)
    for model in (sm, ref):
        model(x).square().sum().backward()
    assert torch.equal(sm[0].weight.grad, ref[0].weight.grad)  # FROZEN elements included
    assert all(p.grad is None for p in parts)
    for model in (sm, ref):  # accumulates like unsplit
        model(x2).square().sum().backward()
    want = ref[0].weight.grad.clone()
    assert torch.equal(sm[0].weight.grad, want)
    norms = [nn.utils.clip_grad_norm_(m.parameters(), 1e9) for m in (sm, ref)]
    assert torch.equal(norms[0], norms[1])
    opt.step()
    assert torch.equal(sm[0].weight.grad, want)  # given back after the step
    assert all(p.grad is None for p in parts)
    opt.zero_grad()  # the optimizer holds the weight: it clears its gradient
    assert sm[0].weight.grad is None and sm[0].bias.grad is None
    sm(x).square().sum().backward()
    sm.zero_grad()
    assert sm[0].weight.grad is None
    sm(x).square().sum().backward()


# -- torch.func ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_functional_call_grad_vmap_jacrev_with_original_names(kind):
    from torch.func import functional_call, grad, jacrev, vmap

    ref, sm, groups = _pair(kind)
    opt = torch.optim.AdamW(groups, lr=0.1)
    sm(torch.randn(2, 12)).sum().backward()
    opt.step()
    ref.load_state_dict(sm.state_dict())  # both at the trained values
    params = {k: v.detach() * 1.5 for k, v in ref.named_parameters()}
    assert {k for k, _ in sm.named_parameters()} == set(params)
    x = torch.randn(4, 12)
    assert torch.equal(functional_call(sm, params, (x,)), functional_call(ref, params, (x,)))
    assert torch.equal(sm(x), ref(x))  # the model's own weights are back afterwards
    # stand-in tensors, one of them a different one for the split weight only
    other = {**params, "0.weight": torch.randn(9, 12)}
    hidden = torch.tanh(nn.functional.linear(x, other["0.weight"], other["0.bias"]))
    assert torch.equal(functional_call(sm, other, (x,)),
                       nn.functional.linear(hidden, other["2.weight"], other["2.bias"]))

    def loss(model):
        return lambda p, x: functional_call(model, p, (x,)).square().sum()

    g_sm, g_ref = grad(loss(sm))(params, x), grad(loss(ref))(params, x)
    assert g_sm.keys() == g_ref.keys()
    for k in g_ref:
        assert torch.equal(g_sm[k], g_ref[k]), k
    per_sample = [vmap(grad(lambda p, xi: loss(m)(p, xi[None])), in_dims=(None, 0))(params, x)
                  for m in (sm, ref)]
    for k in params:
        assert torch.equal(per_sample[0][k], per_sample[1][k]), k
    jacs = [jacrev(lambda w: functional_call(m, {**params, "0.weight": w}, (x,)))(
        params["0.weight"]) for m in (sm, ref)]
    assert torch.equal(jacs[0], jacs[1])
    opt.zero_grad()
    sm(x).sum().backward()  # training goes on after the transforms
    opt.step()


# -- pickling and deepcopy ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("how", ["torch.save", "deepcopy", "pickle"])
def test_whole_model_pickles_and_copies_into_a_plain_working_model(kind, how):
    oracle = _Oracle(kind)
    oracle.step()
    sm = oracle.sm
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(sm, buf)
        buf.seek(0)
        got = torch.load(buf, weights_only=False)
    elif how == "pickle":
        got = pickle.loads(pickle.dumps(sm))
    else:
        got = copy.deepcopy(sm)
    assert type(got[0]) is nn.Linear
    _assert_same(got, sm)
    assert paramsplit.describe(got).count("\n") == 0  # nothing planned: a plain model
    # the copy trains like the unsplit model, with a plain optimizer and no warning
    plain = copy.deepcopy(oracle.ref)
    opts = [torch.optim.AdamW(got.parameters(), lr=0.1), torch.optim.AdamW(plain.parameters(),
                                                                           lr=0.1)]
    x = torch.randn(3, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model, opt in zip((got, plain), opts):
            for _ in range(2):
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
    _assert_same(got, plain)
    # the original keeps training with its optimizer, untouched by the copy
    with torch.no_grad():
        got[0].weight.mul_(0)
    oracle.step()
    # and the copy can be split again
    split_again, groups = _split(got, {"0.weight": _oracle_plan(kind)}, kind)
    assert split_again is got and kind in paramsplit.describe(got)
    before = got[0].weight.detach().clone()
    opt = torch.optim.SGD(groups, lr=0.1)
    got(x).square().sum().backward()
    opt.step()
    frozen = _frozen(kind)
    assert torch.equal(got[0].weight[frozen], before[frozen])


# -- optimizers not built from the groups -------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_optimizer_not_built_from_the_groups_warns_naming_the_parameter(kind):
    ref, sm, groups = _pair(kind)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    x = torch.randn(2, 12)
    for model in (sm, ref):
        model(x).sum().backward()
    with pytest.warns(UserWarning, match=r"'0\.weight'[\s\S]*not built from paramsplit's group"):
        opt.step()
    ref_opt.step()
    _assert_same(sm, ref)  # what it warns about: the weight was stepped as a whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer
        ref_opt.step()
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).step()  # not paramsplit's
    _assert_same(sm, ref)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_optimizer_built_from_the_groups_never_warns_also_with_an_lr_scheduler(kind):
    _, sm, groups = _pair(kind)
    x = torch.randn(2, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.AdamW(groups, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        lrs = []
        for _ in range(4):
            opt.zero_grad()
            sm(x).sum().backward()
            opt.step()
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        assert lrs[0] != lrs[-1]  # the warmup did change the groups' lr
        # regrouped by hand within one optimizer, the scheduler's keys included: no warning (the
        # decay layout's group is known by its name, with weight_decay 0: the regroup keeps it)
        keys = ("lr", "name") if kind == "decay" else ("lr",)
        again = torch.optim.SGD([{"params": g["params"], **{k: g[k] for k in keys}}
                                 for g in opt.param_groups], lr=0.1)
        torch.optim.lr_scheduler.StepLR(again, 1, gamma=0.5)
        sm(x).sum().backward()
        again.step()


# -- RNNs ---------------------------------------------------------------------------------------

_RNN_OPTIONS = [None, {"lr": 0.02, "weight_decay": 0.1}, {}]  # region 0 FROZEN; SGD lr 0.1
#: the decay layout: every region trains; they differ in weight_decay only
_RNN_DECAY_OPTIONS = [{"weight_decay": 0.0}, {"weight_decay": 0.1}, {}]


def _rnn_options(kind):
    return _RNN_DECAY_OPTIONS if kind == "decay" else _RNN_OPTIONS


def _rnn_regions(kind, shape):
    """Region ids (0 FROZEN, 1 and 2 trained with options of their own; for the decay layout all
    three trained, by a mask) and the plan."""
    ids = torch.full(shape, 2)
    opts = [FROZEN if o is None else o for o in _rnn_options(kind)]
    if kind == "rows":
        a, b = shape[0] // 4, shape[0] // 2
        ids[:a], ids[a:b] = 0, 1
        return ids, rows({(0, a): opts[0], (a, b): opts[1], (b, None): opts[2]})
    if kind == "cols":
        ids[:, :2], ids[:, 2:3] = 0, 1
        return ids, cols({(0, 2): opts[0], (2, 3): opts[1], (3, None): opts[2]})
    r = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    ids = torch.where(r < (0.4 if kind == "mask" else 0.7), 0, torch.where(r < 0.85, 1, 2))
    return ids, Regions(ids, dict(enumerate(opts)))


class _PerRegionSGD:
    """torch's for-loop SGD (momentum 0.9), each region with its own lr and weight_decay: the
    same tensor ops on the whole tensor, each element taken from its own region's result."""

    def __init__(self, param, ids, options):
        self.param, self.ids, self.options, self.bufs = param, ids, options, {}

    @torch.no_grad()
    def step(self):
        p, new = self.param, self.param.detach().clone()
        for r, opts in enumerate(self.options):
            if opts is None:
                continue
            lr, wd = opts.get("lr", 0.1), opts.get("weight_decay", 0.0)
            grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if r not in self.bufs:
                self.bufs[r] = torch.clone(grad).detach()
            else:
                self.bufs[r].mul_(0.9).add_(grad, alpha=1)
            stepped = p.detach().clone().add_(self.bufs[r], alpha=-lr)
            new = torch.where(self.ids == r, stepped, new)
        p.copy_(new)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_rnn_split_trains_like_a_per_region_oracle(cls, kind):
    torch.manual_seed(0)
    ref = cls(6, 4, num_layers=2, batch_first=True)
    ids, plan = _rnn_regions(kind, tuple(ref.weight_ih_l0.shape))
    sm, groups = paramsplit.split(ref, {"weight_ih_l0": plan})
    assert kind in paramsplit.describe(sm)
    ref = copy.deepcopy(ref)
    x = torch.randn(3, 5, 6)
    assert torch.equal(sm(x)[0], ref(x)[0])
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD([p for n, p in ref.named_parameters() if n != "weight_ih_l0"],
                              lr=0.1, momentum=0.9)
    ref_split = _PerRegionSGD(ref.weight_ih_l0, ids, _rnn_options(kind))
    init = sm.weight_ih_l0.detach().clone()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        xb = torch.randn(3, 5, 6, generator=g)
        for model in (sm, ref):
            model.zero_grad()
            model(xb)[0].square().sum().backward()
        assert torch.equal(sm.weight_ih_l0.grad, ref.weight_ih_l0.grad)
        opt.step()
        ref_opt.step()
        ref_split.step()
        for (n, p), q in zip(sm.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
        assert torch.equal(sm(x)[0], ref(x)[0])
    after = sm.state_dict()["weight_ih_l0"]
    trained = ids != 0 if kind != "decay" else torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(after[~trained], init[~trained]) and (after != init)[trained].all()
    assert paramsplit.merge(sm) is sm
    dc = copy.deepcopy(sm)
    assert type(dc) is cls and torch.equal(dc(x)[0], sm(x)[0])
