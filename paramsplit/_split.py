"""The entry point: ``split(model, spec)``, and ``describe`` to show what it did."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ._groups import _param_groups
from ._layout import _plan
from ._rewrite import _STATE, _rewrite
from ._spec import Spec, SpecError, _options_label, _resolve
from ._state import merged_state_dict


def split(model: nn.Module, spec: Spec) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Split parameters of ``model`` into regions with their own optimizer options.

    Returns a new model that computes bitwise what ``model`` computes, and param groups for any
    ``torch.optim`` optimizer. ``model`` itself is not changed. The new model shares every
    parameter and buffer that is not split with ``model``; each split parameter is copied into
    its parts (see the README's "Memory" section).

    ``spec`` maps parameter names, module names (meaning the module's ``weight``) or shell
    wildcards over both to a plan: a floating tensor of per-element ``weight_decay``,
    :class:`Regions`, :func:`rows`, :func:`cols`, a dict of options, or :data:`FROZEN`. It may
    also be a callable ``(name, param) -> plan | None``. A bad spec raises :class:`SpecError`
    naming its key, before anything is done.

    Example::

        >>> model = nn.Sequential(nn.Linear(10, 1))
        >>> split_model, groups = paramsplit.split(
        ...     model, {"0": paramsplit.cols({(0, 5): {"weight_decay": 0.01},
        ...                                   (5, None): {"weight_decay": 0.1}})})
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    if any(lay.split for m in model.modules() for lay, _ in getattr(m, _STATE, {}).values()):
        raise SpecError("this model is already split; split paramsplit.merge(model) with the "
                        "new spec instead (merged_optimizer_state carries the optimizer state)")
    targets = _resolve(model, spec)  # all validation happens here, before any change

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
    if plans and callable(getattr(new, "save_pretrained", None)):
        _save_merged(new)
    return new, _param_groups(new)


def _save_merged(model: nn.Module) -> None:
    """Make a Hugging Face model's ``save_pretrained`` write the original (merged) weights."""
    cls = type(model)

    def save_pretrained(self: nn.Module, *args: Any, state_dict: Any = None, **kwargs: Any) -> Any:
        if state_dict is None:
            state_dict = merged_state_dict(self)
        return cls.save_pretrained(self, *args, state_dict=state_dict,  # type: ignore[attr-defined]
                                   **kwargs)

    model.__class__ = type(cls.__name__, (cls,), {
        "save_pretrained": save_pretrained, "_paramsplit_class": True,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__})


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
    """A readable table of every planned parameter: region, elements, options and path.

    ``path`` is ``fx`` (the owner's forward was rewritten with torch.fx), ``attr`` (the owner's
    forward reads the parameter as an attribute, which assembles it) or ``-`` (not split).

    Example::

        >>> print(paramsplit.describe(split_model))
        parameter  region     elements  options            path
        0.weight   cols 0:5   5         weight_decay=0.01  fx
        0.weight   cols 5:10  5         weight_decay=0.1   fx
    """
    rows: list[tuple[str, ...]] = [("parameter", "region", "elements", "options", "path")]
    seen: set[int] = set()  # a tied parameter is listed once, under its first name
    for mname, module in split_model.named_modules():
        for attr, (layout, path) in getattr(module, _STATE, {}).items():
            if id(layout) in seen:
                continue
            seen.add(id(layout))
            name = f"{mname}.{attr}" if mname else attr
            for region in layout.regions:
                rows.append((name, region.label, str(region.numel),
                             _options_label(region.options), path or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
