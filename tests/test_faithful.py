"""Split changes nothing the model computes; loading is all or nothing.

``paramsplit.split`` leaves the model as it is: every owner runs its own ``forward`` with its
own parameters, and no paramsplit code runs in the forward or the backward (only at the
optimizer step). So nothing the forward depends on is fixed at split time: optional arguments,
Python flags, attributes changed later, forwards that read a weight twice or assign to self.
Oracle: the unsplit model under the same calls and changes, trained by the same optimizer with
the FROZEN elements put back after each step.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows

KINDS = ["rows", "cols", "mask", "sparse"]
LR = 0.1  # SGD's lr below: regions given it differ from the defaults in form only


def _frozen(kind, shape):
    """The FROZEN elements of ``_plan(kind, shape)``."""
    out = torch.zeros(shape, dtype=torch.bool)
    if kind == "rows":
        out[:2] = True
    elif kind in ("mask", "sparse"):
        share = 0.3 if kind == "mask" else 0.8
        out = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < share
    return out


def _plan(kind, shape):
    if kind == "rows":
        return rows({(0, 2): FROZEN})
    if kind == "cols":
        return cols({(0, 2): {"lr": LR}})
    return Regions(_frozen(kind, shape), {True: FROZEN, False: {"lr": LR}})


def _split(module, kind):
    """(split module, its optimizer, unsplit copy, the copy's optimizer, FROZEN mask)."""
    ref = copy.deepcopy(module)
    sm, groups = paramsplit.split(module, {"weight": _plan(kind, tuple(module.weight.shape))})
    assert sm is module and kind in paramsplit.describe(sm)
    return (sm, torch.optim.SGD(groups, lr=LR), ref, torch.optim.SGD(ref.parameters(), lr=LR),
            _frozen(kind, tuple(module.weight.shape)))


def _train_like_oracle(sm, opt, ref, ref_opt, frozen, loss, steps=2):
    """Train both with ``loss(model)``; the same weights, gradients and outputs every step."""
    for _ in range(steps):
        for model, o in ((sm, opt), (ref, ref_opt)):
            o.zero_grad()
            loss(model).backward()
        assert torch.equal(sm.weight.grad, ref.weight.grad)  # FROZEN elements included
        before = ref.weight.detach().clone()
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            ref.weight[frozen] = before[frozen]
        for (n, p), q in zip(sm.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
        assert torch.equal(sm.weight[frozen], before[frozen])


class PosEmb(nn.Embedding):
    """A learned positional embedding written like those of real transformer models."""

    def forward(self, x, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return super().forward(position_ids)


class Scaled(nn.Linear):
    """Branches on an optional argument and on a flag a user toggles after split."""

    def __init__(self):
        super().__init__(6, 4)
        self.use_scale = True

    def forward(self, x, scale=None):
        out = super().forward(x)
        if scale is not None:
            out = out * scale
        if self.use_scale:
            out = out * 2
        return out


class ReadsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a forward that assigns to self
        self.last_norm = self.weight.detach().norm()
        return x @ self.weight.t() + self.weight.square().sum()


@pytest.mark.parametrize("kind", KINDS)
def test_optional_argument_owner_called_both_ways(kind):
    torch.manual_seed(0)
    sm, opt, ref, ref_opt, frozen = _split(PosEmb(10, 4), kind)
    x = torch.zeros(2, 5, dtype=torch.long)
    pos = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    assert torch.equal(sm(x), ref(x))
    assert torch.equal(sm(x, pos), ref(x, pos))
    assert torch.equal(sm(x, position_ids=pos), ref(x, position_ids=pos))
    _train_like_oracle(sm, opt, ref, ref_opt, frozen,
                       lambda m: (m(x).square().sum() + m(x, position_ids=pos).sum()))


@pytest.mark.parametrize("kind", KINDS)
def test_flag_and_optional_argument_after_split(kind):
    torch.manual_seed(0)
    sm, opt, ref, ref_opt, frozen = _split(Scaled(), kind)
    x = torch.randn(3, 6)
    for flag in (True, False, True):
        sm.use_scale = ref.use_scale = flag
        assert torch.equal(sm(x), ref(x))
        assert torch.equal(sm(x, torch.tensor(3.0)), ref(x, torch.tensor(3.0)))
        _train_like_oracle(sm, opt, ref, ref_opt, frozen,
                           lambda m: m(x, torch.tensor(3.0)).square().sum(), steps=1)


def test_torch_layer_attributes_changed_after_split():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.LayerNorm(6), nn.Conv1d(6, 4, 3, padding=1))
    with torch.no_grad():
        ref[0].weight.uniform_()
    sm = copy.deepcopy(ref)
    paramsplit.split(sm, {"0.weight": rows({(0, 3): FROZEN}),
                          "1.weight": cols({(0, 2): {"lr": 0.1}})})
    x = torch.randn(2, 5, 6)
    for model in (sm, ref):
        model[0].eps = 0.5
        model[1].padding = (2,)
        model[1].dilation = (2,)
    assert torch.equal(sm[0](x), ref[0](x))
    assert torch.equal(sm[1](x.transpose(1, 2)), ref[1](x.transpose(1, 2)))
    assert torch.equal(sm[1](sm[0](x).transpose(1, 2)), ref[1](ref[0](x).transpose(1, 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_owner_reading_its_weight_twice_and_assigning_to_self(kind):
    torch.manual_seed(0)
    sm, opt, ref, ref_opt, frozen = _split(ReadsTwice(), kind)
    x = torch.randn(3, 6)
    out, want = sm(x), ref(x)
    assert torch.equal(out, want) and sm.calls == 1 and torch.equal(sm.last_norm, ref.last_norm)
    out.sum().backward()
    want.sum().backward()
    assert torch.equal(sm.weight.grad, ref.weight.grad)  # the unsplit gradient, FROZEN included
    _train_like_oracle(sm, opt, ref, ref_opt, frozen, lambda m: m(x).sum())
    assert sm.calls == ref.calls and torch.equal(sm.last_norm, ref.last_norm)
    # nothing the forward left behind breaks copying or merging
    merged = paramsplit.merge(sm)
    assert merged is sm and type(merged) is ReadsTwice and torch.equal(merged(x), ref(x))
    assert torch.equal(copy.deepcopy(sm)(x), sm(x))


def test_split_leaves_a_failing_to_trace_owner_untouched():
    """Nothing is traced: an LSTM's cached weights are its very parameters after split."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 3)
    before = list(lstm._flat_weights)
    sm, _ = paramsplit.split(lstm, {"weight_hh_l0": rows({(0, 3): FROZEN})})
    assert sm is lstm
    assert all(a is b for a, b in zip(sm._flat_weights, before))
    assert sm._flat_weights[1] is sm.weight_hh_l0
    assert paramsplit.merge(sm) is sm
    copy.deepcopy(sm)


def _paramsplit_frames(fn):
    """The paramsplit functions that ran (were called) during ``fn()``."""
    root = str(Path(paramsplit.__file__).parent)
    seen = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_no_paramsplit_code_runs_in_forward_or_backward(kind):
    """Only the optimizer step runs paramsplit code: forward and backward are the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(PosEmb(10, 4), nn.Linear(4, 6), ReadsTwice())
    model, groups = paramsplit.split(model, {"0": _plan(kind, (10, 4)),
                                             "1": _plan(kind, (6, 4)),
                                             "2": _plan(kind, (4, 6))})
    opt = torch.optim.SGD(groups, lr=LR)
    x = torch.zeros(2, 5, dtype=torch.long)
    for _ in range(2):
        opt.zero_grad()
        assert _paramsplit_frames(lambda: model(x).square().sum().backward()) == []
        with torch.no_grad():
            assert _paramsplit_frames(lambda: model(x)) == []
        assert _paramsplit_frames(opt.step)  # the step hooks do run: the check sees them


# -- loading is all or nothing -------------------------------------------------------------------

def _split_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    mask = torch.tensor([[0, 1, 0, 1]] * 3)
    return paramsplit.split(model, {"0": Regions(mask, {0: {}, 1: {"weight_decay": 0.1}})})


@pytest.mark.parametrize("change,words", [
    (lambda sd: sd.pop("2.bias"), ["missing keys ['2.bias']"]),
    (lambda sd: sd.pop("0.weight"), ["missing keys ['0.weight']"]),
    (lambda sd: sd.update(extra=torch.zeros(1)), ["unexpected keys ['extra']"]),
    (lambda sd: sd.update({"2.bias": torch.zeros(5)}), ["'2.bias' has shape (5,)", "(2,)"]),
    (lambda sd: sd.update({"0.weight": [[0.0] * 4] * 3}), ["'0.weight' is a list"]),
    (lambda sd: sd.update({"0.weight": torch.zeros(4, 3)}), ["'0.weight' has shape (4, 3)"]),
])
def test_load_merged_state_dict_checks_everything_first(change, words):
    sm, _ = _split_mlp()
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    torch.manual_seed(5)
    sd = {k: torch.randn_like(v) for k, v in before.items()}
    change(sd)
    with pytest.raises(RuntimeError, match="nothing was loaded") as err:
        paramsplit.load_merged_state_dict(sm, sd)
    for w in words:
        assert w in str(err.value)
    after = sm.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_merged_state_dict_non_strict_loads_what_matches():
    sm, _ = _split_mlp()
    sd = {"0.weight": torch.ones(3, 4), "extra": torch.zeros(1)}
    result = paramsplit.load_merged_state_dict(sm, sd, strict=False)
    assert torch.equal(sm[0].weight, torch.ones(3, 4))
    assert "0.bias" in result.missing_keys and "0.weight" not in result.missing_keys


def _opt_with_state():
    sm, groups = _split_mlp()
    opt = torch.optim.AdamW(groups, lr=1e-2)
    sm(torch.randn(2, 4)).sum().backward()
    opt.step()
    return sm, opt


@pytest.mark.parametrize("change,error,words", [
    (lambda s: s["0.weight"].update(exp_avg=torch.zeros(4, 3)), ValueError,
     ["state['0.weight']['exp_avg'] has shape (4, 3)", "(3, 4)"]),
    (lambda s: s["0.weight"].update(exp_avg=torch.zeros(3, 4, dtype=torch.float64)), ValueError,
     ["dtype torch.float64", "torch.float32"]),
    (lambda s: s["2.bias"].update(step="one"), TypeError, ["state['2.bias']['step'] is a str"]),
    (lambda s: s.update({"2.weigth": {}}), KeyError, ["no parameter '2.weigth'",
                                                      "did you mean '2.weight'"]),
    (lambda s: s.update({"0.bias": [1, 2]}), TypeError, ["state['0.bias'] must be a dict"]),
])
def test_load_merged_optimizer_state_checks_everything_first(change, error, words):
    sm, opt = _opt_with_state()
    state = paramsplit.merged_optimizer_state(opt, sm)
    fresh, groups = _split_mlp()
    fresh_opt = torch.optim.AdamW(groups, lr=1e-2)
    change(state)
    with pytest.raises(error) as err:
        paramsplit.load_merged_optimizer_state(fresh_opt, fresh, state)
    for w in words:
        assert w in str(err.value)
    assert len(fresh_opt.state) == 0  # nothing half-loaded


def test_load_merged_optimizer_state_round_trips():
    sm, opt = _opt_with_state()
    state = paramsplit.merged_optimizer_state(opt, sm)
    fresh, groups = _split_mlp()
    fresh_opt = torch.optim.AdamW(groups, lr=1e-2)
    paramsplit.load_merged_optimizer_state(fresh_opt, fresh, state)
    again = paramsplit.merged_optimizer_state(fresh_opt, fresh)
    assert again.keys() == state.keys()
    for name in state:
        for key in state[name]:
            assert torch.equal(torch.as_tensor(again[name][key]),
                               torch.as_tensor(state[name][key])), (name, key)
