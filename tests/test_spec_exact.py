"""Options compared exactly, sparse gradients refused where they would be split, and a light
``import paramsplit``.

* Regions with equal options share a part and a group; "equal" is exact: two tensor learning
  rates that print alike (``tensor(0.0010)``) are different options and must train apart.
* ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)`` produce sparse gradients,
  which cannot be cut into regions: a spec that would split such a weight raises a SpecError at
  ``split``; one options dict for the whole weight (no parts) keeps working with SparseAdam/SGD.
* ``import paramsplit`` does not import ``torch.distributed.tensor`` (about 2 s, and a numpy
  warning on machines without numpy).
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, SpecError, cols, rows
from paramsplit._spec import _options_key

LR_A, LR_B = torch.tensor(1.00001e-3), torch.tensor(1.00002e-3)


# -- the key ---------------------------------------------------------------------------------

def test_tensor_lrs_that_print_alike_have_different_keys():
    assert repr(LR_A) == repr(LR_B) and str(LR_A) == str(LR_B)  # the trap: they print alike
    assert _options_key({"lr": LR_A}) != _options_key({"lr": LR_B})
    assert _options_key({"lr": LR_A}) == _options_key({"lr": LR_A.clone()})


@pytest.mark.parametrize("a,b", [
    (0.1 + 0.2, 0.3),
    (1e-3, math.nextafter(1e-3, 1)),
    (0.0, -0.0),
    (True, 1),
    (torch.tensor(1e-3), torch.tensor(1e-3, dtype=torch.float64)),
    (torch.tensor(1e-3), torch.tensor([1e-3])),
    (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])),
    (np.float32(0.1), 0.1),
    (np.array([1.0, 2.0]), np.array([1.0, 2.5])),
    ((0.9, 0.999), (0.9, 0.99900001)),
    ((0.9, 0.999), [0.9, 0.999]),
    ([[0.5]], [[0.5000001]]),
    ("a", "b"),
], ids=lambda v: repr(v).replace(" ", ""))
def test_different_values_have_different_keys(a, b):
    assert _options_key({"x": a}) != _options_key({"x": b})
    hash(_options_key({"x": a}))


@pytest.mark.parametrize("a,b", [
    (1e-3, 1e-3),
    (1, 1.0),  # equal numbers train alike
    (float("nan"), float("nan")),
    (np.float64(0.1), 0.1),  # numpy scalars as their Python value
    (np.float32(0.25), 0.25),
    (np.int64(3), 3),
    (torch.tensor(1e-3), torch.tensor(1e-3)),
    (torch.arange(6.0)[2:4], torch.tensor([2.0, 3.0])),  # a view and a copy: same values
    (np.array([1.0, 2.0]), np.array([1.0, 2.0])),
    ((0.9, 0.999), (0.9, 0.999)),
    ({"a": [1, 2]}, {"a": [1, 2]}),
    ({1, 2}, {2, 1}),
    (None, None),
    (FROZEN, FROZEN),
], ids=lambda v: repr(v).replace(" ", ""))
def test_equal_values_have_equal_keys(a, b):
    assert _options_key({"x": a}) == _options_key({"x": b})
    assert hash(_options_key({"x": a})) == hash(_options_key({"x": b}))


def test_an_unhashable_value_without_equality_is_keyed_by_repr():
    class Opaque:  # unhashable (it defines __eq__ without __hash__)
        def __init__(self, v):
            self.v = v

        def __eq__(self, other):
            return NotImplemented

        __hash__ = None  # type: ignore[assignment]

        def __repr__(self):
            return f"Opaque({self.v})"

    assert _options_key({"x": Opaque(1)}) == _options_key({"x": Opaque(1)})
    assert _options_key({"x": Opaque(1)}) != _options_key({"x": Opaque(2)})
    hash(_options_key({"x": Opaque(1)}))


# -- regions with tensor learning rates that print alike ------------------------------------

class _Cat(nn.Module):
    """The oracle: a Linear whose weight is two row blocks held as separate parameters."""

    def __init__(self, linear: nn.Linear, at: int):
        super().__init__()
        self.a = nn.Parameter(linear.weight.detach()[:at].clone())
        self.b = nn.Parameter(linear.weight.detach()[at:].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, torch.cat([self.a, self.b]), self.bias)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_tensor_lrs_that_print_alike_stay_apart_and_each_trains_with_its_own(opt_name):
    """Rows 0:4 train with lr 1.00001e-3, rows 4:8 with 1.00002e-3 (both print as
    ``tensor(0.0010)``): two regions, two parts, two groups, each group with its own tensor.
    Oracle: the same rows as two separate parameters, each in a group with its own lr."""
    make = {"SGD": lambda g: torch.optim.SGD(g, lr=1e-3, momentum=0.9),
            "Adam": lambda g: torch.optim.Adam(g, lr=1e-3),
            "AdamW": lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1)}[opt_name]
    model = _net()
    ref = copy.deepcopy(model)
    ref[0] = _Cat(ref[0], 4)
    plan = rows({(0, 4): {"lr": LR_A}, (4, None): {"lr": LR_B}})
    _, groups = paramsplit.split(model, {"0": plan})
    lines = paramsplit.describe(model).splitlines()[1:]
    assert len(lines) == 2 and all("rows" in line for line in lines)
    assert len(paramsplit._sync._SPLITS[model[0].weight].parts) == 2
    held = [g["lr"] for g in groups if isinstance(g.get("lr"), torch.Tensor)]
    assert len(held) == 2 and held[0] is LR_A and held[1] is LR_B

    opt = make(groups)
    ref_opt = make([{"params": [ref[0].a], "lr": LR_A}, {"params": [ref[0].b], "lr": LR_B},
                    {"params": [ref[0].bias, *ref[2].parameters()]}])
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 6, generator=g)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert torch.equal(model[0].weight[:4], ref[0].a)
    assert torch.equal(model[0].weight[4:], ref[0].b)
    assert torch.equal(model[0].bias, ref[0].bias)
    for p, q in zip(model[2].parameters(), ref[2].parameters()):
        assert torch.equal(p, q)


def test_tensor_lrs_in_a_mask_stay_apart():
    mask = torch.arange(48).reshape(8, 6) % 3
    model = _net()
    spec = {"0": Regions(mask, {0: {"lr": LR_A}, 1: {"lr": LR_B}, 2: {"lr": LR_A.clone()}})}
    _, groups = paramsplit.split(model, spec)
    lines = paramsplit.describe(model).splitlines()[1:]
    assert [line.split()[1:3] for line in lines] == [["region", "0"], ["region", "1"]]
    assert "region 0 + region 2" in lines[0]  # equal tensors (a clone) merge
    assert len(paramsplit._sync._SPLITS[model[0].weight].parts) == 2
    assert sum(isinstance(g.get("lr"), torch.Tensor) for g in groups) == 2


def test_equal_tensor_lrs_share_a_region_or_a_group():
    """A mask's regions with equal tensors (not the same object) merge into one region (here:
    the whole weight); row blocks with equal tensors keep their parts but share one group."""
    model = _net()
    mask = torch.arange(48).reshape(8, 6) % 2
    paramsplit.split(model, {"0": Regions(mask, {0: {"lr": torch.tensor(1e-3)},
                                                 1: {"lr": torch.tensor(1e-3)}})})
    assert paramsplit.describe(model).split()[-1] == "whole"
    model = _net()
    plan = rows({(0, 4): {"lr": torch.tensor(1e-3)}, (4, None): {"lr": torch.tensor(1e-3)}})
    _, groups = paramsplit.split(model, {"0": plan})
    parts = paramsplit._sync._SPLITS[model[0].weight].parts
    (group,) = [g for g in groups if isinstance(g.get("lr"), torch.Tensor)]
    assert len(parts) == 2 and all(any(p is q for q in group["params"]) for p in parts)


def test_parameters_with_tensor_lrs_that_print_alike_get_separate_groups():
    model = _net()
    _, groups = paramsplit.split(model, {"0": {"lr": LR_A}, "2": {"lr": LR_B}})
    tensors = [g["lr"] for g in groups if isinstance(g.get("lr"), torch.Tensor)]
    assert len(tensors) == 2 and tensors[0] is LR_A and tensors[1] is LR_B


# -- sparse gradients ------------------------------------------------------------------------

class _Bag(nn.Module):
    def __init__(self, sparse: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.bag = nn.EmbeddingBag(12, 4, mode="sum", sparse=sparse)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).sum(1) + self.bag(ids))


SPLITTING = {
    "rows": lambda p: rows({(0, 5): FROZEN}),
    "rows-options": lambda p: rows({(0, 5): {"lr": 0.5}}),
    "cols": lambda p: cols({(0, 2): {"lr": 0.5}}),
    "mask": lambda p: Regions(torch.arange(p.numel()).reshape(p.shape) % 2,
                              {0: {"lr": 0.5}, 1: {"lr": 0.1}}),
    "sparse-layout": lambda p: Regions((torch.arange(p.numel()) < 3).reshape(p.shape),
                                       {False: FROZEN, True: {"lr": 0.5}}),
    "decay-tensor": lambda p: torch.linspace(0, 0.1, p.numel()).reshape(p.shape),
}


@pytest.mark.parametrize("module", ["emb", "bag"])
@pytest.mark.parametrize("plan", list(SPLITTING))
def test_splitting_a_sparse_embedding_is_a_spec_error(module, plan):
    model = _Bag()
    params = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    kind = {"emb": "Embedding", "bag": "EmbeddingBag"}[module]
    with pytest.raises(SpecError) as info:
        paramsplit.split(model, {module: SPLITTING[plan](getattr(model, module).weight)})
    message = str(info.value)
    assert message.startswith(f"spec[{module!r}]: parameter '{module}.weight' is the weight of "
                              f"module {module!r} ({kind}(..., sparse=True))")
    assert "sparse=False" in message  # the remedy
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == params
    assert paramsplit.describe(model).splitlines()[1:] == []


@pytest.mark.parametrize("how", ["param-name", "wildcard", "callable"])
def test_sparse_embedding_refused_whatever_names_it(how):
    model = _Bag()
    plan = rows({(0, 5): FROZEN})
    spec = {"param-name": {"emb.weight": plan}, "wildcard": {"e*": plan},
            "callable": lambda name, p: plan if name == "emb.weight" else None}[how]
    key = {"param-name": "emb.weight", "wildcard": "e*", "callable": "emb.weight"}[how]
    with pytest.raises(SpecError, match=rf"^spec\[{re.escape(repr(key))}\]: .*sparse=True"):
        paramsplit.split(model, spec)


def test_a_sparse_embedding_tied_to_a_linear_is_refused_by_the_linear_name():
    model = _Bag()
    model.out = nn.Linear(4, 10, bias=False)
    model.out.weight = model.emb.weight
    with pytest.raises(SpecError, match=r"^spec\['out'\]: .*'emb' \(Embedding\(\.\.\., "
                                        r"sparse=True\)\)"):
        paramsplit.split(model, {"out": rows({(0, 5): FROZEN})})


def test_a_dense_embedding_still_splits():
    model = _Bag(sparse=False)
    paramsplit.split(model, {"emb": rows({(0, 5): FROZEN}), "bag": cols({(0, 2): {"lr": 0.5}})})
    assert [line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]] == [
        "rows", "rows", "cols", "cols"]


def _sparse_run(model, opt, steps=3):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, 10, (4, 3), generator=g)
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["SparseAdam", "SGD"])
def test_whole_parameter_options_on_sparse_embeddings_train_like_torch(opt_name):
    """A whole-parameter plan makes no parts: the weights stay in their own groups and their
    sparse gradients reach the optimizer as they are. Oracle: the same groups by hand."""
    class Two(nn.Module):  # only sparse gradients: SparseAdam refuses dense ones
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 4, sparse=True)
            self.bag = nn.EmbeddingBag(10, 4, mode="sum", sparse=True)

        def forward(self, ids):
            return self.emb(ids).sum(1) * self.bag(ids)

    make = {"SparseAdam": lambda g: torch.optim.SparseAdam(g, lr=1e-2),
            "SGD": lambda g: torch.optim.SGD(g, lr=1e-2)}[opt_name]
    model, ref = Two(), Two()
    _, groups = paramsplit.split(model, {"emb": {"lr": 0.5}, "bag": FROZEN})
    assert [line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]] == [
        "whole", "whole"]
    assert not model.bag.weight.requires_grad
    ref.bag.weight.requires_grad_(False)
    opt, ref_opt = make(groups), make([{"params": [ref.emb.weight], "lr": 0.5}])
    before = model.emb.weight.detach().clone()
    _sparse_run(model, opt)
    _sparse_run(ref, ref_opt)
    assert model.emb.weight.grad.is_sparse
    assert torch.equal(model.emb.weight, ref.emb.weight)
    assert not torch.equal(model.emb.weight, before)
    assert torch.equal(model.bag.weight, ref.bag.weight)


# -- import ----------------------------------------------------------------------------------

def test_import_paramsplit_does_not_import_torch_distributed_tensor():
    code = ("import sys; import paramsplit; "
            "print('torch.distributed.tensor' in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('torch.distributed.tensor'))[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    assert out == "False []", out
