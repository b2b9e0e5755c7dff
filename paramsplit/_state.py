"""State-dict conversion between a split model and the original (unsplit) format."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._layout import _has_storage, _Layout
from ._rewrite import _STATE, _part_names


def _split_entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, _Layout]]:
    """``(state-dict prefix, owner, attr, layout)`` for every split parameter, under every name."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, (layout, _) in getattr(module, _STATE, {}).items():
            if layout.split:
                yield (f"{prefix}." if prefix else ""), module, attr, layout


def _index(module: nn.Module, attr: str, layout: _Layout, which: str) -> torch.Tensor | None:
    """The ``perm`` or ``inv`` index buffer of a mask layout (``None`` for others)."""
    return getattr(module, f"{attr}__{which}") if layout.kind == "mask" else None


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

    Returns what ``split_model.load_state_dict`` returns. On a model sharded with FSDP2
    (``fully_shard``), every rank passes the full checkpoint and receives its shards, through
    ``torch.distributed.checkpoint.state_dict.set_model_state_dict``.

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
        values = layout.values(full, _index(module, attr, layout, "perm"))
        converted.update(zip([prefix + n for n in _part_names(attr, layout)], values))
    if any(not _has_storage(p) for p in split_model.parameters()):  # sharded (DTensor) params
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=strict)
        return set_model_state_dict(split_model, converted, options=options)
    return split_model.load_state_dict(converted, strict=strict)


def _splits_by_name(model: nn.Module) -> dict[str, tuple[nn.Module, str, _Layout]]:
    """Each split parameter once, under its first (canonical) name."""
    out: dict[str, tuple[nn.Module, str, _Layout]] = {}
    seen: set[int] = set()
    for prefix, module, attr, layout in _split_entries(model):
        first_part = module._parameters[_part_names(attr, layout)[0]]
        if id(first_part) not in seen:
            seen.add(id(first_part))
            out[prefix + attr] = (module, attr, layout)
    return out


def _parts(module: nn.Module, attr: str, layout: _Layout) -> list[nn.Parameter]:
    return [getattr(module, n) for n in _part_names(attr, layout)]


def merged_optimizer_state(optimizer: torch.optim.Optimizer,
                           model: nn.Module) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state in the original layout, keyed by parameter name.

    Works for split and unsplit models alike: state tensors of split parameters (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``, ...) are assembled into the original shape (zeros
    where a region has no state, e.g. FROZEN ones); scalar state (``step``) is the largest of the
    parts'. Use :func:`load_merged_optimizer_state` to load it into a (differently) split run.

    Example::

        >>> state = paramsplit.merged_optimizer_state(opt, model)     # an unsplit run
        >>> split_model, groups = paramsplit.split(model, spec)
        >>> new_opt = torch.optim.AdamW(groups, lr=1e-3)
        >>> paramsplit.load_merged_optimizer_state(new_opt, split_model, state)
    """
    splits = _splits_by_name(model)
    owner_of = {id(p): name for name, (m, a, lay) in splits.items() for p in _parts(m, a, lay)}
    out: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if id(p) not in owner_of:
            if p in optimizer.state:
                out[name] = {k: _copy(v) for k, v in optimizer.state[p].items()}
            continue
        orig = owner_of[id(p)]
        if orig in out:
            continue
        module, attr, layout = splits[orig]
        parts = _parts(module, attr, layout)
        states = [optimizer.state.get(q, {}) for q in parts]
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for s in states for k in s):
            values = [s.get(key) for s in states]
            present = [v for v in values if v is not None]
            if all(isinstance(v, torch.Tensor) and v.shape == q.shape and v.dim() > 0
                   for v, q in zip(values, parts) if v is not None):
                like = present[0]
                full = [v if v is not None else torch.zeros(q.shape, dtype=like.dtype,
                                                            device=like.device)
                        for v, q in zip(values, parts)]
                with torch.no_grad():
                    merged[key] = layout.merge(full, _index(module, attr, layout, "inv"))
            elif all(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in present):
                merged[key] = _copy(max(present, key=float))
            else:
                raise ValueError(f"merged_optimizer_state: state {key!r} of {orig!r} has a shape "
                                 f"that is neither per-element nor scalar; it cannot be merged")
        if merged:
            out[orig] = merged
    return out


def load_merged_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                                state: Mapping[str, Mapping[str, Any]]) -> None:
    """Load state from :func:`merged_optimizer_state` into ``optimizer`` of ``model``.

    ``model`` may be split differently from (or not at all like) the run the state comes from:
    every element gets its own state back. Parameters the optimizer does not hold (FROZEN parts)
    are skipped.

    Example::

        >>> paramsplit.load_merged_optimizer_state(new_opt, split_model, state)
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    splits = _splits_by_name(model)
    plain = dict(model.named_parameters())
    for name, values in state.items():
        if name in splits:
            module, attr, layout = splits[name]
            parts = _parts(module, attr, layout)
            perm = _index(module, attr, layout, "perm")
            per_part: list[dict[str, Any]] = [{} for _ in parts]
            for key, v in values.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) == layout.shape and v.dim() > 0:
                    pieces = [t.clone() for t in layout.values(v, perm)]
                else:
                    pieces = [_copy(v) for _ in parts]
                for d, piece in zip(per_part, pieces):
                    d[key] = piece
            targets = list(zip(parts, per_part))
        elif name in plain:
            targets = [(plain[name], {k: _copy(v) for k, v in values.items()})]
        else:
            raise KeyError(f"load_merged_optimizer_state: the model has no parameter {name!r}")
        for p, s in targets:
            if id(p) in held:
                optimizer.state[p] = s


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def merge(split_model: nn.Module) -> nn.Module:
    """A plain model of the original classes with the split model's current values.

    Split parameters become ordinary parameters again (copies of the assembled values, ties
    kept); everything else is shared with ``split_model``, as :func:`split` shares it. Use it for
    export, ONNX or inference, or to :func:`split` again with another spec.

    Example::

        >>> plain = paramsplit.merge(split_model)
        >>> torch.onnx.export(plain, (x,), "model.onnx")
    """
    from ._rewrite import _original_class

    memo: dict[int, Any] = {id(t): t for t in split_model.parameters()}
    memo.update({id(t): t for t in split_model.buffers()})
    new = copy.deepcopy(split_model, memo)
    merged: dict[int, nn.Parameter] = {}
    for module in new.modules():
        module.__class__ = _original_class(module)
        layouts = module.__dict__.pop(_STATE, None)
        if not layouts:
            continue
        params: dict[str, Any] = {}
        names = {a: _part_names(a, lay) for a, (lay, _) in layouts.items() if lay.split}
        first = {n[0]: a for a, n in names.items()}
        drop = {n for ns in names.values() for n in ns[1:]}
        for name, p in module._parameters.items():
            if name in first:
                attr = first[name]
                layout = layouts[attr][0]
                if id(p) not in merged:
                    with torch.no_grad():
                        value = layout.merge(_parts(module, attr, layout),
                                             _index(module, attr, layout, "inv")).clone()
                    merged[id(p)] = nn.Parameter(value, requires_grad=layout.requires_grad)
                params[attr] = merged[id(p)]
            elif name not in drop:
                params[name] = p
        module.__dict__["_parameters"] = params
        for attr in names:
            if layouts[attr][0].kind == "mask":
                for which in ("perm", "inv"):
                    module._buffers.pop(f"{attr}__{which}", None)
                    module._non_persistent_buffers_set.discard(f"{attr}__{which}")
    return new
