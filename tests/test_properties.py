"""Property tests: random shapes, masks and blocks keep every guarantee."""

from __future__ import annotations

import bisect
import copy
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import paramsplit
from paramsplit import FROZEN, Blocks, Regions, cols, rows

LR, WD = 0.3, 0.0  # the optimizer's defaults (a region's {} means these)


class Raw(nn.Module):
    """A raw parameter read directly in forward."""

    def __init__(self, shape, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, dtype=dtype))

    def forward(self, x):
        return (self.w * x).sum()


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def _blocks(draw, size):
    cuts = sorted(draw(st.sets(st.integers(0, size), max_size=4)) | {0, size})
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
    chosen = draw(st.lists(st.sampled_from(spans), unique=True, max_size=len(spans)))
    options = [{"lr": 0.1}, {"weight_decay": 0.2}, FROZEN, {}]
    return {s: draw(st.sampled_from(options)) for s in chosen}


@st.composite
def cases(draw):
    shape = draw(shapes)
    kind = draw(st.sampled_from(["mask", "rows", "cols", "decay", "whole"]))
    if kind == "cols" and len(shape) < 2:
        kind = "rows"
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "mask":
        k = draw(st.integers(1, 4))
        ids = torch.randint(0, k, shape, generator=g)
        opts = {i: draw(st.sampled_from([{}, {"lr": 0.5}, FROZEN, {"weight_decay": i / 10}]))
                for i in range(k)}
        plan = Regions(ids, opts)
    elif kind == "decay":
        plan = torch.randint(0, 3, shape, generator=g).double().div(10)
    elif kind == "whole":
        plan = draw(st.sampled_from([{}, {"lr": 0.5}, FROZEN]))
    else:
        dim = 0 if kind == "rows" else 1
        blocks = _blocks(draw, shape[dim])
        plan = rows(blocks) if kind == "rows" else cols(blocks)
    per_element_decay = draw(st.booleans())
    return shape, plan, seed, per_element_decay


def _per_element(plan, shape):
    """Independent oracle, from the plan alone: for every element its region key (elements
    with equal keys share a part), its lr, its weight_decay and whether it is FROZEN."""
    n = torch.Size(shape).numel()
    if isinstance(plan, Regions):
        opts = [plan.options[int(v)] for v in plan.mask.reshape(-1)]
        keys = [repr(o) for o in opts]  # equal options merge into one region
    elif isinstance(plan, torch.Tensor):
        opts = [{"weight_decay": float(v)} for v in plan.reshape(-1)]
        keys = [repr(o) for o in opts]
    elif isinstance(plan, Blocks):
        size = shape[plan.dim]
        at = [slice(None)] * len(shape)
        block = torch.full(shape, -1, dtype=torch.long)
        for i, (start, stop) in enumerate(plan.blocks):
            at[plan.dim] = slice(start, stop)
            block[tuple(at)] = i
        spans = list(plan.blocks)
        opts = [plan.blocks[spans[i]] if i >= 0 else {} for i in block.reshape(-1).tolist()]
        # every block is its own region, and so is each uncovered stretch between blocks
        cuts = sorted({0, size} | {c for span in spans for c in span})
        stretch = torch.tensor([bisect.bisect_right(cuts, i) - 1 for i in range(size)])
        view = [1] * len(shape)
        view[plan.dim] = size
        keys = [f"stretch {s}" for s in stretch.view(view).expand(shape).reshape(-1).tolist()]
    else:
        opts, keys = [plan] * n, ["all"] * n
    frozen = torch.tensor([o is FROZEN for o in opts], dtype=torch.bool)
    lr = torch.tensor([LR if o is FROZEN else o.get("lr", LR) for o in opts], dtype=torch.float64)
    wd = torch.tensor([WD if o is FROZEN else o.get("weight_decay", WD) for o in opts],
                      dtype=torch.float64)
    return keys, frozen, lr, wd, opts


