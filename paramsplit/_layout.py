"""Region planning: how a parameter's elements are laid out in its sub-parameters.

A split parameter of shape ``S`` becomes one sub-parameter ("part") per region. All parts are dense
(contiguous) views into one fresh storage, the *base*, so that every optimizer implementation
(for-loop, foreach, fused) sees ordinary tensors:

* ``rows``: the base has the original shape; part ``i`` is ``base[start_i:stop_i]``, so the base
  *is* the original tensor: no copy, and each part's gradient is a view of the weight's.
* ``cols``: the base holds the column blocks one after the other. A block of columns of the
  original layout is not dense, and fused optimizers mishandle such views.
* ``mask``: the base is 1-D with the elements sorted by region (stable); part ``i`` is a slice of
  it. ``inv`` gathers the base into the original layout, ``perm`` gathers back.
* ``sparse`` (a mask whose FROZEN region holds most elements): the FROZEN part (``held``) is a
  whole tensor in the original layout; the trained regions' parts are slices of a small 1-D base,
  ``perm`` their positions. Assembly writes just them into the held part (``index_copy_``), which
  the forward then reads; work and optimizer state scale with the trained elements.

This module only describes layouts and moves values between the two layouts; keeping the
original-layout tensor in sync with the parts is ``_assemble``'s job.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._spec import _Region, _Target

try:  # FSDP2 shards parameters into DTensors (torch >= 2.5)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = None  # type: ignore[assignment, misc]


def _has_storage(t: Tensor) -> bool:
    """Whether ``t`` owns plain storage: not a wrapper such as FSDP2's DTensor or a
    ``torch.func`` transform's tensor."""
    return not (is_traceable_wrapper_subclass(t) or t.device.type == "meta"
                or torch._C._functorch.is_functorch_wrapped_tensor(t))


def _sharded(t: Tensor) -> bool:
    """Whether ``t`` is a wrapper such as FSDP2's DTensor (its storage is not ours)."""
    return is_traceable_wrapper_subclass(t)


def _index_like(index: Tensor, like: Tensor) -> Tensor:
    """``index`` on ``like``'s device; a replicated DTensor on its mesh if ``like`` is one."""
    if DTensor is not None and isinstance(like, DTensor) and not isinstance(index, DTensor):
        mesh = like.device_mesh
        return DTensor.from_local(index.to(like.device), mesh, [Replicate()] * mesh.ndim,
                                  run_check=False)
    return index.to(like.device)


