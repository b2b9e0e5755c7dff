"""Core contract of paramsplit.split: the model is untouched (its forward and backward are the
original's), the groups cover every trainable tensor once, and the optimizer applies each region's
options exactly (checked against unsplit models and hand-written optimizers)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5)).to(dtype)


def _plans(shape=(9, 12)):
    g = torch.Generator().manual_seed(3)
    return {
        "rows": rows({(0, 4): {"weight_decay": 0.0}, (4, None): {"weight_decay": 0.1}}),
        "cols": cols({(2, 7): {"weight_decay": 0.3}}),
        # column blocks of one width after a FROZEN one: copied as one block from column 2 on
        "even-cols": cols({(0, 2): FROZEN, (2, 7): {"lr": 0.01}, (7, None): {"weight_decay": 0.2}}),
        "regions": Regions(torch.randint(0, 3, shape, generator=g),
                           {0: {"lr": 0.01}, 1: {"weight_decay": 0.2}, 2: FROZEN}),
        "bool-mask": Regions(torch.rand(shape, generator=g) < 0.5, {True: {"weight_decay": 0.0},
                                                                    False: {}}),
        "decay-tensor": torch.where(torch.rand(shape, generator=g) < 0.3, 0.01, 0.1),
        "sparse": Regions(torch.rand(shape, generator=g) < 0.2, {True: {"lr": 0.05},
                                                                 False: FROZEN}),
        "options": {"weight_decay": 0.5, "lr": 0.1},
        # regions that differ only in weight_decay, kept whole (see _split)
        "decay": torch.where(torch.rand(shape, generator=g) < 0.5, 0.0, 0.2),
    }


PLAN_KINDS = list(_plans())
SPLIT_KINDS = [k for k in PLAN_KINDS if k not in ("options", "decay")]  # the kinds with parts


def _split(model, kind, name="0.weight"):
    """Split ``name`` by ``_plans()[kind]``: every kind but "decay" with parts, as named (rows,
    cols, bool-mask and decay-tensor differ only in weight_decay, so per_element_decay=False);
    "decay" kept whole (the decay layout)."""
    out = paramsplit.split(model, {name: _plans()[kind]}, per_element_decay=kind == "decay")
    assert (_layouts(model)[name] == "decay") == (kind == "decay")
    return out


def _parts(weight):
    """The optimizer's parts of a split parameter (internal; used sparingly)."""
    return paramsplit._sync._SPLITS[weight].parts


def _layouts(model):
    """{parameter name: its layout} from describe's table."""
    lines = paramsplit.describe(model).splitlines()[1:]
    return {line.split()[0]: line.split()[-1] for line in lines}


def _step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("kind", PLAN_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_forward_and_backward_are_bitwise(kind, dtype, train):
    """Split runs no code in the forward or backward: the model computes what a deep copy of it
    computes, and every parameter's .grad is the unsplit gradient (FROZEN elements included)."""
    model = _mlp(dtype).train(train)
    ref = copy.deepcopy(model)
    before = list(model.named_parameters())
    split_model, _ = _split(model, kind)
    assert split_model is model
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(after, before))
    x = torch.randn(7, 12, dtype=dtype)
    out, want = model(x), ref(x)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert all(p.grad is None for p in (_parts(model[0].weight) if kind != "options" else []))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_split_returns_the_model_itself_untouched():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    params = list(model.named_parameters())
    split_model, groups = paramsplit.split(model, {"0": rows({(0, 3): {"lr": 0.0}}),
                                                   "2": _plans((5, 9))["regions"]})
    assert split_model is model
    assert [type(m) for m in model.modules()] == classes
    assert all(type(m).forward is c.forward for m, c in zip(model.modules(), classes))
    assert list(model.named_parameters()) == params  # same names, same objects
    assert not any("__" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for _, p in params)
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert [n for n, _ in model.named_buffers()] == []  # no index buffers either
    # the parts live in the optimizer's groups, not in the model
    in_model = {id(p) for p in model.parameters()}
    for w in (model[0].weight, model[2].weight):
        assert _parts(w) and not {id(p) for p in _parts(w)} & in_model
    assert {id(p) for g in groups for p in g["params"]} >= in_model


