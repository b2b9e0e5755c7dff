"""paramsplit on real models and every kind of owner module.

``split`` leaves the model as it is (same object, parameters, names, classes and forward); the
optimizer steps *parts*, one per trained region, which the step hooks sync with the model's
parameter once per step. Every check has an oracle that does not go through paramsplit:

* forward / backward: the unsplit model (a deep copy taken before ``split``), compared bitwise;
  after backward a split parameter's ``.grad`` is the unsplit gradient, every element of it
  (FROZEN ones included), and the parts hold no gradient outside a step;
* optimizer steps: plain ``torch.optim`` on the unsplit model, with one leaf tensor per region
  (the region's elements, gathered with a boolean mask) in a param group with that region's
  options, and the region written back after each step; or, where all options are effectively
  equal, a plain optimizer over the unsplit model's parameters;
* checkpoints: a freshly built, unsplit model loaded with ``strict=True``.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import runpy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import transformers
from torch import Tensor, nn

import paramsplit as ps
from paramsplit import FROZEN

ROOT = Path(__file__).resolve().parents[1]

LR = 1e-2
WD = 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add latency (a lot, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# region structures: one plan, and the boolean mask of every region in part order
# ---------------------------------------------------------------------------------------------


@dataclass
class Structure:
    """How a parameter of ``shape`` is cut: ``rows``/``cols`` spans (covering all) or ``mask`` ids."""

    kind: str
    shape: tuple[int, ...]
    spans: list[tuple[int, int]] | None = None
    ids: Tensor | None = None  # values 0..k-1, each present

    @property
    def n(self) -> int:
        return len(self.spans) if self.spans is not None else int(self.ids.max()) + 1

    def plan(self, options: list[Any]) -> Any:
        assert len(options) == self.n
        if self.kind == "rows":
            return ps.rows(dict(zip(self.spans, options)))
        if self.kind == "cols":
            return ps.cols(dict(zip(self.spans, options)))
        return ps.Regions(self.ids, dict(enumerate(options)))

    def masks(self) -> list[Tensor]:
        if self.kind == "mask":
            return [self.ids == i for i in range(self.n)]
        dim = 0 if self.kind == "rows" else 1
        out = []
        for a, b in self.spans:
            m = torch.zeros(self.shape, dtype=torch.bool)
            m.narrow(dim, a, b - a).fill_(True)
            out.append(m)
        return out


def rows_of(shape, *spans):
    return Structure("rows", tuple(shape), spans=list(spans))


def cols_of(shape, *spans):
    return Structure("cols", tuple(shape), spans=list(spans))


def mask_of(shape, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, k, tuple(shape), generator=g)
        if len(ids.unique()) == k:
            return Structure("mask", tuple(shape), ids=ids)


#: A frozen region, a region with its own options, a region with the defaults (and more).
MIXED = [FROZEN, {"lr": 0.05, "weight_decay": 0.0}, {}, {"weight_decay": 0.2, "lr": 0.003}]
#: Options that differ as keys (separate parts and groups) but equal the optimizer defaults.
EQUAL = [{}, {"lr": LR}, {"weight_decay": WD}, {"lr": LR, "weight_decay": WD}]


# ---------------------------------------------------------------------------------------------
# owner kinds
# ---------------------------------------------------------------------------------------------


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _default_call(model, inputs):
    return model(*inputs)


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]  # deterministic
    inputs: Callable[[torch.Generator], tuple]
    target: str  # the parameter's name in the unsplit model
    structure: Structure
    key: str | None = None  # spec key; default: target
    call: Callable[[nn.Module, tuple], Any] = _default_call
    train: bool = True  # mode for the gradient and optimizer tests
    options: list[Any] = field(default_factory=list)

    def __post_init__(self):
        if not self.options:
            self.options = MIXED[: self.structure.n]
        if self.key is None:
            self.key = self.target

    def spec(self, options=None):
        return {self.key: self.structure.plan(self.options if options is None else options)}


def seeded(fn, seed=0):
    def build():
        torch.manual_seed(seed)
        return fn()
    return build


class ViTStem(nn.Module):
    """Raw parameters used directly in forward: a class token and positional embeddings."""

    def __init__(self, dim=8, n=5):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


def randomized(module):
    """Random values for parameters and statistics that start as ones/zeros (norm layers)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.copy_(torch.rand_like(b) + 0.5)
            elif "running_mean" in name:
                b.copy_(torch.randn_like(b))
    return module


def _mha_call(model, inputs):
    (x,) = inputs
    return model(x, x, x, need_weights=True)


def _conv_bn():
    return randomized(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)))


def _conv_net(conv, act=True):
    return nn.Sequential(conv, nn.Tanh()) if act else nn.Sequential(conv)


