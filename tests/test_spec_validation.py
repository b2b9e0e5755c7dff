"""Spec validation: parametrizations with several originals, zero-size parameters, the region
limit, option names and values, untrainable parameters, modules without a weight."""

from __future__ import annotations

import copy
import inspect
import io
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import paramsplit
from paramsplit import FROZEN, Regions, SpecError, cols, rows
from paramsplit._spec import MAX_REGIONS, _known_options, _resolve


def _split_fails(model, spec, pattern):
    """``split`` raises a SpecError matching ``pattern`` and leaves ``model`` as it was: the same
    parameter objects, values and requires_grad, and nothing planned."""
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    params = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    with pytest.raises(SpecError, match=pattern) as info:
        paramsplit.split(model, spec)
    assert [type(m) for m in model.modules()] == classes
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == params
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert paramsplit.describe(model).splitlines()[1:] == []
    return str(info.value)


def _same_forward(model, spec, x):
    """Split ``model``; it is returned itself and computes what a copy of it, unsplit, does."""
    ref = copy.deepcopy(model)
    split_model, groups = paramsplit.split(model, spec)
    assert split_model is model
    assert torch.equal(split_model(x), ref(x))
    return split_model, groups


# -- parametrizations with several originals ------------------------------------------------

def _weight_normed():
    torch.manual_seed(0)
    return nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))


def test_weight_norm_model_other_keys_work():
    model, x = _weight_normed(), torch.randn(5, 4)
    _same_forward(model, {"2": cols({(0, 1): FROZEN})}, x)
    _same_forward(model, {"*bias": {"weight_decay": 0.0}}, x)


def test_naming_a_weight_normed_module_lists_its_originals():
    message = _split_fails(_weight_normed(), {"0": {"weight_decay": 0.0}},
                           r"^spec\['0'\]: module '0' \(ParametrizedLinear\) has a weight "
                           r"parametrized from several tensors")
    assert "'0.parametrizations.weight.original0', '0.parametrizations.weight.original1'" in message


def test_originals_by_parameter_name():
    model, x = _weight_normed(), torch.randn(5, 4)
    spec = {"0.parametrizations.weight.original0": {"lr": 0.5},
            "0.parametrizations.weight.original1": rows({(0, 1): FROZEN})}
    targets = _resolve(model, spec)
    assert [(t.name, t.kind) for t in targets] == [
        ("0.parametrizations.weight.original0", "whole"),
        ("0.parametrizations.weight.original1", "rows")]
    split_model, groups = _same_forward(model, spec, x)
    assert [g["lr"] for g in groups if "lr" in g] == [0.5]
    v_before = paramsplit.merged_state_dict(split_model)["0.parametrizations.weight.original1"]
    v_before = v_before.clone()
    opt = torch.optim.SGD(groups, lr=0.1)
    split_model(x).square().sum().backward()
    opt.step()
    v_after = paramsplit.merged_state_dict(split_model)["0.parametrizations.weight.original1"]
    assert torch.equal(v_after[0], v_before[0]) and not torch.equal(v_after[1:], v_before[1:])


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrization_with_one_original_still_stands_for_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "weight", _Scale())
    (target,) = _resolve(model, {"0": rows({(0, 1): FROZEN})})
    assert target.name == "0.parametrizations.weight.original" and target.kind == "rows"
    _same_forward(model, {"0": rows({(0, 1): FROZEN})}, torch.randn(2, 4))


# -- zero-size parameters -------------------------------------------------------------------

def _empty_linear(n_in, n_out):
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore")
        return nn.Sequential(nn.Linear(n_in, n_out))


@pytest.mark.parametrize("n_in,n_out", [(0, 4), (4, 0)])
@pytest.mark.parametrize("plan", ["regions", "decay", "rows", "rows-frozen", "cols"])
def test_zero_size_parameter_is_whole(n_in, n_out, plan):
    model = _empty_linear(n_in, n_out)
    shape = model[0].weight.shape
    plan = {"regions": Regions(torch.zeros(shape, dtype=torch.long), {0: {"weight_decay": 0.1}}),
            "decay": torch.empty(shape),
            "rows": rows({}),
            "rows-frozen": rows({(0, shape[0]): FROZEN}) if shape[0] else rows({}),
            "cols": cols({(0, shape[1]): {"lr": 0.1}}) if shape[1] else cols({})}[plan]
    (target,) = _resolve(model, {"0": plan})
    assert target.param.numel() == 0
    assert all(r.numel == 0 for r in target.regions) and len(target.regions) == 1
    assert target.kind == "whole"  # nothing to split
    split_model, groups = _same_forward(model, {"0": plan}, torch.randn(3, n_in))
    frozen = target.regions[0].options is None
    assert split_model[0].weight.requires_grad == (not frozen)
    assert any(p is split_model[0].weight for g in groups for p in g["params"]) == (not frozen)


