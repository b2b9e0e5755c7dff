"""Core contract of paramsplit.split: bitwise forward, exact training semantics, groups, state."""

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
        "regions": Regions(torch.randint(0, 3, shape, generator=g),
                           {0: {"lr": 0.01}, 1: {"weight_decay": 0.2}, 2: FROZEN}),
        "bool-mask": Regions(torch.rand(shape, generator=g) < 0.5, {True: {"weight_decay": 0.0},
                                                                    False: {}}),
        "decay-tensor": torch.where(torch.rand(shape, generator=g) < 0.3, 0.01, 0.1),
        "options": {"weight_decay": 0.5, "lr": 0.1},
    }


PLAN_KINDS = list(_plans())


def _merged_grad(split_model, name):
    """The gradient of the original parameter ``name``, rebuilt from the parts' gradients."""
    sd = {}
    for n, p in split_model.named_parameters():
        sd[n] = p.grad if p.grad is not None else torch.zeros_like(p)
    saved = {n: p.detach().clone() for n, p in split_model.named_parameters()}
    with torch.no_grad():
        for n, p in split_model.named_parameters():
            p.copy_(sd[n])
        out = paramsplit.merged_state_dict(split_model)[name].clone()
        for n, p in split_model.named_parameters():
            p.copy_(saved[n])
    return out