CASES = [
    Case("linear-rows", seeded(lambda: nn.Linear(8, 6)), lambda g: (_randn(g, 4, 8),),
         "weight", rows_of((6, 8), (0, 2), (2, 3), (3, 6))),
    Case("linear-cols", seeded(lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU())),
         lambda g: (_randn(g, 4, 8),), "0.weight", cols_of((6, 8), (0, 3), (3, 4), (4, 8)), key="0"),
    Case("linear-mask", seeded(lambda: nn.Linear(8, 6)), lambda g: (_randn(g, 3, 2, 8),),
         "weight", mask_of((6, 8), 4)),
    # a non-contiguous 3-D input sends F.linear through matmul, whose kernel choice depends on
    # whether weight.t() requires grad (also under no_grad)
    Case("linear-rows-noncontig-input", seeded(lambda: nn.Linear(8, 6)),
         lambda g: (_randn(g, 5, 3, 8).transpose(0, 1),), "weight", rows_of((6, 8), (0, 2), (2, 3), (3, 6))),
    Case("linear-mask-noncontig-input", seeded(lambda: nn.Linear(8, 6)),
         lambda g: (_randn(g, 5, 3, 8).transpose(0, 1),), "weight", mask_of((6, 8), 3, seed=8),
         options=[{"lr": 0.05}, FROZEN, {}]),
    Case("linear-bias", seeded(lambda: nn.Linear(8, 6)), lambda g: (_randn(g, 4, 8),),
         "bias", rows_of((6,), (0, 2), (2, 5), (5, 6))),
    Case("bilinear-rows", seeded(lambda: nn.Bilinear(5, 4, 6)),
         lambda g: (_randn(g, 3, 5), _randn(g, 3, 4)), "weight", rows_of((6, 5, 4), (0, 2), (2, 4), (4, 6))),
    Case("bilinear-cols", seeded(lambda: nn.Bilinear(5, 4, 6)),
         lambda g: (_randn(g, 3, 5), _randn(g, 3, 4)), "weight", cols_of((6, 5, 4), (0, 1), (1, 3), (3, 5))),
    Case("conv1d-rows", seeded(lambda: _conv_net(nn.Conv1d(4, 6, 3))), lambda g: (_randn(g, 2, 4, 9),),
         "0.weight", rows_of((6, 4, 3), (0, 2), (2, 4), (4, 6)), key="0"),
    Case("conv1d-cols", seeded(lambda: _conv_net(nn.Conv1d(4, 6, 3))), lambda g: (_randn(g, 2, 4, 9),),
         "0.weight", cols_of((6, 4, 3), (0, 1), (1, 2), (2, 4)), key="0"),
    Case("conv2d-rows", seeded(lambda: _conv_net(nn.Conv2d(4, 6, 3, padding=1))),
         lambda g: (_randn(g, 2, 4, 6, 6),), "0.weight", rows_of((6, 4, 3, 3), (0, 3), (3, 4), (4, 6)),
         key="0"),
    Case("conv2d-cols", seeded(lambda: _conv_net(nn.Conv2d(4, 6, 3, padding=1))),
         lambda g: (_randn(g, 2, 4, 6, 6),), "0.weight", cols_of((6, 4, 3, 3), (0, 1), (1, 3), (3, 4)),
         key="0"),
    Case("conv2d-mask", seeded(lambda: _conv_net(nn.Conv2d(4, 6, 3))),
         lambda g: (_randn(g, 2, 4, 6, 6),), "0.weight", mask_of((6, 4, 3, 3), 3, seed=1), key="0"),
    Case("conv2d-bias", seeded(lambda: _conv_net(nn.Conv2d(4, 6, 3))),
         lambda g: (_randn(g, 2, 4, 6, 6),), "0.bias", rows_of((6,), (0, 1), (1, 4), (4, 6))),
    Case("conv3d-rows", seeded(lambda: _conv_net(nn.Conv3d(3, 4, 2))),
         lambda g: (_randn(g, 2, 3, 4, 4, 4),), "0.weight", rows_of((4, 3, 2, 2, 2), (0, 1), (1, 3), (3, 4))),
    Case("conv3d-cols", seeded(lambda: _conv_net(nn.Conv3d(3, 4, 2))),
         lambda g: (_randn(g, 2, 3, 4, 4, 4),), "0.weight", cols_of((4, 3, 2, 2, 2), (0, 1), (1, 2), (2, 3))),
    Case("conv3d-mask", seeded(lambda: _conv_net(nn.Conv3d(3, 4, 2))),
         lambda g: (_randn(g, 2, 3, 4, 4, 4),), "0.weight", mask_of((4, 3, 2, 2, 2), 3, seed=2)),
    Case("convtranspose2d-rows", seeded(lambda: _conv_net(nn.ConvTranspose2d(4, 6, 3, stride=2))),
         lambda g: (_randn(g, 2, 4, 5, 5),), "0.weight", rows_of((4, 6, 3, 3), (0, 1), (1, 3), (3, 4))),
    Case("convtranspose2d-cols", seeded(lambda: _conv_net(nn.ConvTranspose2d(4, 6, 3, stride=2))),
         lambda g: (_randn(g, 2, 4, 5, 5),), "0.weight", cols_of((4, 6, 3, 3), (0, 2), (2, 5), (5, 6))),
    Case("convtranspose2d-mask", seeded(lambda: _conv_net(nn.ConvTranspose2d(4, 6, 3, stride=2))),
         lambda g: (_randn(g, 2, 4, 5, 5),), "0.weight", mask_of((4, 6, 3, 3), 3, seed=3)),
    Case("embedding-rows", seeded(lambda: nn.Embedding(20, 8)),
         lambda g: (torch.randint(0, 20, (4, 7), generator=g),), "weight",
         rows_of((20, 8), (0, 10), (10, 15), (15, 20))),
    Case("embeddingbag-rows", seeded(lambda: nn.EmbeddingBag(20, 8, mode="mean")),
         lambda g: (torch.randint(0, 20, (4, 7), generator=g),), "weight",
         rows_of((20, 8), (0, 10), (10, 15), (15, 20))),
    Case("embeddingbag-sum-offsets", seeded(lambda: nn.EmbeddingBag(20, 8, mode="sum")),
         lambda g: (torch.randint(0, 20, (12,), generator=g), torch.tensor([0, 3, 3, 8])), "weight",
         rows_of((20, 8), (0, 4), (4, 16), (16, 20))),
    Case("layernorm-weight", seeded(lambda: randomized(nn.LayerNorm(8))), lambda g: (_randn(g, 3, 5, 8),),
         "weight", rows_of((8,), (0, 3), (3, 5), (5, 8))),
    Case("layernorm-bias-mask", seeded(lambda: randomized(nn.LayerNorm(8))), lambda g: (_randn(g, 3, 5, 8),),
         "bias", mask_of((8,), 3, seed=4)),
    Case("rmsnorm-weight", seeded(lambda: randomized(nn.RMSNorm(8))), lambda g: (_randn(g, 3, 5, 8),),
         "weight", rows_of((8,), (0, 3), (3, 5), (5, 8))),
    Case("batchnorm2d-train", seeded(_conv_bn),
         lambda g: (_randn(g, 4, 3, 3, 3),), "1.weight", rows_of((6,), (0, 2), (2, 3), (3, 6)), key="1"),
    Case("batchnorm2d-eval", seeded(_conv_bn),
         lambda g: (_randn(g, 4, 3, 3, 3),), "1.weight", mask_of((6,), 3, seed=5), key="1", train=False),
    Case("batchnorm2d-bias", seeded(_conv_bn),
         lambda g: (_randn(g, 4, 3, 3, 3),), "1.bias", rows_of((6,), (0, 2), (2, 3), (3, 6))),
    Case("raw-pos-embed", seeded(ViTStem), lambda g: (_randn(g, 2, 5, 8),), "pos_embed",
         cols_of((1, 6, 8), (0, 1), (1, 4), (4, 6))),
    Case("raw-cls-token", seeded(ViTStem), lambda g: (_randn(g, 2, 5, 8),), "cls_token",
         mask_of((1, 1, 8), 3, seed=6)),
    Case("mha-in-proj-qkv", seeded(lambda: nn.MultiheadAttention(8, 2, batch_first=True)),
         lambda g: (_randn(g, 2, 5, 8),), "in_proj_weight", rows_of((24, 8), (0, 8), (8, 16), (16, 24)),
         call=_mha_call, options=[{"lr": 0.05}, FROZEN, {"weight_decay": 0.0}]),
    # need_weights=False: eval + no_grad takes MultiheadAttention's fused fast path
    Case("mha-in-proj-fastpath", seeded(lambda: nn.MultiheadAttention(8, 2, batch_first=True)),
         lambda g: (_randn(g, 2, 5, 8),), "in_proj_weight", mask_of((24, 8), 3, seed=7),
         call=lambda m, x: m(x[0], x[0], x[0], need_weights=False)),
]
CASE_IDS = [c.id for c in CASES]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _flat(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out if o is not None for t in _flat(o)]
    if hasattr(out, "to_tuple"):
        return _flat(out.to_tuple())
    raise TypeError(type(out))


