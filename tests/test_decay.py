"""Per-element weight decay without parts: the ``decay`` layout.

A plan whose regions all train and differ only in ``weight_decay`` keeps the weight whole, in one
param group "per-element weight_decay" with ``weight_decay=0``, and the step hooks decay each
element the way the stepping optimizer decays (``paramsplit/_decay.py``: ``pre``, ``coupled``,
``post``). Every check here is against an oracle that knows nothing of paramsplit:

* ``PerElement``: the real optimizer, unsplit, once per distinct weight_decay value. One copy of
  the weight per value ``v``, stepped by a plain optimizer built with ``weight_decay=v``; before
  each step every copy takes the oracle model's weight and its gradient, after it each element is
  taken from the copy of its own value. For an optimizer whose update of an element depends only
  on that element's history and on statistics of the whole gradient or of the weight before the
  step (Muon's orthogonalised momentum, Adafactor's factored moments and parameter RMS: the same
  in every copy), that is exactly the optimizer with a per-element ``weight_decay``;
* hand-written per-element rules (AdamW, SGD with momentum, Lion), in float64.

Bitwise (``torch.equal``) where ``_decay.py`` says bitwise; otherwise ``assert_close`` with the
tolerance stated beside it and why.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import Regions, cols, rows
from paramsplit._sync import _SPLITS

OUT, IN = 8, 37  # odd sizes: vectorised kernels get tails; a 2-D weight (Muon)
A, B = 0.3, 0.02  # the two regions' weight_decay
DEFAULT_WD = 0.05  # the optimizer's own weight_decay: regions with empty options get it


# -- plans and their per-element weight_decay ---------------------------------------------------

def _mask():
    return torch.rand(OUT, IN, generator=torch.Generator().manual_seed(3)) < 0.4


def _plan(kind):
    """(plan for the weight, its weight_decay per element given DEFAULT_WD as float64)."""
    m = _mask()
    wd = torch.full((OUT, IN), B, dtype=torch.float64)
    if kind == "tensor":
        wd[m] = A
        return wd.clone(), wd
    if kind == "regions":
        wd[m] = A
        return Regions(m.long(), {1: {"weight_decay": A}, 0: {"weight_decay": B}}), wd
    if kind == "rows":
        wd[:3] = A
        return rows({(0, 3): {"weight_decay": A}, (3, None): {"weight_decay": B}}), wd
    if kind == "cols":
        wd[:, :5] = A
        return cols({(0, 5): {"weight_decay": A}, (5, None): {"weight_decay": B}}), wd
    if kind == "defaults":  # a region with empty options: the optimizer's own weight_decay
        wd[m] = DEFAULT_WD
        return Regions(m, {True: {}, False: {"weight_decay": B}}), wd
    if kind == "rows-defaults":  # rows no block covers keep the optimizer's defaults
        wd[:] = DEFAULT_WD
        wd[2:5] = A
        return rows({(2, 5): {"weight_decay": A}}), wd
    raise AssertionError(kind)


PLANS = ["tensor", "regions", "rows", "cols", "defaults", "rows-defaults"]


def _models(dtype=torch.float32, seed=0):
    """A model (Linear(IN, OUT) without bias, then tanh) and an unsplit deep copy."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False), nn.Tanh()).to(dtype)
    return model, copy.deepcopy(model)


def _data(dtype=torch.float32, seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g).to(dtype), torch.randn(n, OUT, generator=g).to(dtype)


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _grad_at(ref, p, x, y):
    """The gradient of the loss at weight ``p`` (the hand-written optimizers' input), from the
    unsplit ``ref``."""
    ref[0].weight.data.copy_(p)
    ref.zero_grad()
    _loss(ref, x, y).backward()
    return ref[0].weight.grad


class PerElement:
    """The oracle (see the module docstring): ``make([copy], v)`` once per value ``v`` of ``wd``,
    combined by mask after each step."""

    def __init__(self, weight, wd, make):
        self.weight = weight
        self.values = sorted(set(wd.flatten().tolist()))
        self.masks = [wd == v for v in self.values]
        self.copies = [nn.Parameter(weight.detach().clone()) for _ in self.values]
        self.opts = [make([c], v) for c, v in zip(self.copies, self.values)]

    @torch.no_grad()
    def step(self):
        new = self.weight.detach().clone()
        for c, opt, m in zip(self.copies, self.opts, self.masks):
            c.copy_(self.weight)
            c.grad = self.weight.grad.clone()
            opt.step()
            new = torch.where(m, c, new)
        self.weight.copy_(new)


