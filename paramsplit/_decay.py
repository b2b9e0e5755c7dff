"""Per-element weight decay without parts: the ``decay`` layout.

A plan whose regions differ only in ``weight_decay`` needs no parts: the weight stays one tensor
in a param group with ``weight_decay=0``, and the step hooks apply each element's decay the way
the stepping optimizer applies its own, with the group's current ``lr``:

* ``pre`` (decoupled, applied first: AdamW; Adam, NAdam, RAdam with
  ``decoupled_weight_decay=True``; Muon; lion-pytorch's Lion): ``p.mul_(1 - lr * wd)`` before the
  step. Bitwise what the optimizer would do with a per-element ``weight_decay``.
* ``coupled`` (SGD, Adam, Adamax, Adadelta, Adagrad, RMSprop, ASGD, NAdam, RAdam): the step sees
  the gradient ``grad + wd * p``, as ``grad.add(p, alpha=wd)`` computes it; ``weight.grad``
  itself is not changed. Bitwise in float32 and float64.
* ``post`` (torch's and transformers' Adafactor, which compute statistics of the parameter
  before decaying it): after the step, ``p -= lr * wd * p_before``. The statistics are exact;
  the result differs from a per-element Adafactor by rounding only (the decay is applied after
  the update instead of before it).

Optimizers not listed here raise at their first step: paramsplit does not guess how they decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._spec import _Target

#: The name of the group paramsplit puts such weights in (``weight_decay=0``); the step hooks
#: decay a weight per element only there (a copy of the group dict keeps it: regroup freely).
DECAY_GROUP = "per-element weight_decay"

_COUPLED = {"SGD", "Adam", "Adamax", "Adadelta", "Adagrad", "RMSprop", "ASGD", "NAdam", "RAdam"}
_DECOUPLED = {"AdamW", "Muon"}
_SWITCHED = {"Adam", "NAdam", "RAdam"}  # decoupled when the group says decoupled_weight_decay


def _form(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """How ``optimizer`` decays the parameters of ``group``: ``pre``, ``coupled``, ``post``, or
    ``None`` when paramsplit does not know. A subclass that keeps its base's ``step`` decays as
    that base does; one with a ``step`` of its own is not known."""
    for cls in _stepping_classes(optimizer):
        form = _form_of(cls, group)
        if form is not None:
            return form
    return None


def _stepping_classes(optimizer: Any) -> list[type]:
    """``optimizer``'s class and its bases up to the one that defines the ``step`` it runs
    (torch's hook wrapper unwrapped; torch may copy a base's step onto a subclass): the classes
    whose math that step is. Empty if no class defines it."""
    mro = type(optimizer).__mro__
    step = _unwrapped(type(optimizer).step)
    defining = [i for i, cls in enumerate(mro)
                if "step" in vars(cls) and _unwrapped(vars(cls)["step"]) is step]
    return list(mro[: defining[-1] + 1]) if defining else []


def _unwrapped(fn: Any) -> Any:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _form_of(cls: type, group: dict[str, Any]) -> str | None:
    module, name = cls.__module__, cls.__name__
    if module.startswith("torch.optim"):
        if name in _SWITCHED and group.get("decoupled_weight_decay", False):
            return "pre"
        if name in _DECOUPLED:
            return "pre"
        if name in _COUPLED:
            return None if group.get("maximize", False) else "coupled"
        if name == "Adafactor":
            return "post"
    if module.startswith("lion_pytorch") and name == "Lion":
        return "pre"  # with decoupled_weight_decay=True, see _scale
    if module.startswith("transformers") and name == "Adafactor":
        return "post"
    return None


def _scale(optimizer: torch.optim.Optimizer) -> float:
    """What ``optimizer`` divides weight_decay by (lion-pytorch's ``decoupled_weight_decay``
    divides it by the initial lr)."""
    return float(getattr(optimizer, "_init_lr", 1.0)) if getattr(optimizer, "decoupled_wd",
                                                                  False) else 1.0


def _lr(optimizer: torch.optim.Optimizer, group: dict[str, Any], weight: Tensor) -> float:
    """The learning rate ``optimizer`` decayed ``weight`` with in the step that just ran."""
    if any(c.__module__.startswith("transformers") and c.__name__ == "Adafactor"
           for c in _stepping_classes(optimizer)):  # relative, scaled steps
        return float(type(optimizer)._get_lr(group, optimizer.state[weight]))
    return float(group["lr"])


class _Decay:
    """Where each region's elements are (blocks of one dim, or a mask) and their decay."""

    def __init__(self, target: _Target) -> None:
        self.shape = tuple(target.param.shape)
        self.decays = [None if not r.options else float(r.options["weight_decay"])
                       for r in target.regions]  # None: the optimizer's default
        self.dim, self.bounds = target.dim, target.bounds
        ids = target.region_ids
        self.ids = None if ids is None else ids.to(torch.int32)
        self._on: dict[torch.device, Tensor] = {}
        self._last: tuple[Any, Tensor] | None = None

    def values(self, default: float) -> list[float]:
        return [default if d is None else d for d in self.decays]

    def _full(self, values: list[float], like: Tensor) -> Tensor:
        """``values[region of each element]`` in ``like``'s shape, in its compute dtype; the
        last one is kept (a constant lr gathers once, at the price of a weight-sized tensor)."""
        assert self.ids is not None
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (tuple(values), like.device, dtype)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        ids = self._on.get(like.device)
        if ids is None:
            ids = self._on[like.device] = self.ids.to(like.device)
        table = torch.tensor(values, dtype=dtype, device=like.device)
        full = table.index_select(0, ids).view(self.shape)
        self._last = (key, full)
        return full

    def scale_(self, t: Tensor, values: list[float]) -> None:
        """``t *= values[region]`` (python scalars per block, as optimizers multiply)."""
        if self.bounds is None:
            t.mul_(self._full(values, t))
            return
        for (a, b), v in zip(self.bounds, values):
            if v != 1.0:
                t.narrow(self.dim, a, b - a).mul_(v)

    def add_scaled_(self, out: Tensor, src: Tensor, values: list[float]) -> None:
        """``out += values[region] * src``, as ``out.add_(src, alpha=v)`` computes it."""
        if self.bounds is None:
            out.addcmul_(src, self._full(values, out))
            return
        for (a, b), v in zip(self.bounds, values):
            if v != 0.0:
                out.narrow(self.dim, a, b - a).add_(src.narrow(self.dim, a, b - a), alpha=v)
