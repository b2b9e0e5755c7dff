"""paramsplit on real models and every kind of owner module.

Every check has an oracle that does not go through paramsplit:

* forward / backward: the unsplit model (a deep copy taken before ``split``), compared bitwise;
* optimizer steps: plain ``torch.optim`` on the unsplit model, with one leaf tensor per region
  (the region's elements, gathered with a boolean mask) in a param group with that region's
  options, and the region written back after each step; or, where all options are effectively
  equal, a plain optimizer over the unsplit model's parameters;
* checkpoints: a freshly built, unsplit model loaded with ``strict=True``.

Region part ``i`` (``<attr>__i``) holds the elements of region ``i`` in row-major order, so a
part's gradient goes back into the full tensor with ``full[mask_i] = part_i.grad.reshape(-1)``.
"""

from __future__ import annotations

import copy
import dataclasses
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


def owner_attr(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner, _, attr = target.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def assembled(model: nn.Module, target: str) -> Tensor:
    owner, attr = owner_attr(model, target)
    return getattr(owner, attr)


def parts(model: nn.Module, target: str, n: int) -> list[nn.Parameter]:
    owner, attr = owner_attr(model, target)
    out = [owner._parameters[f"{attr}__{i}"] for i in range(n)]
    assert f"{attr}__{n}" not in owner._parameters
    assert attr not in owner._parameters
    return out


def merged_grad(model, target, masks) -> tuple[Tensor, Tensor]:
    """The parts' gradients, scattered into the full shape, and where any gradient was."""
    ps_ = parts(model, target, len(masks))
    full = torch.zeros(masks[0].shape, dtype=ps_[0].dtype)
    have = torch.zeros(masks[0].shape, dtype=torch.bool)
    for m, p in zip(masks, ps_):
        # a part holds its region's elements (sparse: the FROZEN part is the whole tensor)
        assert p.shape == () or p.numel() == int(m.sum()) or p.shape == m.shape
        if p.grad is not None:
            full[m] = p.grad.reshape(-1)
            have |= m
    return full, have


def split_pair(case: Case, options=None):
    """``(ref, split_model, groups)``; ``ref`` is an independent deep copy of the original."""
    model = case.build()
    ref = copy.deepcopy(model)
    split_model, groups = ps.split(model, case.spec(options))
    return ref, split_model, groups


def other_params_equal(ref, split_model, target):
    got = dict(split_model.named_parameters())
    owner, attr = target.rpartition(".")[0], target.rpartition(".")[2]
    prefix = f"{owner}.{attr}__" if owner else f"{attr}__"
    n = 0
    for name, p in ref.named_parameters():
        if name == target:
            continue
        assert torch.equal(p, got[name]), name
        n += 1
    assert n + len([k for k in got if k.startswith(prefix)]) == len(got)


def oracle_optimizer(ref, case, options, opt_cls, **defaults):
    """A plain optimizer over ``ref`` with one leaf per non-frozen region of the target."""
    p = ref.get_parameter(case.target)
    rest = [q for q in ref.parameters() if q is not p]
    groups = [{"params": rest}] if rest else []
    leaves = []
    for m, opts in zip(case.structure.masks(), options):
        if opts is FROZEN:
            continue
        leaf = p.detach()[m].clone().requires_grad_()
        leaves.append((m, leaf))
        groups.append({"params": [leaf], **opts})
    return opt_cls(groups, **defaults), leaves


def oracle_step(p, opt, leaves):
    """One step of the per-region oracle: leaves take ``p``'s masked gradients, step, write back."""
    for m, leaf in leaves:
        leaf.grad = p.grad[m].clone()
    opt.step()
    with torch.no_grad():
        for m, leaf in leaves:
            p[m] = leaf
    p.grad = None


# ---------------------------------------------------------------------------------------------
# owner-kind tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_forward_bitwise(case):
    ref, sm, _ = split_pair(case)
    assert torch.equal(assembled(sm, case.target), ref.get_parameter(case.target))
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
    assert type(sm.get_submodule(case.target.rpartition(".")[0])).forward is \
        type(ref.get_submodule(case.target.rpartition(".")[0])).forward  # the owner's own forward


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_owner_backward_grads(case):
    ref, sm, groups = split_pair(case)
    ref.train(case.train)
    sm.train(case.train)
    x = case.inputs(torch.Generator().manual_seed(2))
    loss_of(case.call(ref, x)).backward()
    loss_of(case.call(sm, x)).backward()
    masks = case.structure.masks()
    full, have = merged_grad(sm, case.target, masks)
    want = ref.get_parameter(case.target).grad
    trainable = torch.zeros_like(have)
    for m, opts in zip(masks, case.options):
        if opts is not FROZEN:
            trainable |= m
    assert torch.equal(have, trainable)
    assert torch.equal(full[have], want[have])
    for p, opts in zip(parts(sm, case.target, len(masks)), case.options):
        assert p.requires_grad == (opts is not FROZEN)
    got = dict(sm.named_parameters())
    for name, p in ref.named_parameters():
        if name != case.target:
            assert torch.equal(p.grad, got[name].grad), name


def check_adamw_against_oracle(case: Case, steps: int = 3) -> None:
    """``steps`` AdamW steps of the split model equal the per-region oracle's, bitwise."""
    ref, sm, groups = split_pair(case)
    ref.train(case.train)
    sm.train(case.train)
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    oracle, leaves = oracle_optimizer(ref, case, case.options, torch.optim.AdamW, lr=LR,
                                      weight_decay=WD, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = case.inputs(g)
        opt.zero_grad()
        oracle.zero_grad()
        ref.zero_grad()
        loss_of(case.call(ref, x)).backward()
        loss_of(case.call(sm, x)).backward()
        oracle_step(ref.get_parameter(case.target), oracle, leaves)
        opt.step()
        assert torch.equal(assembled(sm, case.target), ref.get_parameter(case.target))
        other_params_equal(ref, sm, case.target)
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
    assert torch.equal(assembled(sm, case.target), ref.get_parameter(case.target))
    other_params_equal(ref, sm, case.target)


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
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        opt.zero_grad()
        loss_of(case.call(sm, case.inputs(g))).backward()
        opt.step()
    after = assembled(sm, case.target).detach()
    for m, opts in zip(case.structure.masks(), case.options):
        if opts is FROZEN:
            assert torch.equal(after[m], before[m])
        elif opts.get("lr", 1) > 0:
            assert not torch.equal(after[m], before[m])
    frozen = [p for p, o in zip(parts(sm, case.target, case.structure.n), case.options) if o is FROZEN]
    in_groups = {id(p) for grp in groups for p in grp["params"]}
    for p in frozen:
        assert p.grad is None and not p.requires_grad and id(p) not in in_groups


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
    assert torch.equal(fresh.get_parameter(case.target), assembled(sm, case.target))
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
    g = torch.cat([torch.zeros(1, 6), sm.weight__1.grad, sm.weight__2.grad])
    gb = sm.bias.grad.clone()
    opt.step()
    lr = torch.tensor([[0.0], [0.05], [0.05], [0.01], [0.01]])
    wd = torch.tensor([[0.0], [0.0], [0.0], [0.5], [0.5]])
    want = w0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(sm.weight.detach(), want, rtol=0, atol=1e-6)
    assert torch.equal(sm.weight[0], w0[0])
    want_b = b0 * (1 - 0.01 * 0.1) - 0.01 * gb / (gb.abs() + 1e-8)
    torch.testing.assert_close(sm.bias.detach(), want_b, rtol=0, atol=1e-6)


def test_weight_decay_tensor_plan_matches_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    wd = torch.full((5, 6), 0.01)
    wd[:, :2] = 0.0
    wd[1] = 0.3
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, {"0": wd})
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, foreach=False)
    values = sorted(wd.unique().tolist())  # part order: ascending weight decay
    masks = [wd == v for v in values]
    p = ref[0].weight
    leaves = [(m, p.detach()[m].clone().requires_grad_()) for m in masks]
    oracle = torch.optim.AdamW(
        [{"params": [q for q in ref.parameters() if q is not p]}]
        + [{"params": [leaf], "weight_decay": v} for (m, leaf), v in zip(leaves, values)],
        lr=LR, weight_decay=WD, foreach=False)
    for step in range(3):
        x = torch.randn(4, 6)
        opt.zero_grad()
        oracle.zero_grad()
        loss_of(ref(x)).backward()
        loss_of(sm(x)).backward()
        oracle_step(p, oracle, leaves)
        opt.step()
        assert torch.equal(sm[0].weight, p)
        assert torch.equal(sm[2].weight, ref[2].weight)


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
    for i in range(2):
        want = ref.layers[i].self_attn.in_proj_weight.grad
        got = sm.layers[i].self_attn
        for j, (a, b) in enumerate(blocks):
            part = got._parameters[f"in_proj_weight__{j}"]
            if j == frozen:
                assert part.grad is None
            else:
                assert torch.equal(part.grad, want[a:b])
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
    assert sum(len(g["params"]) for g in groups) == len(list(sm.parameters())) - 1
    x = torch.randn(5, 8)
    assert torch.equal(ref(x), sm(x))
    loss_of(ref(x)).backward()
    loss_of(sm(x)).backward()
    assert torch.equal(sm.block.weight__1.grad, ref.block.weight.grad[3:])
    assert sm.block.weight__0.grad is None
    assert torch.equal(sm.block.bias.grad, ref.block.bias.grad)
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
    names = [n for n, _ in sm.named_parameters()]
    assert [n for n in names if n.startswith("0.")] == [
        "0.bias", f"{target}__0", f"{target}__1", f"{target}__2"]
    x = torch.randn(4, 6)
    assert torch.equal(sm[0].weight, ref[0].weight)
    assert torch.equal(ref(x), sm(x))
    loss_of(ref(x)).backward()
    loss_of(sm(x)).backward()
    want = ref.get_parameter(target).grad
    owner = sm.get_submodule("0.parametrizations.weight")
    assert owner.original__0.grad is None
    assert torch.equal(owner.original__1.grad, want[2:4])
    assert torch.equal(owner.original__2.grad, want[4:])
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