def assert_same(a, b, what="output"):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb), what
    for i, (x, y) in enumerate(zip(fa, fb)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}[{i}]"
        assert torch.equal(x, y), f"{what}[{i}] differs: max abs diff {(x - y).abs().max()}"


def loss_of(out) -> Tensor:
    total = 0
    for t in _flat(out):
        if t.is_floating_point():
            w = torch.linspace(-1.0, 1.5, t.numel(), dtype=t.dtype).view_as(t)
            total = total + (t * w).sum()
    return total


def parts_of(model: nn.Module, target: str) -> list[nn.Parameter]:
    """The parts the optimizer steps for ``target``: one per trained region, in region order."""
    return ps._sync._SPLITS[model.get_parameter(target)].parts


def trained(options) -> int:
    return sum(o is not FROZEN for o in options)


def assert_params_equal(ref: nn.Module, sm: nn.Module, grads: bool = False) -> None:
    """The same parameter names (tied ones under every name), values and, with ``grads``,
    gradients, bitwise; and no part holds a gradient (parts have one only inside a step)."""
    want = list(ref.named_parameters(remove_duplicate=False))
    got = list(sm.named_parameters(remove_duplicate=False))
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, p), (_, q) in zip(got, want):
        assert p.shape == q.shape and torch.equal(p, q), name
        if grads:
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or torch.equal(p.grad, q.grad), f"{name}.grad"
        split = ps._sync._SPLITS.get(p)
        assert split is None or all(part.grad is None for part in split.parts), name


def assert_groups_hold(sm: nn.Module, groups) -> None:
    """Each trainable parameter and each part appears once in the groups, nothing else does."""
    held = [p for g in groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    want = {id(p) for p in sm.parameters() if p.requires_grad}
    for p in sm.parameters():
        split = ps._sync._SPLITS.get(p)
        if split is not None and p.requires_grad:
            want |= {id(part) for part in split.parts}
    assert {id(p) for p in held} == want


def split_pair(case: Case, options=None):
    """``(ref, split_model, groups)``; ``ref`` is an independent deep copy of the original."""
    model = case.build()
    ref = copy.deepcopy(model)
    before = dict(model.named_parameters())
    split_model, groups = ps.split(model, case.spec(options))
    assert split_model is model
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is p for n, p in before.items())
    assert_groups_hold(split_model, groups)
    return ref, split_model, groups


def oracle_optimizer(ref, regions, opt_cls, **defaults):
    """A plain optimizer over ``ref`` with one leaf per non-frozen region of each target;
    ``regions`` maps a target's name to ``(masks, options)``."""
    targets = {id(ref.get_parameter(t)) for t in regions}
    rest = [q for q in ref.parameters() if id(q) not in targets]
    groups = [{"params": rest}] if rest else []
    leaves = []
    for target, (masks, options) in regions.items():
        p = ref.get_parameter(target)
        for m, opts in zip(masks, options):
            if opts is FROZEN:
                continue
            leaf = p.detach()[m].clone().requires_grad_()
            leaves.append((p, m, leaf))
            groups.append({"params": [leaf], **opts})
    return opt_cls(groups, **defaults), leaves


def oracle_step(opt, leaves):
    """One step of the per-region oracle: each leaf takes its region's values and gradient from
    its parameter, steps, and is written back."""
    with torch.no_grad():
        for p, m, leaf in leaves:
            leaf.copy_(p[m])
            leaf.grad = p.grad[m].clone()
    opt.step()
    with torch.no_grad():
        for p, m, leaf in leaves:
            p[m] = leaf


# ---------------------------------------------------------------------------------------------
# owner-kind tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_forward_bitwise(case):
    ref, sm, _ = split_pair(case)
    assert_params_equal(ref, sm)
    g = torch.Generator().manual_seed(1)
    for mode in (True, False, True, False):  # BatchNorm: running stats evolve identically
        ref.train(mode)
        sm.train(mode)
        x = case.inputs(g)
        assert_same(case.call(ref, x), case.call(sm, x), f"train={mode}")
        with torch.no_grad():
            assert_same(case.call(ref, x), case.call(sm, x), f"no_grad train={mode}")
    got_buffers = dict(sm.named_buffers())
    for n, a in ref.named_buffers():  # e.g. BatchNorm running statistics
        assert torch.equal(a, got_buffers[n]), n
    table = ps.describe(sm)
    rows_ = [r.split() for r in table.splitlines()[1:] if r.startswith(case.target + " ")]
    assert len(rows_) == case.structure.n, table
    assert [type(m) for m in sm.modules()] == [type(m) for m in ref.modules()]  # no class swap


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_backward_grads(case):
    ref, sm, groups = split_pair(case)
    ref.train(case.train)
    sm.train(case.train)
    x = case.inputs(torch.Generator().manual_seed(2))
    loss_of(case.call(ref, x)).backward()
    loss_of(case.call(sm, x)).backward()
    # every parameter's .grad, the split one's too (all its elements), is the unsplit gradient
    assert_params_equal(ref, sm, grads=True)
    assert sm.get_parameter(case.target).grad is not None
    # one part per trained region, holding that region's elements in row-major order
    w = sm.get_parameter(case.target).detach()
    regions = [m for m, o in zip(case.structure.masks(), case.options) if o is not FROZEN]
    parts = parts_of(sm, case.target)
    assert len(parts) == len(regions) == trained(case.options)
    for part, m in zip(parts, regions):
        assert part.requires_grad and part.grad is None
        assert torch.equal(part.detach().reshape(-1), w[m])


