"""The rewrite of a module that owns a split parameter.

The owner keeps its identity, class (``isinstance``), attributes, methods, hooks and its own
``forward``. Its class is swapped for a per-instance subclass (as ``torch.nn.utils.parametrize``
does) in which:

* ``<name>`` is a property returning the assembled tensor (``_assemble``): the owner's forward,
  its parent and any helper read it as before. Assigning a tensor to it, as
  ``torch.func.functional_call`` does, stands in for it until the original is assigned back;
  assigning a ``Parameter`` raises, naming the remedy;
* ``state_dict`` / ``load_state_dict`` use the original key, shape and layout (FSDP2-sharded
  parts excepted: sharded checkpoints hold the parts);
* ``.to()`` and friends, ``copy.deepcopy`` and pickling keep the parts in one storage;
* RNNs' cached ``_flat_weights`` are refreshed around each forward.

The parameter itself is replaced, at its position, by its parts ``<name>__0``, ``<name>__1``, ...
and (mask layouts) the non-persistent index buffers ``<name>__perm`` and ``<name>__inv``.
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ._assemble import (
    _STATE,
    _layouts,
    _assembled,
    _Full,
    _index,
    _part_names,
    _parts,
    _plain,
    _reader,
    _sync,
    _tag,
    _value,
)
from ._layout import _indices, _Layout, _sharded


def _splits(module: nn.Module) -> dict[str, _Layout]:
    return {a: lay for a, lay in _layouts(module).items() if lay.split}


def _flush(module: nn.Module) -> None:
    """Land pending writes to the stores of ``module``'s split parameters in their parts."""
    for attr, layout in _splits(module).items():
        if _plain(layout, _parts(module, attr, layout)):
            _sync(module, attr)


def _get(module: nn.Module, attr: str) -> Any:
    override = module.__dict__.get("_paramsplit_override", {})
    if attr in override:
        return override[attr]
    return _assembled(module, attr)


def _set(module: nn.Module, value: Any, attr: str) -> None:
    override = module.__dict__.setdefault("_paramsplit_override", {})
    if isinstance(value, _Full) and value._paramsplit_owner[1] == attr and \
            _layouts(value._paramsplit_owner[0]).get(attr) is _layouts(module)[attr]:
        override.pop(attr, None)  # the split tensor itself (functional_call restoring it)
        return
    caller = sys._getframe(2).f_code.co_filename
    if isinstance(value, torch.Tensor) and caller.endswith("_named_member_accessor.py"):
        override[attr] = value  # torch.func.functional_call and friends
        cache = _layouts(module)[attr].cache
        if cache is not None:
            cache.check = None  # the fast read path must not answer while it stands in
        return
    raise AttributeError(
        f"{type(module).__name__}.{attr} is split by paramsplit and cannot be replaced by "
        f"{type(value).__name__}; write into it instead (`with torch.no_grad(): "
        f"module.{attr}.copy_(t)`, `module.{attr}.data = t`, load_state_dict), or "
        f"paramsplit.merge the model, change it, and split again (e.g. to tie or resize weights)")


def _rebuild(cls: type, attrs: tuple[str, ...]) -> nn.Module:
    """Unpickling: an empty instance of the split class (its state is set next)."""
    obj = cls.__new__(cls)  # type: ignore[call-overload]
    obj.__class__ = _split_class(cls, list(attrs))
    return obj  # type: ignore[no-any-return]