def test_meta_device_split_then_to_empty_and_load():
    torch.manual_seed(0)
    real = SmallNet()
    with torch.device("meta"):
        meta = SmallNet()
    sm, groups = ps.split(meta, META_SPEC)
    assert all(p.device.type == "meta" for p in sm.parameters())
    sm.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in list(sm.parameters()) + list(sm.buffers()))
    result = ps.load_merged_state_dict(sm, real.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, 30, (3, 6))
    for mode in (True, False):
        real.train(mode)
        sm.train(mode)
        assert torch.equal(real(ids), sm(ids))
    state = ps.merged_state_dict(sm)
    for k, v in real.state_dict().items():
        assert torch.equal(state[k], v), k
    # ``to_empty`` replaces every meta Parameter by a new object (plain PyTorch behaviour), so the
    # groups ``split`` returned hold the old meta tensors; build the groups again.
    assert all(p.device.type == "meta" for g in groups for p in g["params"])
    groups = ps.param_groups(sm)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in sm.parameters() if p.requires_grad}
    assert not sm.emb.weight__0.requires_grad
    sm.train()
    before = sm.emb.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    loss_of(sm(ids)).backward()
    opt.step()
    assert torch.equal(sm.emb.weight[:20], before[:20])
    assert not torch.equal(sm.emb.weight[20:], before[20:])


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