@settings(max_examples=60, deadline=None)
@given(cases(), dtypes)
def test_random_splits_are_exact(case, dtype):
    shape, plan, seed, per_element_decay = case
    torch.manual_seed(seed)
    model = Raw(shape, dtype)
    ref = copy.deepcopy(model)
    w = model.w
    split_model, groups = paramsplit.split(model, {"w": plan},
                                           per_element_decay=per_element_decay)
    keys, frozen, lr, wd, opts = _per_element(plan, shape)
    n_regions = len(set(keys))
    # the decay layout: several regions, all trained, differing in weight_decay only; with
    # one weight_decay for all of them, no split at all ("whole")
    decays_only = per_element_decay and n_regions > 1 and not frozen.any() and all(
        set(o) <= {"weight_decay"} for o in opts)
    one_decay = decays_only and len({o.get("weight_decay") for o in opts}) == 1
    decay = decays_only and not one_decay
    layout = paramsplit.describe(model).splitlines()[1].split()[-1]
    assert (layout == "decay") == decay, layout

    # the model itself, untouched; forward bitwise
    assert split_model is model and model.w is w
    assert [n for n, _ in model.named_parameters()] == ["w"]
    assert torch.equal(w, ref.w)
    x = torch.randn(shape, dtype=dtype)
    out, want = model(x), ref(x)
    assert torch.equal(out, want)

    all_frozen = bool(frozen.all())  # a FROZEN plan: the one change split makes to a model
    assert w.requires_grad == (not all_frozen)

    # groups: every trained tensor exactly once (the weight, the carrier, with its parts)
    split = paramsplit._sync._SPLITS[w]
    parts = split.parts
    ids = [id(p) for g in groups for p in g["params"]]
    trained = [] if all_frozen else [w] + parts
    assert sorted(ids) == sorted(map(id, trained))

    # the parts: one per trained region (none when the plan has one region), nothing FROZEN
    regions = {k for k, f in zip(keys, frozen.tolist()) if not f}
    whole = n_regions == 1 or decays_only  # no parts
    assert len(parts) == (0 if whole else len(regions))
    assert sum(p.numel() for p in parts) == (0 if whole else int((~frozen).sum()))
    if decay:  # the weight alone in its group, which does not decay it itself
        (group,) = groups
        assert group["params"] == [w] and group["weight_decay"] == 0.0

    if all_frozen:  # in no group, no gradient
        assert not any(p is w for g in groups for p in g["params"])
        return
    out.backward()
    assert torch.equal(w.grad, x)  # the unsplit gradient, FROZEN elements included

    # inside a step, each part holds its region's elements and gets x there as gradient
    # (checked against the plan alone); after it, the weight is SGD's per-element update
    seen = {}

    def inside():
        seen["weight_grad"] = w.grad
        seen["parts"] = [(p.detach().clone(), None if p.grad is None else p.grad.clone())
                         for p in parts]

    opt = torch.optim.SGD(groups, lr=LR, weight_decay=WD, foreach=False)
    before = w.detach().clone()
    sgd_module = importlib.import_module("torch.optim.sgd")
    sgd = sgd_module.sgd  # SGD.step's update, run after every hook before the step
    sgd_module.sgd = lambda *a, **k: (seen or inside(), sgd(*a, **k))[1]  # 1st group
    try:
        opt.step()
    finally:
        sgd_module.sgd = sgd
    flat_w, flat_x = before.reshape(-1), x.reshape(-1)
    if decay:  # SGD decays through the gradient: the step sees g + wd * w, per element
        coupled = flat_x.clone()
        for ewd in set(wd.tolist()):
            coupled[wd == ewd] = flat_x[wd == ewd].add(flat_w[wd == ewd], alpha=ewd)
        got = seen["weight_grad"].reshape(-1)
        if dtype == torch.bfloat16:  # rounding by position, as below
            bound = 2 ** -7 * (flat_x.double().abs() + wd * flat_w.double().abs())
            assert ((got.double() - coupled.double()).abs() <= bound).all()
        else:
            assert torch.equal(got, coupled)
    if parts:
        assert seen["weight_grad"] is None  # hidden from the optimizer during the step
        by_key = {}
        for i, k in enumerate(keys):
            if not frozen[i]:
                by_key.setdefault(k, []).append(i)
        flat_w, flat_x = before.reshape(-1), x.reshape(-1)
        unmatched = list(by_key.values())
        for value, grad in seen["parts"]:
            idx = next(i for i in unmatched if len(i) == value.numel()
                       and torch.equal(flat_w[i], value.reshape(-1))
                       and torch.equal(flat_x[i], grad.reshape(-1)))
            unmatched.remove(idx)
        assert unmatched == []
        assert all(p.grad is None for p in parts)  # dropped after the step
    assert torch.equal(w.grad, x)  # the weight's gradient is back
    # SGD, written out per element: w - lr * (g + wd * w), with the element's own lr and wd
    # (the same two tensor ops as torch's SGD); FROZEN elements do not move
    flat_w, flat_x = before.reshape(-1), x.reshape(-1)
    expect = flat_w.clone()
    for elr, ewd in set(zip(lr.tolist(), wd.tolist())):
        at = (lr == elr) & (wd == ewd) & ~frozen
        grad = flat_x[at] if ewd == 0 else flat_x[at].add(flat_w[at], alpha=ewd)
        expect[at] = flat_w[at].add(grad, alpha=-elr)
    assert torch.equal(w.detach()[frozen.view(shape)], before[frozen.view(shape)])
    if dtype == torch.bfloat16:
        # torch's CPU add rounds bfloat16 differently in its vector loop and its scalar tail,
        # so the result depends on an element's position in the tensor it is stepped in (a
        # part, or the oracle's gather): equal up to a rounding of the operands only (two
        # bfloat16 ulps of |w| + lr * |g + wd * w|)
        size = before.double().abs() + (lr * (x.double().abs().reshape(-1) + wd * flat_w.double()
                                              .abs())).view(shape)
        diff = (w.detach().double() - expect.view(shape).double()).abs()
        assert (diff <= 2 ** -6 * size).all(), (diff.max(), size)
    else:
        assert torch.equal(w.detach(), expect.view(shape))

    # merged export round trip
    merged = paramsplit.merged_state_dict(split_model)
    assert list(merged) == ["w"] and torch.equal(merged["w"], w.detach())
    other = Raw(shape, dtype)
    other_split, _ = paramsplit.split(other, {"w": plan}, per_element_decay=per_element_decay)
    paramsplit.load_merged_state_dict(other_split, merged)
    assert torch.equal(other_split.w, w)