def check_adamw_against_oracle(case: Case, steps: int = 3) -> None:
    """``steps`` AdamW steps of the split model equal the per-region oracle's, bitwise."""
    ref, sm, groups = split_pair(case)
    ref.train(case.train)
    sm.train(case.train)
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    oracle, leaves = oracle_optimizer(ref, {case.target: (case.structure.masks(), case.options)},
                                      torch.optim.AdamW, lr=LR, weight_decay=WD, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = case.inputs(g)
        opt.zero_grad()
        oracle.zero_grad()
        ref.zero_grad()
        loss_of(case.call(ref, x)).backward()
        loss_of(case.call(sm, x)).backward()
        oracle_step(oracle, leaves)
        opt.step()
        assert_params_equal(ref, sm, grads=True)  # the step gives the weight its gradient back
    x = case.inputs(g)
    assert_same(case.call(ref, x), case.call(sm, x))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_adamw_per_region_options(case):
    check_adamw_against_oracle(case)


def _sparse_case(case: Case) -> Case:
    """``case`` with a mask whose FROZEN region is most of the parameter: the sparse layout."""
    shape = case.structure.shape
    g = torch.Generator().manual_seed(9)
    trained = torch.rand(shape, generator=g) < 0.15
    trained.view(-1)[0] = trained.view(-1)[-1] = True
    return dataclasses.replace(case, structure=Structure("mask", shape, ids=trained.long()),
                               options=[FROZEN, {"lr": 0.05, "weight_decay": 0.0}])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_sparse_layout_is_exact(case):
    """Every owner kind with the sparse layout: bitwise forward, the per-region AdamW oracle."""
    case = _sparse_case(case)
    ref, sm, groups = split_pair(case)
    assert ps.describe(sm).splitlines()[1].endswith("sparse")
    x = case.inputs(torch.Generator().manual_seed(1))
    assert_same(case.call(ref, x), case.call(sm, x))
    check_adamw_against_oracle(case, steps=2)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_equal_options_match_unsplit_adamw(case):
    options = EQUAL[: case.structure.n]
    ref, sm, groups = split_pair(case, options)
    assert len(groups) == case.structure.n  # distinct option keys: one group each
    ref.train(case.train)
    sm.train(case.train)
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, foreach=False)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = case.inputs(g)
        opt.zero_grad()
        ref_opt.zero_grad()
        loss_of(case.call(ref, x)).backward()
        loss_of(case.call(sm, x)).backward()
        ref_opt.step()
        opt.step()
        assert_params_equal(ref, sm, grads=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_owner_frozen_region_unchanged(case, optimizer):
    ref, sm, groups = split_pair(case)
    before = ref.get_parameter(case.target).detach().clone()
    sm.train(case.train)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1, betas=(0.9, 0.99))
    else:
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1)
    frozen = torch.stack([m for m, o in zip(case.structure.masks(), case.options) if o is FROZEN]).any(0)
    w = sm.get_parameter(case.target)
    pulled = False  # FROZEN elements have a gradient, which must not act
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        opt.zero_grad()
        loss_of(case.call(sm, case.inputs(g))).backward()
        pulled |= bool(w.grad[frozen].ne(0).any())
        opt.step()
    assert pulled
    after = w.detach()
    for m, opts in zip(case.structure.masks(), case.options):
        if opts is FROZEN:
            assert torch.equal(after[m], before[m])
        elif opts.get("lr", 1) > 0:
            assert not torch.equal(after[m], before[m])
    # the optimizer never stepped the weight as a whole: its state is the parts' only
    parts = parts_of(sm, case.target)
    assert len(parts) == trained(case.options)
    assert all(p.grad is None and p in opt.state for p in parts)
    assert w not in opt.state


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_merged_state_dict_loads_strict(case):
    ref, sm, groups = split_pair(case)
    sm.train(case.train)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    g = torch.Generator().manual_seed(6)
    loss_of(case.call(sm, case.inputs(g))).backward()
    opt.step()
    state = ps.merged_state_dict(sm)
    assert set(state) == set(ref.state_dict())
    fresh = case.build()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.get_parameter(case.target), sm.get_parameter(case.target))
    fresh.eval()
    sm.eval()
    x = case.inputs(g)
    assert_same(case.call(fresh, x), case.call(sm, x))
    # ...and back: an unsplit checkpoint into a split model
    ref_sm = ps.split(case.build(), case.spec())[0]
    ps.load_merged_state_dict(ref_sm, state)
    ref_sm.eval()
    assert_same(case.call(ref_sm, x), case.call(sm, x))


def test_first_adamw_step_matches_closed_form():
    """Hand-written AdamW, first step: ``p * (1 - lr * wd) - lr * g / (|g| + eps)``."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    sm, groups = ps.split(model, {"weight": ps.rows({(0, 1): FROZEN,
                                                     (1, 3): {"lr": 0.05, "weight_decay": 0.0},
                                                     (3, 5): {"weight_decay": 0.5}})})
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1, eps=1e-8)
    w0 = sm.weight.detach().clone()
    b0 = sm.bias.detach().clone()
    loss_of(sm(torch.randn(7, 6))).backward()
    g = sm.weight.grad.clone()  # row 0 is FROZEN: lr 0 below
    gb = sm.bias.grad.clone()
    opt.step()
    lr = torch.tensor([[0.0], [0.05], [0.05], [0.01], [0.01]])
    wd = torch.tensor([[0.0], [0.0], [0.0], [0.5], [0.5]])
    want = w0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(sm.weight.detach(), want, rtol=0, atol=1e-6)
    assert torch.equal(sm.weight[0], w0[0])
    want_b = b0 * (1 - 0.01 * 0.1) - 0.01 * gb / (gb.abs() + 1e-8)
    torch.testing.assert_close(sm.bias.detach(), want_b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["parts", "decay"])
def test_weight_decay_tensor_plan_matches_oracle(layout):
    """A tensor of weight decays: one part per value (per_element_decay=False), or the weight
    kept whole and decayed per element (the decay layout); both are the per-region oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    wd = torch.full((5, 6), 0.01)
    wd[:, :2] = 0.0
    wd[1] = 0.3
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, {"0": wd}, per_element_decay=layout == "decay")
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    values = sorted(wd.unique().tolist())  # region order: ascending weight decay
    oracle, leaves = oracle_optimizer(ref, {"0.weight": ([wd == v for v in values],
                                                         [{"weight_decay": v} for v in values])},
                                      torch.optim.AdamW, lr=LR, weight_decay=WD, foreach=False)
    assert len(parts_of(sm, "0.weight")) == (len(values) if layout == "parts" else 0)
    assert ps.describe(sm).splitlines()[1].split()[-1] == ("mask" if layout == "parts" else
                                                            "decay")
    for step in range(3):
        x = torch.randn(4, 6)
        opt.zero_grad()
        oracle.zero_grad()
        ref.zero_grad()
        loss_of(ref(x)).backward()
        loss_of(sm(x)).backward()
        oracle_step(oracle, leaves)
        opt.step()
        assert_params_equal(ref, sm, grads=True)