def test_zero_size_rows_of_different_options_keep_the_defaults():
    model = _empty_linear(0, 4)  # weight (4, 0): rows exist, elements do not
    (target,) = _resolve(model, {"0": rows({(0, 2): FROZEN, (2, 4): {"lr": 0.1}})})
    assert target.kind == "whole" and target.regions[0].options == {}


# -- the region limit ------------------------------------------------------------------------

def test_too_many_distinct_weight_decays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024))
    decay = torch.rand(1024, 1024)
    n = torch.unique(decay).numel()
    assert n > MAX_REGIONS == 1024
    message = _split_fails(model, {"0": decay}, r"^spec\['0'\]: ")
    assert message == (f"spec['0']: {n} regions (distinct weight_decay values) exceed "
                       f"max_regions=1024; use fewer distinct values, or a paramsplit.Regions "
                       f"mask, or pass split(..., max_regions=N)")


def test_max_regions_can_be_raised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40))
    decay = torch.rand(40, 40)
    n = torch.unique(decay).numel()
    with pytest.raises(SpecError, match=f"{n} regions"):
        _resolve(model, {"0": decay})
    (target,) = _resolve(model, {"0": decay}, max_regions=n)
    assert target.kind == "mask" and len(target.regions) == n
    with pytest.raises(SpecError, match=f"{n} regions .* exceed max_regions={n - 1};"):
        _resolve(model, {"0": decay}, n - 1)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(SpecError, match="max_regions must be a positive int"):
            _resolve(model, {"0": decay}, max_regions=bad)


def test_regions_are_counted_after_equal_options_merge():
    model = nn.Sequential(nn.Linear(50, 40))
    mask = torch.arange(2000).reshape(40, 50)
    plan = Regions(mask, {i: {"lr": float(i % 3)} for i in range(2000)})
    (target,) = _resolve(model, {"0": plan})
    assert target.kind == "mask" and len(target.regions) == 3
    with pytest.raises(SpecError, match=re.escape(
            "spec['0']: 2000 regions (distinct options) exceed max_regions=1024; use fewer "
            "distinct options, or pass split(..., max_regions=N)")):
        _resolve(model, {"0": Regions(mask, {i: {"lr": float(i)} for i in range(2000)})})


def test_too_many_blocks():
    model = nn.Sequential(nn.Linear(1, 1025))
    (target,) = _resolve(model, {"0": rows({(i, i + 1): {} for i in range(1023)})})
    assert target.kind == "rows" and len(target.regions) == 1024  # and rows 1023:1025
    with pytest.raises(SpecError, match=r"^spec\['0'\]: 1025 regions \(rows blocks\) exceed"):
        _resolve(model, {"0": rows({(i, i + 1): {} for i in range(1024)})})


# -- option names ----------------------------------------------------------------------------

def test_known_option_names_are_torch_optimizers():
    known = _known_options()
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                torch.optim.Adagrad, torch.optim.LBFGS, torch.optim.Rprop, torch.optim.ASGD):
        assert set(inspect.signature(cls.__init__).parameters) - {"self", "params"} <= set(known)
    assert "name" in known and "params" not in known and "self" not in known


@pytest.mark.parametrize("options", [
    {"weight_decay": 0.1, "amsgrad": True, "maximize": False, "foreach": None, "name": "no-wd"},
    {"momentum": 0.9, "nesterov": True, "dampening": 0.0},
    {"rho_custom_xyz": 1.0},  # a third-party optimizer's option, far from torch's
    {"beta1": 0.9, "eps2": 1e-3, "eta": 0.001, "weight_decay_rate": 0.01},  # others' options
    {"eps": (None, 1e-3), "beta2_decay": -0.8, "d": 1.0},  # torch.optim.Adafactor's
])
def test_accepted_options(options):
    (target,) = _resolve(nn.Sequential(nn.Linear(3, 2)), {"0": options})
    assert target.regions[0].options == options


def test_numpy_and_tensor_numbers():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3)
    lr = torch.tensor(0.01)
    spec = {"0": {"lr": np.float32(0.5), "weight_decay": np.int64(0)},
            "0.bias": {"lr": lr, "betas": [np.float64(0.8), 0.9]}}
    weight, bias = _resolve(model, spec)
    assert weight.regions[0].options == {"lr": 0.5, "weight_decay": 0}
    assert type(weight.regions[0].options["lr"]) is float
    assert type(weight.regions[0].options["weight_decay"]) is int
    assert bias.regions[0].options["lr"] is lr
    assert bias.regions[0].options["betas"] == (0.8, 0.9)
    assert all(type(b) is float for b in bias.regions[0].options["betas"])
    split_model, groups = _same_forward(model, spec, x)
    opt = torch.optim.Adam(groups, lr=1e-3)
    split_model(x).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # no numpy objects in the groups