def _layouts(model):
    """The layouts describe() shows (its last column)."""
    return {line.split()[-1] for line in paramsplit.describe(model).splitlines()[1:]}


def _split(model, kind, **kw):
    plan, wd = _plan(kind)
    _, groups = paramsplit.split(model, {"0": plan}, **kw)
    return groups, wd


def _run(make, kind, *, dtype=torch.float32, steps=3, sched=None, check=None, raw_grad=False):
    """Train a split model with ``make(groups, DEFAULT_WD)`` and the oracle side by side; call
    ``check(split weight, oracle weight)`` after every step (default: bitwise). ``raw_grad``:
    also check ``weight.grad`` after each step is the raw gradient, the same tensor as before."""
    model, ref = _models(dtype)
    groups, wd = _split(model, kind)
    assert _layouts(model) == {"decay"}
    opt = make(groups, DEFAULT_WD)
    oracle = PerElement(ref[0].weight, wd, make)
    scheds = [] if sched is None else [sched(o) for o in [opt, *oracle.opts]]
    x, y = _data(dtype)
    w, v = model[0].weight, ref[0].weight
    for step in range(steps):
        opt.zero_grad()
        ref.zero_grad()
        _loss(model, x, y).backward()
        _loss(ref, x, y).backward()
        if check is None:  # the forward and backward are the model's own
            assert torch.equal(w.grad, v.grad)
        grad, raw = w.grad, w.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no paramsplit warning: nothing is split into parts
            opt.step()
        oracle.step()
        for s in scheds:
            s.step()
        if raw_grad:
            assert w.grad is grad and torch.equal(w.grad, raw), step
        (check or _bitwise)(w.detach(), v.detach(), step)
    assert not torch.equal(w.detach(), _models(dtype)[0][0].weight.detach())  # it trained
    return model, opt


def _bitwise(got, want, step):
    assert torch.equal(got, want), (step, (got - want).abs().max().item())


def _close(rtol, atol):
    def check(got, want, step):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{step}: {m}")
    return check


def _opt(cls, **kw):
    return lambda params, wd: cls(params, weight_decay=wd, **kw)


# -- pre: decoupled decay multiplied in before the step, bitwise ---------------------------------

def _lion(**kw):
    from lion_pytorch import Lion
    return lambda params, wd: Lion(params, lr=1e-3, weight_decay=wd, **kw)


PRE = {
    "AdamW": _opt(torch.optim.AdamW, lr=0.05, foreach=False),
    "AdamW-foreach": _opt(torch.optim.AdamW, lr=0.05, foreach=True),
    "AdamW-maximize": _opt(torch.optim.AdamW, lr=0.05, maximize=True),
    "Adam-decoupled": _opt(torch.optim.Adam, lr=0.05, decoupled_weight_decay=True, foreach=False),
    "Adam-decoupled-foreach": _opt(torch.optim.Adam, lr=0.05, decoupled_weight_decay=True,
                                   foreach=True),
    "NAdam-decoupled": _opt(torch.optim.NAdam, lr=0.05, decoupled_weight_decay=True,
                            foreach=False),
    "NAdam-decoupled-foreach": _opt(torch.optim.NAdam, lr=0.05, decoupled_weight_decay=True,
                                    foreach=True),
    "RAdam-decoupled": _opt(torch.optim.RAdam, lr=0.05, decoupled_weight_decay=True,
                            foreach=False),
    "RAdam-decoupled-foreach": _opt(torch.optim.RAdam, lr=0.05, decoupled_weight_decay=True,
                                    foreach=True),
    "Adam-decoupled-maximize": _opt(torch.optim.Adam, lr=0.05, decoupled_weight_decay=True,
                                    maximize=True),
    "Muon": _opt(torch.optim.Muon, lr=0.05),
    "Lion": _lion(),
}


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("name", list(PRE))
def test_pre_bitwise_like_per_element_optimizer(name, kind):
    _run(PRE[name], kind, raw_grad=True)