# ---------------------------------------------------------------------------------------------
# nn.TransformerEncoder, shared modules, hooks, parametrize, meta device
# ---------------------------------------------------------------------------------------------


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize("frozen", [0, 1, 2], ids=["q-frozen", "k-frozen", "v-frozen"])
def test_transformer_encoder_in_proj_qkv_split(frozen):
    enc = _encoder()
    ref = copy.deepcopy(enc)
    blocks = [(0, 16), (16, 32), (32, 48)]
    options = [{"lr": 0.05}, {"weight_decay": 0.0}, {}]
    options.insert(frozen, FROZEN)
    options = options[:3]
    plan = ps.rows(dict(zip(blocks, options)))
    sm, groups = ps.split(enc, {"layers.*.self_attn.in_proj_weight": plan})
    table = ps.describe(sm)
    lines = [r.split() for r in table.splitlines()[1:]]
    assert len(lines) == 6 and all(r[-1] == "rows" for r in lines), table
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    for mode in (True, False):
        ref.train(mode)
        sm.train(mode)
        assert torch.equal(ref(x), sm(x)), f"train={mode}"
        assert torch.equal(ref(x, src_key_padding_mask=pad), sm(x, src_key_padding_mask=pad))
        with torch.no_grad():  # eval: the fused fast path; train: MultiheadAttention's slow path
            assert torch.equal(ref(x), sm(x)), f"no_grad train={mode}"
            assert torch.equal(ref(x, src_key_padding_mask=pad), sm(x, src_key_padding_mask=pad))
    ref.train()
    sm.train()
    loss_of(ref(x)).backward()
    loss_of(sm(x)).backward()
    assert_params_equal(ref, sm, grads=True)  # in_proj_weight.grad: q, k and v, the frozen one too
    for i in range(2):
        assert len(parts_of(sm, f"layers.{i}.self_attn.in_proj_weight")) == 2
    a, b = blocks[frozen]
    before = [ref.layers[i].self_attn.in_proj_weight[a:b].detach().clone() for i in range(2)]
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss_of(sm(x)).backward()
    for i in range(2):
        assert torch.equal(sm.layers[i].self_attn.in_proj_weight[a:b], before[i])
    fresh = _encoder()
    fresh.load_state_dict(ps.merged_state_dict(sm), strict=True)
    fresh.eval()
    sm.eval()
    assert torch.equal(fresh(x), sm(x))


class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


def test_shared_module_used_twice():
    torch.manual_seed(0)
    model = SharedTwice()
    model.alias = model.block  # also registered under a second name
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, {"block": ps.rows({(0, 3): FROZEN, (3, 8): {"lr": 0.05}})})
    assert sm.alias is sm.block
    parts = parts_of(sm, "block.weight")
    assert len(parts) == 1 and parts_of(sm, "alias.weight") is parts
    assert_groups_hold(sm, groups)
    assert sum(len(g["params"]) for g in groups) == len(list(sm.parameters())) + 1
    assert_params_equal(ref, sm)  # alias.* names too
    x = torch.randn(5, 8)
    assert torch.equal(ref(x), sm(x))
    loss_of(ref(x)).backward()
    loss_of(sm(x)).backward()
    assert_params_equal(ref, sm, grads=True)  # both uses reach block.weight.grad
    before = sm.block.weight.detach().clone()
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        loss_of(sm(x)).backward()
    assert sm.alias.weight is sm.block.weight
    assert torch.equal(sm.block.weight[:3], before[:3])
    assert not torch.equal(sm.block.weight[3:], before[3:])
    state = ps.merged_state_dict(sm)
    assert set(state) == set(ref.state_dict())  # includes the alias.* keys
    fresh = SharedTwice()
    fresh.alias = fresh.block
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), sm(x))


def test_forward_hook_and_pre_hook_still_fire():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    calls = []

    def pre(module, args):
        calls.append(("pre", type(module).__name__))
        return (args[0] * 2,)

    def post(module, args, out):
        calls.append(("post", type(module).__name__))
        return out + 1

    model[0].register_forward_pre_hook(pre)
    model[0].register_forward_hook(post)
    ref = copy.deepcopy(model)
    sm, _ = ps.split(model, {"0": ps.cols({(0, 4): FROZEN})})
    x = torch.randn(3, 8)
    calls.clear()
    want = ref(x)
    assert calls == [("pre", "Linear"), ("post", "Linear")]
    calls.clear()
    got = sm(x)
    assert calls == [("pre", "Linear"), ("post", "Linear")]
    assert torch.equal(want, got)
    assert isinstance(sm[0], nn.Linear)


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


def _parametrized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


def test_parametrize_registered_weight_split_by_module_name():
    model = _parametrized()
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, {"0": ps.rows({(0, 2): FROZEN, (2, 4): {"lr": 0.05}})})
    target = "0.parametrizations.weight.original"
    assert parametrize.is_parametrized(sm[0], "weight")
    assert_params_equal(ref, sm)
    assert [n for n, _ in sm.named_parameters() if n.startswith("0.")] == ["0.bias", target]
    assert len(parts_of(sm, target)) == 2
    x = torch.randn(4, 6)
    assert torch.equal(sm[0].weight, ref[0].weight)
    assert torch.equal(ref(x), sm(x))
    loss_of(ref(x)).backward()
    loss_of(sm(x)).backward()
    assert_params_equal(ref, sm, grads=True)  # original.grad: through the parametrization
    owner = sm.get_submodule("0.parametrizations.weight")
    before = ref.get_parameter(target).detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss_of(sm(x)).backward()
    assert torch.equal(owner.original[:2], before[:2])
    assert not torch.equal(owner.original[2:], before[2:])
    state = ps.merged_state_dict(sm)
    assert set(state) == set(ref.state_dict())
    fresh = _parametrized()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), sm(x))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.pos = nn.Parameter(torch.randn(1, 6, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 8)
        self.conv = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, ids):
        h = self.emb(ids) + self.pos[:, : ids.shape[1]]
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = torch.relu(self.fc(h))
        return self.conv(h.transpose(1, 2))


META_SPEC = {
    "emb": ps.rows({(0, 20): FROZEN}),
    "pos": ps.cols({(0, 3): {"weight_decay": 0.0}}),
    "attn.in_proj_weight": ps.rows({(0, 16): {"lr": 0.05}, (16, 32): FROZEN}),
    "norm": ps.rows({(0, 8): {"weight_decay": 0.0}}),
    "fc": ps.Regions(torch.arange(8 * 16).view(8, 16) % 3, {0: FROZEN, 1: {"lr": 0.1}, 2: {}}),
    "conv": torch.arange(4 * 8 * 3, dtype=torch.float).view(4, 8, 3).remainder(2) * 0.1,
}


