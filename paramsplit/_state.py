"""State-dict conversion between a split model and the original (unsplit) format."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._layout import _Layout
from ._rewrite import _STATE, _part_names


def _split_entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, _Layout]]:
    """``(state-dict prefix, owner, attr, layout)`` for every split parameter, under every name."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, (layout, _) in getattr(module, _STATE, {}).items():
            if layout.split:
                yield (f"{prefix}." if prefix else ""), module, attr, layout


def merged_state_dict(split_model: nn.Module) -> dict[str, Any]:
    """The state dict of ``split_model`` with the original keys and shapes.

    It loads with ``strict=True`` into a fresh, unsplit model (tied parameters keep all their
    keys, as in the original). Values of split parameters are assembled, detached tensors.

    Example::

        >>> split_model, groups = paramsplit.split(model, {"fc": paramsplit.rows({(0, 5): {}})})
        >>> fresh_model.load_state_dict(paramsplit.merged_state_dict(split_model))
    """
    state = split_model.state_dict()
    first: dict[str, tuple[str, torch.Tensor]] = {}
    rest: set[str] = set()
    for prefix, module, attr, layout in _split_entries(split_model):
        names = [prefix + n for n in _part_names(attr, layout)]
        first[names[0]] = (prefix + attr, getattr(module, attr).detach())
        rest.update(names[1:])
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in first:
            name, full = first[key]
            out[name] = full
        elif key not in rest:
            out[key] = value
    return out


def load_merged_state_dict(split_model: nn.Module, state_dict: Mapping[str, Any],
                           strict: bool = True) -> Any:
    """Load an unsplit checkpoint (original keys and shapes) into ``split_model``.

    Returns what ``split_model.load_state_dict`` returns.

    Example::

        >>> paramsplit.load_merged_state_dict(split_model, torch.load("original.pt"))
    """
    converted = dict(state_dict)
    for prefix, module, attr, layout in _split_entries(split_model):
        key = prefix + attr
        if key not in converted:
            continue
        full = converted.pop(key)
        if tuple(full.shape) != layout.shape:
            raise RuntimeError(f"load_merged_state_dict: {key!r} has shape {tuple(full.shape)}, "
                               f"the model expects {layout.shape}")
        perm = getattr(module, f"{attr}__perm") if layout.kind == "mask" else None
        values = layout.views(layout.base_from(full, perm))
        converted.update(zip([prefix + n for n in _part_names(attr, layout)], values))
    return split_model.load_state_dict(converted, strict=strict)
