"""Region planning: how a parameter's elements are laid out in its sub-parameters.

A split parameter of shape ``S`` becomes one sub-parameter ("part") per region. All parts are dense
(contiguous) views into one fresh storage, the *base*, so that every optimizer implementation
(for-loop, foreach, fused) sees ordinary tensors, and assembling the original tensor costs little:

* ``rows``: the base has the original shape; part ``i`` is ``base[start_i:stop_i]``. The assembled
  tensor is the base itself: no copy, and each part's gradient is a view of the weight's.
* ``cols``: the base holds the column blocks one after the other; assembly is ``torch.cat`` along
  dim 1 (one copy). A block of columns of the original layout is not dense, and fused optimizers
  mishandle such views, so the parts are not taken from the original layout.
* ``mask``: the base is 1-D with the elements sorted by region (stable); part ``i`` is a slice of
  it. Assembly gathers the base into a fresh tensor of shape ``S`` (``index_select`` with ``inv``);
  the gradient is gathered back with ``perm``.

When the parts stop sharing one storage (a wrapper such as FSDP2 replaced them) or under
``torch.compile``, assembly uses plain differentiable ops (``torch.cat`` and ``index_select``).
Every route gives exactly the original values in a contiguous tensor at storage offset 0, so every
kernel reading it computes bitwise what it computed on the original parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._spec import _Region, _Target

try:  # FSDP2 shards parameters into DTensors (torch >= 2.5)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = None  # type: ignore[assignment, misc]


def _has_storage(t: Tensor) -> bool:
    """Whether ``t`` owns plain storage (not a wrapper subclass such as FSDP2's DTensor)."""
    return not is_traceable_wrapper_subclass(t)


def _index_like(index: Tensor, like: Tensor) -> Tensor:
    """``index`` on ``like``'s device; a replicated DTensor on its mesh if ``like`` is one."""
    if DTensor is not None and isinstance(like, DTensor) and not isinstance(index, DTensor):
        mesh = like.device_mesh
        return DTensor.from_local(index.to(like.device), mesh, [Replicate()] * mesh.ndim,
                                  run_check=False)
    return index.to(like.device)


@dataclass(eq=False)
class _Layout:
    """Immutable description of one split parameter; shared by all modules that own it."""

    kind: str  # "whole", "rows", "cols" or "mask"
    shape: tuple[int, ...]
    regions: list[_Region]
    requires_grad: bool
    dim: int = 0
    bounds: list[tuple[int, int]] | None = None
    perm_cpu: Tensor | None = None  # kept only for meta parameters, to rebuild indices later

    @property
    def split(self) -> bool:
        return self.kind != "whole"

    @property
    def sizes(self) -> list[int]:
        return [r.numel for r in self.regions]

    # -- building ---------------------------------------------------------------------------

    def _shapes(self) -> list[tuple[int, ...]]:
        """The shape of each part."""
        if self.kind == "mask":
            return [(n,) for n in self.sizes]
        assert self.bounds is not None
        return [self.shape[:self.dim] + (b - a,) + self.shape[self.dim + 1:]
                for a, b in self.bounds]

    def views(self, base: Tensor) -> list[Tensor]:
        """The parts as dense views into ``base``."""
        if self.kind == "rows":
            return [base[a:b] for a, b in self.bounds or []]
        return [flat.view(shape) for flat, shape in zip(base.split(self.sizes), self._shapes())]

    def base_from(self, full: Tensor, perm: Tensor | None) -> Tensor:
        """A fresh base holding the values of the (unsplit) tensor ``full``."""
        full = full.detach()
        if self.kind == "mask":
            assert perm is not None
            return full.reshape(-1).index_select(0, perm.to(full.device))
        if self.kind == "cols":
            return torch.cat([full.narrow(1, a, b - a).reshape(-1) for a, b in self.bounds or []])
        return full.clone(memory_format=torch.contiguous_format)

    def values(self, full: Tensor, perm: Tensor | None) -> list[Tensor]:
        """The parts' values of the (unsplit) tensor ``full``, as dense views of a fresh base."""
        return self.views(self.base_from(full, perm))

    def linked(self, parts: tuple[Tensor, ...]) -> bool:
        """Whether ``parts`` are still the dense views :meth:`views` made of one base."""
        if not all(_has_storage(p) for p in parts):
            return False  # e.g. FSDP2's sharded DTensors: nothing to alias
        ptr = parts[0].untyped_storage().data_ptr()
        at = 0
        for p, n, shape in zip(parts, self.sizes, self._shapes()):
            if (p.untyped_storage().data_ptr() != ptr or p.storage_offset() != at
                    or tuple(p.shape) != shape or not p.is_contiguous()):
                return False
            at += n
        return True

    # -- assembling ---------------------------------------------------------------------------

    def assemble(self, *tensors: Tensor) -> Tensor:
        """The original tensor, from ``(perm, inv, *parts)`` (mask) or ``(*parts)``."""
        perm: Tensor | None = None
        inv: Tensor | None = None
        parts = tensors
        if self.kind == "mask":
            perm, inv, parts = tensors[0], tensors[1], tensors[2:]
        if torch.compiler.is_compiling():
            # Compiled kernels do not pick their path by requires_grad, and dynamo cannot return
            # a tensor marked with requires_grad_(): plain ops only.
            return self.merge(parts, inv)
        if self.kind != "cols" and self.linked(parts):
            out = _AliasAssemble.apply(self, perm, inv, *parts)
        else:
            out = self.merge(parts, inv)
        if self.requires_grad and not out.requires_grad:
            # Kernels (e.g. MultiheadAttention's) pick their path by requires_grad, even under
            # no_grad: the assembled tensor must look like the parameter it stands for. A leaf, so
            # that its views (``weight.t()`` inside ``F.linear``) require grad too.
            out = out.detach().requires_grad_()
        return out

    def merge(self, parts: tuple[Tensor, ...] | list[Tensor], inv: Tensor | None) -> Tensor:
        """The full tensor from per-part tensors (parts, their grads or optimizer state), with
        plain differentiable ops into a fresh tensor."""
        if self.kind == "mask":
            assert inv is not None
            flat = torch.cat([p.reshape(-1) for p in parts])
            return flat.index_select(0, _index_like(inv, flat)).view(self.shape)
        return torch.cat(list(parts), self.dim)

    def relink(self, parts: list[nn.Parameter]) -> None:
        """Make ``parts`` views of one fresh base again (after ``module.to()`` and friends)."""
        if not all(_has_storage(p) for p in parts) or self.linked(tuple(parts)):
            return  # sharded (FSDP2 owns the storage of DTensor parts), or linked already
        with torch.no_grad():
            base = torch.cat([p.reshape(-1) for p in parts])
        if self.kind == "rows":
            base = base.view(self.shape)
        for p, view in zip(parts, self.views(base)):
            p.data = view


class _AliasAssemble(torch.autograd.Function):
    """Assembly from linked parts: an alias of the base (rows) or one gather (mask)."""

    @staticmethod
    def forward(ctx, layout: _Layout, perm: Tensor | None, inv: Tensor | None,  # type: ignore[override]
                *parts: Tensor) -> Tensor:
        ctx.layout = layout
        first = parts[0]
        if layout.kind == "mask":
            assert perm is not None and inv is not None
            ctx.save_for_backward(perm)
            base = first.as_strided((sum(layout.sizes),), (1,), 0)
            return base.index_select(0, inv).view(layout.shape)
        return first.as_strided(layout.shape, _contiguous_strides(layout.shape), 0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        layout: _Layout = ctx.layout
        if layout.kind == "mask":
            (perm,) = ctx.saved_tensors
            grads = grad.reshape(-1).index_select(0, perm).split(layout.sizes)
        else:
            assert layout.bounds is not None
            grads = [grad.narrow(layout.dim, a, b - a) for a, b in layout.bounds]
        return (None, None, None, *grads)


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
    if not layout.split:
        return layout, [], {}
    buffers: dict[str, Tensor] = {}
    perm = None
    if layout.kind == "mask":
        assert target.region_ids is not None
        perm, inv = _indices(torch.argsort(target.region_ids, stable=True))
        if param.device.type == "meta":
            layout.perm_cpu = perm
        buffers = {"perm": perm.to(param.device), "inv": inv.to(param.device)}
        perm = buffers["perm"]
    parts = [
        nn.Parameter(view, requires_grad=param.requires_grad and region.options is not None)
        for view, region in zip(layout.values(param, perm), layout.regions)
    ]
    return layout, parts, buffers
