"""Property tests: random shapes, masks and blocks keep every guarantee."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows


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
    kind = draw(st.sampled_from(["mask", "rows", "cols", "decay"]))
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
    else:
        dim = 0 if kind == "rows" else 1
        blocks = _blocks(draw, shape[dim])
        plan = rows(blocks) if kind == "rows" else cols(blocks)
    return shape, plan, seed


def _region_of_each_element(plan, shape):
    """Independent oracle: the region key of every element, from the plan alone."""
    if isinstance(plan, Regions):
        return [repr(plan.options[int(v)]) for v in plan.mask.reshape(-1)]
    if isinstance(plan, torch.Tensor):
        return [repr(float(v)) for v in plan.reshape(-1)]
    keys = torch.empty(shape, dtype=torch.long).fill_(-1)
    index = [slice(None)] * len(shape)
    for i, (a, b) in enumerate(plan.blocks):
        index[plan.dim] = slice(a, b)
        keys[tuple(index)] = i
    return [f"block {int(k)}" for k in keys.reshape(-1)]


@settings(max_examples=60, deadline=None)
@given(cases(), dtypes)
def test_random_splits_are_exact(case, dtype):
    shape, plan, seed = case
    torch.manual_seed(seed)
    model = Raw(shape, dtype)
    split_model, groups = paramsplit.split(model, {"w": plan})
    x = torch.randn(shape, dtype=dtype)

    # forward bitwise, and the assembled tensor is the original
    assert torch.equal(split_model.w, model.w)
    assert split_model.w.requires_grad
    out, ref = split_model(x), model(x)
    assert torch.equal(out, ref)

    # each part holds its region's elements and gets x there as gradient; checked against the
    # plan alone (independent of paramsplit's layout code)
    out.backward()
    parts = [p for n, p in split_model.named_parameters() if n.startswith("w__")]
    w = model.w.detach()
    if parts and isinstance(plan, type(rows({}))):
        assert torch.equal(torch.cat([p.detach() for p in parts], plan.dim), w)
        for p, block in zip(parts, torch.split(x, [p.shape[plan.dim] for p in parts], plan.dim)):
            assert p.grad is None if not p.requires_grad else torch.equal(p.grad, block)
    elif parts:
        keys = _region_of_each_element(plan, shape)
        groups_of = {}
        for i, k in enumerate(keys):
            groups_of.setdefault(k, []).append(i)
        assert len(parts) == len(groups_of)
        for p in parts:
            if p.shape == w.shape and not p.requires_grad and len(parts) > 1:
                # the sparse layout: its FROZEN part is the whole tensor
                assert torch.equal(p.detach(), w) and p.grad is None
                continue
            idx = next(i for i in groups_of.values()
                       if len(i) == p.numel() and torch.equal(w.reshape(-1)[i], p.detach().reshape(-1)))
            if p.requires_grad:
                assert torch.equal(p.grad.reshape(-1), x.reshape(-1)[idx])
            else:
                assert p.grad is None

    # groups: every trainable tensor exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in split_model.parameters() if p.requires_grad)

    # merged export round trip
    merged = paramsplit.merged_state_dict(split_model)
    assert list(merged) == ["w"] and torch.equal(merged["w"], model.w.detach())
    other = Raw(shape, dtype)
    other_split, _ = paramsplit.split(other, {"w": plan})
    paramsplit.load_merged_state_dict(other_split, merged)
    assert torch.equal(other_split.w, model.w)