def hf_pair(name):
    build, spec = HF_SPECS[name]
    model = build()
    ref = copy.deepcopy(model)
    sm, groups = ps.split(model, spec)
    return build, ref, sm, groups


@pytest.mark.parametrize("name", list(HF_SPECS))
def test_hf_logits_bitwise_and_step(name):
    build, ref, sm, groups = hf_pair(name)
    split_names = {r.split()[0] for r in ps.describe(sm).splitlines()[1:]}
    assert split_names == HF_EXPECTED_SPLIT[name](ref), ps.describe(sm)
    ids = _ids()
    for mode in (False, True):
        ref.train(mode)
        sm.train(mode)
        assert torch.equal(ref(ids).logits, sm(ids).logits), f"train={mode}"
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, sm(ids).logits), f"no_grad train={mode}"
    # gradients, merged back, equal the unsplit model's; then one step and a strict reload
    loss_ref = ref(ids, labels=ids).loss
    loss_sm = sm(ids, labels=ids).loss
    assert torch.equal(loss_ref, loss_sm)
    loss_ref.backward()
    loss_sm.backward()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))  # tied: every name
    checked = 0
    for prefix, module in sm.named_modules():
        attrs = {n.rpartition("__")[0] for n in module._parameters if "__" in n}
        for attr in sorted(attrs):
            name = f"{prefix}.{attr}" if prefix else attr
            full = ref_params[name]
            got, have = _cat_part_grads(module, attr, full.shape)
            assert have.any()
            assert torch.equal(got[have], full.grad[have]), name
            checked += 1
    assert checked >= 3
    for name, p in sm.named_parameters():
        if "__" not in name:
            assert torch.equal(p.grad, ref_params[name].grad), name
    opt = torch.optim.AdamW(groups, lr=1e-3)
    opt.step()
    fresh = build(seed=1)
    fresh.load_state_dict(ps.merged_state_dict(sm), strict=True)
    fresh.eval()
    sm.eval()
    assert torch.equal(fresh(ids).logits, sm(ids).logits)