def _split_class(cls: type, attrs: list[str]) -> type:
    """A subclass of ``cls`` that reads ``attrs`` as assembled tensors."""

    def __setattr__(self: nn.Module, name: str, value: Any) -> None:
        if name in attrs:
            _set(self, value, name)
        else:
            cls.__setattr__(self, name, value)  # type: ignore[call-arg, arg-type]

    def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        _flush(self)  # before the parts move
        layouts = _splits(self)
        cls._apply(self, fn, recurse)  # type: ignore[attr-defined]
        for attr, layout in layouts.items():
            layout.cache = None
            if layout.perm_cpu is not None:  # built on the meta device: indices now
                device = self._buffers[f"{attr}__perm"].device  # type: ignore[union-attr]
                if device.type != "meta":
                    self._buffers[f"{attr}__perm"] = layout.perm_cpu.to(device)
                    if layout.kind == "mask":
                        self._buffers[f"{attr}__inv"] = _indices(layout.perm_cpu)[1].to(device)
            layout.relink(_parts(self, attr, layout))
        _tag(self)  # parameter objects may have been replaced
        _refresh_rnn(self)
        return self

    def _save_to_state_dict(self: nn.Module, destination: Any, prefix: str,
                            keep_vars: bool) -> None:
        own: OrderedDict[str, Any] = OrderedDict()
        cls._save_to_state_dict(self, own, prefix, keep_vars)  # type: ignore[attr-defined]
        first: dict[str, str] = {}
        drop: set[str] = set()
        for attr, layout in _splits(self).items():
            names = [prefix + n for n in _part_names(attr, layout)]
            if not _sharded(_parts(self, attr, layout)[0]):  # sharded: keep the parts
                first[names[0]] = attr
                drop.update(names[1:])
        for key, value in own.items():
            if key in first:
                attr = first[key]
                full = getattr(self, attr) if keep_vars else _value(self, attr)
                destination[prefix + attr] = full
            elif key not in drop:
                destination[key] = value

    def _load_from_state_dict(self: nn.Module, state_dict: Any, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        converted = dict(state_dict)
        renamed: dict[str, str] = {}
        refused: list[str] = []
        for attr, layout in _splits(self).items():
            key, names = prefix + attr, [prefix + n for n in _part_names(attr, layout)]
            parts = _parts(self, attr, layout)
            if _sharded(parts[0]):
                continue  # FSDP2-sharded parts load from part keys
            refused += [n for n in names if converted.pop(n, None) is not None]
            renamed.update(dict.fromkeys(names, key))
            if key not in converted:
                continue
            value = converted.pop(key)
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"While copying the parameter named {key!r}, expected a "
                                  f"tensor, got {type(value).__name__}.")
                continue
            if tuple(value.shape) != layout.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(value.shape)} from checkpoint, the shape in current "
                                  f"model is {torch.Size(layout.shape)}.")
                continue
            if _plain(layout, parts):
                _sync(self, attr)  # a pending write to the store must not override the load
            perm = _index(self, attr, layout, "perm")
            with torch.no_grad():
                values = layout.values(value.to(parts[0].device), perm)
            converted.update(zip(names, values))
        n_missing = len(missing_keys)
        load = cls._load_from_state_dict  # type: ignore[attr-defined]
        load(self, converted, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs)
        if renamed:
            tail = list(dict.fromkeys(renamed.get(k, k) for k in missing_keys[n_missing:]))
            missing_keys[n_missing:] = tail
            if strict:
                unexpected_keys.extend(refused)
        _tag(self)  # assign=True replaces the parts
        _refresh_rnn(self)

    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:
        _flush(self)  # the parts are what is pickled
        state = dict(self.__dict__)
        state.pop("_paramsplit_override", None)
        return _rebuild, (cls, tuple(attrs)), state

    def __setstate__(self: nn.Module, state: dict[str, Any]) -> None:
        cls.__setstate__(self, state)  # type: ignore[attr-defined]
        for attr, layout in _splits(self).items():
            layout.relink(_parts(self, attr, layout))
        _tag(self)
        _refresh_rnn(self)

    namespace: dict[str, Any] = {
        "__setattr__": __setattr__, "_apply": _apply, "_save_to_state_dict": _save_to_state_dict,
        "_load_from_state_dict": _load_from_state_dict, "__reduce_ex__": __reduce_ex__,
        "__setstate__": __setstate__, "__module__": cls.__module__,
        "__qualname__": cls.__qualname__, "_paramsplit_class": True,
    }
    for attr in attrs:
        namespace[attr] = property(_reader(attr, functools.partial(_get, attr=attr)),
                                   doc=f"``{attr}``, assembled from its paramsplit parts.")
    if hasattr(cls, "_init_flat_weights"):
        namespace["forward"] = _rnn_forward(cls)
    return type(cls.__name__, (cls,), namespace)


def _rnn_forward(cls: type) -> Any:
    """RNNs read their weights from a cached list: fill it with this forward's tensors, and
    leave plain leaves there afterwards (deep-copyable, no graph kept alive)."""

    @functools.wraps(cls.forward)  # type: ignore[attr-defined]
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._init_flat_weights()  # type: ignore[operator]
        try:
            return cls.forward(self, *args, **kwargs)  # type: ignore[attr-defined]
        finally:
            _refresh_rnn(self)

    return forward


def _refresh_rnn(module: nn.Module) -> None:
    if hasattr(module, "_init_flat_weights") and hasattr(module, "_flat_weights_names"):
        with torch.no_grad():
            module._init_flat_weights()  # type: ignore[operator]


def _original_class(module: nn.Module) -> type:
    """The class ``module`` had before paramsplit swapped it."""
    cls = type(module)
    while cls.__dict__.get("_paramsplit_class", False):
        cls = cls.__bases__[0]
    return cls


def _rewrite(module: nn.Module,
             plans: dict[str, tuple[_Layout, list[nn.Parameter], dict[str, torch.Tensor]]]) -> None:
    """Install ``plans`` (attr -> layout, parts, index buffers) on ``module``.

    Every planned attribute is recorded; split ones are replaced, in place, by their parts.
    """
    split = {a: lay for a, (lay, _, _) in plans.items() if lay.split}
    params: dict[str, Any] = {}
    for name, p in module._parameters.items():
        if name in split:
            params.update(zip(_part_names(name, split[name]), plans[name][1]))
        else:
            params[name] = p
    module.__dict__["_parameters"] = params
    for attr, (_, _, buffers) in plans.items():
        for suffix, t in buffers.items():
            module.register_buffer(f"{attr}__{suffix}", t, persistent=False)
    state = dict(_layouts(module))
    state.update({a: lay for a, (lay, _, _) in plans.items()})
    object.__setattr__(module, _STATE, state)
    if split:
        module.__class__ = _split_class(type(module), list(split))
        _tag(module)
        _refresh_rnn(module)
