"""The rewrite is faithful for any owner; loading is all or nothing.

Every owner runs its own ``forward`` (nothing is traced), so nothing the forward depends on is
fixed at split time: optional arguments, Python flags, attributes changed later. Oracle: the
unsplit model under the same calls and changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, cols, rows


def _plan(kind, shape):
    if kind == "rows":
        return rows({(0, 2): FROZEN})
    if kind == "cols":
        return cols({(0, 2): {"weight_decay": 0.0}})
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5
    return Regions(mask, {True: FROZEN, False: {"lr": 0.1}})


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


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_optional_argument_owner_called_both_ways(kind):
    torch.manual_seed(0)
    ref = PosEmb(10, 4)
    sm, _ = paramsplit.split(ref, {"weight": _plan(kind, (10, 4))})
    x = torch.zeros(2, 5, dtype=torch.long)
    pos = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    assert torch.equal(sm(x), ref(x))
    assert torch.equal(sm(x, pos), ref(x, pos))
    assert torch.equal(sm(x, position_ids=pos), ref(x, position_ids=pos))


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_flag_and_optional_argument_after_split(kind):
    torch.manual_seed(0)
    ref = Scaled()
    sm, _ = paramsplit.split(ref, {"weight": _plan(kind, (4, 6))})
    x = torch.randn(3, 6)
    for flag in (True, False, True):
        sm.use_scale = ref.use_scale = flag
        assert torch.equal(sm(x), ref(x))
        assert torch.equal(sm(x, torch.tensor(3.0)), ref(x, torch.tensor(3.0)))


def test_torch_layer_attributes_changed_after_split():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.LayerNorm(6), nn.Conv1d(6, 4, 3, padding=1))
    with torch.no_grad():
        ref[0].weight.uniform_()
    sm, _ = paramsplit.split(ref, {"0.weight": rows({(0, 3): FROZEN}),
                                   "1.weight": cols({(0, 2): {"lr": 0.1}})})
    x = torch.randn(2, 5, 6)
    for model in (sm, ref):
        model[0].eps = 0.5
        model[1].padding = (2,)
        model[1].dilation = (2,)
    assert torch.equal(sm[0](x), ref[0](x))
    assert torch.equal(sm[1](x.transpose(1, 2)), ref[1](x.transpose(1, 2)))


@pytest.mark.parametrize("kind", ["rows", "cols", "mask"])
def test_owner_reading_its_weight_twice_and_assigning_to_self(kind):
    torch.manual_seed(0)
    ref = ReadsTwice()
    sm, groups = paramsplit.split(ref, {"weight": _plan(kind, (4, 6))})
    ref = copy.deepcopy(ref)
    x = torch.randn(3, 6)
    out, want = sm(x), ref(x)
    assert torch.equal(out, want) and sm.calls == 1 and torch.equal(sm.last_norm, ref.last_norm)
    out.sum().backward()
    want.sum().backward()
    grad = ref.weight.grad
    if kind != "cols":
        frozen = (torch.arange(4)[:, None] < 2).expand(4, 6) if kind == "rows" else \
            _plan(kind, (4, 6)).mask
        grad = grad.masked_fill(frozen, 0)
    assert torch.equal(sm.weight.grad, grad)
    # nothing the forward left behind breaks copying or merging
    merged = paramsplit.merge(sm)
    assert type(merged) is ReadsTwice and torch.equal(merged(x), sm(x))
    assert torch.equal(copy.deepcopy(sm)(x), sm(x))


def test_split_leaves_a_failing_to_trace_owner_untouched():
    """Nothing is traced: an LSTM's cached weights hold real tensors after split."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 3)
    before = [w.data_ptr() for w in lstm._flat_weights]
    sm, _ = paramsplit.split(lstm, {"weight_hh_l0": rows({(0, 3): FROZEN})})
    assert [w.data_ptr() for w in lstm._flat_weights] == before
    assert all(isinstance(w, torch.Tensor) for w in sm._flat_weights)
    paramsplit.merge(sm)
    copy.deepcopy(sm)


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