# -- untrainable parameters ------------------------------------------------------------------

def _half_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("plan,where", [
    ({"weight_decay": 0.0}, "options"),
    ({}, "options"),
    (rows({(0, 1): FROZEN, (1, 3): {"lr": 0.1}}), r"rows block \(1, 3\)"),
    (Regions(torch.tensor([[0, 1, 0, 1]] * 3), {0: FROZEN, 1: {}}), "region 1"),
    (torch.full((3, 4), 0.1), "weight-decay tensor"),
])
def test_options_on_a_parameter_without_grad(plan, where):
    _split_fails(_half_frozen(), {"0": plan},
                 rf"^spec\['0'\]: {where}: parameter '0.weight' has requires_grad=False, so "
                 rf"options would have no effect")


@pytest.mark.parametrize("plan", [FROZEN, rows({(0, 1): FROZEN}),
                                  Regions(torch.zeros(3, 4, dtype=torch.long), {0: FROZEN})])
def test_frozen_on_a_parameter_without_grad(plan):
    _same_forward(_half_frozen(), {"0": plan}, torch.randn(2, 4))


def test_wildcards_report_untrainable_parameters_too():
    _split_fails(_half_frozen(), {"*.weight": {"weight_decay": 0.1}},
                 r"^spec\['\*.weight'\]: options: parameter '0.weight' has requires_grad=False")


class _Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.idx = nn.Parameter(torch.tensor([1, 0]), requires_grad=False)

    def forward(self, x):
        return self.lin(x)[:, self.idx]


def test_options_on_an_integer_parameter():
    _split_fails(_Gather(), {"idx": {"lr": 0.1}},
                 r"^spec\['idx'\]: options: parameter 'idx' has dtype torch.int64, which no "
                 r"optimizer trains")
    (target,) = _resolve(_Gather(), {"idx": FROZEN})
    assert target.regions[0].options is None


# -- modules without a weight ----------------------------------------------------------------

def test_module_without_a_weight_lists_its_parameters():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(4, 1))
    message = _split_fails(model, {"attn": {}},
                           r"^spec\['attn'\]: module 'attn' \(MultiheadAttention\) has no "
                           r"parameter 'weight'; its parameters are: ")
    assert "'attn.in_proj_weight'" in message and "'attn.out_proj.weight'" in message
    paramsplit.split(model, {"attn.out_proj": {"weight_decay": 0.0}})  # a sub-module's weight


@pytest.mark.parametrize("make, dim", [(rows, 0), (cols, 1)])
def test_negative_block_bounds_count_from_the_end_as_in_slicing(make, dim):
    model = nn.Sequential(nn.Linear(6, 5))
    size = model[0].weight.shape[dim]
    blocks = {(-2, None): FROZEN, (0, -3): {"lr": 0.1}}
    same = {(size - 2, None): FROZEN, (0, size - 3): {"lr": 0.1}}
    (got,) = _resolve(model, {"0.weight": make(blocks)})
    (want,) = _resolve(model, {"0.weight": make(same)})
    assert got.bounds == want.bounds and [(r.options, r.numel) for r in got.regions] == \
        [(r.options, r.numel) for r in want.regions]
    message = _split_fails(model, {"0.weight": make({(-size - 1, None): FROZEN})},
                           r"out of range or empty")
    assert f"({-size - 1}, None)" in message and f"size {size}" in message


def test_block_bounds_are_ints_not_bools_and_overlaps_name_the_keys_given():
    model = nn.Sequential(nn.Linear(8, 5))
    for bad in ({(False, -1): FROZEN}, {(0, True): FROZEN}, {(None, 3): FROZEN}):
        _split_fails(model, {"0.weight": cols(bad)}, r"cols keys must be \(start, stop\) tuples")
    message = _split_fails(model, {"0.weight": cols({(4, 8): FROZEN, (-4, None): {}})},
                           r"overlap")
    assert "(4, 8)" in message and "(-4, None)" in message and "size 8" in message


def test_a_key_on_a_model_without_parameters_says_so():
    _split_fails(nn.Sequential(nn.ReLU()), {"zzz": FROZEN},
                 r"no parameter or module with this name; the model has no parameters$")
