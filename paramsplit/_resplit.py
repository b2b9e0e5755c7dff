"""Regions that change during training: ``resplit`` a live optimizer in place.

The state rule, per element (what the tests' hand-written per-element optimizers do):

* an element that trained before and still trains keeps its state (moments, momentum);
* an element that starts training starts with zero state;
* an element that becomes FROZEN loses its state and never changes again.

A part's scalar state (Adam's ``step``, which drives bias correction) is one number for all its
elements: the largest step among its elements that trained before. A region made only of new
elements has no state at all, so the optimizer starts it as a fresh tensor (step 0). New elements
in a region that already trained therefore share that region's step: their first updates are not
bias-corrected up the way a fresh tensor's are.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ._groups import _param_groups
from ._spec import MAX_REGIONS, Spec
from ._split import _plan
from ._sync import _CACHE, _PART, _SPLITS, LAYOUT_KEY, _is_wrapper, _register, _Split


def resplit(optimizer: torch.optim.Optimizer, model: nn.Module, spec: Spec, *,
            max_regions: int = MAX_REGIONS, per_element_decay: bool = True) -> None:
    """Change the regions of the parameters ``spec`` names, in place, on a live optimizer.

    ``optimizer`` (built from paramsplit's groups), its LR schedulers and ``model`` stay usable
    as they are; parameters ``spec`` does not name are untouched. Every element keeps, gets or
    drops optimizer state by the rule in the README ("Regions that change"): kept where it
    trains on, zero where it starts training, dropped where it becomes FROZEN; options may
    change per region (a new option set gets a new param group at the end, which LR
    schedulers created before do not schedule: a warning says so). ``spec`` is validated
    before anything changes (:class:`SpecError`); a parameter the optimizer does not hold, or
    a sharded (DTensor) one, raises ``ValueError``.

    Under DDP every rank must resplit with the same spec at the same step: compute it from
    replicated values (the weights, the reduced gradients) or broadcast it.

    Example::

        >>> mask = weight.abs() > threshold                   # e.g. RigL: drop and grow
        >>> paramsplit.resplit(opt, model, {"fc": paramsplit.Regions(mask, {True: {},
        ...                                                               False: paramsplit.FROZEN})})
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = {id(p): n for n, p in model.named_parameters()}
    _check_groups(optimizer, model)
    splits = _plan(model, spec, max_regions, per_element_decay)
    olds: list[tuple[_Split, list[Tensor], dict[str, Any]]] = []
    for new in splits:
        weight = new.weight
        old = _SPLITS.get(weight)
        tensors = list(old.parts) + [weight] if old is not None and old.parts else [weight]
        if _is_wrapper(weight):
            raise ValueError(f"resplit: {new.name!r} is a {type(weight).__name__}; resplit "
                             f"supports plain tensors only")
        if weight.requires_grad and not any(id(t) in held for t in tensors) and (
                old is None or old.layout is not None or old.regions[0].options is not None):
            raise ValueError(f"resplit: the optimizer holds neither {named.get(id(weight))!r} "
                             f"nor its parts; resplit an optimizer built from paramsplit's "
                             f"groups")
        olds.append((new, tensors, _full_state(optimizer, old, weight)))
    for new, tensors, state in olds:  # nothing has changed so far: now change everything
        for t in tensors:
            optimizer.state.pop(t, None)
        drop = {id(t) for t in tensors}
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in drop]
        _register(model, new)
        for t, cut in _new_tensors(new):
            if state and cut is not None and t.requires_grad:
                _set_state(optimizer, t, state, cut)
    _regroup(optimizer, model, {id(t) for n, _, _ in olds for t, _ in _new_tensors(n)})
    _CACHE.pop(optimizer, None)


