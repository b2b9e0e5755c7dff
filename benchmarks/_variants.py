"""The variants: what each one does to the same freshly built model, and its step.

Every variant gets the unsplit model of a :class:`~_cases.Case` (same weights every time) and
turns it into a :class:`Prepared` model: the model to run, its AdamW param groups, and optional
extras for the step (an added loss term, work after backward). :func:`build` then makes the step:
a training step (``zero_grad(set_to_none=True)`` + forward + loss + backward + ``AdamW.step``)
for ``linear`` / ``gpt2``, or one ``model.generate(...)`` call for ``generate``.

Weight decay: ``WD_LO`` on one region, ``WD_HI`` on the other; the unsplit model has ``WD_HI`` on
the whole targets (the 0.01, not 0, keeps AdamW's work equal: with weight_decay == 0 AdamW skips
one pass over the parameter).

Split variants use the public API only: ``paramsplit.split`` on the CPU model, then
``.to(device)`` and ``paramsplit.param_groups`` on other devices. The floors (``cols_floor``,
``mask_floor``) are the unsplit model plus exactly the extra work a split of that layout cannot
avoid; see ``_floors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import paramsplit

from _cases import Case, build_base, generate, make_inputs, target_names, task_loss
from _floors import cols_floor, mask_floor

LR = 1e-3
WD_HI = 0.1
WD_LO = 0.01


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
    after_backward: Callable[[], None] | None = None


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


def _split(s: Setup, spec: Any) -> Prepared:
    model, groups = paramsplit.split(s.model, spec)
    if s.device.type != "cpu":
        model.to(s.device)
        groups = paramsplit.param_groups(model)
    return Prepared(model, groups)


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


def _floor(make: Callable[..., Any]) -> Callable[[Setup], Prepared]:
    def prepare(s: Setup) -> Prepared:
        masks = s.random_masks()
        _on_device(s)
        groups = _unsplit_groups(s, WD_HI)
        return Prepared(s.model, groups,
                        after_backward=make(s.model, s.names, s.device, masks))

    return prepare


_ALL = (
    Variant("baseline", None, "the unsplit model (rows' floor)", baseline),
    Variant("rows", "baseline", "paramsplit.rows: 2 row blocks", rows),
    Variant("cols_floor", None, "unsplit + 2 weight-sized copies (assemble, split the grad)",
            _floor(cols_floor)),
    Variant("cols", "cols_floor", "paramsplit.cols: 2 column blocks", cols),
    Variant("forum", "cols_floor", "paramsplit.Regions, mask[:, :in/2] = 1 (the forum's mask)",
            forum),
    Variant("mask_floor", None, "unsplit + 2 int32 index gathers (weight, its grad) sorting "
            "by the mask",
            _floor(mask_floor)),
    Variant("mask", "mask_floor", "paramsplit.Regions: a random 50% mask", mask),
    Variant("penalty", None, "masked L2 penalty on the loss (the forum answer)", penalty),
    Variant("hooks", None, "gradient hooks zeroing half of each gradient", hooks),
    Variant("parametrize", None, "torch parametrize: cat of 2 row blocks", parametrized),
)
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}

#: The variants timed together for each case kind (the forum mask is the Linear's question).
GROUPS: dict[str, tuple[str, ...]] = {
    "linear": tuple(VARIANTS),
    "gpt2": tuple(v for v in VARIANTS if v != "forum"),
    "generate": ("baseline", "mask_floor", "mask"),
}


# -- steps -------------------------------------------------------------------------------------


@dataclass
class Runner:
    step: Callable[[], None]
    prepared: Prepared


def build(case: Case, variant: str, batch: int, device: str | torch.device = "cpu") -> Runner:
    """A fresh model for ``variant`` and its step at ``batch``, ready to time."""
    device = torch.device(device)
    model = build_base(case)
    p = VARIANTS[variant].prepare(Setup(case, device, model, target_names(case, model)))
    inputs = make_inputs(case, batch, device)
    if case.kind == "generate":
        def gen_step() -> None:
            generate(case, p.model, inputs)

        return Runner(gen_step, p)

    opt = torch.optim.AdamW(p.groups, lr=LR, weight_decay=0.0)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = task_loss(case, p.model, inputs)
        if p.extra_loss is not None:
            loss = loss + p.extra_loss()
        loss.backward()
        if p.after_backward is not None:
            p.after_backward()
        opt.step()

    return Runner(train_step, p)