@pytest.mark.parametrize("kind", ["tensor", "rows"])
def test_pre_lion_decoupled_weight_decay_option(kind):
    """lion-pytorch's ``decoupled_weight_decay=True`` divides weight_decay by the initial lr
    (``1 - lr * wd / init_lr``); a per-element Lion with that option does the same per element."""
    _run(_lion(decoupled_weight_decay=True), kind)


@pytest.mark.parametrize("kind", ["tensor", "regions", "rows", "cols"])
def test_pre_fused_adamw_close(kind):
    """Fused AdamW applies its decay inside the CPU kernel (which rounds by position: vectorised
    body and tail); the decay layout multiplies first, then runs the fused kernel with
    weight_decay=0, so only "close" is claimed: within a few float32 ulps, rtol 1e-6, atol 1e-7
    (weights are O(0.1); 3 steps). Measured on this CPU: no difference at all."""
    _run(_opt(torch.optim.AdamW, lr=0.05, fused=True), kind, check=_close(1e-6, 1e-7))


def test_pre_hand_written_adamw_float64():
    """An independent oracle: AdamW written out, per element, in float64. The optimizer computes
    the same formula in another order (``lerp_``, ``addcdiv_``): equal to float64 rounding."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    model, ref = _models(torch.float64)
    groups, wd = _split(model, "regions")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=DEFAULT_WD)
    x, y = _data(torch.float64)
    p = ref[0].weight.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 5):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        g = _grad_at(ref, p, x, y)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
        torch.testing.assert_close(model[0].weight.detach(), p, rtol=1e-12, atol=1e-14)


def test_pre_hand_written_lion_float64():
    """Lion written out per element (``p *= 1 - lr * wd``; ``p -= lr * sign(b1 m + (1-b1) g)``;
    ``m = b2 m + (1-b2) g``), float64: equal to rounding."""
    from lion_pytorch import Lion
    lr, b1, b2 = 1e-2, 0.9, 0.99
    model, ref = _models(torch.float64)
    groups, wd = _split(model, "cols")
    opt = Lion(groups, lr=lr, betas=(b1, b2), weight_decay=DEFAULT_WD)
    x, y = _data(torch.float64)
    p = ref[0].weight.detach().clone()
    m = torch.zeros_like(p)
    for _ in range(4):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        g = _grad_at(ref, p, x, y)
        p = p * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(model[0].weight.detach(), p, rtol=1e-12, atol=1e-14)


# -- coupled: the step sees grad + wd * p; weight.grad is left alone ----------------------------

COUPLED = {
    "SGD": lambda **kw: _opt(torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "SGD-nesterov": lambda **kw: _opt(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, **kw),
    "Adam": lambda **kw: _opt(torch.optim.Adam, lr=0.05, **kw),
    "Adamax": lambda **kw: _opt(torch.optim.Adamax, lr=0.05, **kw),
    "Adadelta": lambda **kw: _opt(torch.optim.Adadelta, lr=1.0, **kw),
    "Adagrad": lambda **kw: _opt(torch.optim.Adagrad, lr=0.1, **kw),
    "RMSprop": lambda **kw: _opt(torch.optim.RMSprop, lr=0.01, momentum=0.5, **kw),
    "ASGD": lambda **kw: _opt(torch.optim.ASGD, lr=0.1, t0=1, **kw),
    "NAdam": lambda **kw: _opt(torch.optim.NAdam, lr=0.05, **kw),
    "RAdam": lambda **kw: _opt(torch.optim.RAdam, lr=0.05, **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("name", list(COUPLED))
def test_coupled_bitwise_like_per_element_optimizer(name, kind, foreach, dtype):
    _run(COUPLED[name](foreach=foreach), kind, dtype=dtype, raw_grad=True)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_coupled_fused_close(name):
    """Fused CPU kernels add ``wd * p`` to the gradient inside the kernel; the decay layout adds it
    before and runs the kernel with weight_decay=0. Same formula, but the kernel may round that
    add its own way: rtol 1e-6, atol 1e-7 (a few float32 ulps). Measured on this CPU: equal."""
    _run(COUPLED[name](fused=True), "regions", check=_close(1e-6, 1e-7), raw_grad=True)


def test_coupled_hand_written_sgd_momentum_float64():
    """SGD with momentum written out per element: ``d = g + wd p``; ``buf = mu buf + d``;
    ``p -= lr buf``. float64, equal to rounding; and ``weight.grad`` stays the raw gradient."""
    lr, mu = 0.1, 0.9
    model, ref = _models(torch.float64)
    groups, wd = _split(model, "tensor")
    opt = torch.optim.SGD(groups, lr=lr, momentum=mu, weight_decay=DEFAULT_WD)
    x, y = _data(torch.float64)
    p = ref[0].weight.detach().clone()
    buf = None
    for _ in range(4):
        opt.zero_grad()
        _loss(model, x, y).backward()
        g, raw = _grad_at(ref, p, x, y), model[0].weight.grad.clone()
        opt.step()
        assert torch.equal(model[0].weight.grad, raw)  # the raw gradient, not g + wd p
        d = g + wd * p
        buf = d if buf is None else mu * buf + d
        p = p - lr * buf
        torch.testing.assert_close(model[0].weight.detach(), p, rtol=1e-12, atol=1e-14)


# -- post: Adafactor decays after computing the parameter's statistics --------------------------

def _hf_adafactor(**kw):
    from transformers.optimization import Adafactor
    return lambda params, wd: Adafactor(params, weight_decay=wd, **kw)


POST = {
    "torch-Adafactor": _opt(torch.optim.Adafactor, foreach=False),
    "torch-Adafactor-foreach": _opt(torch.optim.Adafactor, foreach=True),
    "torch-Adafactor-lr": _opt(torch.optim.Adafactor, lr=0.05, foreach=False),
    "hf-Adafactor": _hf_adafactor(),
    "hf-Adafactor-lr": _hf_adafactor(lr=0.05, relative_step=False, scale_parameter=False),
}

#: Adafactor applies ``p * (1 - lr wd)`` and then ``- update``; the decay layout applies the
#: update and then ``- lr wd p_before``: the same terms summed in another order, so float32
#: results differ by the rounding of those adds. Measured over 4 steps, every plan: at most
#: 6e-8 absolute (weights O(0.1), so a few ulps; near-zero elements up to ~700 ulps of
#: themselves), while the decay terms are 1e-5..3e-4: a wrong decay value or lr fails.
POST_TOL = dict(rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("name", list(POST))
def test_post_close_to_per_element_optimizer(name, kind):
    _run(POST[name], kind, steps=4, check=_close(**POST_TOL), raw_grad=True)


# -- LR schedulers: the decay uses the group's current lr ----------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 3 * s)),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["AdamW", "Muon", "Lion", "SGD", "torch-Adafactor-lr",
                                  "hf-Adafactor-lr"])
def test_lr_scheduler_decays_with_current_lr(name, sched):
    make = {**PRE, **POST, "SGD": COUPLED["SGD"]()}[name]
    check = _close(**POST_TOL) if name in POST else None
    model, opt = _run(make, "regions", steps=4, sched=SCHEDULERS[sched], check=check)
    assert opt.param_groups[0]["lr"] != opt.defaults["lr"]  # the schedule did change the lr


def test_lr_scheduler_decay_is_not_the_initial_lr():
    """The oracle check above would also pass if the decay used a fixed lr only where the
    schedule leaves it; here the two differ at once: a zero gradient, AdamW, StepLR halving the lr
    every step, so each step multiplies by ``1 - lr_t * wd`` with ``lr_t = lr / 2**t``."""
    model, _ = _models()
    groups, wd = _split(model, "rows")
    lr = 0.5
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=DEFAULT_WD)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w = model[0].weight
    want = w.detach().clone()
    for t in range(4):
        opt.zero_grad()
        (0 * model(torch.ones(1, IN))).sum().backward()
        opt.step()
        sched.step()
        want = want * (1 - (lr / 2 ** t) * wd).float()
        torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=0)  # float32 products


# -- what split made: no parts, one group ---------------------------------------------------------

@pytest.mark.parametrize("kind", PLANS)
def test_no_parts_one_group_layout_decay(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh())
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan, _ = _plan(kind)
    out, groups = paramsplit.split(model, {"0": plan})
    assert out is model and dict(model.named_parameters()) == params
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    w = model[0].weight
    assert _SPLITS[w].parts == []
    lines = paramsplit.describe(model).splitlines()
    assert lines[0].split() == ["parameter", "region", "elements", "options", "layout"]
    assert len(lines) >= 3 and all(line.split()[-1] == "decay" for line in lines[1:]), lines
    held = [p for g in groups for p in g["params"]]
    assert len(held) == 2 and {id(p) for p in held} == {id(w), id(model[0].bias)}
    (decay,) = [g for g in groups if any(p is w for p in g["params"])]
    assert decay["name"] == "per-element weight_decay" and decay["weight_decay"] == 0
    assert decay["params"] == [w]
    (default,) = [g for g in groups if g is not decay]
    assert default["name"] == "default" and "weight_decay" not in default
    assert default["params"] == [model[0].bias]
    assert [[p is q for p, q in zip(g["params"], h["params"])] for g, h in
            zip(groups, paramsplit.param_groups(model))] == [[True], [True]]


def test_per_element_decay_false_gives_parts():
    model, ref = _models()
    groups, wd = _split(model, "regions", per_element_decay=False)
    assert len(_SPLITS[model[0].weight].parts) == 2
    assert _layouts(model) == {"mask"}
    make = PRE["AdamW"]
    opt, oracle = make(groups, DEFAULT_WD), PerElement(ref[0].weight, wd, make)
    x, y = _data()
    for _ in range(3):
        for m, o in ((model, opt), (ref, None)):
            m.zero_grad()
            _loss(m, x, y).backward()
        opt.step()
        oracle.step()
        assert torch.equal(model[0].weight, ref[0].weight)


def test_frozen_or_other_options_are_not_decay():
    """Only plans whose regions all train and differ only in weight_decay take the decay layout."""
    model, _ = _models()
    frozen = rows({(0, 3): paramsplit.FROZEN, (3, None): {"weight_decay": A}})
    paramsplit.split(model, {"0": frozen})
    assert _SPLITS[model[0].weight].parts and _layouts(model) == {"rows"}
    paramsplit.split(model, {"0": rows({(0, 3): {"lr": 0.1, "weight_decay": A}})})
    assert _SPLITS[model[0].weight].parts and _layouts(model) == {"rows"}


# -- optimizers paramsplit does not know: a clear error at the first step ------------------------

class TinySGD(torch.optim.Optimizer):
    """A user's own optimizer with (coupled) weight_decay: paramsplit cannot know how it decays."""

    def __init__(self, params, lr=0.1, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.add(p, alpha=group["weight_decay"]), alpha=-group["lr"])


