"""Assembly: the tensor ``owner.weight`` returns, kept in sync with the parts.

The original-layout values of a split parameter live in one *store* tensor:

* ``rows``: the store is the parts' own base. Parts and store are one memory: always in sync,
  no copy, and any write through ``owner.weight`` lands in the parts.
* ``sparse``: the store is the FROZEN part (the whole tensor); only the trained elements are
  copied in, and only they are written back.
* ``cols`` and masks: the store is a tensor of its own. At every use (``owner.weight``, the
  owner's forward, ``state_dict``, ``.to()``...) it is refreshed from the parts if they changed
  (the optimizer stepped: version counters, and an optimizer-step hook for fused optimizers,
  which bump none), or written back into the parts if *it* was written (``nn.init``, ``.data``,
  ``Embedding(max_norm=...)``'s renormalisation, ``load_state_dict``...). Written on both sides
  since the last use, to different values, is ambiguous and raises (alike, as by a load or DDP's
  broadcast, is fine). Nothing changed: nothing is copied (eval loops, ``generate``).

``owner.weight`` is a :class:`_Full`, an alias of the store (shared storage and version counter,
so its writes are seen): in grad mode the output of :class:`_Route`, whose backward hands each
part its share of the gradient; otherwise a leaf carrying the parameter's ``requires_grad`` (some
kernels, e.g. ``MultiheadAttention``'s, pick their path by it even under ``no_grad``). It is a
plain, contiguous tensor at storage offset 0 to every kernel (bitwise results), and answers
``.grad``, ``.data`` and ``requires_grad_()`` like the parameter it stands for.

Under ``torch.compile``, ``torch.func`` transforms of the parts, or FSDP2 (parts sharded),
assembly is a plain differentiable ``torch.cat`` / ``index_select`` of the parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._layout import _contiguous_strides, _has_storage, _Layout

#: Attribute on each owner: {attr: layout} for every planned parameter (split or not).
_STATE = "_paramsplit"
#: Attribute on each part: (layout, region index); see _tag.
_PART = "_paramsplit_part"


def _part_names(attr: str, layout: _Layout) -> list[str]:
    return list(_names(attr, len(layout.regions)))


_NAMES: dict[tuple[str, int], tuple[str, ...]] = {}


def _names(attr: str, n: int) -> tuple[str, ...]:
    names = _NAMES.get((attr, n))
    if names is None:
        names = _NAMES[attr, n] = tuple(f"{attr}__{i}" for i in range(n))
    return names


def _parts(module: nn.Module, attr: str, layout: _Layout) -> list[Tensor]:
    params = module._parameters
    return [params[n] for n in _names(attr, len(layout.regions))]  # type: ignore[misc]


def _index(module: nn.Module, attr: str, layout: _Layout, which: str) -> Tensor | None:
    """The ``perm`` (to the parts) or ``inv`` (to the original layout) index of a mask layout;
    ``sparse`` has one index, ``perm``, the trained elements' positions, for both ways."""
    if layout.kind == "sparse":
        return module._buffers[f"{attr}__perm"]
    return module._buffers[f"{attr}__{which}"] if layout.kind == "mask" else None


def _layouts(module: nn.Module) -> dict[str, _Layout]:
    """``{attr: layout}`` of ``module``'s own planned parameters (never a wrapped module's, which
    wrappers such as PEFT's forward attribute reads to)."""
    return module.__dict__.get(_STATE, {})  # type: ignore[no-any-return]


def _layout(module: nn.Module, attr: str) -> _Layout:
    return _layouts(module)[attr]


@dataclass
class _Cache:
    store: Tensor
    key: tuple[Any, ...]  # the parts (identity, memory, dtype, device) it was built for
    store_version: int
    parts_version: tuple[int, ...]
    stepped: bool = False  # an optimizer holding the parts stepped since the last sync
    leaf: _Full | None = None  # the alias no-grad reads return while nothing changes
    check: tuple[tuple[str, int, int, int, bool], ...] | None = None  # _check when leaf returned


def _traced() -> bool:
    """Under ``torch.compile`` or a ``torch.func`` transform: plain differentiable ops only."""
    return torch.compiler.is_compiling() or \
        torch._C._functorch.peek_interpreter_stack() is not None