def _check_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise unless the optimizer's groups are paramsplit's groups for ``model``: resplit puts
    new parts into them by name, and must not move anything else."""
    home = {id(p): g["name"] for g in _param_groups(model) for p in g["params"]}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in home and (LAYOUT_KEY not in g or g.get("name") != home[id(p)]):
                raise ValueError(
                    f"resplit: the optimizer's param groups are not the ones paramsplit.split "
                    f"returned for this model (group {g.get('name', '?')!r} holds a tensor that "
                    f"paramsplit's group {home[id(p)]!r} holds: regrouped or built by hand), so "
                    f"resplit cannot tell where new parts belong without changing the options of "
                    f"other tensors. Build the optimizer from paramsplit's groups to resplit it, "
                    f"or split again and build a new one (merged_optimizer_state carries the "
                    f"state).")


def _new_tensors(split: _Split) -> list[tuple[Tensor, Any]]:
    """What the optimizer holds for ``split`` and how to cut a full-shape tensor for each
    (``None`` for a split weight, which carries its parts' gradient and has no state)."""
    if split.layout is not None:
        layout = split.layout
        return [(p, (lambda full, i=i: layout.pieces(full)[i])) for i, p in
                enumerate(split.parts)] + [(split.weight, None)]
    return [(split.weight, lambda full: full)]


def _full_state(optimizer: torch.optim.Optimizer, old: _Split | None,
                weight: Tensor) -> dict[str, Any]:
    """The optimizer's state of ``weight`` in its shape: per-element tensors (zeros where no
    element had state), ``"__steps"`` (each element's scalar state, by key) and ``"__had"``
    (which elements had state)."""
    if old is not None and old.parts:
        tensors, layout = old.parts, old.layout
    else:
        tensors, layout = [weight], None
    states = [optimizer.state.get(t, {}) for t in tensors]
    if not any(states):
        return {}

    def full(pieces: list[Tensor]) -> Tensor:
        return layout.full(pieces) if layout is not None else pieces[0].clone()

    out: dict[str, Any] = {"__steps": {}, "__like": {}}
    like = next(s for s in states if s)
    out["__had"] = full([torch.full(t.shape, bool(s), dtype=torch.bool, device=t.device)
                         for t, s in zip(tensors, states)])
    for key, value in like.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            out[key] = full([s[key].detach() if key in s else torch.zeros_like(value)
                             for s in states])
        elif isinstance(value, (Tensor, int, float)) and not isinstance(value, bool):
            out["__steps"][key] = full([torch.full(t.shape, float(s.get(key, 0)),
                                                   dtype=torch.float64, device=t.device)
                                        for t, s in zip(tensors, states)])
            out["__like"][key] = value
        else:
            out["__like"][key] = value  # None (SGD without momentum) and the like: kept as is
    return out


def _set_state(optimizer: torch.optim.Optimizer, t: Tensor, state: dict[str, Any],
               cut: Any) -> None:
    """Give ``t`` the state of its elements (none if none of them had state)."""
    had = cut(state["__had"])
    if not bool(had.any()):
        return
    new: dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith("__"):
            new[key] = cut(value).clone()  # zeros where an element had no state
    for key, like in state["__like"].items():
        if key in state["__steps"]:
            step = float(cut(state["__steps"][key])[had].max())
            new[key] = (torch.tensor(step, dtype=like.dtype, device=like.device)
                        if isinstance(like, Tensor) else type(like)(step))
        else:
            new[key] = like
    optimizer.state[t] = new


def _regroup(optimizer: torch.optim.Optimizer, model: nn.Module, added: set[int]) -> None:
    """Put every tensor of ``model`` the optimizer holds (and the ``added`` ones) where
    paramsplit's groups put them, in their order: into the optimizer's group of that name, or a
    new group at the end. Tensors of other models keep their places."""
    keep = {id(p) for g in optimizer.param_groups for p in g["params"]} | added
    canonical = [(g, [p for p in g["params"] if id(p) in keep]) for g in _param_groups(model)]
    placed = {id(p) for _, params in canonical for p in params}
    by_name = {g.get("name"): g for g in optimizer.param_groups}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in placed]
    for group, params in canonical:
        target = by_name.get(group["name"])
        if target is not None:
            target["params"] = params + target["params"]
        elif params:
            optimizer.add_param_group({**group, "params": params})
            warnings.warn(f"paramsplit.resplit: added param group {group['name']!r} for new "
                          f"options; LR schedulers created before do not schedule it",
                          stacklevel=3)
    for g in optimizer.param_groups:  # the fingerprints of the parts each group holds now
        if LAYOUT_KEY in g:
            g[LAYOUT_KEY] = sorted(tag[0].part_digest(tag[1]) for p in g["params"]
                                   if (tag := getattr(p, _PART, None)) is not None)