def test_owner_keeps_class_attributes_methods_and_hooks():
    model = _mlp()
    ref = copy.deepcopy(model)
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append("post"))
    model[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    split_model, _ = paramsplit.split(model, {"0": cols({(0, 6): {"weight_decay": 0.0}})})
    lin = split_model[0]
    assert type(lin) is nn.Linear
    assert lin.in_features == 12 and lin.out_features == 9
    assert lin.weight.shape == (9, 12) and lin.weight.requires_grad
    assert "in_features=12" in lin.extra_repr()
    x = torch.randn(2, 12)
    assert torch.equal(split_model(x), ref(x))
    assert calls == ["pre", "post"]
    assert torch.equal(split_model(x), ref(x))
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("kind", SPLIT_KINDS)
def test_parts_are_dense_tensors_holding_the_trained_elements(kind):
    """One part per trained region; ``rows`` parts are views of the weight (no copy), the other
    layouts' parts dense copies. Fused optimizers need every part contiguous."""
    model = _mlp()
    _split(model, kind)
    w = model[0].weight
    parts = _parts(w)
    assert len(parts) >= 1
    assert all(p.is_contiguous() and p.requires_grad and p.dtype == w.dtype for p in parts)
    plan = _plans()[kind]
    frozen = (torch.zeros(9, 12, dtype=torch.bool) if not isinstance(plan, Regions) else
              torch.tensor([plan.options[v.item()] is FROZEN for v in plan.mask.flatten()])
              .view(9, 12))
    if kind == "even-cols":
        frozen[:, :2] = True
    assert sum(p.numel() for p in parts) == int((~frozen).sum())
    if kind == "rows":  # rows({(0, 4): ..., (4, None): ...}): views of the weight's rows
        assert _layouts(model)["0.weight"] == "rows"
        assert [p.shape for p in parts] == [(4, 12), (5, 12)]
        assert parts[0].data_ptr() == w[0].data_ptr() and parts[1].data_ptr() == w[4].data_ptr()
    else:
        values = torch.cat([p.detach().reshape(-1) for p in parts]).sort().values
        assert torch.equal(values, w.detach()[~frozen].sort().values)
    torch.optim.AdamW([{"params": parts + [w]}], lr=1e-3, fused=True)  # accepted as is


@pytest.mark.parametrize("kind", ["rows", "cols", "bool-mask", "decay-tensor"])
def test_plans_differing_only_in_weight_decay_keep_the_weight_whole(kind):
    """Regions that all train and differ only in weight_decay make no parts (the decay layout):
    the weight itself sits in one group with weight_decay=0, and the step hooks decay it."""
    model = _mlp()
    _, groups = paramsplit.split(model, {"0.weight": _plans()[kind]})
    w = model[0].weight
    assert _parts(w) == [] and _layouts(model)["0.weight"] == "decay"
    (decayed,) = [g for g in groups if any(p is w for p in g["params"])]
    assert decayed["name"] == "per-element weight_decay" and decayed["weight_decay"] == 0.0
    assert [p for p in decayed["params"]] == [w]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once, nothing else


def test_groups_cover_every_trainable_parameter_once_and_merge_equal_options():
    model = _mlp()
    mask = torch.randint(0, 3, (9, 12), generator=torch.Generator().manual_seed(0))
    spec = {
        "0.weight": Regions(mask, {0: {"weight_decay": 0.1}, 1: {}, 2: FROZEN}),
        "2.weight": rows({(0, 2): {"weight_decay": 0.1}, (2, None): FROZEN}),
        "2.bias": {"weight_decay": 0.1},
    }
    split_model, groups = paramsplit.split(model, spec)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    parts = _parts(model[0].weight) + _parts(model[2].weight)
    assert len(_parts(model[0].weight)) == 2 and len(_parts(model[2].weight)) == 1  # no FROZEN part
    expected = [p for p in model.parameters() if p.requires_grad] + parts  # each carrier once too
    assert sorted(ids) == sorted(map(id, expected))
    # the parts hold exactly the trained elements
    assert sum(p.numel() for p in _parts(model[0].weight)) == int((mask != 2).sum())
    assert _parts(model[2].weight)[0].numel() == 2 * 9
    names = [g["name"] for g in groups]
    assert names == ["default", "weight_decay=0.1"] and len(set(names)) == len(names)
    assert groups[1]["weight_decay"] == 0.1 and "weight_decay" not in groups[0]
    decayed = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(_parts(model[0].weight)[0]), id(model[0].weight),
                       id(_parts(model[2].weight)[0]), id(model[2].weight), id(model[2].bias)}
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def _hand_adamw(w, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Per-element AdamW (decoupled decay), written out; ``lr`` and ``wd`` may be tensors."""
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mhat = m / (1 - betas[0] ** t)
        vhat = v / (1 - betas[1] ** t)
        w = w - lr * mhat / (vhat.sqrt() + eps)
    return w


@pytest.mark.parametrize("layout", ["mask", "cols", "rows"])
def test_adamw_matches_hand_written_per_element_decoupled_decay(layout):
    torch.manual_seed(0)
    w0 = torch.randn(6, 8, dtype=torch.float64)
    model = nn.Linear(8, 6, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0)
    mask = {"mask": torch.randint(0, 2, (6, 8)),
            "cols": (torch.arange(8) >= 3).long().expand(6, 8),
            "rows": (torch.arange(6) >= 2).long()[:, None].expand(6, 8)}[layout]
    f64 = dict(dtype=torch.float64)
    wd = torch.where(mask.bool(), torch.tensor(0.5, **f64), torch.tensor(0.01, **f64))
    lr = torch.where(mask.bool(), torch.tensor(0.05, **f64), torch.tensor(0.02, **f64))
    split_model, groups = paramsplit.split(model, {"weight": Regions(
        mask, {0: {"weight_decay": 0.01, "lr": 0.02}, 1: {"weight_decay": 0.5, "lr": 0.05}})})
    assert _layouts(model)["weight"] == layout
    opt = torch.optim.AdamW(groups, lr=1.0)
    grads = []
    for _ in range(4):
        opt.zero_grad()
        split_model(torch.randn(4, 8, dtype=torch.float64)).sin().sum().backward()
        grads.append(model.weight.grad.clone())  # the unsplit gradient, between steps
        opt.step()
    w = _hand_adamw(w0, grads, lr, wd)
    final = model.weight.detach()
    torch.testing.assert_close(final, w, rtol=0, atol=1e-12)
    # and no single weight_decay could have produced it
    for single in (0.01, 0.5):
        assert not torch.allclose(final, _hand_adamw(w0, grads, lr, torch.full_like(w0, single)))


@pytest.mark.parametrize("layout", ["mask", "decay"])
def test_adamw_gradients_replayed_through_hand_written_step(layout):
    """The hand-written AdamW, fed the model's own gradients step by step, lands exactly where
    the split model does after every step, not only the last: with parts, and kept whole."""
    torch.manual_seed(1)
    model = nn.Linear(8, 6).double()
    mask = torch.rand(6, 8) < 0.4
    split_model, groups = paramsplit.split(model, {"weight": torch.where(mask, 0.3, 0.0).double()},
                                           per_element_decay=layout == "decay")
    assert _layouts(model)["weight"] == layout
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
    grads = []
    w0 = model.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        split_model(torch.randn(5, 8, dtype=torch.float64)).pow(2).mean().backward()
        grads.append(model.weight.grad.clone())
        opt.step()
        expect = _hand_adamw(w0, grads, 0.01, torch.where(mask, 0.3, 0.0).double())
        torch.testing.assert_close(model.weight.detach(), expect, rtol=0, atol=1e-13)


@pytest.mark.parametrize("layout", ["cols", "decay"])
def test_adam_matches_the_seed_masked_l2_penalty(layout):
    """Adam's coupled weight_decay == the forum answer's penalty 0.5 * wd * w**2 on the loss,
    with parts (cols) and with the weight kept whole (decay)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 1)).double()
    ref = copy.deepcopy(model)
    penalty_mask = torch.ones(1, 10, dtype=torch.float64)
    penalty_mask[:, 5:] = 2.0
    wd = 0.01 * penalty_mask
    split_model, groups = paramsplit.split(model, {"0.weight": wd},
                                           per_element_decay=layout == "decay")
    assert _layouts(model)["0.weight"] == layout
    opt = torch.optim.Adam(groups, lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(20):
        x, y = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(split_model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        loss = nn.functional.mse_loss(ref(x), y) + (0.5 * wd * ref[0].weight ** 2).sum()
        loss.backward()
        ref_opt.step()
    torch.testing.assert_close(model[0].weight.detach(), ref[0].weight.detach(), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(model[0].bias.detach(), ref[0].bias.detach(), rtol=1e-10,
                               atol=1e-12)


SAME = {"weight_decay": 0.05}  # the optimizers' default below: a distinct group, equal settings


def _equal_options_plan(layout):
    """``layout``'s plan of regions with equal settings. "decay-rows"/"decay-mask" are the
    rows/mask plans kept whole (the decay layout: their regions differ only in weight_decay)."""
    g = torch.Generator().manual_seed(5)
    return {
        "rows": rows({(0, 4): {}, (4, 7): SAME}),
        "cols": cols({(3, 8): SAME}),
        "mask": Regions(torch.randint(0, 3, (9, 12), generator=g), {0: {}, 1: SAME, 2: {}}),
        # FROZEN holds most elements; the oracle puts its elements back after each step
        "sparse": Regions(torch.rand(9, 12, generator=g) < 0.3, {True: SAME, False: FROZEN}),
        "whole": SAME,
    }[layout.removeprefix("decay-")]


def _split_equal(model, spec, layout):
    """Split with the equal-options plans: the part layouts with per_element_decay=False (their
    regions differ only in weight_decay, which would keep the weight whole), "decay-*" without."""
    return paramsplit.split(model, spec, per_element_decay=layout.startswith("decay"))


EQUAL_LAYOUTS = ["rows", "cols", "mask", "sparse", "whole", "decay-rows", "decay-mask"]


@pytest.mark.parametrize("layout", EQUAL_LAYOUTS)
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.05),
], ids=["adamw-loop", "adamw-foreach", "adamw-fused", "adam", "sgd-momentum"])
def test_equal_options_train_bitwise_like_the_unsplit_model(layout, make_opt):
    model = _mlp(seed=4)
    ref = copy.deepcopy(model)
    plan = _equal_options_plan(layout)
    split_model, groups = _split_equal(model, {"0.weight": plan}, layout)
    assert _layouts(model)["0.weight"] == layout.split("-")[0]
    assert len(groups) == 2
    frozen = ~plan.mask if layout == "sparse" else torch.zeros(9, 12, dtype=torch.bool)
    opt, ref_opt = make_opt(groups), make_opt(ref.parameters())
    for _ in range(8):
        x = torch.randn(8, 12)
        kept = ref[0].weight.detach()[frozen].clone()
        _step(split_model, opt, x)
        _step(ref, ref_opt, x)
        with torch.no_grad():
            ref[0].weight[frozen] = kept  # the oracle of FROZEN: put back by hand
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if opt.defaults.get("fused") and layout in ("rows", "cols", "mask", "sparse"):
            # torch's fused CPU AdamW does the last (numel % vector width) elements of each
            # tensor in a scalar loop that rounds differently from its vector loop. A part is a
            # shorter tensor than the weight, so other elements fall in that tail: equal up to
            # rounding only (for every layout; whether it shows depends on data and shapes).
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_fused_adamw_trains_every_plan(kind):
    """Fused kernels treat tensors as dense memory: every layout's parts work with them."""
    model = _mlp()
    split_model, groups = _split(model, kind)
    before = model[0].weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=True)
    for _ in range(2):
        _step(split_model, opt, torch.randn(4, 12))
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-1, weight_decay=0.5),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.5),
], ids=["adamw", "sgd-momentum"])
def test_frozen_elements_never_move_and_cost_no_state(make_opt):
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(9, 12, generator=g) < 0.4  # FROZEN: a minority (mask layout)
    sparse = torch.rand(5, 9, generator=g) < 0.8  # FROZEN: most (sparse layout)
    spec = {"0.weight": Regions(mask, {True: FROZEN, False: {}}),
            "2.weight": Regions(sparse, {True: FROZEN, False: {"lr": 0.05}}),
            "0.bias": rows({(0, 2): FROZEN})}
    split_model, groups = paramsplit.split(model, spec)
    assert [_layouts(model)[n] for n in ("0.weight", "0.bias", "2.weight")] == [
        "mask", "rows", "sparse"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_opt(groups)
    for _ in range(5):
        _step(split_model, opt, torch.randn(8, 12))
    frozen = {"0.weight": mask, "2.weight": sparse,
              "0.bias": torch.arange(9) < 2, "2.bias": torch.zeros(5, dtype=torch.bool)}
    trained = 0
    for name, p in model.named_parameters():
        f = frozen[name]
        assert torch.equal(p.detach()[f], start[name][f]), name
        assert (p.detach()[~f] != start[name][~f]).all(), name
        trained += int((~f).sum())
    # no optimizer state for FROZEN elements (they have no part) nor for the carried weights
    assert not any(w in opt.state for w in (model[0].weight, model[0].bias, model[2].weight))
    per_elem = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert per_elem == trained * (2 if isinstance(opt, torch.optim.AdamW) else 1)


def test_gradient_hook_freezing_is_what_we_fix():
    """The usual workaround (zeroing gradients with a hook) still moves 'frozen' elements."""
    model = _mlp()
    w = model[0].weight
    before = w.detach().clone()
    w.register_hook(lambda g: g * torch.cat([torch.zeros(4, 12), torch.ones(5, 12)]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.5)
    for _ in range(2):
        _step(model, opt, torch.randn(8, 12))
    assert not torch.equal(w.detach()[:4], before[:4])  # decay moved the "frozen" rows
    split_model, groups = paramsplit.split(_mlp(), {"0": rows({(0, 4): FROZEN})})
    opt = torch.optim.AdamW(groups, lr=1e-1, weight_decay=0.5)
    for _ in range(2):
        _step(split_model, opt, torch.randn(8, 12))
    assert torch.equal(split_model[0].weight[:4], before[:4])
    assert not torch.equal(split_model[0].weight[4:], before[4:])


def test_whole_parameter_plans():
    """An options dict: the parameter (unsplit, no parts) in its own group; FROZEN:
    requires_grad=False and in no group."""
    model = _mlp()
    ref = copy.deepcopy(model)
    bias0, bias2 = model[0].bias, model[2].bias
    split_model, groups = paramsplit.split(model, {"0.bias": {"weight_decay": 0.0},
                                                   "2.bias": FROZEN})
    assert split_model[0].bias is bias0 and split_model[2].bias is bias2
    assert bias0.requires_grad and not bias2.requires_grad
    assert _parts(bias0) == [] and _parts(bias2) == []
    assert _layouts(model) == {"0.bias": "whole", "2.bias": "whole"}
    assert [g["name"] for g in groups] == ["default", "weight_decay=0.0"]
    assert groups[1]["params"] == [bias0] and groups[1]["weight_decay"] == 0.0
    assert all(p is not bias2 for g in groups for p in g["params"])
    x = torch.randn(3, 12)
    assert torch.equal(split_model(x), ref(x))
    # training: 0.bias without decay, 2.bias never moves and gets no gradient
    ref.requires_grad_(False)
    ref_trained = [ref[0].weight, ref[0].bias, ref[2].weight]
    for p in ref_trained:
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW([{"params": [ref[0].weight, ref[2].weight]},
                                 {"params": [ref[0].bias], "weight_decay": 0.0}],
                                lr=0.1, weight_decay=0.5, foreach=False)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5, foreach=False)
    kept = bias2.detach().clone()
    for _ in range(3):
        x = torch.randn(4, 12)
        _step(split_model, opt, x)
        _step(ref, ref_opt, x)
    assert bias2.grad is None and torch.equal(bias2, kept)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_single_region_plans_do_not_split():
    model = _mlp()
    split_model, groups = paramsplit.split(model, {
        "0": rows({(0, None): {"lr": 0.1}}),
        "2": Regions(torch.ones(5, 9, dtype=torch.long), {1: {"lr": 0.1}})})
    assert _layouts(model) == {"0.weight": "whole", "2.weight": "whole"}
    assert _parts(model[0].weight) == [] and _parts(model[2].weight) == []
    (fast,) = [g for g in groups if g.get("lr") == 0.1]
    assert fast["params"] == [model[0].weight, model[2].weight]


@pytest.mark.parametrize("kind", ["rows", "cols", "regions", "decay-tensor", "sparse", "decay"])
def test_merged_state_dict_round_trips(kind):
    model = _mlp()
    split_model, groups = _split(model, kind)
    opt = torch.optim.AdamW(groups, lr=1e-1)
    _step(split_model, opt, torch.randn(4, 12))
    merged = paramsplit.merged_state_dict(split_model)
    assert list(merged) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())
    fresh = _mlp(seed=9)
    fresh.load_state_dict(merged, strict=True)
    x = torch.randn(5, 12)
    assert torch.equal(fresh(x), split_model(x))
    # and back: an unsplit checkpoint loads into a split model that has stepped before, and its
    # next step starts from the loaded values (SGD without momentum keeps no state: the oracle
    # is a fresh split of the loaded model)
    other, groups = _split(_mlp(seed=7), kind)
    sgd = torch.optim.SGD(groups, lr=0.1, weight_decay=0.01)
    _step(other, sgd, torch.randn(4, 12))
    paramsplit.load_merged_state_dict(other, fresh.state_dict())
    assert torch.equal(other(x), fresh(x))
    for k, v in paramsplit.merged_state_dict(other).items():
        assert torch.equal(v, merged[k])
    oracle, oracle_groups = _split(fresh, kind)
    oracle_sgd = torch.optim.SGD(oracle_groups, lr=0.1, weight_decay=0.01)
    _step(other, sgd, x)
    _step(oracle, oracle_sgd, x)
    for (name, p), q in zip(other.named_parameters(), oracle.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("layout", ["rows", "cols", "mask", "sparse", "decay-mask"])
@pytest.mark.parametrize("how", ["in-place", "data"])
def test_writes_to_the_weight_between_steps_land(layout, how):
    """A write into the weight between steps (an in-place op, or ``p.data = ...``) is what the
    next step starts from, as in the unsplit model."""
    model = _mlp(seed=4)
    ref = copy.deepcopy(model)
    plan = _equal_options_plan(layout)
    _split_equal(model, {"0.weight": plan}, layout)
    assert _layouts(model)["0.weight"] == layout.split("-")[0]
    frozen = ~plan.mask if layout == "sparse" else torch.zeros(9, 12, dtype=torch.bool)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=False)  # noqa
    opt, ref_opt = make(paramsplit.param_groups(model)), make(ref.parameters())
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:
            new = torch.randn(9, 12, generator=g)
            for m in (model, ref):
                if how == "data":
                    m[0].weight.data = new.clone()
                else:
                    with torch.no_grad():
                        m[0].weight.copy_(new)
        x = torch.randn(8, 12, generator=g)
        kept = ref[0].weight.detach()[frozen].clone()
        _step(model, opt, x)
        _step(ref, ref_opt, x)
        with torch.no_grad():
            ref[0].weight[frozen] = kept
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (step, name)