@pytest.mark.parametrize("plan", [rows({(0, 1): FROZEN, (1, 2): FROZEN}),
                                  cols({(0, 2): FROZEN, (2, None): FROZEN})],
                         ids=["rows", "cols"])
def test_blocks_that_are_all_frozen(plan):
    """Several blocks, every one FROZEN (the property test above found it raising IndexError):
    the whole parameter is FROZEN (requires_grad=False, in no group, never moves); the rest of
    the model trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    before = model[0].weight.detach().clone()
    _, groups = paramsplit.split(model, {"0": plan})
    assert not model[0].weight.requires_grad
    assert not any(p is model[0].weight for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    bias = model[0].bias.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight, before)
    assert not torch.equal(model[0].bias, bias)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.01, 0.1, 1e-30, 2.5, float("inf")]), max_size=40),
       st.lists(st.floats(0, 1, width=32), max_size=12), st.sampled_from([torch.float32,
                                                                          torch.float64,
                                                                          torch.bfloat16]))
def test_decay_tensor_values_are_found_as_torch_unique_finds_them(few, many, dtype):
    """A decay tensor's distinct values and each element's index among them, found by one pass
    per value (up to 4) or by a sort: the same as ``torch.unique(..., return_inverse=True)``."""
    from paramsplit._spec import _distinct

    for values in (few, few + many):
        flat = torch.tensor(values, dtype=dtype)
        want, want_ids = torch.unique(flat, return_inverse=True)
        got, ids = _distinct(flat)
        assert torch.equal(got, want) and torch.equal(ids, want_ids), values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60),
       st.lists(st.sampled_from(["frozen", "a", "b", "c"]), min_size=6, max_size=6))
def test_a_mask_layout_rebuilds_its_region_ids_from_its_permutation(ids, kinds):
    """Mask layouts keep no element-wise region ids at rest (a byte per element); the ids FSDP2's
    shards are cut from are rebuilt from the permutation, equal to the plan's."""
    from paramsplit._layout import _layout
    from paramsplit._spec import _resolve

    options = {"frozen": FROZEN, "a": {"lr": 0.1}, "b": {"weight_decay": 0.2}, "c": {}}
    model = nn.Linear(len(ids), 1)
    mask = torch.tensor([ids])
    (target,) = _resolve(model, {"weight": Regions(mask, {i: options[k]
                                                          for i, k in enumerate(kinds)})})
    if target.kind not in ("mask", "sparse"):
        return  # one region (whole) or blocks: no ids
    layout = _layout(target)
    assert layout.target.region_ids is None
    got = layout._region_ids()
    assert got.dtype == target.region_ids.dtype and torch.equal(got, target.region_ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.booleans(), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_a_mask_layout_writes_back_exactly_what_its_parts_hold(ids, frozen, transposed, dtype):
    """A mask's parts go back into the weight by a gather through the inverse permutation when
    they cover every element (int32 indices), else by a scatter: either way every trained element
    takes its part's value, bit for bit, and every FROZEN element keeps the weight's."""
    from paramsplit._layout import _Copies, _layout
    from paramsplit._spec import _resolve

    n = len(ids)
    weight = torch.randn(n, 2, dtype=dtype).t() if transposed else torch.randn(2, n, dtype=dtype)
    model = nn.Linear(n, 2, dtype=dtype)
    model.weight = nn.Parameter(weight)
    mask = torch.tensor([ids, ids[::-1]])
    options = {i: ({"lr": 0.1 * (i + 1)} if i or not frozen else FROZEN) for i in range(4)}
    (target,) = _resolve(model, {"weight": Regions(mask, options)})
    if target.kind not in ("mask", "sparse"):
        return
    layout = _layout(target)
    covers = not frozen or 0 not in ids
    assert (layout.inv is not None) == covers
    assert layout.perm.dtype == (torch.int32 if covers else torch.int64)
    parts = layout.parts_from(model.weight)
    with torch.no_grad():
        model.weight.mul_(3)  # the parts take the weight's values again at load
        assert layout.load(model.weight, parts, _Copies())
        before = model.weight.detach().clone()
        for k, p in enumerate(parts):
            p.copy_(torch.arange(p.numel(), dtype=dtype) + 100 * k)
        layout.store(model.weight, parts, _Copies())
    want = before.reshape(-1).clone()
    want[layout.perm.long()] = torch.cat([p.reshape(-1) for p in parts])
    assert torch.equal(model.weight.detach().reshape(-1), want)
    assert torch.equal(layout.full(parts).reshape(-1)[layout.perm.long()],
                       torch.cat([p.reshape(-1) for p in parts]))