UNKNOWN = {
    "Rprop": lambda params, wd: torch.optim.Rprop(params, lr=0.01),  # has no weight_decay at all
    "TinySGD": lambda params, wd: TinySGD(params, lr=0.1, weight_decay=wd),
    "SGD-maximize": _opt(torch.optim.SGD, lr=0.1, maximize=True),
    "Adam-maximize": _opt(torch.optim.Adam, lr=0.05, maximize=True),
    "RMSprop-maximize": _opt(torch.optim.RMSprop, lr=0.01, maximize=True),
}


@pytest.mark.parametrize("name", list(UNKNOWN))
def test_unknown_decay_raises_at_first_step(name):
    model, _ = _models()
    groups, _ = _split(model, "regions")
    opt = UNKNOWN[name](groups, DEFAULT_WD)  # building it is fine
    x, y = _data()
    _loss(model, x, y).backward()
    w = model[0].weight
    before, grad = w.detach().clone(), w.grad.clone()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    msg = str(info.value)
    assert "'0.weight'" in msg and "per_element_decay=False" in msg, msg
    assert type(opt).__name__ in msg, msg
    assert ("maximize=True" in msg) == name.endswith("maximize"), msg
    assert torch.equal(w, before) and torch.equal(w.grad, grad)  # nothing was stepped
    with pytest.raises(RuntimeError, match="per_element_decay=False"):
        opt.step()  # and every step after