def test_state_dict_of_split_model_reloads_into_same_split():
    spec = {"0.weight": _plans()["regions"]}
    a, _ = paramsplit.split(_mlp(seed=1), spec)
    b, _ = paramsplit.split(_mlp(seed=2), spec)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(3, 12)
    assert torch.equal(a(x), b(x))
    assert list(a.state_dict()) == list(_mlp().state_dict())  # no index buffers, no parts


def test_describe_lists_regions_elements_options_and_layout():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(10, 1), "b": nn.Linear(1, 2), "c": nn.Linear(4, 6),
                           "d": nn.Linear(5, 8), "e": nn.Linear(3, 2)})
    mask = torch.zeros(6, 4, dtype=torch.long)
    mask[0, 0], mask[1, 1], mask[5, 3] = 1, 2, 2
    sparse = torch.zeros(8, 5, dtype=torch.long)
    sparse[2, 3] = 1
    decay = cols({(0, 5): {"weight_decay": 0.01}, (5, None): {"weight_decay": 0.1}})
    split_model, _ = paramsplit.split(model, {
        "a": decay,  # parts (cols), not the decay layout: per_element_decay=False
        "a.bias": FROZEN, "b": {"lr": 0.5},
        "c": Regions(mask, {0: {}, 1: {"lr": 0.1}, 2: {"lr": 0.1}}),
        "c.bias": rows({(0, 2): FROZEN}),
        "d": Regions(sparse, {0: FROZEN, 1: {}})}, per_element_decay=False)
    paramsplit.split(model, {"e": rows({(0, 1): {"weight_decay": 0.2}})})  # the decay layout
    lines = paramsplit.describe(split_model).splitlines()
    assert lines[0].split() == ["parameter", "region", "elements", "options", "layout"]
    assert [line.split() for line in lines[1:]] == [
        ["a.weight", "cols", "0:5", "5", "weight_decay=0.01", "cols"],
        ["a.weight", "cols", "5:10", "5", "weight_decay=0.1", "cols"],
        ["a.bias", "all", "1", "FROZEN", "whole"],
        ["b.weight", "all", "2", "lr=0.5", "whole"],
        ["c.weight", "region", "0", "21", "defaults", "mask"],
        ["c.weight", "region", "1", "+", "region", "2", "3", "lr=0.1", "mask"],
        ["c.bias", "rows", "0:2", "2", "FROZEN", "rows"],
        ["c.bias", "rows", "2:6", "4", "defaults", "rows"],
        ["d.weight", "region", "0", "39", "FROZEN", "sparse"],
        ["d.weight", "region", "1", "1", "defaults", "sparse"],
        ["e.weight", "rows", "0:1", "3", "weight_decay=0.2", "decay"],
        ["e.weight", "rows", "1:2", "3", "defaults", "decay"],
    ]
    # the columns line up: every layout starts where the header's does
    assert {len(line) - len(line.split()[-1]) for line in lines} == {lines[0].index("layout")}
    assert paramsplit.describe(nn.Linear(2, 2)).splitlines() == [
        "parameter  region  elements  options  layout"]