@pytest.mark.parametrize("kind", PLAN_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_forward_and_backward_are_bitwise(kind, dtype, train):
    model = _mlp(dtype).train(train)
    split_model, _ = paramsplit.split(model, {"0.weight": _plans()[kind]})
    x = torch.randn(7, 12, dtype=dtype)
    out, ref = split_model(x), model(x)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    expected = model[0].weight.grad
    if kind == "regions":  # region 2 is FROZEN: no gradient is computed for it
        expected = expected.masked_fill(_plans()[kind].mask == 2, 0)
    assert torch.equal(_merged_grad(split_model, "0.weight"), expected)
    assert torch.equal(split_model[0].bias.grad, model[0].bias.grad)
    with torch.no_grad():
        assert torch.equal(split_model(x), model(x))


def test_split_leaves_input_model_untouched_and_shares_unsplit_params():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    weight = model[0].weight
    split_model, _ = paramsplit.split(model, {"0": rows({(0, 3): {"lr": 0.0}})})
    assert split_model is not model
    assert [type(m) for m in model.modules()] == classes
    assert model[0].weight is weight and "weight" in model[0]._parameters
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # unsplit parameters are shared, not copied
    assert split_model[0].bias is model[0].bias
    assert split_model[2].weight is model[2].weight
    # the split one is copied into parts: training the split model leaves the original alone
    assert split_model[0].weight__0.untyped_storage().data_ptr() != weight.data_ptr()


def test_owner_keeps_class_attributes_methods_and_hooks():
    model = _mlp()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append("post"))
    model[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    split_model, _ = paramsplit.split(model, {"0": cols({(0, 6): {"weight_decay": 0.0}})})
    lin = split_model[0]
    assert isinstance(lin, nn.Linear) and type(lin).__name__ == "Linear"
    assert lin.in_features == 12 and lin.out_features == 9
    assert lin.weight.shape == (9, 12) and lin.weight.requires_grad
    assert "in_features=12" in lin.extra_repr()
    x = torch.randn(2, 12)
    assert torch.equal(split_model(x), model(x))
    assert calls == ["pre", "post", "pre", "post"]
    assert type(lin).forward is nn.Linear.forward  # its own forward runs: nothing is traced


@pytest.mark.parametrize("kind", ["rows", "cols", "regions", "bool-mask", "decay-tensor"])
def test_parts_are_views_into_one_storage(kind):
    split_model, _ = paramsplit.split(_mlp(), {"0.weight": _plans()[kind]})
    parts = [p for n, p in split_model[0].named_parameters() if n.startswith("weight__")]
    assert len(parts) >= 2
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
    # the assembled tensor is a fresh, contiguous tensor with the original's requires_grad
    w = split_model[0].weight
    assert w.is_contiguous() and w.storage_offset() == 0 and w.requires_grad


def test_groups_cover_every_trainable_parameter_once_and_merge_equal_options():
    model = _mlp()
    spec = {
        "0.weight": Regions(torch.randint(0, 3, (9, 12)), {0: {"weight_decay": 0.1}, 1: {},
                                                           2: FROZEN}),
        "2.weight": rows({(0, 2): {"weight_decay": 0.1}, (2, None): FROZEN}),
        "2.bias": {"weight_decay": 0.1},
    }
    split_model, groups = paramsplit.split(model, spec)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in split_model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    frozen = [p for p in split_model.parameters() if not p.requires_grad]
    assert len(frozen) == 2 and not set(map(id, frozen)) & set(ids)
    names = [g["name"] for g in groups]
    assert names == ["default", "weight_decay=0.1"]
    assert len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0.1
    assert len(set(names)) == len(names)
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


def test_adamw_matches_hand_written_per_element_decoupled_decay():
    torch.manual_seed(0)
    w0 = torch.randn(6, 8, dtype=torch.float64)
    model = nn.Linear(8, 6, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0)
    mask = torch.randint(0, 2, (6, 8))
    f64 = dict(dtype=torch.float64)
    wd = torch.where(mask.bool(), torch.tensor(0.5, **f64), torch.tensor(0.01, **f64))
    lr = torch.where(mask.bool(), torch.tensor(0.05, **f64), torch.tensor(0.02, **f64))
    split_model, groups = paramsplit.split(model, {"weight": Regions(
        mask, {0: {"weight_decay": 0.01, "lr": 0.02}, 1: {"weight_decay": 0.5, "lr": 0.05}})})
    opt = torch.optim.AdamW(groups, lr=1.0)
    grads = []
    for _ in range(4):
        opt.zero_grad()
        split_model(torch.randn(4, 8, dtype=torch.float64)).sin().sum().backward()
        grads.append(_merged_grad(split_model, "weight"))
        opt.step()
    w = _hand_adamw(w0, grads, lr, wd)
    final = paramsplit.merged_state_dict(split_model)["weight"]
    torch.testing.assert_close(final, w, rtol=0, atol=1e-12)
    # and no single weight_decay could have produced it
    for single in (0.01, 0.5):
        assert not torch.allclose(final, _hand_adamw(w0, grads, lr, torch.full_like(w0, single)))


def test_adamw_gradients_replayed_through_hand_written_step():
    """The hand-written AdamW, fed the split model's own gradients step by step, lands exactly
    where the split model does; this checks every intermediate step, not only the last."""
    torch.manual_seed(1)
    model = nn.Linear(8, 6).double()
    mask = torch.rand(6, 8) < 0.4
    split_model, groups = paramsplit.split(model, {"weight": torch.where(mask, 0.3, 0.0).double()})
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
    grads = []
    w0 = model.weight.detach().clone()
    for step in range(3):
        opt.zero_grad()
        split_model(torch.randn(5, 8, dtype=torch.float64)).pow(2).mean().backward()
        grads.append(_merged_grad(split_model, "weight"))
        opt.step()
        expect = _hand_adamw(w0, grads, 0.01, torch.where(mask, 0.3, 0.0).double())
        got = paramsplit.merged_state_dict(split_model)["weight"]
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-13)


