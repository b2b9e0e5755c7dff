"""Bad specs: a clear error naming the spec key, raised before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, SpecError, cols, rows


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


CASES = [
    # (spec, key named in the message, words the message must contain)
    ({"0.wieght": {}}, "0.wieght", ["no parameter or module", "did you mean", "'0.weight'"]),
    ({"3": {}}, "3", ["no parameter or module", "the model's parameters are '0.weight', "
                            "'0.bias', '2.weight', '2.bias'"]),
    ({"*.conv": {}}, "*.conv", ["matches no parameter"]),
    ({"0": Regions(torch.zeros(4, 3, dtype=torch.long), {0: {}})}, "0", ["shape (4, 3)", "(3, 4)"]),
    ({"0": Regions(torch.zeros(3, 4), {0: {}})}, "0", ["integer or bool", "torch.float32"]),
    ({"0": Regions([[0, 1, 0, 1]] * 3, {0: {}, 1: {}})}, "0", ["must be a torch.Tensor", "list"]),
    ({"0": Regions(torch.tensor([[0, 1, 2, 1]] * 3), {0: {}, 1: {}})}, "0",
     ["region ids [2]", "no options"]),
    ({"0": Regions(torch.tensor([[0, 1, 0, 1]] * 3), {0: {}, 1: "fast"})}, "0",
     ["region 1", "dict of optimizer options or paramsplit.FROZEN"]),
    ({"0": torch.tensor([[float("nan"), 0.1, 0.1, 0.1]] * 3)}, "0", ["NaN"]),
    ({"0": torch.tensor([[-0.1, 0.1, 0.1, 0.1]] * 3)}, "0", ["negative"]),
    ({"0": torch.zeros(3, 4, dtype=torch.long)}, "0", ["must be floating", "Regions"]),
    ({"0": torch.zeros(4)}, "0", ["shape (4,)"]),
    ({"0": {"weight_decay": float("nan")}}, "0", ["weight_decay", "non-negative"]),
    ({"0": {"weight_decay": -1.0}}, "0", ["weight_decay", "non-negative"]),
    ({"0": {"lr": "big"}}, "0", ["lr must be a number"]),
    ({"0": {"params": []}}, "0", ["'params' is set by paramsplit"]),
    ({"0": rows({(2, 5): {}})}, "0", ["rows block (2, 5)", "out of range", "size 3"]),
    ({"0": rows({(2, 2): {}})}, "0", ["empty"]),
    ({"0": cols({(-1, 2): {}})}, "0", ["cols block (-1, 2)"]),
    ({"0": rows({(0, 2): {}, (1, 3): FROZEN})}, "0", ["(0, 2)", "(1, 3)", "overlap"]),
    ({"0": rows({0: {}})}, "0", ["(start, stop) tuples"]),
    ({"0.bias": cols({(0, 1): {}})}, "0.bias", ["at least 2 dims"]),
    ({"0": {}, "0.weight": {}}, "0.weight", ["'0.weight'", "spec['0'] already names"]),
    ({"*.weight": {}, "2": FROZEN}, "2", ["'2.weight'", "already names"]),
    ({"0": 0.1}, "0", ["unsupported plan", "float"]),
    ({"1": {}}, "1", ["module '1' (ReLU)", "no parameter 'weight'", "it has no parameters"]),
    ({"0": {"weigth_decay": 0.1}}, "0", ["unknown option 'weigth_decay'",
                                         "did you mean 'weight_decay'?"]),
    ({"0": Regions(torch.tensor([[0, 1, 0, 1]] * 3), {0: {}, 1: {"momentun": 0.9}})}, "0",
     ["region 1", "'momentun'", "did you mean 'momentum'?"]),
    ({"0": {"lr": float("inf")}}, "0", ["lr must be a finite non-negative number", "inf"]),
    ({"0": {"weight_decay": float("inf")}}, "0", ["weight_decay must be a finite", "inf"]),
    ({"0": {"eps": -1e-8}}, "0", ["eps must be a finite non-negative number", "-1e-08"]),
    ({"0": {"momentum": float("nan")}}, "0", ["momentum must be a finite", "nan"]),
    ({"0": {"dampening": 1.5}}, "0", ["dampening must be a finite number in [0, 1]", "1.5"]),
    ({"0": {"betas": (2, 2)}}, "0", ["betas[0] must be a finite number in [0, 1)", "got 2"]),
    ({"0": {"betas": (0.9, 1.0)}}, "0", ["betas[1] must be a finite number in [0, 1)"]),
    ({"0": {"betas": 0.9}}, "0", ["betas must be a tuple of numbers", "0.9"]),
    ({"0": {"lr": True}}, "0", ["lr must be a number", "True"]),
    ({"0": {"lr": torch.tensor([0.1, 0.2])}}, "0", ["lr must be a number", "tensor of shape (2,)"]),
    ({"0": {"lr": torch.tensor(float("nan"))}}, "0", ["lr must be a finite", "nan"]),
    ({"0": cols({(0, 2): {"weight_decay": -1.0}})}, "0", ["cols block (0, 2)", "weight_decay"]),
]


def _snapshot(model):
    """What a failed split must leave as it was: parameters (objects, names, values,
    requires_grad), classes, and the plans paramsplit holds for them."""
    return ([type(m) for m in model.modules()],
            [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            paramsplit.describe(model))


def _assert_unchanged(model, snapshot):
    classes, params, table = snapshot
    assert [type(m) for m in model.modules()] == classes
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, *_ in params]
    for (name, p), (_, q, value, requires_grad) in zip(now, params):
        assert p is q and torch.equal(p, value) and p.requires_grad == requires_grad, name
    assert paramsplit.describe(model) == table


@pytest.mark.parametrize("spec,key,words", CASES, ids=[c[1] + ":" + c[2][0] for c in CASES])
def test_bad_spec_names_its_key_and_changes_nothing(spec, key, words):
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(SpecError) as info:
        paramsplit.split(model, spec)
    message = str(info.value)
    assert message.startswith(f"spec[{key!r}]: "), message
    for word in words:
        assert word in message, (word, message)
    _assert_unchanged(model, snapshot)
    assert paramsplit.describe(model).splitlines()[1:] == []  # nothing planned


def test_spec_error_is_a_value_error_and_a_type_error():
    assert issubclass(SpecError, ValueError) and issubclass(SpecError, TypeError)


def test_spec_of_the_wrong_type():
    with pytest.raises(SpecError, match="dict or a callable"):
        paramsplit.split(_model(), [("0", {})])  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="keys must be strings"):
        paramsplit.split(_model(), {0: {}})  # type: ignore[dict-item]


def test_callable_spec_errors_name_the_parameter():
    with pytest.raises(SpecError, match=r"^spec\['2.weight'\]: rows block"):
        paramsplit.split(_model(), lambda n, p: rows({(0, 3): {}}) if n == "2.weight" else None)


def test_callable_spec_that_raises_names_the_parameter():
    def spec(name, p):
        if name == "2.bias":
            raise KeyError("no rule for biases")
        return None

    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(SpecError, match=r"^spec\['2.bias'\]: spec\(name, param\) raised KeyError: "
                                        r"'no rule for biases'$") as info:
        paramsplit.split(model, spec)
    assert isinstance(info.value.__cause__, KeyError)
    _assert_unchanged(model, snapshot)


def test_tied_parameter_named_twice():
    model = _model()
    extra = nn.Linear(4, 3)
    extra.weight = model[0].weight
    model.add_module("3", extra)
    with pytest.raises(SpecError, match=r"spec\['3'\]: names parameter '0.weight'"):
        paramsplit.split(model, {"0": {}, "3": {}})


def test_a_bad_spec_leaves_an_earlier_split_in_place():
    model = _model()
    _, groups = paramsplit.split(model, {"0": rows({(0, 1): FROZEN}), "2.bias": FROZEN})
    snapshot = _snapshot(model)
    with pytest.raises(SpecError, match=r"^spec\['0'\]: rows block \(2, 5\)"):
        paramsplit.split(model, {"2": cols({(0, 1): FROZEN}), "0": rows({(2, 5): {}})})
    _assert_unchanged(model, snapshot)
    # the optimizer of the first split still trains as that split said
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight[0], before[0])
    assert (model[0].weight[1:] != before[1:]).all()


def test_splitting_a_split_model_again_replaces_the_plan():
    """Allowed since 0.3: the named parameters get the new plan; the others keep theirs."""
    model = _model()
    split_model, _ = paramsplit.split(model, {"0": rows({(0, 1): FROZEN}), "2": {"lr": 0.5}})
    again, groups = paramsplit.split(split_model, {"0": cols({(0, 1): FROZEN})})
    assert again is model
    table = [line.split() for line in paramsplit.describe(model).splitlines()[1:]]
    assert table == [["0.weight", "cols", "0:1", "3", "FROZEN", "cols"],
                     ["0.weight", "cols", "1:4", "9", "defaults", "cols"],
                     ["2.weight", "all", "6", "lr=0.5", "whole"]]
    assert [g["name"] for g in groups] == ["default", "lr=0.5"]
    before = model[0].weight.detach().clone()
    x = torch.randn(2, 4)
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=0.1)  # decay: every trained element moves
    model(x).square().sum().backward()
    opt.step()
    after = model[0].weight.detach()
    assert torch.equal(after[:, 0], before[:, 0])  # the new plan's FROZEN column
    assert (after[:, 1:] != before[:, 1:]).all()  # row 0 (FROZEN before) trains now
    # a whole FROZEN plan replaced by a trained one: split set requires_grad=False, and options
    # for a parameter without grad are refused, so it is turned back on by hand first
    _, groups = paramsplit.split(model, {"2.bias": FROZEN})
    assert not model[2].bias.requires_grad
    assert not any(p is model[2].bias for g in groups for p in g["params"])
    model[2].bias.requires_grad_(True)
    _, groups = paramsplit.split(model, {"2.bias": {"weight_decay": 0.0}})
    assert any(p is model[2].bias for g in groups for p in g["params"])


def test_other_libraries_names_for_torch_options_are_refused_with_the_torch_name():
    """``learning_rate`` (Hugging Face's name) would be ignored by torch's optimizers."""
    import torch.nn as nn

    import paramsplit

    model = nn.Linear(3, 2)
    with pytest.raises(paramsplit.SpecError, match=r"spec\['bias'\]: .*'learning_rate'; did you "
                                                   r"mean 'lr'\?"):
        paramsplit.split(model, {"bias": {"learning_rate": 0.1}})
