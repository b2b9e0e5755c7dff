"""Optimizer param groups for a split model.

Every trainable parameter appears exactly once. Parameters no spec names, and regions whose
options are empty, go to the ``"default"`` group (the optimizer's defaults apply); regions and
parameters with equal options share one group, named after its options. FROZEN regions are in
no group.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._rewrite import _STATE, _part_names
from ._spec import _options_key, _options_label


def _options_by_param(model: nn.Module) -> dict[int, dict[str, Any] | None]:
    """Options of every planned parameter or part, keyed by ``id``."""
    found: dict[int, dict[str, Any] | None] = {}
    for module in model.modules():
        for attr, (layout, _) in getattr(module, _STATE, {}).items():
            if layout.split:
                names = _part_names(attr, layout)
                for name, region in zip(names, layout.regions):
                    found[id(module._parameters[name])] = region.options
            else:
                found[id(module._parameters[attr])] = layout.regions[0].options
    return found


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    options = _options_by_param(model)
    groups: dict[Any, dict[str, Any]] = {(): {"name": "default", "params": []}}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        opts = options.get(id(p), {})
        if opts is None:  # FROZEN, but the user made it trainable again: leave it out
            continue
        key = _options_key(opts)
        if key not in groups:
            groups[key] = {"name": _options_label(opts), "params": [], **opts}
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]
