"""The entry point: ``split(model, spec)``, and ``describe`` to show what it did."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._groups import _param_groups
from ._spec import MAX_REGIONS, Spec, SpecError, _options_label, _resolve
from ._sync import _ROOTS, _SPLITS, _register, _Split, _take_over


def split(model: nn.Module, spec: Spec, *, max_regions: int = MAX_REGIONS,
          per_element_decay: bool = True) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Give regions of ``model``'s parameters their own optimizer options.

    Returns ``model`` itself, unchanged (its parameters, names, classes, forward, hooks and state
    dict stay as they are; a parameter whose whole plan is :data:`FROZEN` gets
    ``requires_grad=False``), and param groups for any ``torch.optim`` optimizer. The groups hold
    *parts*: one tensor per trained region of each split parameter, which the optimizer steps
    instead of the parameter; optimizer-step hooks keep them and the parameter in sync once per
    step (see the README's "How it works").

    ``spec`` maps parameter names, module names (meaning the module's ``weight``) or shell
    wildcards over both to a plan: a floating tensor of per-element ``weight_decay``,
    :class:`Regions`, :func:`rows`, :func:`cols`, a dict of options, or :data:`FROZEN`. It may
    also be a callable ``(name, param) -> plan | None``. A bad spec raises :class:`SpecError`
    naming its key, before anything is done. A parameter may have at most ``max_regions``
    regions (each costs a part and, with distinct options, a param group). Splitting a parameter
    again replaces its plan; optimizers built before keep stepping their own parts.

    A plan whose regions differ only in ``weight_decay`` makes no parts (the ``decay`` layout):
    the parameter stays whole in a group with ``weight_decay=0``, and each element is decayed
    at each step the way the optimizer decays (decoupled or coupled; see the README), so
    optimizers that compute statistics of the whole tensor keep their exact math. An optimizer
    whose decay paramsplit does not know raises at its first step; ``per_element_decay=False``
    gives such regions parts instead.

    Example::

        >>> model = nn.Sequential(nn.Linear(10, 1))
        >>> model, groups = paramsplit.split(
        ...     model, {"0": paramsplit.cols({(0, 5): {"weight_decay": 0.01},
        ...                                   (5, None): {"weight_decay": 0.1}})})
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    for split_ in _plan(model, spec, max_regions, per_element_decay):
        _register(model, split_)
    _ROOTS.setdefault(model, {})  # a model given to split, even if nothing was planned
    return model, _param_groups(model)


def _plan(model: nn.Module, spec: Spec, max_regions: int,
          per_element_decay: bool) -> list[_Split]:
    """Validate ``spec`` (raising before any change) and make one _Split per named parameter;
    sets ``requires_grad`` of parameters planned FROZEN as a whole (False) or anew (True)."""
    # parameters split froze as a whole may be planned anew: validate them as trainable
    refrozen = [p for p in model.parameters() if not p.requires_grad
                and (s := _SPLITS.get(p)) is not None and s.layout is None
                and s.decay is None and s.regions[0].options is None]
    for p in refrozen:
        p.requires_grad_(True)
    targets: list[Any] = []
    try:
        targets = _resolve(model, spec, max_regions)  # all validation, before any change
        for target in targets:
            if getattr(target.param, "_fsdp_flattened", False):  # FSDP1's mark on its views
                raise SpecError(
                    f"spec[{target.key!r}]: parameter {target.name!r} is a view of FSDP1's flat "
                    f"parameter (FullyShardedDataParallel wrapped the model), whose shards "
                    f"paramsplit cannot split; paramsplit does not support FSDP1: use FSDP2 "
                    f"(fully_shard), after split")
    except BaseException:
        targets = []
        raise
    finally:
        named = {id(t.param) for t in targets}
        for p in refrozen:
            if id(p) not in named:
                p.requires_grad_(False)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    splits = []
    for target in targets:
        splits.append(_Split(model, names[id(target.param)], target, per_element_decay))
        if target.kind == "whole" and target.regions[0].options is None:
            target.param.requires_grad_(False)
    return splits


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The param groups :func:`split` returned, rebuilt from ``model``'s current parameters.

    Parameters with ``requires_grad=False`` are left out, split or not. Use it when a wrapper
    added trainable parameters after :func:`split` (PEFT's adapters), or to build a second
    optimizer; the parts are the same tensors :func:`split` made.

    Raises ``ValueError`` for a model that was never given to :func:`split` (and holds no
    parameter it planned): the groups would step every tensor whole. A copy of a split model,
    by ``deepcopy`` or pickling, is such a plain model.

    Example::

        >>> peft_model = peft.get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
        >>> opt = torch.optim.AdamW(paramsplit.param_groups(peft_model), lr=1e-3)
    """
    _take_over(model)
    if not any(m in _ROOTS for m in model.modules()) and not any(
            _SPLITS.get(p) is not None for p in model.parameters()):
        raise ValueError(
            "paramsplit.param_groups: no parameter of this model was planned by paramsplit.split, "
            "so every tensor would be stepped whole. A copy of a split model (deepcopy, pickle) "
            "is a plain model: split the copy with the spec (paramsplit.split(copy, spec)).")
    return _param_groups(model)


def describe(model: nn.Module) -> str:
    """A readable table of every planned parameter: its regions, elements, options and layout.

    ``layout`` is ``rows`` (the parts are views of the weight: no copy), ``cols`` (column blocks:
    copied in and out once per step), ``mask`` or ``sparse`` (a gather and a write-back of the
    trained elements once per step; ``sparse`` when FROZEN holds most elements), or ``whole``
    (not split, only given its own group).

    Example::

        >>> print(paramsplit.describe(model))
        parameter  region     elements  options            layout
        0.weight   cols 0:5   5         weight_decay=0.01  cols
        0.weight   cols 5:10  5         weight_decay=0.1   cols
    """
    rows: list[tuple[str, ...]] = [("parameter", "region", "elements", "options", "layout")]
    for name, p in model.named_parameters():
        split = _SPLITS.get(p)
        if split is None:
            continue
        for region in split.regions:
            rows.append((name, region.label, str(region.numel), _options_label(region.options),
                         split.label))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
