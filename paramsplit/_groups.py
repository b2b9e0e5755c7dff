"""Optimizer param groups for a split model, and the checks an optimizer gets at its step.

Every trainable parameter appears exactly once. Parameters no spec names, and regions whose
options are empty, go to the ``"default"`` group (the optimizer's defaults apply); regions and
parameters with equal options share one group, named after its options. FROZEN regions are in
no group. Each group also carries ``"paramsplit_layout"``, a fingerprint of where its parts'
elements live: saved with ``optimizer.state_dict()``, it lets a later step refuse optimizer state
that was saved for a model split another way.

Two global optimizer-step hooks (inert for optimizers that hold no parts) complete the picture:
before a step, an optimizer whose groups do not carry its parts' region options (one built from
``model.parameters()``, say) gets a warning naming them, and loaded state of another layout
raises; after a step, the parts' stores learn that they changed (fused optimizers bump no
version counter).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ._assemble import _PART, _layouts, _mark_stepped, _part_names, _tag
from ._spec import _options_key, _options_label

_LAYOUT_KEY = "paramsplit_layout"


def _options_by_param(model: nn.Module) -> dict[int, dict[str, Any] | None]:
    """Options of every planned parameter or part, keyed by ``id``."""
    found: dict[int, dict[str, Any] | None] = {}
    for module in model.modules():
        _tag(module)
        for attr, layout in _layouts(module).items():
            if layout.split:
                names = _part_names(attr, layout)
                for name, region in zip(names, layout.regions):
                    found[id(module._parameters[name])] = region.options
            else:
                found[id(module._parameters[attr])] = layout.regions[0].options
    return found


def _fingerprint(params: list[Any]) -> str:
    tags = [getattr(p, _PART, None) for p in params]
    text = ";".join(sorted(f"{t[0].digest}:{t[1]}" if t is not None else "-" for t in tags))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


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
    out = [g for g in groups.values() if g["params"]]
    for g in out:
        g[_LAYOUT_KEY] = _fingerprint(g["params"])
    return out


# -- optimizer-step hooks --------------------------------------------------------------------

_checked: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


def _check(optimizer: torch.optim.Optimizer) -> None:
    """Refuse state loaded for another layout; warn about parts whose group lacks their options."""
    groups = optimizer.param_groups
    signature = tuple((id(g), g.get(_LAYOUT_KEY), len(g["params"])) for g in groups)
    if _checked.get(optimizer) == signature:
        return
    wrong: list[str] = []
    for g in groups:
        if _LAYOUT_KEY in g and g[_LAYOUT_KEY] != _fingerprint(g["params"]):
            raise RuntimeError(
                f"paramsplit: param group {g.get('name', '?')!r} of this optimizer was saved "
                f"(optimizer.state_dict()) for parameters split another way, so its state would "
                f"land on the wrong elements. Split the model with the spec of the run that "
                f"saved it, or carry the state with paramsplit.merged_optimizer_state / "
                f"load_merged_optimizer_state.")
        for p in g["params"]:
            tag = getattr(p, _PART, None)
            if tag is None or not p.requires_grad:
                continue
            layout, i = tag
            region = layout.regions[i]
            opts = region.options
            if opts is None or any(not _same(g.get(k), v) for k, v in opts.items()):
                wrong.append(f"{layout.name}__{i} ({region.label}: "
                             f"{_options_label(opts)})")
    _checked[optimizer] = signature
    if wrong:
        warnings.warn(
            f"paramsplit: this optimizer's param groups do not apply the region options of "
            f"{', '.join(wrong)}: it was not built from paramsplit's groups. Build it as "
            f"`torch.optim.AdamW(groups, ...)` with the groups paramsplit.split returned (or "
            f"paramsplit.param_groups(model)).", stacklevel=3)


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not torch.compiler.is_compiling():
        _check(optimizer)


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not torch.compiler.is_compiling():
        for g in optimizer.param_groups:
            _mark_stepped(g["params"])


register_optimizer_step_pre_hook(_pre_step)
register_optimizer_step_post_hook(_post_step)
