"""The entry point: ``split(model, spec)``, and ``describe`` to show what it did."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ._groups import _param_groups
from ._layout import _plan
from ._assemble import _layouts, _part_names
from ._rewrite import _rewrite
from ._spec import MAX_REGIONS, Spec, SpecError, _options_label, _resolve


def split(model: nn.Module, spec: Spec, *,
          max_regions: int = MAX_REGIONS) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Split parameters of ``model`` into regions with their own optimizer options.

    Returns a new model that computes bitwise what ``model`` computes, and param groups for any
    ``torch.optim`` optimizer. ``model`` itself is not changed. The new model shares every
    parameter and buffer that is not split with ``model``; each split parameter is copied into
    its parts (see the README's "Memory" section).

    ``spec`` maps parameter names, module names (meaning the module's ``weight``) or shell
    wildcards over both to a plan: a floating tensor of per-element ``weight_decay``,
    :class:`Regions`, :func:`rows`, :func:`cols`, a dict of options, or :data:`FROZEN`. It may
    also be a callable ``(name, param) -> plan | None``. A bad spec raises :class:`SpecError`
    naming its key, before anything is done. A parameter may have at most ``max_regions``
    regions (each costs a sub-parameter and, with distinct options, a param group).

    Example::

        >>> model = nn.Sequential(nn.Linear(10, 1))
        >>> split_model, groups = paramsplit.split(
        ...     model, {"0": paramsplit.cols({(0, 5): {"weight_decay": 0.01},
        ...                                   (5, None): {"weight_decay": 0.1}})})
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    if any(lay.split for m in model.modules() for lay in _layouts(m).values()):
        raise SpecError("this model is already split; split paramsplit.merge(model) with the "
                        "new spec instead (merged_optimizer_state carries the optimizer state)")
    targets = _resolve(model, spec, max_regions)  # all validation happens here, before any change

    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, attr))

    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    new = copy.deepcopy(model, memo)

    plans: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    for target in targets:
        plan = _plan(target)
        for mname, attr in owners[id(target.param)]:
            module = new.get_submodule(mname)
            plans.setdefault(id(module), (module, {}))[1][attr] = plan
    for module, module_plans in plans.values():
        _rewrite(module, module_plans)
    return new, _param_groups(new)


def param_groups(split_model: nn.Module) -> list[dict[str, Any]]:
    """The param groups :func:`split` returned, rebuilt from ``split_model``'s current parameters.

    Use it when the parameter objects changed after :func:`split`, e.g. after FSDP2's
    ``fully_shard`` or after loading a split model anew.

    Example::

        >>> fully_shard(split_model)
        >>> opt = torch.optim.AdamW(paramsplit.param_groups(split_model), lr=1e-3)
    """
    return _param_groups(split_model)


def describe(split_model: nn.Module) -> str:
    """A readable table of every planned parameter: its parts, regions, elements and options.

    ``part`` is the name of the region's sub-parameter in ``named_parameters()`` (``-`` where the
    parameter is not split, only given its own group); ``layout`` is ``rows`` (the parts are
    blocks of the original tensor: no copy), ``cols`` (column blocks: one copy per assembly) or
    ``mask`` (one gather per assembly).

    Example::

        >>> print(paramsplit.describe(split_model))
        parameter  part       region     elements  options            layout
        0.weight   weight__0  cols 0:5   5         weight_decay=0.01  cols
        0.weight   weight__1  cols 5:10  5         weight_decay=0.1   cols
    """
    rows: list[tuple[str, ...]] = [("parameter", "part", "region", "elements", "options",
                                    "layout")]
    seen: set[int] = set()  # a tied parameter is listed once, under its first name
    for mname, module in split_model.named_modules():
        for attr, layout in _layouts(module).items():
            if id(layout) in seen:
                continue
            seen.add(id(layout))
            name = f"{mname}.{attr}" if mname else attr
            parts = _part_names(attr, layout) if layout.split else ["-"]
            for part, region in zip(parts, layout.regions):
                rows.append((name, part, region.label, str(region.numel),
                             _options_label(region.options), layout.kind))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