#: META_SPEC's regions, written out: (masks, options) of every planned parameter, for the oracle
META_REGIONS = {
    "emb.weight": (rows_of((30, 16), (0, 20), (20, 30)).masks(), [FROZEN, {}]),
    "pos": (cols_of((1, 6, 16), (0, 3), (3, 6)).masks(), [{"weight_decay": 0.0}, {}]),
    "attn.in_proj_weight": (rows_of((48, 16), (0, 16), (16, 32), (32, 48)).masks(),
                            [{"lr": 0.05}, FROZEN, {}]),
    "norm.weight": (rows_of((16,), (0, 8), (8, 16)).masks(), [{"weight_decay": 0.0}, {}]),
    "fc.weight": ([torch.arange(8 * 16).view(8, 16) % 3 == i for i in range(3)],
                  [FROZEN, {"lr": 0.1}, {}]),
    "conv.weight": ([torch.arange(4 * 8 * 3).view(4, 8, 3) % 2 == i for i in range(2)],
                    [{"weight_decay": 0.0}, {"weight_decay": 0.1}]),
}


@pytest.mark.parametrize("layout", ["parts", "decay"])
@pytest.mark.parametrize("materialize", ["to_empty", "assign"])
def test_meta_device_split_then_materialize_and_train(materialize, layout):
    """Split on the meta device, materialize (``to_empty`` and a load, or a load with
    ``assign=True``), train: bitwise the per-region oracle on the real model. A weight replaced
    by an ``assign=True`` load during training is taken over at the next step. ``pos``,
    ``norm`` and ``conv`` differ only in weight_decay: parts (per_element_decay=False), or kept
    whole (the decay layout) beside the others' parts."""
    torch.manual_seed(0)
    real = SmallNet()
    ref = copy.deepcopy(real)
    with torch.device("meta"):
        meta = SmallNet()
    sm, _ = ps.split(meta, META_SPEC, per_element_decay=layout == "decay")
    assert sm is meta
    layouts = {r.split()[0]: r.split()[-1] for r in ps.describe(sm).splitlines()[1:]}
    decayed = {"pos", "norm.weight", "conv.weight"}
    assert {n for n, v in layouts.items() if v == "decay"} == (decayed if layout == "decay"
                                                               else set())
    assert all(p.device.type == "meta" for p in sm.parameters())
    assert [n for n, _ in sm.named_parameters()] == [n for n, _ in real.named_parameters()]
    state = {k: v.clone() for k, v in real.state_dict().items()}
    if materialize == "to_empty":
        sm.to_empty(device="cpu")
        result = ps.load_merged_state_dict(sm, state)
    else:
        result = sm.load_state_dict(state, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(t.device.type == "cpu" for t in list(sm.parameters()) + list(sm.buffers()))
    assert_params_equal(ref, sm)
    ids = torch.randint(0, 30, (3, 6))
    for mode in (True, False):
        real.train(mode)
        sm.train(mode)
        assert torch.equal(real(ids), sm(ids))
    state = ps.merged_state_dict(sm)
    for k, v in real.state_dict().items():
        assert torch.equal(state[k], v), k
    # ``to_empty`` and ``assign=True`` put new Parameter objects in the model (plain PyTorch),
    # so the groups ``split`` returned hold the meta ones: build the groups again
    groups = ps.param_groups(sm)
    assert_groups_hold(sm, groups)
    assert all(p.device.type == "cpu" for g in groups for p in g["params"])
    assert sm.emb.weight.requires_grad  # partly FROZEN only
    assert len(parts_of(sm, "emb.weight")) == 1
    ref.train()
    sm.train()
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    oracle, leaves = oracle_optimizer(ref, META_REGIONS, torch.optim.AdamW, lr=LR,
                                      weight_decay=WD, foreach=False)
    frozen = ref.emb.weight[:20].detach().clone()
    g = torch.Generator().manual_seed(7)
    for step in range(4):
        if step == 2:  # new values for emb.weight, in a new Parameter in sm (as such loads do)
            old = sm.emb.weight
            sm.load_state_dict({"emb.weight": old.detach() * 0.5}, strict=False, assign=True)
            assert sm.emb.weight is not old
            with torch.no_grad():
                ref.emb.weight.mul_(0.5)
            frozen = frozen * 0.5
        ids = torch.randint(0, 30, (3, 6), generator=g)
        opt.zero_grad()
        oracle.zero_grad()
        ref.zero_grad()
        loss_of(ref(ids)).backward()
        loss_of(sm(ids)).backward()
        oracle_step(oracle, leaves)
        opt.step()
        assert_params_equal(ref, sm, grads=True)
    assert torch.equal(sm.emb.weight[:20], frozen)
    assert any(p is sm.emb.weight for g in opt.param_groups for p in g["params"])


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers (small configs, built locally: no downloads)
# ---------------------------------------------------------------------------------------------

transformers.logging.set_verbosity_error()

VOCAB = 1000


def gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _ids(seed=0, batch=2, length=12):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def half_rows(name, p):
    """A callable rule: every 2-D weight, first half of its rows without weight decay."""
    if p.dim() == 2:
        return ps.rows({(0, p.shape[0] // 2): {"weight_decay": 0.0}})
    return None


HF_SPECS = {
    "gpt2-wildcard": (gpt2, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                             "transformer.h.*.mlp.c_fc": ps.rows({(0, 32): {"weight_decay": 0.0}}),
                             "transformer.h.*.attn.c_attn": ps.cols({(64, 128): FROZEN}),
                             "transformer.h.*.ln_*.weight": ps.rows({(0, 10): {"lr": 0.0}})}),
    "gpt2-callable": (gpt2, half_rows),
    "bert-wildcard": (bert, {"bert.embeddings.word_embeddings": ps.rows({(0, 300): FROZEN}),
                             "bert.encoder.layer.*.attention.self.query": ps.rows({(0, 16): FROZEN}),
                             "bert.encoder.layer.*.output.LayerNorm": ps.rows({(0, 8): {"lr": 0.1}})}),
    "bert-callable": (bert, half_rows),
    "llama-wildcard": (llama, {"model.embed_tokens": ps.rows({(0, 500): FROZEN}),
                               "model.layers.*.self_attn.[qk]_proj": ps.rows({(0, 16): FROZEN}),
                               "model.layers.*.mlp.down_proj": ps.cols({(0, 64): {"lr": 0.1}}),
                               "model.layers.*.input_layernorm": ps.rows({(0, 8): {"lr": 0.1}}),
                               "lm_head": ps.rows({(0, 100): {"weight_decay": 0.0}})}),
    "llama-callable": (llama, half_rows),
}


def _two_d(model):
    return {n for n, p in model.named_parameters() if p.dim() == 2}


def _layers(*patterns):
    return lambda model: {p.format(i) for p in patterns for i in range(2)}


#: The parameters each spec must split, written out (wildcards: in every layer).
HF_EXPECTED_SPLIT = {
    "gpt2-wildcard": lambda m: {"transformer.wte.weight"} | _layers(
        "transformer.h.{}.mlp.c_fc.weight", "transformer.h.{}.attn.c_attn.weight",
        "transformer.h.{}.ln_1.weight", "transformer.h.{}.ln_2.weight")(m),
    "gpt2-callable": _two_d,
    # fnmatch semantics: "*" also matches dots, so "layer.*.output.LayerNorm" matches the
    # attention block's "layer.0.attention.output.LayerNorm" too
    "bert-wildcard": lambda m: {"bert.embeddings.word_embeddings.weight"} | _layers(
        "bert.encoder.layer.{}.attention.self.query.weight",
        "bert.encoder.layer.{}.output.LayerNorm.weight",
        "bert.encoder.layer.{}.attention.output.LayerNorm.weight")(m),
    "bert-callable": _two_d,
    "llama-wildcard": lambda m: {"model.embed_tokens.weight", "lm_head.weight"} | _layers(
        "model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.mlp.down_proj.weight", "model.layers.{}.input_layernorm.weight")(m),
    "llama-callable": _two_d,
}


def hf_pair(name, per_element_decay=True):
    build, spec = HF_SPECS[name]
    model = build()
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, spec, per_element_decay=per_element_decay)
    return build, ref, sm, groups


#: the specs with plans whose regions differ only in weight_decay (the decay layout, unless
#: per_element_decay=False): each runs with parts and with the decay layout
HF_DECAY = {"gpt2-wildcard", "gpt2-callable", "bert-callable", "llama-wildcard", "llama-callable"}


@pytest.mark.parametrize("name,layout", [(n, layout) for n in HF_SPECS for layout in
                                         (["parts", "decay"] if n in HF_DECAY else ["parts"])])
def test_hf_logits_bitwise_and_step(name, layout):
    build, ref, sm, groups = hf_pair(name, per_element_decay=layout == "decay")
    split_names = {r.split()[0] for r in ps.describe(sm).splitlines()[1:]}
    assert split_names == HF_EXPECTED_SPLIT[name](ref), ps.describe(sm)
    layouts = {r.split()[-1] for r in ps.describe(sm).splitlines()[1:]}
    assert ("decay" in layouts) == (layout == "decay"), layouts
    ids = _ids()
    for mode in (False, True):
        ref.train(mode)
        sm.train(mode)
        assert torch.equal(ref(ids).logits, sm(ids).logits), f"train={mode}"
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, sm(ids).logits), f"no_grad train={mode}"
    # every gradient, the split parameters' whole ones too, equals the unsplit model's
    loss_ref = ref(ids, labels=ids).loss
    loss_sm = sm(ids, labels=ids).loss
    assert torch.equal(loss_ref, loss_sm)
    loss_ref.backward()
    loss_sm.backward()
    assert_params_equal(ref, sm, grads=True)
    assert_groups_hold(sm, groups)
    # then one AdamW step: bitwise the per-region oracle's
    regions = _hf_regions(ref, HF_SPECS[name][1])
    assert set(regions) == split_names
    opt = torch.optim.AdamW(groups, lr=1e-3, foreach=False)
    oracle, leaves = oracle_optimizer(ref, regions, torch.optim.AdamW, lr=1e-3, foreach=False)
    oracle_step(oracle, leaves)
    opt.step()
    assert_params_equal(ref, sm, grads=True)
    # and a strict reload
    fresh = build(seed=1)
    fresh.load_state_dict(ps.merged_state_dict(sm), strict=True)
    fresh.eval()
    sm.eval()
    assert torch.equal(fresh(ids).logits, sm(ids).logits)


def _hf_regions(model, spec):
    """Each planned parameter's ``(masks, options)``, read off the spec by hand (each plan here
    is one block of rows or columns; the rest of the parameter has the defaults)."""
    out = {}
    for name, p in model.named_parameters():
        if callable(spec):
            plan = spec(name, p)
        else:
            plan = next((v for k, v in spec.items()
                         if fnmatch.fnmatchcase(name, k) or fnmatch.fnmatchcase(name, k + ".weight")),
                        None)
        if plan is None:
            continue
        ((a, b), opts), = plan.blocks.items()
        m = torch.zeros(p.shape, dtype=torch.bool)
        m.narrow(plan.dim, a, b - a).fill_(True)
        out[name] = ([m, ~m], [opts, {}])
    return out


def test_gpt2_equal_options_steps_match_unsplit_adamw():
    model = gpt2()
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, {
        "transformer.wte": ps.rows({(0, 400): {"lr": LR}, (400, 700): {"weight_decay": WD}}),
        "transformer.h.*.mlp.c_fc": ps.cols({(0, 100): {"lr": LR, "weight_decay": WD}}),
        "transformer.h.*.attn.c_attn": ps.Regions(torch.arange(64 * 192).view(64, 192) % 2,
                                                  {0: {}, 1: {"lr": LR}}),
    })
    assert len(groups) >= 4
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, foreach=False)
    ref.train()
    sm.train()
    for step in range(2):
        ids = _ids(step)
        opt.zero_grad()
        ref_opt.zero_grad()
        ref(ids, labels=ids).loss.backward()
        sm(ids, labels=ids).loss.backward()
        ref_opt.step()
        opt.step()
    state = ps.merged_state_dict(sm)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k
    assert_params_equal(ref, sm, grads=True)
    assert sm.lm_head.weight is sm.transformer.wte.weight