@pytest.mark.parametrize("name", ["Rprop", "TinySGD", "SGD-maximize"])
def test_unknown_decay_with_parts_trains_per_element(name):
    """The remedy the error names: ``per_element_decay=False`` gives the regions parts, each in a
    group with its own weight_decay, which any optimizer steps elementwise."""
    model, ref = _models()
    groups, wd = _split(model, "regions", per_element_decay=False)
    make = UNKNOWN[name]
    opt, oracle = make(groups, DEFAULT_WD), PerElement(ref[0].weight, wd, make)
    x, y = _data()
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad()
            _loss(m, x, y).backward()
        opt.step()
        oracle.step()
        assert torch.equal(model[0].weight, ref[0].weight)


# -- an optimizer not built from paramsplit's groups ---------------------------------------------

@pytest.mark.parametrize("name,wd", [("AdamW", 0.01), ("SGD", 0.0)])
def test_optimizer_from_model_parameters_warns_and_decays_as_a_whole(name, wd):
    """Built from ``model.parameters()``, the optimizer steps the weight as a whole with its own
    weight_decay (README: "Optimizers not built from the groups ... would step a split weight as a
    whole and ignore its regions: the first step() warns, naming it"), whatever that
    weight_decay is (SGD's default is 0, as is Trainer's)."""
    cls = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[name]
    model, ref = _models()
    _split(model, "regions")
    opt = cls(model.parameters(), lr=0.05, weight_decay=wd)
    ref_opt = cls(ref.parameters(), lr=0.05, weight_decay=wd)
    x, y = _data()
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
        if step == 0:
            with pytest.warns(UserWarning, match=r"'0\.weight'.*not built from paramsplit's"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once
                opt.step()
        ref_opt.step()
        assert torch.equal(model[0].weight, ref[0].weight), step  # no per-element decay at all


@pytest.mark.parametrize("name", ["AdamW", "SGD", "torch-Adafactor-lr"])
def test_no_gradient_no_decay(name):
    """A weight without a gradient at a step is skipped by the optimizer, decay included; so is it
    by the decay layout (here: a weight the forward did not use)."""
    make = {"AdamW": PRE["AdamW"], "SGD": COUPLED["SGD"](), **POST}[name]
    net, ref = _models()
    model = nn.Module()
    model.net, model.unused = net, nn.Linear(IN, OUT, bias=False)
    _, groups = paramsplit.split(model, {"net.0": _plan("rows")[0], "unused": _plan("cols")[0]})
    extra = model.unused.weight
    assert _SPLITS[extra].parts == [] and _layouts(model) == {"decay"}
    opt = make(groups, DEFAULT_WD)
    before = extra.detach().clone()
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()
    assert extra.grad is None and torch.equal(extra, before)
    assert not torch.equal(net[0].weight, ref[0].weight)  # the other weight did train


# -- GradScaler, micro-batches, checkpoints -------------------------------------------------------

@pytest.mark.parametrize("name", ["AdamW", "SGD", "torch-Adafactor-lr"])
def test_grad_scaler_skipped_step_applies_no_decay(name):
    make = {"AdamW": PRE["AdamW"], "SGD": COUPLED["SGD"](), **POST}[name]
    model, ref = _models()
    groups, wd = _split(model, "tensor")
    opt, oracle = make(groups, DEFAULT_WD), PerElement(ref[0].weight, wd, make)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = _data()
    w = model[0].weight
    check = _close(**POST_TOL) if name in POST else _bitwise
    for step in range(4):
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        skip = step in (0, 2)
        if skip:
            w.grad[1, 2] = float("inf")
        before = w.detach().clone()
        scaler.step(opt)
        scaler.update()
        if skip:
            assert torch.equal(w, before)  # neither the update nor the decay
            continue
        ref.zero_grad()
        _loss(ref, x, y).backward()  # unscaled; a power-of-two scale is exact
        oracle.step()
        check(w.detach(), ref[0].weight.detach(), step)
    assert scaler.get_scale() == 2.0 ** 6  # halved at each skipped step


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adagrad", "torch-Adafactor-lr"])
def test_micro_batches_one_decay_per_step(name):
    """Two micro-batches accumulate in ``weight.grad``; only ``optimizer.zero_grad()`` clears it;
    each optimizer step decays once."""
    make = {"AdamW": PRE["AdamW"], "SGD": COUPLED["SGD"](), "Adagrad": COUPLED["Adagrad"](),
            **POST}[name]
    model, ref = _models()
    groups, wd = _split(model, "cols")
    opt, oracle = make(groups, DEFAULT_WD), PerElement(ref[0].weight, wd, make)
    x, y = _data(n=32)
    check = _close(**POST_TOL) if name in POST else _bitwise
    for step in range(3):
        opt.zero_grad()
        assert model[0].weight.grad is None
        ref.zero_grad()
        for m in (model, ref):
            for sl in (slice(0, 16), slice(16, 32)):
                _loss(m, x[sl], y[sl]).backward()
        if check is _bitwise:
            assert torch.equal(model[0].weight.grad, ref[0].weight.grad)
        opt.step()
        oracle.step()
        check(model[0].weight.detach(), ref[0].weight.detach(), step)


@pytest.mark.parametrize("name", ["AdamW", "Muon", "SGD", "Adagrad", "torch-Adafactor",
                                  "hf-Adafactor"])
def test_checkpoint_resume_bitwise(name):
    """Train 4 steps, or 2 steps, save (model and optimizer state dicts), build everything anew
    in a fresh model, load, 2 more: bitwise the same."""
    make = {**PRE, **POST, "SGD": COUPLED["SGD"](), "Adagrad": COUPLED["Adagrad"]()}[name]
    x, y = _data()

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()

    straight, _ = _models()
    groups, _ = _split(straight, "rows")
    steps(straight, make(groups, DEFAULT_WD), 4)

    first, _ = _models()
    groups, _ = _split(first, "rows")
    opt = make(groups, DEFAULT_WD)
    steps(first, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert [g["weight_decay"] for g in saved["opt"]["param_groups"]] == [0.0]

    resumed, _ = _models(seed=7)  # other initial values: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    groups, _ = _split(resumed, "rows")
    opt = make(groups, DEFAULT_WD)
    opt.load_state_dict(saved["opt"])
    steps(resumed, opt, 2)
    assert torch.equal(resumed[0].weight, straight[0].weight)


# -- per-tensor optimizers keep their math: equal decay in every region --------------------------

EQUAL = {
    "regions": lambda: Regions(_mask(), {True: {"weight_decay": DEFAULT_WD}, False: {}}),
    "rows": lambda: rows({(0, 3): {"weight_decay": DEFAULT_WD},
                          (3, None): {"weight_decay": DEFAULT_WD}}),
}


@pytest.mark.parametrize("plan", list(EQUAL))
@pytest.mark.parametrize("name", ["AdamW", "AdamW-foreach", "Muon", "Lion", "SGD",
                                  "torch-Adafactor", "torch-Adafactor-foreach", "hf-Adafactor",
                                  "hf-Adafactor-lr"])
def test_equal_decay_trains_like_unsplit(name, plan):
    """A decay split whose regions all get the optimizer's own weight_decay trains like the
    unsplit optimizer with that weight_decay: bitwise for pre (the same multiply) and coupled
    (the same add); Adafactor (post) to POST_TOL only, as its decay is applied after the update.
    Muon and Adafactor see the whole tensor, so their per-tensor statistics are exact. Regions
    that all name one weight_decay ("rows") are no split at all: the weight is one tensor of
    one group with that weight_decay (layout "whole"), stepped by the optimizer alone, bitwise
    (and with any optimizer, known to paramsplit or not)."""
    make = {**PRE, **POST, "SGD": COUPLED["SGD"]()}[name]
    model, ref = _models()
    paramsplit.split(model, {"0": EQUAL[plan]()})
    assert _layouts(model) == {"whole" if plan == "rows" else "decay"}
    assert _SPLITS[model[0].weight].parts == []
    opt = make(paramsplit.param_groups(model), DEFAULT_WD)
    ref_opt = make(ref.parameters(), DEFAULT_WD)
    x, y = _data()
    check = _close(**POST_TOL) if name in POST and plan != "rows" else _bitwise
    for step in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
        check(model[0].weight.detach(), ref[0].weight.detach(), step)