@pytest.mark.parametrize("layout", ["parts", "decay"])
@pytest.mark.parametrize("convert", ["double", "half", "bfloat16", "to-float64"])
def test_converting_the_dtype_after_split_then_training_works(convert, layout):
    """``model.double()``/``.half()``/``.to(dtype)`` after split: the parts follow the weight's
    dtype at the next step, and training is bitwise the unsplit model's (equal options); and
    the same with the weights kept whole (decay layout)."""
    model = _mlp(seed=4)
    ref = copy.deepcopy(model)
    paramsplit.split(model, {"0.weight": _equal_options_plan("mask"),
                             "2.weight": rows({(0, 2): SAME, (2, 4): {}})},
                     per_element_decay=layout == "decay")
    assert [_layouts(model)[n] for n in ("0.weight", "2.weight")] == (
        ["mask", "rows"] if layout == "parts" else ["decay", "decay"])
    # eps=1e-3: the default 1e-8 is 0 in float16, and Adam's first update then divides 0 by 0
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, eps=1e-3,  # noqa: E731
                                        foreach=False)
    opt, ref_opt = make(paramsplit.param_groups(model)), make(ref.parameters())
    dtype = {"double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
             "to-float64": torch.float64}[convert]
    for m in (model, ref):  # before the first step: optimizer state takes the new dtype
        if convert == "to-float64":
            m.to(torch.float64)
        else:
            getattr(m, convert)()
    x = torch.randn(4, 12, dtype=dtype)
    assert torch.equal(model(x), ref(x))
    for _ in range(3):
        x = torch.randn(8, 12, dtype=dtype)
        _step(model, opt, x)
        _step(ref, ref_opt, x)
    for w in (model[0].weight, model[2].weight):
        assert w.dtype == dtype and all(p.dtype == dtype for p in _parts(w))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name