def _plain(layout: _Layout, parts: list[Tensor]) -> bool:
    """Whether the store can serve ``parts``: they are the parts paramsplit made (tagged; not,
    say, FSDP2's unsharded copies, which it refills without bumping version counters, nor
    ``functional_call``'s stand-ins), they own plain storage, and nothing is tracing."""
    return not _traced() and all(getattr(p, _PART, (None,))[0] is layout for p in parts) \
        and _has_storage(parts[0])  # parts are all plain or all sharded


def _key(parts: list[Tensor]) -> tuple[Any, ...]:
    """What the store was built for: the parts' identity, memory, dtype and device."""
    return tuple((id(p), p.data_ptr(), p.dtype, p.device) for p in parts)


def _sync(module: nn.Module, attr: str, parts: list[Tensor] | None = None) -> Tensor:
    """The store of ``module.<attr>``, up to date with the parts (see the module docstring)."""
    layout = _layout(module, attr)
    parts = _parts(module, attr, layout) if parts is None else parts
    c: _Cache | None = layout.cache
    key = _key(parts)
    if c is None or c.key != key:  # first use, or the parts moved: check they are one base
        if not layout.linked(tuple(parts)):  # e.g. after copy.deepcopy or pickling
            layout.relink(parts)
            key = _key(parts)
        c = None
    first = parts[0]
    versions = tuple(p._version for p in layout.linked_of(parts))
    if c is None:
        if layout.kind == "rows":
            store = first.detach().as_strided(layout.shape, _contiguous_strides(layout.shape), 0)
        elif layout.kind == "sparse":  # the held FROZEN part is the original-layout tensor
            store = parts[layout.held].detach()
            with torch.no_grad():
                _gather_into(layout, parts, _index(module, attr, layout, "perm"), store)
        else:
            with torch.no_grad():
                store = layout.merge(parts, _index(module, attr, layout, "inv")).detach()
        c = layout.cache = _Cache(store, key, store._version, versions)
        return store
    if layout.kind == "rows":
        return c.store
    written = c.store._version != c.store_version
    stepped = c.stepped or versions != c.parts_version
    perm = _index(module, attr, layout, "perm")
    if written and stepped and torch.equal(layout.base_from(c.store, perm),
                                           layout.flat_base(parts)):
        written = stepped = False  # both written alike (a load, DDP's broadcast, an EMA copy)
    if not (written or stepped):
        return c.store
    if written and stepped:
        layout.cache = None
        raise RuntimeError(
            f"paramsplit: {type(module).__name__}.{attr} was written (through the tensor "
            f"`{attr}` returned) after its parts changed (an optimizer step, or a write to a "
            f"part) and before it was read again: the two writes cannot be merged. Read "
            f"`module.{attr}` again after each optimizer step before writing to it.")
    with torch.no_grad():
        if stepped:
            _gather_into(layout, parts, _index(module, attr, layout, "inv"), c.store)
        elif written:
            _scatter_from(layout, parts, perm, c.store)
    c.store_version, c.parts_version, c.stepped = c.store._version, tuple(
        p._version for p in layout.linked_of(parts)), False
    return c.store


def _gather_into(layout: _Layout, parts: list[Tensor], inv: Tensor | None, store: Tensor) -> None:
    """``store`` = the parts, in the original layout."""
    if layout.kind == "cols":
        torch.cat(parts, layout.dim, out=store)
    elif layout.kind == "sparse":  # inv is perm: write the trained elements only
        assert inv is not None
        store.view(-1).index_copy_(0, inv, layout.flat_base(parts))
    else:
        assert inv is not None
        torch.index_select(layout.flat_base(parts), 0, inv, out=store.view(-1))


def _scatter_from(layout: _Layout, parts: list[Tensor], perm: Tensor | None,
                  store: Tensor) -> None:
    """The parts = ``store``'s values."""
    if layout.kind == "cols":
        assert layout.bounds is not None
        for p, (a, b) in zip(parts, layout.bounds):
            p.copy_(store.narrow(layout.dim, a, b - a))
    else:
        assert perm is not None
        torch.index_select(store.reshape(-1), 0, perm, out=layout.flat_base(parts))


# -- the tensor owner.weight returns ------------------------------------------------------------


