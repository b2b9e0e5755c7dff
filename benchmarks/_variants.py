"""The variants: what each one does to its own freshly built model, and its step.

Every variant gets a fresh unsplit model of a :class:`~_cases.Case` (built anew for each variant,
with the same weights every time: ``paramsplit.split`` registers plans for the parameters it is
given, so no two variants may share a model) and turns it into a :class:`Prepared` model: the
model to run, its AdamW param groups, and optional extras for the step (an added loss term, work
around the optimizer step). :func:`build` then makes the step: a training step
(``zero_grad(set_to_none=True)`` + forward + loss + backward + ``AdamW.step``) for ``linear`` /
``gpt2`` / ``sparse`` / ``many`` / ``gpt124m``, or one ``model.generate(...)`` call for
``generate``. The optimizer is ``torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)``, with
``fused=True`` or ``foreach=True`` where the case says so (``Case.adamw``: the ``gpt124m``
tables; the others run AdamW's default implementation); forward and loss (the penalty's term
included) run under ``torch.autocast(device type, dtype=...)`` where the case names a dtype
(``Case.autocast``: bf16 in the ``gpt124m`` tables; the others run without autocast).

Weight decay: ``WD_LO`` on one region, ``WD_HI`` on the other; the unsplit model has ``WD_HI`` on
the whole targets (the 0.01, not 0, keeps AdamW's work equal: with weight_decay == 0 AdamW skips
one pass over the parameter).

Split variants use the public API only (paramsplit 0.3): ``paramsplit.split`` on the CPU model
(it returns the model itself, unchanged, and param groups holding the parts and the weights),
then, on other devices, ``.to(device)`` and ``paramsplit.param_groups(model)``. Each records the
``layout`` column of ``paramsplit.describe`` (``info["layout"]``: every layout its weights got,
comma-separated). The floors (``cols_floor``, ``mask_floor``) are the unsplit model plus exactly
the copies a split of that layout cannot avoid; see ``_floors``. In the ``generate`` table the
mask split's floor is the unsplit model itself (0.3 runs no paramsplit code in the forward).

The ``rows`` / ``cols`` / ``forum`` / ``mask`` plans differ only in ``weight_decay``, so they split
with ``per_element_decay=False``: they measure the parts mechanism (rows' views, the gathers and
scatters of cols and masks). ``decay`` measures the other one, the default for such plans: the
weight kept whole in one group with ``weight_decay=0``, each element decayed by paramsplit's
optimizer-step hook (the ``decay`` layout); like rows it copies nothing, so its floor is the
unsplit step.

The ``sparse`` table (sparse fine-tuning, project issue 12) has its own group, judged against
``full_ft`` (full fine-tuning: the unsplit layer, AdamW over all of it, weight_decay
``WD_SPARSE`` on the weight); at 1% and 10% trainable, a random bool mask with a fixed seed per
split weight:

* ``sparse_<p>``       ``paramsplit.Regions(mask, {True: {"weight_decay": 0.01}, False: FROZEN})``;
                       paramsplit picks its ``sparse`` layout by itself (recorded from
                       ``paramsplit.describe`` as ``info["layout"]``). In 0.3 ``sparse`` is the
                       ``mask`` mechanism (one gather of the trained elements' values and
                       gradients, one scatter back) under another name, so the 0.2 table's
                       ``sparse_mask_<p>`` column (the same spec forced onto the gather layout by
                       patching ``paramsplit._spec._as_sparse``) is gone: it measured nothing new.
* ``hooks_<p>``        the unsplit layer, ``weight.register_hook(lambda g: g * mask)``, AdamW over
                       all of it (inexact: decay and the moments still move frozen elements).
* ``shira``            PEFT's SHiRA (``peft.ShiraConfig(r=8)``, its default random mask: r * (in
                       + out) elements, 0.98% of the Linear(1024, 4096)) on the Linear inside a
                       wrapper module, AdamW over the PEFT model's trainable parameters (the
                       adapter's values; the bias stays frozen). Only with ``peft`` installed.

The ``many`` table (48 small weights of a 12-layer GPT-2) times ``baseline`` (unsplit; also full
fine-tuning), ``rows_by_hand`` (AdamW over the two row blocks of each weight as tensors of their
own, no paramsplit: what any optimizer-side rows split costs), ``rows``, ``cols_floor``,
``cols``, ``mask_floor``, ``mask`` (50%), ``decay``, ``sparse_1`` (1% of every weight trained,
the rest FROZEN), ``penalty`` and ``hooks``, every ratio over the unsplit step (``REFERENCE``);
the floors are shown beside, not judged.

The ``gpt124m`` tables (GPT-2 124M, bf16 autocast, one table per AdamW implementation) time
``baseline`` (unsplit; also full fine-tuning), ``rows``, ``cols_floor``, ``cols``,
``mask_floor``, ``mask`` (50%), ``decay``, ``sparse_1`` (1% of every weight trained, the rest
FROZEN), ``penalty`` and ``hooks``: every ratio over the unsplit step, and for ``rows`` /
``cols`` / ``mask`` / ``decay`` also over their floors (as the ``gpt2`` table), which here
report rather than judge (the targets are ``_report.GPT124M_TIME_TARGETS`` /
``GPT124M_MEM_TARGETS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import paramsplit

from _cases import Case, build_base, generate, have_peft, make_inputs, target_names, task_loss
from _floors import cols_floor, mask_floor

LR = 1e-3
WD_HI = 0.1
WD_LO = 0.01
WD_SPARSE = 0.01  # the sparse table: the trained elements' (and full fine-tuning's) decay
SPARSE_SHARES = {"1": 0.01, "10": 0.10}  # variant suffix -> trainable share of the weight
SHIRA_R = 8


@dataclass
class Setup:
    """What a variant builder starts from: the fresh unsplit model (CPU) and its targets."""

    case: Case
    device: torch.device
    model: nn.Module
    names: list[str]

    def params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(targets, the rest) of the model's parameters now."""
        named = dict(self.model.named_parameters())
        names = set(self.names)
        return [named[n] for n in self.names], [p for n, p in named.items() if n not in names]

    def random_masks(self) -> dict[str, Tensor]:
        """A random 50% bool mask per target (CPU), the same in every variant."""
        named = dict(self.model.named_parameters())
        out = {}
        for i, name in enumerate(self.names):
            g = torch.Generator().manual_seed(1000 + i)
            out[name] = torch.rand(named[name].shape, generator=g) < 0.5
        return out