def _cat_part_grads(owner, attr, shape):
    """The gradients of a rows/cols split's parts, concatenated; and where any gradient was."""
    parts_ = []
    i = 0
    while f"{attr}__{i}" in owner._parameters:
        parts_.append(owner._parameters[f"{attr}__{i}"])
        i += 1
    assert len(parts_) >= 2
    differ = [d for d in range(len(shape)) if parts_[0].shape[d] != shape[d]]
    assert len(differ) == 1, (parts_[0].shape, shape)
    dim = differ[0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parts_]
    have = [torch.full(p.shape, p.grad is not None) for p in parts_]
    return torch.cat(grads, dim), torch.cat(have, dim)


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
    assert torch.equal(sm.lm_head.weight, sm.transformer.wte.weight)


def test_gpt2_tied_embedding_split_rows():
    model = gpt2()
    ref = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    sm, groups = ps.split(model, {"transformer.wte": ps.rows({(0, 600): FROZEN, (600, 800): {"lr": 0.05}})})
    wte = sm.transformer.wte
    # the tie is kept: lm_head reads the same parts
    assert torch.equal(sm.lm_head.weight, wte.weight)
    assert "weight" not in sm.lm_head._parameters
    for i in range(3):
        assert sm.lm_head._parameters[f"weight__{i}"] is wte._parameters[f"weight__{i}"]
    # each tensor appears once in the groups, and the tied parts once in named_parameters
    all_group_params = [p for g in groups for p in g["params"]]
    assert len(all_group_params) == len({id(p) for p in all_group_params})
    assert {id(p) for p in all_group_params} == {id(p) for p in sm.parameters() if p.requires_grad}
    assert sum(1 for p in all_group_params if p is wte.weight__1 or p is wte.weight__2) == 2
    names = [n for n, _ in sm.named_parameters()]
    assert "transformer.wte.weight__0" in names and not any(n.startswith("lm_head.") for n in names)
    table = ps.describe(sm)
    assert table.count("rows 600:800") == 1, table
    # merged_state_dict keeps the original keys (lm_head.weight too, if the original has it)
    state = ps.merged_state_dict(sm)
    assert set(state) == set(ref.state_dict())
    assert ("lm_head.weight" in state) == ("lm_head.weight" in ref.state_dict())
    # gradients from both uses (embedding and lm_head) reach the parts
    ids = _ids()
    ref.train()
    sm.train()
    ref(ids, labels=ids).loss.backward()
    sm(ids, labels=ids).loss.backward()
    want = ref.transformer.wte.weight.grad
    assert wte.weight__0.grad is None
    assert torch.equal(wte.weight__1.grad, want[600:800])
    assert torch.equal(wte.weight__2.grad, want[800:])
    before = wte.weight.detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1)
    for step in range(3):
        opt.step()
        opt.zero_grad()
        sm(_ids(step + 1), labels=_ids(step + 1)).loss.backward()
    after = wte.weight
    assert torch.equal(after[:600], before[:600])
    assert not torch.equal(after[600:], before[600:])
    assert torch.equal(sm.lm_head.weight, after)  # still tied after training
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
    ref_params = dict(ref.named_parameters())
    for i in range(2):
        want = ref_params[f"transformer.h.{i}.mlp.c_fc.weight"].grad
        c_fc = sm.transformer.h[i].mlp.c_fc
        assert torch.equal(c_fc.weight__0.grad, want[:32])
        assert torch.equal(c_fc.weight__1.grad, want[32:])
        want = ref_params[f"transformer.h.{i}.attn.c_attn.weight"].grad
        ids3 = torch.arange(64 * 192).view(64, 192) % 3
        c_attn = sm.transformer.h[i].attn.c_attn
        assert torch.equal(c_attn.weight__0.grad, want[ids3 == 0])
        assert torch.equal(c_attn.weight__1.grad, want[ids3 == 1])
        assert c_attn.weight__2.grad is None
    want = ref.transformer.wte.weight.grad
    assert torch.equal(sm.transformer.wte.weight__1.grad, want[500:])
    for name, p in sm.named_parameters():
        if "__" not in name:
            assert torch.equal(p.grad, ref_params[name].grad), name


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
    sm, _ = ps.split(model, {"transformer.wte": ps.rows({(0, 500): FROZEN}),
                             "transformer.h.*.attn.c_attn": ps.cols({(0, 16): {"lr": 0.1}})})
    plain = ps.merge(sm)
    assert type(plain) is type(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert plain.lm_head.weight is plain.transformer.wte.weight
    plain.eval()
    model.eval()
    ids = _ids()
    assert torch.equal(plain(ids).logits, model(ids).logits)