def test_gpt2_tied_embedding_split_rows():
    model = gpt2()
    ref = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    options = [FROZEN, {"lr": 0.05}, {}]
    sm, groups = ps.split(model, {"transformer.wte": ps.rows({(0, 600): FROZEN, (600, 800): {"lr": 0.05}})})
    wte = sm.transformer.wte
    assert sm.lm_head.weight is wte.weight  # the tie is untouched
    # each tensor appears once in the groups: the weight (under both its names) and its two parts
    assert_groups_hold(sm, groups)
    parts = parts_of(sm, "transformer.wte.weight")
    assert len(parts) == 2 and parts_of(sm, "lm_head.weight") is parts
    all_group_params = [p for g in groups for p in g["params"]]
    assert sum(1 for p in all_group_params if any(p is q for q in parts)) == 2
    assert sum(1 for p in all_group_params if p is wte.weight) == 1
    assert_params_equal(ref, sm)  # the names: lm_head.weight under remove_duplicate=False only
    assert not any(n.startswith("lm_head.") for n, _ in sm.named_parameters())
    table = ps.describe(sm)
    assert table.count("rows 600:800") == 1, table
    # merged_state_dict keeps the original keys (lm_head.weight too, if the original has it)
    state = ps.merged_state_dict(sm)
    assert set(state) == set(ref.state_dict())
    assert ("lm_head.weight" in state) == ("lm_head.weight" in ref.state_dict())
    # gradients from both uses (embedding and lm_head) reach the weight
    ids = _ids()
    ref.train()
    sm.train()
    ref(ids, labels=ids).loss.backward()
    sm(ids, labels=ids).loss.backward()
    assert_params_equal(ref, sm, grads=True)
    # training: bitwise the per-region oracle; FROZEN rows stay, the tie holds
    before = wte.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1, foreach=False)
    oracle, leaves = oracle_optimizer(
        ref, {"transformer.wte.weight": (rows_of((VOCAB, 64), (0, 600), (600, 800), (800, VOCAB)).masks(),
                                         options)},
        torch.optim.AdamW, lr=0.05, weight_decay=0.1, foreach=False)
    for step in range(3):
        oracle_step(oracle, leaves)
        opt.step()
        assert_params_equal(ref, sm, grads=True)
        opt.zero_grad()
        oracle.zero_grad()
        ref.zero_grad()
        ref(_ids(step + 1), labels=_ids(step + 1)).loss.backward()
        sm(_ids(step + 1), labels=_ids(step + 1)).loss.backward()
    after = wte.weight
    assert torch.equal(after[:600], before[:600])
    assert not torch.equal(after[600:], before[600:])
    assert sm.lm_head.weight is sm.transformer.wte.weight  # still tied after training
    state = ps.merged_state_dict(sm)
    fresh = gpt2(seed=1)
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    fresh.eval()
    sm.eval()
    assert torch.equal(fresh(ids).logits, sm(ids).logits)