@dataclass
class Prepared:
    model: nn.Module
    groups: list[dict[str, Any]]
    extra_loss: Callable[[], Tensor] | None = None
    before_step: Callable[[], None] | None = None  # after backward, before optimizer.step()
    after_step: Callable[[], None] | None = None  # after optimizer.step()
    info: dict[str, Any] = field(default_factory=dict)  # reported with the results (layout, ...)


@dataclass(frozen=True)
class Variant:
    name: str
    floor: str | None  # the variant this one's cost is judged against (None: not a split)
    what: str
    prepare: Callable[[Setup], Prepared]


# -- the variants ------------------------------------------------------------------------------


def _unsplit_groups(s: Setup, wd_targets: float) -> list[dict[str, Any]]:
    targets, rest = s.params()
    return [{"params": targets, "weight_decay": wd_targets}, {"params": rest, "weight_decay": 0.0}]


def _on_device(s: Setup) -> None:
    s.model.to(s.device)


def baseline(s: Setup) -> Prepared:
    _on_device(s)
    return Prepared(s.model, _unsplit_groups(s, WD_HI))


def _split(s: Setup, spec: Any, per_element_decay: bool = False) -> Prepared:
    """``paramsplit.split``; with parts unless ``per_element_decay`` (see the module's doc)."""
    model, groups = paramsplit.split(s.model, spec, per_element_decay=per_element_decay)
    assert model is s.model  # 0.3: the model itself, unchanged
    if s.device.type != "cpu":
        model.to(s.device)
        groups = paramsplit.param_groups(model)
    return Prepared(model, groups, info={"layout": ",".join(sorted(set(layouts(model))))})


def _blocks(s: Setup, make: Callable[..., Any], dim: int) -> Prepared:
    def spec(name: str, p: nn.Parameter) -> Any:
        if name not in s.names:
            return None
        h = p.shape[dim] // 2
        return make({(0, h): {"weight_decay": WD_LO}, (h, None): {"weight_decay": WD_HI}})

    return _split(s, spec)


def rows(s: Setup) -> Prepared:
    return _blocks(s, paramsplit.rows, 0)


def cols(s: Setup) -> Prepared:
    return _blocks(s, paramsplit.cols, 1)


def mask(s: Setup) -> Prepared:
    opts = {0: {"weight_decay": WD_LO}, 1: {"weight_decay": WD_HI}}
    return _split(s, {n: paramsplit.Regions(m, opts) for n, m in s.random_masks().items()})