@pytest.mark.parametrize("layout", ["rows", "cols", "mask", "decay-mask"])
def test_converting_the_dtype_mid_training(layout):
    """With a stateless optimizer the dtype may change between steps too."""
    model = _mlp(seed=4)
    ref = copy.deepcopy(model)
    _split_equal(model, {"0.weight": _equal_options_plan(layout)}, layout)
    assert _layouts(model)["0.weight"] == layout.split("-")[0]
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05)  # noqa: E731
    opt, ref_opt = make(paramsplit.param_groups(model)), make(ref.parameters())
    for step in range(4):
        if step == 2:
            model.double()
            ref.double()
        x = torch.randn(8, 12, dtype=model[0].weight.dtype)
        _step(model, opt, x)
        _step(ref, ref_opt, x)
    assert all(p.dtype == torch.float64 for p in _parts(model[0].weight))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


class _ParentReadsChildWeight(nn.Module):
    """The output layer reuses the embedding matrix through ``self.emb.weight`` (no tie)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)

    def forward(self, tokens):
        return nn.functional.linear(torch.tanh(self.emb(tokens)), self.emb.weight)


@pytest.mark.parametrize("kind", ["rows", "regions"])
def test_parameter_read_outside_its_owner_forward(kind):
    torch.manual_seed(0)
    model = _ParentReadsChildWeight()
    ref = copy.deepcopy(model)
    plan = (rows({(0, 20): FROZEN}) if kind == "rows"
            else Regions(torch.arange(240).reshape(30, 8) % 3, {0: FROZEN, 1: {}, 2: {"lr": 0.1}}))
    split_model, groups = paramsplit.split(model, {"emb": plan})
    tokens = torch.randint(0, 30, (4, 5))
    out, want = split_model(tokens), ref(tokens)
    assert torch.equal(out, want)
    out.logsumexp(-1).sum().backward()
    want.logsumexp(-1).sum().backward()
    assert torch.equal(model.emb.weight.grad, ref.emb.weight.grad)  # both uses, unsplit
    frozen = (plan.mask == 0) if kind == "regions" else torch.arange(30)[:, None].expand(30, 8) < 20
    before = model.emb.weight.detach().clone()
    torch.optim.SGD(groups, lr=0.1).step()
    after = model.emb.weight.detach()
    assert torch.equal(after[frozen], before[frozen])
    expect = before.add(ref.emb.weight.grad, alpha=-0.1)  # SGD's step, per element
    assert torch.equal(after[~frozen], expect[~frozen])


def _train_alike(*runs, features):
    """Three AdamW steps of each ``(model, groups)`` on the same data; their state dicts agree
    bitwise. Returns the optimizers."""
    opts = [torch.optim.AdamW(groups, lr=1e-2) for _, groups in runs]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, features, generator=g)
        for (m, _), opt in zip(runs, opts):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    first = runs[0][0].state_dict()
    for m, _ in runs[1:]:
        assert all(torch.equal(first[k], v) for k, v in m.state_dict().items())
    return opts


@pytest.mark.parametrize("which", ["forum-cols", "rows", "cols-3"])
def test_masks_that_are_blocks_take_the_block_layout_and_train_like_the_mask_path(
        which, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 1))
    copy_for_mask, decay_blocks, decay_mask = (copy.deepcopy(model) for _ in range(3))
    mask = torch.zeros(6, 10, dtype=torch.long)
    if which == "forum-cols":  # the forum question: mask[:, :5] = 1
        mask[:, :5] = 1
    elif which == "rows":  # freeze the first rows
        mask[:2] = 1
    else:
        mask[:, 3:7], mask[:, 7:] = 1, 2
    plan = Regions(mask, {0: {"weight_decay": 0.1}, 1: FROZEN if which == "rows" else
                          {"weight_decay": 0.01}, 2: {"lr": 0.05}})
    # forum-cols differs only in weight_decay: parts with per_element_decay=False, and also kept
    # whole (the decay layout, which applies the decay by blocks or by the mask)
    split_model, groups = paramsplit.split(model, {"0": plan}, per_element_decay=False)
    layout = "rows" if which == "rows" else "cols"
    assert _layouts(model)["0.weight"] == layout
    decay_runs = [paramsplit.split(decay_blocks, {"0": plan})] if which == "forum-cols" else []
    monkeypatch.setattr(paramsplit._spec, "_as_blocks", lambda *a: None)
    mask_model, mask_groups = paramsplit.split(copy_for_mask, {"0": plan}, per_element_decay=False)
    assert _layouts(mask_model)["0.weight"] == "mask"
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in mask_groups)
    if which == "forum-cols":
        decay_runs.append(paramsplit.split(decay_mask, {"0": plan}))
        assert paramsplit._sync._SPLITS[decay_blocks[0].weight].decay.bounds is not None
        assert paramsplit._sync._SPLITS[decay_mask[0].weight].decay.bounds is None
        assert all(_layouts(m)["0.weight"] == "decay" for m, _ in decay_runs)
    _train_alike((split_model, groups), (mask_model, mask_groups), *decay_runs, features=10)
    if which == "rows":  # the trained rows' part is a view of the weight: no copy
        (part,) = _parts(model[0].weight)
        assert part.data_ptr() == model[0].weight[2].data_ptr() and part.shape == (4, 10)


@pytest.mark.parametrize("trained", [0.01, 0.3])
def test_mostly_frozen_masks_take_the_sparse_layout_and_train_like_the_mask_path(
        trained, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.Tanh(), nn.Linear(40, 3))
    copy_for_mask = copy.deepcopy(model)
    start = model[0].weight.detach().clone()
    mask = torch.rand(40, 16, generator=torch.Generator().manual_seed(4)) < trained
    plan = Regions(mask.long() + (torch.arange(16) < 4).long() * mask.long(),
                   {0: FROZEN, 1: {"weight_decay": 0.1}, 2: {"lr": 0.05}})
    split_model, groups = paramsplit.split(model, {"0": plan})
    assert _layouts(model)["0.weight"] == "sparse"
    assert sum(p.numel() for p in _parts(model[0].weight)) == int(mask.sum())  # no FROZEN part
    monkeypatch.setattr(paramsplit._spec, "_as_sparse", lambda *a: None)
    mask_model, mask_groups = paramsplit.split(copy_for_mask, {"0": plan})
    assert _layouts(mask_model)["0.weight"] == "mask"
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in mask_groups)
    opts = _train_alike((split_model, groups), (mask_model, mask_groups), features=16)
    assert torch.equal(model[0].weight[~mask], start[~mask])  # FROZEN: never moved
    state = sum(t.numel() for s in opts[0].state.values() for t in s.values() if t.dim() > 0)
    trained_elems = int(mask.sum()) + 40 + 40 * 3 + 3  # the trained elements and the rest
    assert state == 2 * trained_elems  # exp_avg and exp_avg_sq, for trained elements only


@pytest.mark.parametrize("make", ["conv", "transposed"])
def test_even_column_blocks_of_conv_and_strided_weights_train_as_the_unsplit_model(make):
    """Column blocks of one width that follow each other are copied in one go, through a
    (blocks, rows, width, ...) view: a 4-D conv weight and a weight stored transposed (not
    contiguous) train bitwise as the unsplit model when the blocks' options equal the defaults."""
    torch.manual_seed(0)
    if make == "conv":
        model, x = nn.Conv2d(6, 4, 3), torch.randn(2, 6, 8, 8)
    else:
        model, x = nn.Linear(6, 4), torch.randn(5, 6)
        model.weight = nn.Parameter(torch.randn(6, 4).t())
    ref = copy.deepcopy(model)
    plan = cols({(0, 2): {"lr": 0.01}, (2, 4): {}, (4, 6): {"weight_decay": 0.01}})
    _, groups = paramsplit.split(model, {"weight": plan}, per_element_decay=False)
    assert paramsplit._sync._SPLITS[model.weight].layout._even == (0, 3, 2)
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.01, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.01, foreach=False)
    for _ in range(3):
        _step(model, opt, x)
        _step(ref, ref_opt, x)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["rows", "cols", "even-cols", "regions", "bool-mask", "sparse"])