def test_adam_matches_the_seed_masked_l2_penalty():
    """Adam's coupled weight_decay == the forum answer's penalty 0.5 * wd * w**2 on the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 1)).double()
    ref = copy.deepcopy(model)
    penalty_mask = torch.ones(1, 10, dtype=torch.float64)
    penalty_mask[:, 5:] = 2.0
    wd = 0.01 * penalty_mask
    split_model, groups = paramsplit.split(model, {"0.weight": wd})
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
    merged = paramsplit.merged_state_dict(split_model)
    torch.testing.assert_close(merged["0.weight"], ref[0].weight.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged["0.bias"], ref[0].bias.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["rows", "cols", "regions"])
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.05),
], ids=["adamw-loop", "adamw-foreach", "adamw-fused", "adam", "sgd-momentum"])
def test_equal_options_train_bitwise_like_the_unsplit_model(kind, make_opt):
    model = _mlp(seed=4)
    ref = copy.deepcopy(model)
    # {"weight_decay": 0.05} is the optimizers' default: a distinct group with equal settings
    same = {"weight_decay": 0.05}
    plan = {
        "rows": rows({(0, 4): {}, (4, 7): same}),
        "cols": cols({(3, 8): same}),
        "regions": Regions(torch.randint(0, 3, (9, 12)), {0: {}, 1: same, 2: {}}),
    }[kind]
    split_model, groups = paramsplit.split(model, {"0.weight": plan})
    assert len(groups) == 2
    opt, ref_opt = make_opt(groups), make_opt(ref.parameters())
    for _ in range(5):
        x = torch.randn(8, 12)
        for m, o in ((split_model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    merged = paramsplit.merged_state_dict(split_model)
    for k, v in ref.state_dict().items():
        if opt.defaults.get("fused"):
            # torch's fused CPU kernel rounds differently by an element's position in its
            # vector loop, and the parts are shorter tensors: equal up to rounding only
            torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(merged[k], v), k


def test_fused_adamw_sees_dense_parts():
    """Fused optimizers treat parameters as dense memory: every part must be contiguous."""
    for plan in _plans().values():
        split_model, _ = paramsplit.split(_mlp(), {"0.weight": plan})
        assert all(p.is_contiguous() for p in split_model.parameters())


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-1, weight_decay=0.5),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.5),
], ids=["adamw", "sgd-momentum"])
def test_frozen_elements_never_move_and_cost_no_state(make_opt):
    model = _mlp()
    mask = torch.rand(9, 12) < 0.5
    split_model, groups = paramsplit.split(model, {
        "0.weight": Regions(mask, {True: FROZEN, False: {}}),
        "2.weight": rows({(0, 2): FROZEN}),
    })
    opt = make_opt(groups)
    for _ in range(5):
        opt.zero_grad()
        split_model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
    merged = paramsplit.merged_state_dict(split_model)
    assert torch.equal(merged["0.weight"][mask], model[0].weight.detach()[mask])
    assert not torch.equal(merged["0.weight"][~mask], model[0].weight.detach()[~mask])
    assert torch.equal(merged["2.weight"][:2], model[2].weight.detach()[:2])
    assert not torch.equal(merged["2.weight"][2:], model[2].weight.detach()[2:])
    frozen = [p for p in split_model.parameters() if not p.requires_grad]
    assert len(frozen) == 2
    assert all(p not in opt.state and p.grad is None for p in frozen)


def test_gradient_hook_freezing_is_what_we_fix():
    """The usual workaround (zeroing gradients with a hook) still moves 'frozen' elements."""
    model = _mlp()
    w = model[0].weight
    before = w.detach().clone()
    w.register_hook(lambda g: g * torch.cat([torch.zeros(4, 12), torch.ones(5, 12)]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 12)).sum().backward()
        opt.step()
    assert not torch.equal(w.detach()[:4], before[:4])  # decay moved the "frozen" rows
    split_model, groups = paramsplit.split(_mlp(), {"0": rows({(0, 4): FROZEN})})
    opt = torch.optim.AdamW(groups, lr=1e-1, weight_decay=0.5)
    for _ in range(2):
        opt.zero_grad()
        split_model(torch.randn(8, 12)).sum().backward()
        opt.step()
    assert torch.equal(split_model[0].weight[:4], before[:4])


def test_whole_parameter_plans():
    model = _mlp()
    split_model, groups = paramsplit.split(model, {"0.bias": {"weight_decay": 0.0},
                                                   "2.bias": FROZEN})
    assert split_model[0].bias is model[0].bias
    # a FROZEN parameter becomes one frozen part; what the forward reads still requires grad
    assert not split_model[2].bias__0.requires_grad and model[2].bias.requires_grad
    assert split_model[2].bias.requires_grad
    assert torch.equal(split_model[2].bias, model[2].bias)
    assert [g["name"] for g in groups] == ["default", "weight_decay=0.0"]
    assert groups[1]["params"] == [model[0].bias]
    x = torch.randn(3, 12)
    assert torch.equal(split_model(x), model(x))


def test_single_region_plans_do_not_split():
    split_model, _ = paramsplit.split(_mlp(), {"0": rows({(0, None): {"lr": 0.1}}),
                                               "2": Regions(torch.ones(5, 9, dtype=torch.long),
                                                            {1: {"lr": 0.1}})})
    assert "weight" in split_model[0]._parameters and "weight" in split_model[2]._parameters
    assert type(split_model[0]) is nn.Linear


@pytest.mark.parametrize("kind", ["rows", "cols", "regions", "decay-tensor"])
def test_merged_state_dict_round_trips(kind):
    model = _mlp()
    split_model, groups = paramsplit.split(model, {"0.weight": _plans()[kind]})
    opt = torch.optim.AdamW(groups, lr=1e-1)
    opt.zero_grad()
    split_model(torch.randn(4, 12)).sum().backward()
    opt.step()
    merged = paramsplit.merged_state_dict(split_model)
    assert list(merged) == list(model.state_dict())
    fresh = _mlp(seed=9)
    fresh.load_state_dict(merged, strict=True)
    x = torch.randn(5, 12)
    assert torch.equal(fresh(x), split_model(x))
    # and back: an unsplit checkpoint loads into a split model
    other, _ = paramsplit.split(_mlp(seed=7), {"0.weight": _plans()[kind]})
    paramsplit.load_merged_state_dict(other, fresh.state_dict())
    assert torch.equal(other(x), fresh(x))
    for k, v in paramsplit.merged_state_dict(other).items():
        assert torch.equal(v, merged[k])


def test_state_dict_of_split_model_reloads_into_same_split():
    spec = {"0.weight": _plans()["regions"]}
    a, _ = paramsplit.split(_mlp(seed=1), spec)
    b, _ = paramsplit.split(_mlp(seed=2), spec)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(3, 12)
    assert torch.equal(a(x), b(x))
    assert "0.weight__perm" not in a.state_dict()


def test_describe_lists_parts_regions_elements_options_and_layout():
    model = nn.Sequential(nn.Linear(10, 1), nn.Linear(1, 2))
    split_model, _ = paramsplit.split(model, {"0": cols({(0, 5): {"weight_decay": 0.01},
                                                        (5, None): {"weight_decay": 0.1}}),
                                              "0.bias": FROZEN, "1": {"lr": 0.5}})
    lines = paramsplit.describe(split_model).splitlines()
    assert lines[0].split() == ["parameter", "part", "region", "elements", "options", "layout"]
    assert lines[1].split() == ["0.weight", "weight__0", "cols", "0:5", "5", "weight_decay=0.01",
                                "cols"]
    assert lines[2].split() == ["0.weight", "weight__1", "cols", "5:10", "5", "weight_decay=0.1",
                                "cols"]
    assert lines[3].split() == ["0.bias", "bias__0", "all", "1", "FROZEN", "rows"]
    assert lines[4].split() == ["1.weight", "-", "all", "2", "lr=0.5", "whole"]
    names = dict(split_model.named_parameters())
    assert {"0.weight__0", "0.weight__1", "0.bias__0"} <= set(names)


def test_to_dtype_keeps_parts_linked_and_bitwise():
    model = _mlp()
    split_model, groups = paramsplit.split(model, {"0.weight": _plans()["regions"],
                                                   "2.weight": rows({(0, 2): {}, (2, 4): {}})})
    split_model.double()
    model64 = copy.deepcopy(model).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(split_model(x), model64(x))
    for lin in (split_model[0], split_model[2]):
        parts = [p for n, p in lin.named_parameters() if "__" in n]
        assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
        assert all(p.dtype == torch.float64 for p in parts)


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
    plan = (rows({(0, 20): FROZEN}) if kind == "rows"
            else Regions(torch.arange(240).reshape(30, 8) % 3, {0: FROZEN, 1: {}, 2: {"lr": 0.1}}))
    split_model, _ = paramsplit.split(model, {"emb": plan})
    tokens = torch.randint(0, 30, (4, 5))
    out, ref = split_model(tokens), model(tokens)
    assert torch.equal(out, ref)
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    frozen = (plan.mask == 0) if kind == "regions" else torch.arange(30)[:, None].expand(30, 8) < 20
    grad = _merged_grad(split_model, "emb.weight")
    assert torch.equal(grad[~frozen], model.emb.weight.grad[~frozen])
    assert torch.all(grad[frozen] == 0)


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
    mask = torch.zeros(6, 10, dtype=torch.long)
    if which == "forum-cols":  # the forum question: mask[:, :5] = 1
        mask[:, :5] = 1
    elif which == "rows":  # freeze the first rows
        mask[:2] = 1
    else:
        mask[:, 3:7], mask[:, 7:] = 1, 2
    plan = Regions(mask, {0: {"weight_decay": 0.1}, 1: FROZEN if which == "rows" else
                          {"weight_decay": 0.01}, 2: {"lr": 0.05}})
    split_model, groups = paramsplit.split(model, {"0": plan})
    layout = "rows" if which == "rows" else "cols"
    table = paramsplit.describe(split_model).splitlines()
    assert all(r.endswith(layout) for r in table[1:] if r.startswith("0.weight")), table
    monkeypatch.setattr(paramsplit._spec, "_as_blocks", lambda *a: None)
    mask_model, mask_groups = paramsplit.split(copy.deepcopy(model), {"0": plan})  # no sharing
    assert "mask" in paramsplit.describe(mask_model)
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in mask_groups)
    _train_alike((split_model, groups), (mask_model, mask_groups), features=10)
    if which == "rows":
        assert split_model[0].weight.data_ptr() == split_model[0].weight__0.data_ptr()


@pytest.mark.parametrize("trained", [0.01, 0.3])
def test_mostly_frozen_masks_take_the_sparse_layout_and_train_like_the_mask_path(
        trained, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.Tanh(), nn.Linear(40, 3))
    mask = torch.rand(40, 16, generator=torch.Generator().manual_seed(4)) < trained
    plan = Regions(mask.long() + (torch.arange(16) < 4).long() * mask.long(),
                   {0: FROZEN, 1: {"weight_decay": 0.1}, 2: {"lr": 0.05}})
    split_model, groups = paramsplit.split(model, {"0": plan})
    assert paramsplit.describe(split_model).splitlines()[1].endswith("sparse")
    frozen_part = split_model[0].weight__0
    assert frozen_part.shape == (40, 16) and not frozen_part.requires_grad
    monkeypatch.setattr(paramsplit._spec, "_as_sparse", lambda *a: None)
    mask_model, mask_groups = paramsplit.split(copy.deepcopy(model), {"0": plan})
    assert "mask" in paramsplit.describe(mask_model)
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in mask_groups)
    opts = _train_alike((split_model, groups), (mask_model, mask_groups), features=16)
    a = split_model.state_dict()
    assert torch.equal(a["0.weight"][~mask], model[0].weight[~mask])  # FROZEN: never moved
    state = sum(t.numel() for s in opts[0].state.values() for t in s.values() if t.dim() > 0)
    trained_elems = int(mask.sum()) + 40 + 40 * 3 + 3  # the trained elements and the rest
    assert state == 2 * trained_elems  # exp_avg and exp_avg_sq, for trained elements only