def decay(s: Setup) -> Prepared:
    """A tensor of weight decays (``WD_HI`` on the random 50% mask, ``WD_LO`` elsewhere: the
    penalty's), the weight kept whole: the decay layout."""
    spec = {n: torch.where(m, WD_HI, WD_LO) for n, m in s.random_masks().items()}
    return _split(s, spec, per_element_decay=True)


def forum(s: Setup) -> Prepared:
    """The forum question's ``mask = zeros_like(w); mask[:, :5] = 1`` on ``Linear(10, 1)``,
    scaled: the first half of the columns is id 1."""
    spec = {}
    for name, p in s.model.named_parameters():
        if name in s.names:
            m = torch.zeros(p.shape, dtype=torch.int64)
            m[:, : p.shape[1] // 2] = 1
            spec[name] = paramsplit.Regions(m, {0: {"weight_decay": WD_HI},
                                                1: {"weight_decay": WD_LO}})
    return _split(s, spec)


def penalty(s: Setup) -> Prepared:
    """The forum answer: ``loss + 0.5 * sum(wd_mask * w**2)``, AdamW weight_decay=0."""
    masks = s.random_masks()
    _on_device(s)
    targets, _ = s.params()
    pairs = [(torch.where(masks[n], WD_HI, WD_LO).to(p.dtype).to(s.device), p)
             for n, p in zip(s.names, targets)]

    def extra() -> Tensor:
        return 0.5 * sum((m * w**2).sum() for m, w in pairs)  # type: ignore[return-value]

    return Prepared(s.model, _unsplit_groups(s, 0.0), extra_loss=extra)


def hooks(s: Setup) -> Prepared:
    """``w.register_hook(lambda g: g * keep)`` zeroes the gradient of half the elements;
    AdamW weight_decay=0 (so the frozen elements really stay put)."""
    masks = s.random_masks()
    _on_device(s)
    targets, _ = s.params()
    for n, p in zip(s.names, targets):
        keep = masks[n].to(p.dtype).to(s.device)
        p.register_hook(lambda g, keep=keep: g * keep)
    return Prepared(s.model, _unsplit_groups(s, 0.0))


class _CatRows(nn.Module):
    """A hand-written rows split as a parametrization: ``weight = cat((original0, original1))``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat((a, b), 0)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return w[: self.k].clone(), w[self.k:].clone()


def parametrized(s: Setup) -> Prepared:
    _on_device(s)
    targets, rest = s.params()
    lo, hi = [], []
    for n, p in zip(s.names, targets):
        owner_name, _, attr = n.rpartition(".")
        owner = s.model.get_submodule(owner_name)
        parametrize.register_parametrization(owner, attr, _CatRows(p.shape[0] // 2))
        plist = owner.parametrizations[attr]
        lo.append(plist.original0)
        hi.append(plist.original1)
    groups = [{"params": lo, "weight_decay": WD_LO}, {"params": hi, "weight_decay": WD_HI},
              {"params": rest, "weight_decay": 0.0}]
    return Prepared(s.model, groups)


# -- the sparse table ---------------------------------------------------------------------------


def _sparse_masks(s: Setup, share: float) -> dict[str, Tensor]:
    """The trained elements of each target: a random bool mask with ``share`` of them (a fixed
    seed per target, the same in every variant of that share)."""
    targets, _ = s.params()
    out = {}
    for i, (name, w) in enumerate(zip(s.names, targets)):
        g = torch.Generator().manual_seed(12 + i)
        out[name] = torch.rand(w.shape, generator=g) < share
    return out


def _trained(masks: dict[str, Tensor]) -> dict[str, Any]:
    return {"trained": sum(m.sum().item() for m in masks.values())
            / sum(m.numel() for m in masks.values())}


def layouts(model: nn.Module) -> list[str]:
    """The ``layout`` column of ``paramsplit.describe(model)``, one entry per split parameter."""
    rows = [line.split() for line in paramsplit.describe(model).splitlines()[1:]]
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r[0], r[-1])
    return list(seen.values())


def full_ft(s: Setup) -> Prepared:
    _on_device(s)
    return Prepared(s.model, _unsplit_groups(s, WD_SPARSE), info={"trained": 1.0})


def _sparse_split(share: float) -> Callable[[Setup], Prepared]:
    def prepare(s: Setup) -> Prepared:
        masks = _sparse_masks(s, share)
        p = _split(s, {n: paramsplit.Regions(m, {True: {"weight_decay": WD_SPARSE},
                                                 False: paramsplit.FROZEN})
                       for n, m in masks.items()})
        p.info.update(_trained(masks))
        return p

    return prepare


def _masked_hooks(share: float) -> Callable[[Setup], Prepared]:
    def prepare(s: Setup) -> Prepared:
        masks = _sparse_masks(s, share)
        _on_device(s)
        targets, _ = s.params()
        for n, w in zip(s.names, targets):
            keep = masks[n].to(w.dtype).to(s.device)
            w.register_hook(lambda g, keep=keep: g * keep)
        return Prepared(s.model, _unsplit_groups(s, WD_SPARSE), info=_trained(masks))

    return prepare


class _Wrapper(nn.Module):
    """A module holding the Linear (PEFT targets modules by name)."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def shira(s: Setup) -> Prepared:
    import warnings

    import peft

    model = peft.get_peft_model(_Wrapper(s.model), peft.ShiraConfig(r=SHIRA_R,
                                                                    target_modules=["lin"]))
    model.to(s.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # SHiRA's forward builds a sparse_coo_tensor each step and torch warns (once) about the
    # invariant checks; the step does not change with it
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    n = sum(p.numel() for p in trainable)
    return Prepared(model, [{"params": trainable, "weight_decay": WD_SPARSE}],
                    info={"trained": n / s.model.weight.numel()})


def _floor(make: Callable[..., Any]) -> Callable[[Setup], Prepared]:
    def prepare(s: Setup) -> Prepared:
        masks = s.random_masks()
        _on_device(s)
        groups = _unsplit_groups(s, WD_HI)
        before, after = make(s.model, s.names, s.device, masks)
        return Prepared(s.model, groups, before_step=before, after_step=after)

    return prepare


def rows_by_hand(s: Setup) -> Prepared:
    """The least an optimizer-side ``rows`` split costs: AdamW over each target's two row blocks
    as tensors of their own (views of the weight), their gradients handed over from ``W.grad``
    by a plain loop around the step; no check of any kind. ``rows`` over this is the cost of
    paramsplit's step hooks; this over the unsplit step, the cost of the optimizer stepping
    twice as many tensors."""
    _on_device(s)
    targets, rest = s.params()
    blocks = [(w, w.detach()[: w.shape[0] // 2], w.detach()[w.shape[0] // 2:]) for w in targets]

    def before() -> None:
        for w, lo, hi in blocks:
            h = lo.shape[0]
            lo.grad, hi.grad = w.grad[:h], w.grad[h:]  # type: ignore[index]
            w.grad = None

    def after() -> None:
        for _, lo, hi in blocks:
            lo.grad = hi.grad = None

    groups = [{"params": [b[1] for b in blocks], "weight_decay": WD_LO},
              {"params": [b[2] for b in blocks], "weight_decay": WD_HI},
              {"params": rest, "weight_decay": 0.0}]
    return Prepared(s.model, groups, before_step=before, after_step=after)


_ALL = (
    Variant("baseline", None, "the unsplit model (rows' floor)", baseline),
    Variant("rows", "baseline", "paramsplit.rows: 2 row blocks", rows),
    Variant("cols_floor", None, "unsplit + 3 weight-sized copies per step (the columns' values "
            "in, their gradient, the values back)", _floor(cols_floor)),
    Variant("cols", "cols_floor", "paramsplit.cols: 2 column blocks", cols),
    Variant("forum", "cols_floor", "paramsplit.Regions, mask[:, :in/2] = 1 (the forum's mask)",
            forum),
    Variant("mask_floor", None, "unsplit + index_select of the values, index_select of the "
            "gradient, index_select back by the inverse permutation, sorting by the mask",
            _floor(mask_floor)),
    Variant("mask", "mask_floor", "paramsplit.Regions: a random 50% mask", mask),
    Variant("decay", "baseline", "per-element weight_decay, a tensor of decays on the random 50% "
            "mask: the weight kept whole, decayed by paramsplit's step hook (the decay layout)",
            decay),
    Variant("penalty", None, "masked L2 penalty on the loss (the forum answer)", penalty),
    Variant("hooks", None, "gradient hooks zeroing half of each gradient", hooks),
    Variant("parametrize", None, "torch parametrize: cat of 2 row blocks", parametrized),
    Variant("rows_by_hand", None, "AdamW over 2 row blocks of each weight as tensors of their "
            "own, gradients handed over by a plain loop (no paramsplit)", rows_by_hand),
)


def _sparse_variants(p: str, share: float) -> tuple[Variant, ...]:
    return (
        Variant(f"sparse_{p}", None, f"paramsplit.Regions, {p}% trained, the rest FROZEN "
                "(paramsplit's own choice: the sparse layout)", _sparse_split(share)),
        Variant(f"hooks_{p}", None, f"gradient hook masking all but {p}% of the unsplit "
                "weight's gradient, AdamW over all of it (inexact)", _masked_hooks(share)),
    )


_SPARSE = (
    Variant("full_ft", None, "full fine-tuning: the unsplit model, AdamW over all of it "
            "(the sparse table's reference)", full_ft),
    *_sparse_variants("1", SPARSE_SHARES["1"]),
    Variant("shira", None, f"PEFT SHiRA r={SHIRA_R}, its default random mask (r * (in + out) "
            "elements: 0.98% of a Linear(1024, 4096)), AdamW over its trainable values", shira),
    *_sparse_variants("10", SPARSE_SHARES["10"]),
)
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL + _SPARSE}

#: The variants timed together for each case kind (the forum mask is the Linear's question).
GROUPS: dict[str, tuple[str, ...]] = {
    "linear": tuple(v.name for v in _ALL if v.name != "rows_by_hand"),
    "gpt2": tuple(v.name for v in _ALL if v.name not in ("forum", "rows_by_hand")),
    "generate": ("baseline", "mask"),
    "sparse": tuple(v.name for v in _SPARSE if v.name != "shira" or have_peft()),
    "many": ("baseline", "rows_by_hand", "rows", "cols_floor", "cols", "mask_floor", "mask", "decay",
             "sparse_1", "penalty", "hooks"),
    "gpt124m": ("baseline", "rows", "cols_floor", "cols", "mask_floor", "mask", "decay",
                "sparse_1", "penalty", "hooks"),
}
#: Per kind, the variant the others' ``x`` ratios are taken over.
REFERENCE: dict[str, str] = {"linear": "baseline", "gpt2": "baseline", "generate": "baseline",
                             "sparse": "full_ft", "many": "baseline", "gpt124m": "baseline"}
#: Per kind, floors that differ from ``Variant.floor``: ``generate`` runs no optimizer step, so
#: the mask split's floor is the unsplit model; ``many`` is judged against the unsplit step
#: (``_report.MANY_TARGETS``), not against floors.
_FLOORS: dict[str, dict[str, str | None]] = {
    "generate": {"mask": "baseline"},
    "many": {"rows": None, "cols": None, "mask": None, "decay": None},
}


def floor_of(kind: str, variant: str) -> str | None:
    """The variant whose time and memory ``variant``'s are judged against in a ``kind`` table."""
    return _FLOORS.get(kind, {}).get(variant, VARIANTS[variant].floor)


# -- steps -------------------------------------------------------------------------------------


@dataclass
class Runner:
    step: Callable[[], None]
    prepared: Prepared
    #: the training step's two halves (``step`` is one, then the other; None for ``generate``):
    #: zero_grad + forward + loss + backward, then the floor's work + ``optimizer.step()``
    forward_backward: Callable[[], None] | None = None
    update: Callable[[], None] | None = None


def build(case: Case, variant: str, batch: int, device: str | torch.device = "cpu") -> Runner:
    """A fresh model for ``variant`` and its step at ``batch``, ready to time."""
    device = torch.device(device)
    model = build_base(case)
    names = target_names(case, model)
    p = VARIANTS[variant].prepare(Setup(case, device, model, names))
    p.info.setdefault("n_targets", len(names))
    inputs = make_inputs(case, batch, device)
    if case.kind == "generate":
        def gen_step() -> None:
            generate(case, p.model, inputs)

        return Runner(gen_step, p)

    opt = torch.optim.AdamW(p.groups, lr=LR, weight_decay=0.0, **case.adamw_kwargs())
    dtype = case.autocast_dtype

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = task_loss(case, p.model, inputs)
            if p.extra_loss is not None:
                loss = loss + p.extra_loss()
        loss.backward()

    def update() -> None:
        if p.before_step is not None:
            p.before_step()
        opt.step()
        if p.after_step is not None:
            p.after_step()

    def train_step() -> None:
        forward_backward()
        update()

    return Runner(train_step, p, forward_backward, update)