def test_at_rest_a_split_holds_its_parts_and_for_masks_one_index_per_trained_element(kind):
    """Memory at rest, counted by storage: beyond the weight, a split keeps the parts' values
    (none for rows: views of the weight) and, for masks, 8 bytes of index per trained element
    (an int64 position; or, for a mask that covers every element, an int32 position and its
    inverse); no element-wise region ids (0.2 kept none either)."""
    model = _mlp()
    _, groups = _split(model, kind)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    _step(model, opt, torch.randn(4, 12))  # after a step, nothing of it is kept either
    opt.zero_grad()
    w = model[0].weight
    split = paramsplit._sync._SPLITS[w]
    seen, held = {w.untyped_storage().data_ptr()}, 0

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    own = {k: v for k, v in vars(split).items() if k != "_links"}  # (the model's own dicts)
    objects = [own, vars(split.layout), vars(split.layout.target)]
    for t in tensors(objects):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                held += t.untyped_storage().nbytes()
    trained = sum(p.numel() for p in split.parts)
    per_element = {"rows": 0, "cols": 4, "even-cols": 4}.get(kind, 4 + 8)  # fp32 (+ indices)
    assert held == trained * per_element, (kind, held, trained)


def test_one_step_hands_over_weights_of_several_dtypes_and_layouts_together():
    """The hand-over batches the copies of every weight an optimizer steps into one
    ``torch._foreach_copy_`` each way, whatever their dtypes (it groups them itself): a bf16 and
    an fp32 layer, cols and mask, train as the unsplit model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8).to(torch.bfloat16), nn.Linear(8, 6),
                          nn.Linear(6, 4).to(torch.bfloat16))
    ref = copy.deepcopy(model)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    spec = {"0.weight": cols({(0, 6): {"lr": 0.01}, (6, None): {}}),
            "1.weight": cols({(0, 3): {"lr": 0.01}, (3, 8): {}}),
            "2.weight": Regions(mask, {True: {"lr": 0.01}, False: {}})}
    _, groups = paramsplit.split(model, spec, per_element_decay=False)
    opt = torch.optim.AdamW(groups, lr=0.01, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, foreach=False)

    def step(m, o, x):
        o.zero_grad()
        h = m[0](x.to(torch.bfloat16)).float()
        m[2](m[1](h).to(torch.bfloat16)).float().pow(2).mean().backward()
        o.step()

    for _ in range(3):
        x = torch.randn(5, 12)
        step(model, opt, x)
        step(ref, ref_opt, x)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
