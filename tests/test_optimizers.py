"""Which optimizers train a split weight exactly as the unsplit one, with the real optimizers.

A weight split into two regions with EQUAL options (a ``rows`` split, whose parts are views of
the weight, and a ``mask`` split, whose parts are 1-D gathered copies) trains for a few steps;
the oracle is a copy of the model trained unsplit by the same optimizer.

* Element-wise optimizers (each element's update depends only on that element's gradient and
  state, and on the group's options): bitwise equal to the unsplit run, in their CPU default
  (for-loop) and, for torch's, with ``foreach=True``.
* Per-tensor optimizers (factored second moments, orthogonalised updates, trust ratios, 8-bit
  block quantisation): each part is its own tensor, so they differ from the unsplit run; the
  test records by how much and checks that the split run is bitwise the run of the same
  optimizer on the parts as separate tensors (the ``per-part`` oracle), so the difference is
  the optimizer's own math and nothing else.

``test_zz_table`` prints the table of what was measured (optimizer, rows exact?, mask exact?,
max difference from the unsplit run, note); run with ``-s`` or see the captured output.
LBFGS and schedule-free's ``eval()`` have tests of their own below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import paramsplit
from paramsplit import FROZEN, Regions, rows

D = 128  # 128x128 weight: rows halves and mask regions are >= 4096 elements (8-bit optimizers
         # quantise only tensors that large)
STEPS = 3
LAYOUTS = ("rows", "mask")


@dataclass
class Case:
    name: str
    make: Callable[..., torch.optim.Optimizer]
    #: per layout: "exact" (bitwise vs unsplit), "rounding" (equal up to the order of sums
    #: over all tensors), "differs" (per-part oracle bitwise, not the unsplit run) or "error"
    #: (the optimizer refuses the parts at construction)
    expect: dict[str, str]
    note: str = ""
    module: str | None = None  # a package to import first (skipped only if not installed)
    bias: bool = True
    schedule_free: bool = False
    #: (optimizer, parts) -> what the optimizer keeps for each part, for the table
    inspect: Callable[..., str] | None = None

    @property
    def per_tensor(self) -> bool:
        """Computes statistics of each whole tensor: paramsplit warns when it steps parts."""
        return "differs" in self.expect.values() or "8bit" in self.name


def _torch(name, note="", **kw):
    cls = getattr(torch.optim, name)
    return Case(name, lambda p, kw=kw, **more: cls(p, **kw, **more),
                {"rows": "exact", "mask": "exact"}, note)


ELEMENTWISE = [
    _torch("SGD", lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    _torch("Adam", lr=1e-2, weight_decay=0.01, amsgrad=True),
    _torch("AdamW", lr=1e-2, weight_decay=0.1),
    _torch("RAdam", lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    _torch("NAdam", lr=1e-2, weight_decay=0.01),
    _torch("Adamax", lr=1e-2, weight_decay=0.01),
    _torch("Adadelta", lr=1.0, weight_decay=0.01),
    _torch("Adagrad", lr=1e-2, weight_decay=0.01),
    _torch("RMSprop", lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
    _torch("ASGD", lr=1e-2, t0=1, weight_decay=0.01),
    _torch("Rprop", lr=1e-2),
]
FOREACH = [Case(f"{c.name}(foreach)", (lambda p, c=c: c.make(p, foreach=True)), c.expect)
           for c in ELEMENTWISE]
OTHERS = [
    Case("Lion(lion-pytorch)",
         lambda p: __import__("lion_pytorch").Lion(p, lr=1e-3, weight_decay=0.1),
         {"rows": "exact", "mask": "exact"}, module="lion_pytorch"),
    Case("AdamWScheduleFree(schedulefree)",
         lambda p: __import__("schedulefree").AdamWScheduleFree(p, lr=1e-2, weight_decay=0.1),
         {"rows": "exact", "mask": "exact"},
         "training steps exact; see test_schedule_free_eval_reaches_the_model",
         module="schedulefree", schedule_free=True),
    Case("Adafactor(torch)", lambda p: torch.optim.Adafactor(p, lr=1e-2),
         {"rows": "differs", "mask": "differs"},
         "factored 2nd moment per part (a mask part: one row)"),
    Case("Muon(torch)", lambda p: torch.optim.Muon(p, lr=1e-2),
         {"rows": "differs", "mask": "differs"},
         "each part orthogonalised alone (a mask part as a 1 x n matrix)",
         bias=False),
    Case("Adafactor(transformers)",
         lambda p: __import__("transformers").optimization.Adafactor(p),
         {"rows": "differs", "mask": "differs"},
         "factored 2nd moment and RMS scale per part (a mask part: one row)",
         module="transformers"),
    Case("Lamb(pytorch-optimizer)", lambda p: __import__("pytorch_optimizer").Lamb(p, lr=1e-2),
         {"rows": "differs", "mask": "differs"}, "trust ratio per part",
         module="pytorch_optimizer"),
    Case("LARS(pytorch-optimizer)", lambda p: __import__("pytorch_optimizer").LARS(p, lr=1e-2),
         {"rows": "differs", "mask": "differs"}, "trust ratio per part",
         module="pytorch_optimizer"),
    *[Case(f"{name}(pytorch-optimizer)",
           lambda p, name=name, kw=kw: getattr(__import__("pytorch_optimizer"), name)(p, **kw),
           {"rows": "exact", "mask": "exact"}, note, module="pytorch_optimizer")
      for name, kw, note in [
          ("Adan", {"lr": 1e-2, "weight_decay": 0.01}, ""),
          ("AdaBelief", {"lr": 1e-2, "weight_decay": 0.01}, ""),
          ("Lion", {"lr": 1e-3, "weight_decay": 0.1}, ""),
          ("Tiger", {"lr": 1e-3}, ""),
          ("Prodigy", {"lr": 1.0}, "step size from sums over all tensors"),
          ]],
    Case("DAdaptAdam(pytorch-optimizer)",
         lambda p: __import__("pytorch_optimizer").DAdaptAdam(p, lr=1.0),
         {"rows": "rounding", "mask": "rounding"},
         "step size from sums over all tensors, in another order", module="pytorch_optimizer"),
    *[Case(f"{name}(bitsandbytes)",
           lambda p, name=name: getattr(__import__("bitsandbytes").optim, name)(p, lr=1e-3),
           {"rows": "exact", "mask": "exact"}, "32-bit state", module="bitsandbytes")
      for name in ("AdamW32bit", "Lion32bit")],
    Case("AdamW8bit(bitsandbytes)",
         lambda p: __import__("bitsandbytes").optim.AdamW8bit(p, lr=1e-2),
         {"rows": "exact", "mask": "differs"},
         "256-element quantisation blocks: rows 0:64 end on a block edge (exact); mask parts "
         "are quantised apart", module="bitsandbytes",
         inspect=lambda opt, parts: "part state: " + ", ".join(
             str(opt.state[p]["state1"].dtype).replace("torch.", "") for p in parts)),
    Case("AdamW8bit(torchao)",
         lambda p: __import__("torchao.optim").optim.AdamW8bit(p, lr=1e-2),
         {"rows": "exact", "mask": "differs"},
         "rows: 256-blocks align (exact); mask parts not a multiple of 256 elements keep fp32 "
         "state", module="torchao",
         inspect=lambda opt, parts: "part state: " + ", ".join(
             f"{type(opt.state[p]['exp_avg']).__name__} of {p.numel()}" for p in parts)),
]
CASES = ELEMENTWISE + FOREACH + OTHERS

#: name -> {"note": the case's note, layout: (result, max |split - unsplit|, detail)}, filled by
#: the tests, printed last
RESULTS: dict[str, dict] = {}


def _model(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D, bias=bias), nn.Tanh(), nn.Linear(D, 8, bias=bias))


def _mask():
    return torch.randint(0, 2, (D, D), generator=torch.Generator().manual_seed(1))


def _spec(layout):
    """Two regions with equal options (a group name apart: the optimizer ignores it), so that
    both layouts make two parts."""
    a, b = {"name": "region a"}, {"name": "region b"}
    if layout == "rows":
        return {"0": rows({(0, D // 2): a, (D // 2, None): b})}
    return {"0": Regions(_mask(), {0: a, 1: b})}


class _PerPart(nn.Module):
    """The per-part oracle: ``0.weight`` assembled from two separate parameters, shaped like
    paramsplit's parts (rows: two row blocks; mask: two 1-D tensors of each region's elements
    in flat order), so the optimizer sees the same tensors paramsplit gives it."""

    def __init__(self, linear: nn.Linear, layout: str):
        super().__init__()
        w = linear.weight.detach()
        self.layout = layout
        if layout == "rows":
            self.a = nn.Parameter(w[: D // 2].clone())
            self.b = nn.Parameter(w[D // 2:].clone())
        else:
            flat = _mask().reshape(-1)
            self.register_buffer("ia", (flat == 0).nonzero().flatten())
            self.register_buffer("ib", (flat == 1).nonzero().flatten())
            # a mask part has its weight's ndim: 1 x n
            self.a = nn.Parameter(w.reshape(-1)[self.ia].clone().view(1, -1))
            self.b = nn.Parameter(w.reshape(-1)[self.ib].clone().view(1, -1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def weight(self):
        if self.layout == "rows":
            return torch.cat([self.a, self.b])
        w = self.a.new_empty(D * D).index_copy(0, self.ia, self.a.view(-1)).index_copy(
            0, self.ib, self.b.view(-1))
        return w.view(D, D)

    def forward(self, x):
        return nn.functional.linear(x, self.weight(), self.bias)


def _train(model, opt, case, steps=STEPS):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(16, D, generator=g)
        if case.schedule_free:
            opt.train()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _weights(model):
    """The model's parameters as the unsplit model has them."""
    if isinstance(model[0], _PerPart):
        first = [model[0].weight().detach()] + ([model[0].bias] if model[0].bias is not None
                                                else [])
        return first + list(model[2].parameters())
    return list(model.parameters())