def test_gpt2_generate_and_input_embeddings():
    model = gpt2()
    ref = copy.deepcopy(model)
    sm, _ = ps.split(model, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                             "transformer.h.*.mlp.c_fc": ps.rows({(0, 32): {"weight_decay": 0.0}})})
    ref.eval()
    sm.eval()
    emb = sm.get_input_embeddings()
    assert emb is sm.transformer.wte and isinstance(emb, nn.Embedding)
    assert torch.equal(emb.weight, ref.get_input_embeddings().weight)
    ids = _ids(length=5)
    assert torch.equal(emb(ids), ref.get_input_embeddings()(ids))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    want = ref.generate(ids, **kw)
    got = sm.generate(ids, **kw)
    assert want.shape == (2, 11)
    assert torch.equal(want, got)


def test_llama_generate():
    build, ref, sm, _ = hf_pair("llama-wildcard")
    ref.eval()
    sm.eval()
    ids = _ids(length=5)
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(ref.generate(ids, **kw), sm.generate(ids, **kw))


def _enable_checkpointing(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
        model.gradient_checkpointing_enable()


def test_gpt2_gradient_checkpointing():
    model = gpt2()
    ref = copy.deepcopy(model)
    sm, _ = ps.split(model, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                             "transformer.h.*.mlp.c_fc": ps.rows({(0, 32): {"weight_decay": 0.0}}),
                             "transformer.h.*.attn.c_attn": ps.Regions(
                                 torch.arange(64 * 192).view(64, 192) % 3,
                                 {0: {}, 1: {"lr": 0.1}, 2: FROZEN})})
    _enable_checkpointing(ref)
    _enable_checkpointing(sm)
    ref.train()
    sm.train()
    calls = []
    # recomputation in backward runs the block again (from its start: checkpoint stops early)
    sm.transformer.h[0].ln_1.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = _ids()
    loss_ref = ref(ids, labels=ids).loss
    loss_sm = sm(ids, labels=ids).loss
    assert torch.equal(loss_ref, loss_sm)
    loss_ref.backward()
    loss_sm.backward()
    assert len(calls) == 2, "the block was not recomputed: checkpointing is not active"
    # every W.grad (all elements, FROZEN ones too) is the reference gradient
    assert_params_equal(ref, sm, grads=True)


def test_gpt2_save_pretrained_original_format(tmp_path):
    """``split_model.save_pretrained`` writes the original format (merged weights), which
    ``from_pretrained`` loads into an unsplit model."""
    model = gpt2()
    sm, groups = ps.split(model, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                                  "transformer.h.*.mlp.c_fc": ps.cols({(0, 100): {"lr": 0.1}})})
    sm.train()
    ids = _ids()
    opt = torch.optim.AdamW(groups, lr=0.05)
    sm(ids, labels=ids).loss.backward()
    opt.step()
    sm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("__" in k for k in saved)
    assert "transformer.wte.weight" in saved and "transformer.h.0.mlp.c_fc.weight" in saved
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    loaded.eval()
    sm.eval()
    assert torch.equal(loaded(ids).logits, sm(ids).logits)
    # and a checkpoint saved from an unsplit model loads into a split one
    ps.load_merged_state_dict(sm, loaded.state_dict())
    assert torch.equal(loaded(ids).logits, sm(ids).logits)


# ---------------------------------------------------------------------------------------------
# the example
# ---------------------------------------------------------------------------------------------


def test_example_gpt2_new_tokens(capsys):
    path = ROOT / "examples" / "gpt2_new_tokens.py"
    old_argv = sys.argv
    sys.argv = [str(path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old_argv
    out = capsys.readouterr().out
    assert "old rows unchanged" in out and "new rows changed" in out


def test_gpt2_merge_gives_the_plain_hf_model():
    model = gpt2()
    ref = copy.deepcopy(model)
    sm, _ = ps.split(model, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                             "transformer.h.*.attn.c_attn": ps.cols({(0, 16): {"lr": 0.1}})})
    plain = ps.merge(sm)
    assert plain is sm is model  # a split model is the plain model
    assert [type(m) for m in plain.modules()] == [type(m) for m in ref.modules()]
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert_params_equal(ref, plain)
    plain.eval()
    ref.eval()
    ids = _ids()
    assert torch.equal(plain(ids).logits, ref(ids).logits)