@dataclass(eq=False)
class _Layout:
    """Description of one split parameter; shared by all modules that own it.

    ``requires_grad`` is the parameter's as the user sees it (``owner.weight.requires_grad_()``
    changes it); ``cache`` is the original-layout store kept by ``_assemble``."""

    kind: str  # "whole", "rows", "cols", "mask" or "sparse"
    shape: tuple[int, ...]
    regions: list[_Region]
    requires_grad: bool
    dim: int = 0
    bounds: list[tuple[int, int]] | None = None
    perm_cpu: Tensor | None = None  # kept only for meta parameters, to rebuild indices later
    name: str = ""  # the parameter's (first) name in the model
    digest: str = ""  # identifies the layout (kind, shape, blocks, mask): see _groups
    cache: Any = field(default=None, repr=False)  # _assemble's store; never copied or pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": None}

    @property
    def split(self) -> bool:
        return self.kind != "whole"

    @property
    def sizes(self) -> list[int]:
        return [r.numel for r in self.regions]

    @functools.cached_property
    def held(self) -> int:
        """``sparse``: the index of the FROZEN part that is the whole tensor (kept apart; the
        other parts are views of one base, as every layout's parts are); else -1."""
        if self.kind != "sparse":
            return -1
        return next(i for i, r in enumerate(self.regions) if r.options is None)

    def linked_of(self, items: list[Any] | tuple[Any, ...]) -> list[Any]:
        """``items`` (one per part) without the held part's."""
        held = self.held
        return [x for i, x in enumerate(items) if i != held]

    def with_held(self, held_item: Any, linked: list[Any]) -> list[Any]:
        """One item per part: ``linked`` with ``held_item`` at the held part's index."""
        out = list(linked)
        if self.held >= 0:
            out.insert(self.held, held_item)
        return out

    # -- building ---------------------------------------------------------------------------

    def _shapes(self) -> list[tuple[int, ...]]:
        """The shape of each part."""
        if self.kind == "sparse":
            return self.with_held(self.shape, [(n,) for n in self.linked_of(self.sizes)])
        if self.kind == "mask":
            return [(n,) for n in self.sizes]
        assert self.bounds is not None
        return [self.shape[:self.dim] + (b - a,) + self.shape[self.dim + 1:]
                for a, b in self.bounds]

    def views(self, base: Tensor) -> list[Tensor]:
        """The linked parts as dense views into ``base``."""
        if self.kind == "rows":
            return [base[a:b] for a, b in self.bounds or []]
        shapes, sizes = self.linked_of(self._shapes()), self.linked_of(self.sizes)
        return [flat.view(shape) for flat, shape in zip(base.split(sizes), shapes)]

    def base_from(self, full: Tensor, perm: Tensor | None) -> Tensor:
        """A fresh base holding the linked parts' values of the (unsplit) tensor ``full``."""
        full = full.detach()
        if self.kind in ("mask", "sparse"):
            assert perm is not None
            return full.reshape(-1).index_select(0, perm.to(full.device))
        if self.kind == "cols":
            return torch.cat([full.narrow(1, a, b - a).reshape(-1) for a, b in self.bounds or []])
        return full.clone(memory_format=torch.contiguous_format)

    def values(self, full: Tensor, perm: Tensor | None) -> list[Tensor]:
        """The parts' values of the (unsplit) tensor ``full``, as dense views of a fresh base
        (``sparse``: a fresh copy of ``full``, then the trained elements' views)."""
        held = full.detach().clone(memory_format=torch.contiguous_format) if self.held >= 0 \
            else None
        return self.with_held(held, self.views(self.base_from(full, perm)))

    def linked(self, parts: tuple[Tensor, ...]) -> bool:
        """Whether ``parts`` are still the dense views :meth:`views` made of one base."""
        if not all(_has_storage(p) for p in parts):
            return False  # e.g. FSDP2's sharded DTensors: nothing to alias
        if self.held >= 0 and not (parts[self.held].is_contiguous()
                                   and tuple(parts[self.held].shape) == self.shape):
            return False
        linked = self.linked_of(parts)
        ptr = linked[0].untyped_storage().data_ptr()
        at = 0
        for p, n, shape in zip(linked, self.linked_of(self.sizes),
                               self.linked_of(self._shapes())):
            if (p.untyped_storage().data_ptr() != ptr or p.storage_offset() != at
                    or tuple(p.shape) != shape or not p.is_contiguous()):
                return False
            at += n
        return True

    def flat_base(self, parts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """The 1-D base of linked ``parts``, detached (it shares their version counter)."""
        first = self.linked_of(parts)[0]
        return first.detach().as_strided((sum(self.linked_of(self.sizes)),), (1,), 0)

    # -- assembling ---------------------------------------------------------------------------

    def merge(self, parts: tuple[Tensor, ...] | list[Tensor], index: Tensor | None) -> Tensor:
        """The full tensor from per-part tensors (parts, their grads or optimizer state), with
        plain differentiable ops into a fresh tensor. ``index``: ``inv`` for masks, ``perm`` for
        ``sparse`` (see ``_assemble._index``)."""
        if self.kind in ("mask", "sparse"):
            assert index is not None
            flat = torch.cat([p.reshape(-1) for p in self.linked_of(parts)])
            index = _index_like(index, flat)
            if self.kind == "sparse":
                held = parts[self.held].reshape(-1)
                return held.index_copy(0, index, flat).view(self.shape)
            return flat.index_select(0, index).view(self.shape)
        return torch.cat(list(parts), self.dim)

    def relink(self, parts: list[Tensor]) -> None:
        """Make ``parts`` views of one fresh base again (after ``module.to()`` and friends)."""
        if not all(_has_storage(p) for p in parts) or self.linked(tuple(parts)):
            return  # sharded (FSDP2 owns the storage of DTensor parts), or linked already
        linked = self.linked_of(parts)
        with torch.no_grad():
            if self.held >= 0:
                parts[self.held].data = parts[self.held].data.contiguous()
            base = torch.cat([p.reshape(-1) for p in linked])
        if self.kind == "rows":
            base = base.view(self.shape)
        for p, view in zip(linked, self.views(base)):
            p.data = view


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _indices(perm: Tensor) -> tuple[Tensor, Tensor]:
    """``perm`` (base position -> flat position) and its inverse, int32 where that fits."""
    n = perm.numel()
    inv = torch.empty(n, dtype=torch.long)
    inv[perm.long()] = torch.arange(n)
    dtype = torch.int32 if n < 2**31 else torch.long
    return perm.to(dtype), inv.to(dtype)


def _plan(target: _Target) -> tuple[_Layout, list[nn.Parameter], dict[str, Tensor]]:
    """The layout of ``target``'s parameter, its parts and its index tensors (mask only).

    The parts hold a copy of the parameter's values; the parameter itself is not changed.
    """
    param = target.param
    layout = _Layout(target.kind, tuple(param.shape), target.regions, param.requires_grad,
                     target.dim, target.bounds)
    layout.name, layout.digest = target.name, _digest(layout, target.region_ids)
    if not layout.split:
        return layout, [], {}
    buffers: dict[str, Tensor] = {}
    perm = None
    if layout.kind in ("mask", "sparse"):
        assert target.region_ids is not None
        order = torch.argsort(target.region_ids, stable=True)
        if layout.kind == "sparse":  # only the trained elements' positions (index_copy_: long)
            perm, inv = order[target.region_ids[order] != layout.held], order
        else:
            perm, inv = _indices(order)
        if param.device.type == "meta":
            layout.perm_cpu = perm
        buffers = {"perm": perm.to(param.device)}
        if layout.kind == "mask":
            buffers["inv"] = inv.to(param.device)
        perm = buffers["perm"]
    parts = [
        nn.Parameter(view, requires_grad=param.requires_grad and region.options is not None)
        for view, region in zip(layout.values(param, perm), layout.regions)
    ]
    return layout, parts, buffers


def _digest(layout: _Layout, region_ids: Tensor | None) -> str:
    """A short fingerprint of where each element of the parameter lives among the parts."""
    h = hashlib.sha1(repr((layout.kind, layout.shape, layout.dim, layout.bounds,
                           layout.sizes)).encode())
    if region_ids is not None:
        h.update(region_ids.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
