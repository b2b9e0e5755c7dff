"""Gradient bookkeeping: between backward and step the gradient lives in one place, the weight's
``.grad``, whatever tool writes it; every loop below trains bitwise like the unsplit model.

Each test trains a split model (equal options in both regions, so the unsplit model is the
oracle) and a deep copy of the model, unsplit, with the same loop, and compares every parameter
with ``torch.equal`` after every step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paramsplit as ps

#: qkv: three column blocks of one width, which cols copies as one block (a fused projection)
KINDS = ["rows", "cols", "qkv", "mask", "sparse", "decay"]


def spec_of(kind: str) -> dict:
    """Two regions whose options differ in form only: the optimizers' defaults are lr 0.05 and
    weight_decay 0.05 too, so the unsplit model is the oracle. ``decay``: regions that differ in
    weight_decay only, which take the ``decay`` layout (no parts)."""
    opts = {"lr": 0.05}
    if kind == "decay":
        mask = torch.rand(9, 12, generator=torch.Generator().manual_seed(0)) > 0.5
        return {"0": ps.Regions(mask, {True: {"weight_decay": 0.05}, False: {}})}
    if kind == "rows":
        return {"0": ps.rows({(0, 4): opts, (4, None): {}})}
    if kind == "cols":
        return {"0": ps.cols({(0, 5): opts, (5, None): {}})}
    if kind == "qkv":
        return {"0": ps.cols({(0, 4): opts, (4, 8): {}, (8, None): {"weight_decay": 0.05}})}
    mask = torch.rand(9, 12, generator=torch.Generator().manual_seed(0))
    if kind == "mask":
        return {"0": ps.Regions(mask > 0.5, {True: opts, False: {}})}
    # sparse: most elements FROZEN; the oracle freezes them by hand (see pair())
    return {"0": ps.Regions(mask > 0.8, {True: opts, False: ps.FROZEN})}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3))


def pair(kind: str, make_opt=lambda groups: torch.optim.AdamW(groups, lr=0.05, weight_decay=0.05,
                                                         foreach=False)):
    """(split model, its optimizer, unsplit oracle model, its optimizer, a no-op kept for the
    callers' symmetry). For ``sparse`` the oracle's optimizer puts the FROZEN elements back
    after each of its steps (element-wise optimizers: the trained ones are unaffected)."""
    model = make_model()
    ref = copy.deepcopy(model)
    spec = spec_of(kind)
    model, groups = ps.split(model, spec)
    opt = make_opt(groups)
    ref_opt = make_opt(ref.parameters())
    if kind == "sparse":
        frozen = ~spec["0"].mask
        kept: list[torch.Tensor] = []

        def weight() -> torch.Tensor:  # pruning moves it to weight_orig
            params = ref[0]._parameters
            return params["weight_orig"] if "weight_orig" in params else params["weight"]

        ref_opt.register_step_pre_hook(
            lambda *_: kept.__setitem__(slice(None), [weight().detach()[frozen].clone()]))

        def put_back(*_):
            with torch.no_grad():
                weight()[frozen] = kept[0]

        ref_opt.register_step_post_hook(put_back)
    return model, opt, ref, ref_opt, lambda: None


def assert_equal_models(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, xy) -> torch.Tensor:
    x, y = xy
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_grad_after_backward_is_the_unsplit_gradient(kind):
    model, opt, ref, _, _ = pair(kind)
    for xy in batches(2):
        loss_fn(model, xy).backward()
        loss_fn(ref, xy).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name  # FROZEN elements hold the backward's gradient
    split = ps._sync._SPLITS[model[0].weight]
    assert split.label == {"qkv": "cols"}.get(kind, kind)
    assert all(part.grad is None for part in split.parts)  # parts hold gradients only in a step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero", ["optimizer", "model", "optimizer-keep"])
def test_micro_batches_with_one_zero_grad(kind, zero):
    """Several backward passes per step, zeroed through the optimizer alone, or the model alone
    (``optimizer-keep``: ``set_to_none=False``)."""
    model, opt, ref, ref_opt, fix = pair(kind)
    data = batches(9)
    for step in range(3):
        for xy in data[3 * step: 3 * step + 3]:
            (loss_fn(model, xy) / 3).backward()
            (loss_fn(ref, xy) / 3).backward()
        opt.step()
        ref_opt.step()
        fix()
        if zero == "optimizer":
            opt.zero_grad()
            ref_opt.zero_grad()
        elif zero == "model":
            model.zero_grad()
            ref.zero_grad()
        else:
            opt.zero_grad(set_to_none=False)
            ref_opt.zero_grad(set_to_none=False)
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_grad_norm_over_model_parameters_is_bitwise(kind):
    model, opt, ref, ref_opt, fix = pair(kind)
    for xy in batches(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
            if m is model:
                got = norm
        fix()
        assert torch.equal(got, norm)
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_over_the_optimizer_params_is_the_unsplit_norm(kind):
    """Lightning's ``gradient_clip_val`` clips the optimizer's tensors: they hold the weight
    (with its whole gradient) and parts without gradients, so the norm is the unsplit one."""
    model, opt, ref, ref_opt, fix = pair(kind)
    for xy in batches(3):
        norms = []
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            params = [p for g in o.param_groups for p in g["params"]]
            norms.append(torch.nn.utils.clip_grad_norm_(params, 0.05))
            o.step()
        fix()
        assert torch.equal(norms[0], norms[1])
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_unscale_clip_step_and_a_skipped_step(kind, dtype):
    """The AMP recipe: scale, backward, ``unscale_``, ``clip_grad_norm_(model.parameters())``,
    ``scaler.step``, ``update``; the second step overflows and is skipped."""
    model, opt, ref, ref_opt, fix = pair(kind)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) for _ in range(2)]
    for i, xy in enumerate(batches(5)):
        for m, o, scaler in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            with torch.autocast("cpu", dtype=dtype):
                loss = loss_fn(m, xy)
            if i == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        fix()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_equal_models(model, ref)
    assert scalers[0].get_scale() < 2.0 ** 12  # the overflow was seen, and the step skipped


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "rmsprop"])
def test_other_element_wise_optimizers_with_foreach(kind, opt_name):
    make = {"sgd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=0.05,
                                             foreach=True),
            "adam": lambda g: torch.optim.Adam(g, lr=0.05, weight_decay=0.05, foreach=True),
            "rmsprop": lambda g: torch.optim.RMSprop(g, lr=0.05, weight_decay=0.05,
                                                     foreach=True)}[opt_name]
    model, opt, ref, ref_opt, fix = pair(kind, make)
    for xy in batches(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
        fix()
        assert_equal_models(model, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_step_with_a_closure(kind):
    """``optimizer.step(closure)`` (Lightning's automatic optimization): the closure's
    zero_grad and backward run before the parts take their gradients."""
    model, opt, ref, ref_opt, _ = pair(kind)
    for xy in batches(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = loss_fn(m, xy)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                return loss
            o.step(closure)
        assert_equal_models(model, ref)