class _Full(torch.Tensor):
    """``owner.<attr>`` of a split parameter: the original tensor, assembled from its parts.

    To kernels a plain tensor. ``.grad`` is the parts' gradient in the original layout,
    ``.data`` a detached alias whose writes land in the parts, and ``requires_grad_()``
    freezes or unfreezes the parameter's trainable regions.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    _paramsplit_owner: tuple[nn.Module, str]

    @property  # type: ignore[override]
    def grad(self) -> Tensor | None:
        module, attr = self._paramsplit_owner
        layout = _layout(module, attr)
        parts = _parts(module, attr, layout)
        grads = [p.grad for p in parts]
        if all(g is None for g in grads):
            return None
        like = next(g for g in grads if g is not None)
        full = [g if g is not None else torch.zeros(p.shape, dtype=like.dtype, device=like.device)
                for g, p in zip(grads, parts)]
        return layout.merge(full, _index(module, attr, layout, "inv"))

    @grad.setter
    def grad(self, value: Tensor | None) -> None:
        module, attr = self._paramsplit_owner
        layout = _layout(module, attr)
        parts = _parts(module, attr, layout)
        values = [None] * len(parts) if value is None else [
            v.clone() for v in layout.values(value, _index(module, attr, layout, "perm"))]
        for p, v, region in zip(parts, values, layout.regions):
            if region.options is not None:
                p.grad = v

    @property  # type: ignore[override]
    def data(self) -> Tensor:
        return self.detach()  # shares the store's version counter: a write through it is seen

    @data.setter
    def data(self, value: Tensor) -> None:
        module, attr = self._paramsplit_owner
        layout = _layout(module, attr)
        if not isinstance(value, Tensor) or tuple(value.shape) != layout.shape \
                or value.dtype != self.dtype or value.device != self.device:
            raise RuntimeError(
                f"paramsplit: {type(module).__name__}.{attr}.data can only be set to a tensor of "
                f"its shape {layout.shape}, dtype {self.dtype} and device {self.device} (its "
                f"values are copied into the parts); got "
                f"{_describe(value)}. To change shape or dtype, paramsplit.merge the model first.")
        with torch.no_grad():
            self.detach().copy_(value)

    @property  # type: ignore[override]
    def requires_grad(self) -> bool:
        return torch._C.TensorBase.requires_grad.__get__(self)  # type: ignore[attr-defined]

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    def requires_grad_(self, requires_grad: bool = True) -> _Full:  # type: ignore[override]
        module, attr = self._paramsplit_owner
        _set_requires_grad(module, attr, requires_grad)
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickled or deep-copied on its own: a tensor
        return torch.Tensor.__reduce_ex__(self.detach().clone(), protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        return self.detach().clone()


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return type(value).__name__


def _set_requires_grad(module: nn.Module, attr: str, flag: bool) -> None:
    layout = _layout(module, attr)
    layout.requires_grad = flag
    if layout.cache is not None:
        layout.cache.check = None  # the leaf's requires_grad may change
    for p, region in zip(_parts(module, attr, layout), layout.regions):
        if region.options is not None:
            p.requires_grad_(flag)


def _wants_grad(layout: _Layout, parts: list[Tensor], ours: bool) -> bool:
    """The assembled tensor's ``requires_grad``: any part trains; or all are FROZEN and the
    parameter required grad (kernels must see the tensor the original model had)."""
    trainable = False
    for p, region in zip(parts, layout.regions):
        if region.options is None:
            if ours and p.requires_grad:  # FROZEN stays so, e.g. after model.requires_grad_()
                p.requires_grad_(False)
        elif p.requires_grad:
            trainable = True
    if any(r.options is not None for r in layout.regions):
        return trainable
    return layout.requires_grad


def _alias(store: Tensor, owner: tuple[nn.Module, str], requires_grad: bool) -> _Full:
    out = torch.Tensor._make_subclass(_Full, store, requires_grad)
    out._paramsplit_owner = owner
    return out  # type: ignore[return-value]


def _value(module: nn.Module, attr: str) -> Tensor:
    """The current value of ``module.<attr>``: a detached plain tensor (no copy where it can)."""
    layout = _layout(module, attr)
    parts = _parts(module, attr, layout)
    if _plain(layout, parts):
        return _sync(module, attr).detach()
    with torch.no_grad():
        return layout.merge(parts, _index(module, attr, layout, "inv"))


def _reader(attr: str, slow: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """The getter of ``owner.<attr>``: outside grad mode and compilation, while nothing changed
    since the last no-grad read (:func:`_check`), the same leaf again; else ``slow(owner)``.
    Eval loops and ``generate`` read every weight at every step: this path is kept short."""

    def read(module: nn.Module) -> Any:
        d = module.__dict__
        c: _Cache | None = d[_STATE][attr].cache
        if c is not None and c.check is not None and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling() and not c.stepped \
                and c.store._version == c.store_version \
                and c.leaf._paramsplit_owner[0] is module:  # type: ignore[union-attr]
            params = d["_parameters"]
            for name, ident, version, ptr, flag in c.check:
                p = params[name]
                if id(p) != ident or p._version != version or p.data_ptr() != ptr \
                        or p.requires_grad is not flag:
                    break
            else:
                return c.leaf
        return slow(module)

    return read


def _check(attr: str, parts: list[Tensor]) -> tuple[tuple[str, int, int, int, bool], ...]:
    """What :func:`_reader` compares, per part: identity, version, memory (``p.data = t`` bumps
    no version) and ``requires_grad``. The store's version and optimizer steps are checked
    beside it; changing the layout's own ``requires_grad`` or standing a tensor in for the
    parameter (``functional_call``) drops it."""
    return tuple((name, id(p), p._version, p.data_ptr(), p.requires_grad)
                 for name, p in zip(_names(attr, len(parts)), parts))


def _assembled(module: nn.Module, attr: str) -> Tensor:
    """``module.<attr>`` of a split parameter."""
    layout = _layout(module, attr)
    parts = _parts(module, attr, layout)
    plain = _plain(layout, parts)
    wants = _wants_grad(layout, parts, plain)
    if not plain:
        out = layout.merge(parts, _index(module, attr, layout, "inv"))
        if wants and not out.requires_grad and not _traced():
            out = out.detach().requires_grad_()  # under no_grad: look like the parameter
        return out
    store = _sync(module, attr, parts)
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return _Route.apply(layout, (module, attr), store, *parts)  # type: ignore[no-any-return]
    c = layout.cache
    assert c is not None
    if c.leaf is None or c.leaf.requires_grad != wants or c.leaf._paramsplit_owner[0] is not module:
        c.leaf = _alias(store, (module, attr), wants)  # eval loops, generate: one per change
    c.check = _check(attr, parts)
    return c.leaf


class _Route(torch.autograd.Function):
    """An alias of the store whose gradient is handed to the parts."""

    @staticmethod
    def forward(ctx: Any, layout: _Layout, owner: tuple[nn.Module, str],  # type: ignore[override]
                store: Tensor, *parts: Tensor) -> Tensor:
        ctx.layout, ctx.owner = layout, owner
        ctx.perm = _index(*owner, layout, "perm")
        return _alias(store, owner, False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        layout: _Layout = ctx.layout
        if layout.kind != "rows":
            _sync(*ctx.owner)  # a write during the forward (max_norm) reaches the parts first
        if layout.kind in ("mask", "sparse"):
            grads: list[Tensor | None] = layout.with_held(None, list(
                grad.reshape(-1).index_select(0, ctx.perm).split(layout.linked_of(layout.sizes))))
        else:
            assert layout.bounds is not None
            grads = [grad.narrow(layout.dim, a, b - a) for a, b in layout.bounds]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])]
        return (None, None, None, *grads)


def _tag(module: nn.Module) -> None:
    """Mark ``module``'s parts with their layout and region (parameter objects get replaced by
    deepcopy, pickling and FSDP2, so every place that finds new ones calls this)."""
    for attr, layout in _layouts(module).items():
        if layout.split:
            for i, p in enumerate(_parts(module, attr, layout)):
                setattr(p, _PART, (layout, i))


def _mark_stepped(params: Any) -> None:
    """Tell the stores of split parameters among ``params`` that their parts were stepped."""
    for p in params:
        tag = getattr(p, _PART, None)
        if tag is not None and tag[0].cache is not None:
            tag[0].cache.stepped = True
