"""State-dict conversion between a split model and the original (unsplit) format."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._assemble import _STATE, _index, _layouts, _part_names, _parts, _tag, _value
from ._layout import _Layout, _sharded


def _split_entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, _Layout]]:
    """``(state-dict prefix, owner, attr, layout)`` for every split parameter, under every name."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, layout in _layouts(module).items():
            if layout.split:
                yield (f"{prefix}." if prefix else ""), module, attr, layout


def merged_state_dict(split_model: nn.Module) -> dict[str, Any]:
    """The state dict of ``split_model`` with the original keys and shapes.

    This is what ``split_model.state_dict()`` returns, except under FSDP2, where
    ``state_dict()`` holds the sharded parts and this assembles them. It loads with
    ``strict=True`` into a fresh, unsplit model (tied parameters keep all their keys).

    Example::

        >>> split_model, groups = paramsplit.split(model, {"fc": paramsplit.rows({(0, 5): {}})})
        >>> fresh_model.load_state_dict(paramsplit.merged_state_dict(split_model))
    """
    state = split_model.state_dict()
    first: dict[str, tuple[str, torch.Tensor]] = {}
    rest: set[str] = set()
    for prefix, module, attr, layout in _split_entries(split_model):
        names = [prefix + n for n in _part_names(attr, layout)]
        if names[0] in state:  # sharded parts
            first[names[0]] = (prefix + attr, _value(module, attr))
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
    """Load an original-format checkpoint (original keys and shapes) into ``split_model``.

    Everything is checked before anything is written: a missing or extra key (with
    ``strict=True``), a wrong shape or a non-tensor value raises, naming the keys, and leaves the
    model as it was. Returns what ``load_state_dict`` returns. On a model sharded with FSDP2
    (``fully_shard``), every rank passes the full checkpoint and receives its shards, through
    ``torch.distributed.checkpoint.state_dict.set_model_state_dict``.

    Example::

        >>> paramsplit.load_merged_state_dict(split_model, torch.load("original.pt"))
    """
    _check_state_dict(split_model, state_dict, strict)
    if not any(_sharded(p) for p in split_model.parameters()):
        return split_model.load_state_dict(state_dict, strict=strict)
    converted = dict(state_dict)
    for prefix, module, attr, layout in _split_entries(split_model):
        key = prefix + attr
        if key in converted:
            values = layout.values(converted.pop(key), _index(module, attr, layout, "perm"))
            converted.update(zip([prefix + n for n in _part_names(attr, layout)], values))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=strict)
    return set_model_state_dict(split_model, converted, options=options)


def _check_state_dict(split_model: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """Raise, naming the keys, if ``state_dict`` (original format) cannot load fully."""
    expected = {k: tuple(v.shape) for k, v in merged_state_dict(split_model).items()
                if isinstance(v, torch.Tensor)}
    problems = []
    for key, value in state_dict.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, the model expects "
                            f"{expected[key]}")
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected
                      and not k.endswith("_extra_state")]
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise RuntimeError("load_merged_state_dict: nothing was loaded: " + "; ".join(problems))


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
    are skipped. Everything is checked first (names, and every value: a per-element tensor of
    the parameter's shape and dtype, or a scalar); an error names the parameter and key and
    loads nothing.

    Example::

        >>> paramsplit.load_merged_optimizer_state(new_opt, split_model, state)
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    splits = _splits_by_name(model)
    plain = dict(model.named_parameters())
    loads: list[tuple[Any, dict[str, Any]]] = []
    for name, values in state.items():
        if name in splits:
            module, attr, layout = splits[name]
            parts = _parts(module, attr, layout)
            shape, dtype = layout.shape, parts[0].dtype
        elif name in plain:
            parts, shape, dtype = [plain[name]], tuple(plain[name].shape), plain[name].dtype
        else:
            close = difflib.get_close_matches(name, list(splits) + list(plain), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"load_merged_optimizer_state: the model has no parameter "
                           f"{name!r}{hint}; nothing was loaded")
        if not isinstance(values, Mapping):
            raise TypeError(f"load_merged_optimizer_state: state[{name!r}] must be a dict, got "
                            f"{type(values).__name__}; nothing was loaded")
        per_part: list[dict[str, Any]] = [{} for _ in parts]
        for key, v in values.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if tuple(v.shape) != shape or v.dtype != dtype:
                    raise ValueError(
                        f"load_merged_optimizer_state: state[{name!r}][{key!r}] has shape "
                        f"{tuple(v.shape)} and dtype {v.dtype}; the parameter has shape {shape} "
                        f"and dtype {dtype}; nothing was loaded")
                v = v.to(parts[0].device)
                if name in splits:
                    pieces = [t.clone() for t in layout.values(v, _index(module, attr, layout,
                                                                          "perm"))]
                else:
                    pieces = [v.detach().clone()]
            elif isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
                pieces = [_copy(v) for _ in parts]
            else:
                raise TypeError(f"load_merged_optimizer_state: state[{name!r}][{key!r}] is a "
                                f"{type(v).__name__}, not a tensor or number; nothing was loaded")
            for d, piece in zip(per_part, pieces):
                d[key] = piece
        loads += [(p, d) for p, d in zip(parts, per_part) if id(p) in held]
    for p, d in loads:
        optimizer.state[p] = d


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

    merged: dict[int, nn.Parameter] = {}  # by first part: tied owners share one parameter
    for module in split_model.modules():
        for attr, layout in _layouts(module).items():
            first_part = module._parameters.get(f"{attr}__0")
            if layout.split and id(first_part) not in merged:
                merged[id(first_part)] = nn.Parameter(_value(module, attr).clone(),
                                                      requires_grad=layout.requires_grad)
    memo: dict[int, Any] = {id(t): t for t in split_model.parameters()}
    memo.update({id(t): t for t in split_model.buffers()})
    new = copy.deepcopy(split_model, memo)
    for module in new.modules():
        layouts = module.__dict__.pop(_STATE, None)
        module.__class__ = _original_class(module)
        module.__dict__.pop("_paramsplit_override", None)
        if not layouts:
            continue
        params: dict[str, Any] = {}
        names = {a: _part_names(a, lay) for a, lay in layouts.items() if lay.split}
        first = {n[0]: a for a, n in names.items()}
        drop = {n for ns in names.values() for n in ns[1:]}
        for name, p in module._parameters.items():
            if name in first:
                attr = first[name]
                params[attr] = merged[id(p)]
            elif name not in drop:
                params[name] = p
        module.__dict__["_parameters"] = params
        for attr in names:
            if layouts[attr].kind in ("mask", "sparse"):
                for which in ("perm", "inv"):
                    module._buffers.pop(f"{attr}__{which}", None)
                    module._non_persistent_buffers_set.discard(f"{attr}__{which}")
        if hasattr(module, "_init_flat_weights"):
            module._init_flat_weights()  # type: ignore[operator]
    for module in split_model.modules():
        _tag(module)  # the copy's owners tagged the shared parts with their own layouts
    return new