def _max_diff(a, b):
    return max((p.detach() - q.detach()).abs().max().item() for p, q in zip(a, b))


def _record(case, layout, result, diff, detail=""):
    """``detail``: what this layout showed (an error, the optimizer's state per part)."""
    RESULTS.setdefault(case.name, {"note": case.note})[layout] = (result, diff, detail)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_equal_options_against_the_unsplit_run(case, layout):
    if case.module:
        pytest.importorskip(case.module)
    model, unsplit = _model(case.bias), _model(case.bias)
    _, groups = paramsplit.split(model, _spec(layout))
    assert len(paramsplit._sync._SPLITS[model[0].weight].parts) == 2
    expect = case.expect[layout]
    if case.schedule_free and layout != "rows":  # eval()/train() would not reach copies
        opt = case.make(groups)
        with pytest.raises(RuntimeError, match=r"paramsplit: AdamWScheduleFree moves its "
                                               r"tensors .* outside a step"):
            _train(model, opt, case)
        _record(case, layout, "refused", None, "RuntimeError at the first step: eval()/train() "
                                               "move tensors outside a step; mask parts are copies")
        return
    if expect == "error":
        with pytest.raises(ValueError) as info:
            case.make(groups)
        _record(case, layout, "error", None, f"{type(info.value).__name__} at construction: "
                                             f"{str(info.value)[:60]}")
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            # the optimizers' own deprecation notices; paramsplit's warnings still show
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            opt = case.make(groups)
            _train(model, opt, case)
            _train(unsplit, case.make(unsplit.parameters()), case)
    except Exception as exc:
        _record(case, layout, "FAILS", None, f"{type(exc).__name__}: {str(exc)[:90]}")
        raise
    diff = _max_diff(model.parameters(), unsplit.parameters())
    exact = all(torch.equal(p, q) for p, q in zip(model.parameters(), unsplit.parameters()))
    parts = paramsplit._sync._SPLITS[model[0].weight].parts
    _record(case, layout, "exact" if exact else "differs", diff,
            case.inspect(opt, parts) if case.inspect else "")
    # paramsplit warns exactly for the optimizers whose split math may differ
    warned = any("statistics of each whole tensor" in str(w.message) for w in caught)
    assert warned == case.per_tensor, f"{case.name}: paramsplit warned: {warned}"
    if expect == "rounding":
        for p, q in zip(model.parameters(), unsplit.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
        return
    if expect == "exact":
        assert exact, f"{case.name} {layout}: max difference {diff:.3g} from the unsplit run"
        return
    assert not exact and diff > 0, f"{case.name} {layout}: expected per-part statistics"
    # the difference is the optimizer's per-tensor math: the parts as separate tensors agree
    per_part = _model(case.bias)
    per_part[0] = _PerPart(per_part[0], layout)
    oracle_groups = [{"params": [per_part[0].a], "name": "region a"},
                     {"params": [per_part[0].b], "name": "region b"},
                     {"params": [p for p in per_part.parameters()
                                 if p is not per_part[0].a and p is not per_part[0].b]}]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        _train(per_part, case.make(oracle_groups), case)
    for p, q in zip(model.parameters(), _weights(per_part)):
        assert torch.equal(p, q), (f"{case.name} {layout}: the split run is not the run on the "
                                   f"parts as separate tensors (max difference "
                                   f"{(p - q).abs().max().item():.3g})")


# -- LBFGS -----------------------------------------------------------------------------------

def _lbfgs_run(model, opt, steps=3):
    """Train with a closure; returns how often the optimizer called it."""
    g = torch.Generator().manual_seed(2)
    calls = [0]
    for _ in range(steps):
        x = torch.randn(16, D, generator=g)

        def closure():
            calls[0] += 1
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss
        opt.step(closure)
    return calls[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lbfgs_refuses_per_group_options(layout):
    """LBFGS takes one param group; regions with their own options are groups of their own."""
    model = _model()
    _, groups = paramsplit.split(model, _spec(layout))
    with pytest.raises(ValueError, match="LBFGS doesn't support per-parameter options") as info:
        torch.optim.LBFGS(groups)
    RESULTS.setdefault("LBFGS", {"note": "one group (FROZEN + defaults): see test_lbfgs_one_"
                                         "group_is_lbfgs_over_the_trained_elements"})[layout] = (
        "error", None, f"ValueError at construction: {str(info.value)[:60]}")


LBFGS_OPTIONS = {"max_iter=1": {"max_iter": 1}, "default(max_iter=20)": {},
                 "strong_wolfe": {"line_search_fn": "strong_wolfe"}}


@pytest.mark.parametrize("options", list(LBFGS_OPTIONS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lbfgs_one_group_is_lbfgs_over_the_trained_elements(layout, options):
    """With FROZEN regions and default options everywhere else, the groups are one, and LBFGS
    accepts them. LBFGS calls its closure several times per step (``max_iter``, line search),
    each time for the loss and gradient at the parameters it just moved to. Oracle: LBFGS on
    the unsplit model whose FROZEN elements get a zero gradient (a tensor hook): their search
    direction is then zero, so it is LBFGS over the trained elements alone. Same closure calls,
    same weights (up to the order of LBFGS's dot products over its flattened gradient)."""
    kw = LBFGS_OPTIONS[options]
    model, ref = _model(), _model()
    plan = (rows({(0, D // 2): FROZEN}) if layout == "rows"
            else Regions(_mask(), {0: FROZEN, 1: {}}))
    _, groups = paramsplit.split(model, {"0": plan})
    assert len(groups) == 1
    frozen = (torch.arange(D * D).reshape(D, D) < D * D // 2) if layout == "rows" else _mask() == 0
    ref[0].weight.register_hook(lambda grad: grad.masked_fill(frozen, 0))
    before = model[0].weight.detach().clone()
    try:
        calls = _lbfgs_run(model, torch.optim.LBFGS(groups, lr=0.5, **kw))
    except RuntimeError as exc:  # refusing, naming paramsplit, is fine too
        assert "paramsplit" in str(exc)
        return
    ref_calls = _lbfgs_run(ref, torch.optim.LBFGS(ref.parameters(), lr=0.5, **kw))
    moved = (model[0].weight.detach() != before)[frozen]
    assert not moved.any(), f"LBFGS moved {int(moved.sum())} FROZEN elements of 0.weight"
    diff = _max_diff(model.parameters(), ref.parameters())
    assert calls == ref_calls, (f"LBFGS({options}) called the closure {calls} times on the split "
                                f"model, {ref_calls} times on the oracle (max difference "
                                f"{diff:.3g})")
    # LBFGS sums dot products over its flattened gradient, whose order differs (parts instead
    # of the whole weight); its curvature pairs amplify that rounding over ~20 evaluations
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


# -- schedule-free: eval() / train() move the parameters outside a step ----------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_schedule_free_eval_reaches_the_model(layout):
    """schedulefree's ``opt.eval()`` swaps each parameter to its averaged value (and
    ``opt.train()`` back) outside ``step``: the model must evaluate with the averaged
    weights, as the unsplit model does."""
    schedulefree = pytest.importorskip("schedulefree")
    model, unsplit = _model(), _model()
    _, groups = paramsplit.split(model, _spec(layout))
    case = Case("sf", None, {}, schedule_free=True)
    opt = schedulefree.AdamWScheduleFree(groups, lr=1e-2)
    ref_opt = schedulefree.AdamWScheduleFree(unsplit.parameters(), lr=1e-2)
    if layout != "rows":  # parts that are copies: refused loudly at the first step
        with pytest.raises(RuntimeError, match="outside a step, and the parts of '0.weight'"):
            _train(model, opt, case)
        return
    _train(model, opt, case)
    _train(unsplit, ref_opt, case)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), unsplit.parameters()))
    opt.eval()
    ref_opt.eval()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    diff = _max_diff(model.parameters(), unsplit.parameters())
    assert torch.equal(model[0].weight, unsplit[0].weight), (
        f"after opt.eval(), 0.weight ({layout}) is {diff:.3g} away from the unsplit model's "
        f"averaged weight")
    assert torch.equal(model(x), unsplit(x))


def test_schedule_free_refuses_rows_of_a_weight_that_is_not_contiguous():
    """rows parts of a channels_last convolution's weight are copies, like cols parts: the
    moves of ``eval()`` / ``train()`` would not reach them, so it is refused as they are."""
    schedulefree = pytest.importorskip("schedulefree")
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 25, 2))
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    _, groups = paramsplit.split(model, {"0": rows({(0, 2): {"lr": 1e-2}, (2, None): {}})},
                                 per_element_decay=False)
    opt = schedulefree.AdamWScheduleFree(groups, lr=1e-2)
    opt.train()
    model(torch.randn(2, 4, 7, 7)).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"the parts of '0.weight' are copies .*not contiguous"):
        opt.step()


# -- the table -------------------------------------------------------------------------------

def test_zz_table(capsys):
    """Print what the tests above measured (run last: the file's order)."""
    if not RESULTS:
        pytest.skip("no optimizer test ran")
    head = ("optimizer", "rows exact?", "mask exact?", "max diff (rows / mask)", "note")
    lines = [head]
    for name, by_layout in RESULTS.items():
        cells = []
        for layout in LAYOUTS:
            result = by_layout.get(layout, ("-", None, ""))[0]
            cells.append({"exact": "yes", "differs": "no"}.get(result, result))
        diffs = " / ".join("-" if by_layout.get(layout, (0, None))[1] is None
                           else f"{by_layout[layout][1]:.2g}" for layout in LAYOUTS)
        details = [f"{layout}: {by_layout[layout][2]}" for layout in LAYOUTS
                   if by_layout.get(layout, (0, 0, ""))[2]]
        lines.append((name, *cells, diffs, "; ".join([by_layout["note"]] * bool(
            by_layout["note"]) + details)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines)
    with capsys.disabled():
        print("\n" + text)


def test_default_optimizers_step_parts_with_their_multi_tensor_kernels(monkeypatch):
    """torch's optimizers take their foreach path by default (on CUDA) only for the tensor types
    in ``torch.optim.optimizer._foreach_supported_types`` (a private name paramsplit
    touches: it registers its part type there, as torch registers DTensor) and fall back to a
    for-loop with a kernel launch per part and op otherwise. Here the CPU is made a foreach
    device so a default AdamW shows which implementation it picks for a split weight's group."""
    from torch.optim import adam, optimizer

    model, groups = paramsplit.split(nn.Linear(8, 6), {"weight": rows({(0, 3): {"lr": 0.1},
                                                                        (3, None): {}})})
    parts = [p for g in groups for p in g["params"] if p is not model.weight and p is not model.bias]
    assert len(parts) == 2 and all(type(p) in optimizer._foreach_supported_types for p in parts)
    monkeypatch.setattr(optimizer, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    used = []
    for name in ("_multi_tensor_adam", "_single_tensor_adam"):
        monkeypatch.setattr(adam, name, lambda *a, _f=getattr(adam, name), _n=name, **k:
                            (used.append(_n), _f(*a, **k))[1])
    opt = torch.optim.AdamW(groups, lr=0.05)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert used and set(used) == {"_multi_tensor_adam"}, used
