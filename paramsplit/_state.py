"""State conversion: the model's state dict (already the original format) and the optimizer's
per-part state to and from the original layout."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._sync import _SPLITS, _is_wrapper, _Split


def merge(model: nn.Module) -> nn.Module:
    """Return ``model`` itself: since 0.3 a split model *is* the original model.

    Kept from 0.2 so that existing code keeps working. The model's parameters hold the values of
    the last optimizer step (the step hooks write them back). To plan a model anew, call
    :func:`split` on it again.

    Example::

        >>> torch.onnx.export(paramsplit.merge(model), (x,), "model.onnx")
    """
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` as a plain dict: since 0.3 it is the original format already.

    Example::

        >>> fresh_model.load_state_dict(paramsplit.merged_state_dict(model))
    """
    return dict(model.state_dict())


def load_merged_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                           strict: bool = True) -> Any:
    """``model.load_state_dict(state_dict, strict)``, after checking every key and shape.

    On a model sharded with FSDP2 (``fully_shard``), every rank passes the full checkpoint and
    keeps its shards (through ``torch.distributed.checkpoint.state_dict.set_model_state_dict``).

    A missing or extra key (with ``strict=True``), a wrong shape or a non-tensor value raises
    ``RuntimeError`` naming the keys, before anything is written. Returns what
    ``load_state_dict`` returns.

    Example::

        >>> paramsplit.load_merged_state_dict(model, torch.load("original.pt"))
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
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
    if not any(_is_wrapper(p) for p in model.parameters()):
        return model.load_state_dict(state_dict, strict=strict)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # sharded (FSDP2): every rank passes the full tensors and keeps its shards
    options = StateDictOptions(full_state_dict=True, strict=strict)
    return set_model_state_dict(model, dict(state_dict), options=options)


def _stepped(p: torch.Tensor, held: set[int]) -> tuple[_Split | None, list[torch.Tensor]]:
    """The split of ``p`` and its parts, if the optimizer (holding ``held``) steps parts of it;
    else ``(None, [p])``: an optimizer not built from the groups steps ``p`` whole."""
    split = _SPLITS.get(p)
    if split is not None and split.layout is not None and (
            not split.parts or any(id(q) in held for q in split.parts)):
        return split, split.parts
    return None, [p]


def merged_optimizer_state(optimizer: torch.optim.Optimizer,
                           model: nn.Module) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state in the original layout, keyed by parameter name.

    Works for split and unsplit models alike: the state tensors of a split parameter's parts
    (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...) are assembled into the parameter's
    shape (zeros where no part has state, e.g. FROZEN regions); scalar state (``step``) is the
    largest of the parts'. Raises ``ValueError`` if ``optimizer`` holds none of ``model``'s
    parameters or parts (an optimizer of another model, or of a copy of it).

    Example::

        >>> state = paramsplit.merged_optimizer_state(opt, model)     # an unsplit run
        >>> model, groups = paramsplit.split(model, spec)
        >>> new_opt = torch.optim.AdamW(groups, lr=1e-3)
        >>> paramsplit.load_merged_optimizer_state(new_opt, model, state)
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, dict[str, Any]] = {}
    found = False
    for name, p in model.named_parameters():
        split, parts = _stepped(p, held)
        found = found or any(id(q) in held for q in parts + [p])
        states = [optimizer.state.get(q, {}) for q in parts]
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for s in states for k in s):
            values = [s.get(key) for s in states]
            present = [v for v in values if v is not None]
            if all(isinstance(v, torch.Tensor) and v.shape == q.shape and v.dim() > 0
                   for v, q in zip(values, parts) if v is not None):
                if split is None:
                    merged[key] = present[0].detach().clone()
                    continue
                like = present[0]
                full = [v if v is not None else like.new_zeros(q.shape)
                        for v, q in zip(values, parts)]
                with torch.no_grad():
                    merged[key] = split.layout.full([t.detach() for t in full])
            elif all(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in present):
                merged[key] = _copy(max(present, key=float))
            else:
                raise ValueError(f"merged_optimizer_state: state {key!r} of {name!r} has a shape "
                                 f"that is neither per-element nor scalar; it cannot be merged")
        if merged:
            out[name] = merged
    if not found:
        raise ValueError("merged_optimizer_state: the optimizer holds none of the model's "
                         "parameters or paramsplit parts (was it built for another model, or a "
                         "copy of this one?)")
    return out


def load_merged_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                                state: Mapping[str, Mapping[str, Any]]) -> None:
    """Load state from :func:`merged_optimizer_state` into ``optimizer`` of ``model``.

    ``model`` may be split differently from (or not at all like) the run the state comes from:
    every element gets its own state back. Parameters the optimizer does not hold (FROZEN
    regions) are skipped. Everything is checked first (names, and every value: a per-element
    tensor of the parameter's shape and dtype, or a scalar); an error names the parameter and
    key and loads nothing.

    Example::

        >>> paramsplit.load_merged_optimizer_state(new_opt, model, state)
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    loads: list[tuple[Any, dict[str, Any]]] = []
    for name, values in state.items():
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"load_merged_optimizer_state: the model has no parameter "
                           f"{name!r}{hint}; nothing was loaded")
        p = params[name]
        split, parts = _stepped(p, held)
        if not isinstance(values, Mapping):
            raise TypeError(f"load_merged_optimizer_state: state[{name!r}] must be a dict, got "
                            f"{type(values).__name__}; nothing was loaded")
        per_part: list[dict[str, Any]] = [{} for _ in parts]
        for key, v in values.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype:
                    raise ValueError(
                        f"load_merged_optimizer_state: state[{name!r}][{key!r}] has shape "
                        f"{tuple(v.shape)} and dtype {v.dtype}; the parameter has shape "
                        f"{tuple(p.shape)} and dtype {p.dtype}; nothing was loaded")
                v = v.detach().to(p.device)
                pieces = split.layout.pieces(v) if split is not None else [v]
                pieces = [t.clone() for t in pieces]
            elif isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool):
                pieces = [_copy(v) for _ in parts]
            else:
                raise TypeError(f"load_merged_optimizer_state: state[{name!r}][{key!r}] is a "
                                f"{type(v).__name__}, not a tensor or number; nothing was loaded")
            for d, piece in zip(per_part, pieces):
                d[key] = piece
        loads += [(q, d) for q, d in zip(parts, per_part) if id(q) in held]
    for q, d in loads:
        optimizer.state[q] = d


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
