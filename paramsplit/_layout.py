"""Layouts: how the parts of a split parameter map to its elements.

A split parameter keeps living in the model, untouched. Its *parts* are tensors the optimizer
holds instead of it, one per trained region (FROZEN regions have none). A layout knows how to

* make the parts from the weight (:meth:`_Layout.parts_from`),
* bring the weight's current values into the parts before a step (:meth:`_Layout.load`),
* cut the weight's gradient into part gradients (:meth:`_Layout.grads`),
* write the parts' values back into the weight after a step (:meth:`_Layout.store`),
* and convert per-part tensors (optimizer state) to and from the weight's layout
  (:meth:`_Layout.full`, :meth:`_Layout.pieces`).

``rows`` parts are views of the weight: no copy ever, and their gradients are views of the
weight's gradient. ``cols`` and ``mask`` parts are dense copies (fused optimizer kernels mishandle
strided views): one gather of values and of gradients before a step, one scatter after it. The
``cols`` copies of all weights stepped together go into one :class:`_Copies` and are made by one
``torch._foreach_copy_`` (blocks of one width that follow each other: one strided copy per
weight); ``mask`` gathers and scatters each weight with one indexing kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import Tensor

from ._spec import _Region, _Target


class _Copies:
    """Copies gathered across the weights of one step, made together by one
    ``torch._foreach_copy_`` (a few kernel launches per device and dtype, not one per part)."""

    def __init__(self) -> None:
        self.dst: list[Tensor] = []
        self.src: list[Tensor] = []

    def add(self, dst: list[Tensor], src: list[Tensor]) -> None:
        self.dst += dst
        self.src += src

    def run(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)
            self.dst, self.src = [], []


class _Layout:
    """Where each trained region's elements live in the weight; see the module docstring."""

    def __init__(self, target: _Target) -> None:
        self.shape = tuple(target.param.shape)
        # the plan without the weight, nor the element-wise region ids (a mask's perm holds them)
        self.target = dataclasses.replace(target, param=torch.empty(self.shape, device="meta"),
                                          region_ids=None)
        self.regions = target.regions
        self.trained = [i for i, r in enumerate(self.regions) if r.options is not None]
        self.digest = _digest(target)
        # rows / cols: the trained blocks along their dim
        self.bounds = None if target.bounds is None else [target.bounds[i] for i in self.trained]

    def local(self, start: int, stop: int) -> _Layout:
        """This layout restricted to rows ``start:stop`` (a shard of a ``Shard(0)`` DTensor):
        the same trained regions, some possibly empty here."""
        t = self.target
        shape = (stop - start,) + self.shape[1:]
        per_row = 1
        for n in self.shape[1:]:
            per_row *= n
        bounds, ids = t.bounds, self._region_ids()
        if ids is not None:
            ids = ids[start * per_row: stop * per_row]
            counts = torch.bincount(ids.long(), minlength=len(t.regions)).tolist()
        elif t.dim == 0:
            assert bounds is not None
            bounds = [(min(max(a - start, 0), stop - start), min(max(b - start, 0), stop - start))
                      for a, b in bounds]
            counts = [(b - a) * per_row for a, b in bounds]
        else:
            assert bounds is not None
            counts = [(stop - start) * (b - a) * (per_row // self.shape[1]) for a, b in bounds]
        regions = [dataclasses.replace(r, numel=n) for r, n in zip(t.regions, counts)]
        return type(self)(dataclasses.replace(t, param=torch.empty(shape, device="meta"),
                                              bounds=bounds, region_ids=ids, regions=regions))

    def _region_ids(self) -> Tensor | None:
        """Each element's region index, flattened (masks), or None (blocks)."""
        return None

    def pieces(self, full: Tensor) -> list[Tensor]:
        """The trained regions' elements of ``full`` (the weight's shape), one dense tensor each
        (views for ``rows``, fresh tensors otherwise)."""
        raise NotImplementedError

    def write(self, full: Tensor, pieces: list[Tensor]) -> None:
        """Copy ``pieces`` (one per trained region) into their elements of ``full``, in place."""
        raise NotImplementedError

    def parts_from(self, weight: Tensor) -> list[Tensor]:
        """The parts' values, cut from ``weight``; :meth:`load` and :meth:`store` then work on
        that weight's memory until it moves."""
        self._at = _where(weight)
        return self.pieces(weight.detach())

    @property
    def copied(self) -> bool:
        """Whether the parts are copies of the weight's elements (not its memory)."""
        return True

    def load(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> bool:
        """Bring the weight's values into ``parts`` (in place, now or by ``copies``); ``False``
        if the parts must be made anew (the weight's storage, dtype or device changed)."""
        raise NotImplementedError

    def grads(self, grad: Tensor, parts: list[Tensor], copies: _Copies) -> list[Tensor]:
        """The gradients of ``parts``, cut from the weight's ``grad`` (filled now or by
        ``copies``)."""
        return self.pieces(grad)

    def store(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> None:
        """Write the parts back into the weight :meth:`load` last saw (now or by ``copies``)."""
        raise NotImplementedError

    def full(self, pieces: list[Tensor]) -> Tensor:
        """A tensor of the weight's shape holding ``pieces``; zeros where no trained region is."""
        out = pieces[0].new_zeros(self.shape)
        self.write(out, pieces)
        return out


class _Blocks(_Layout):
    """Blocks along one dim, each part a dense copy of a trained block: the weight's values and
    gradient are copied in before a step and the values out after it. ``_in`` holds what the
    copies read and write in the weight (its blocks, while it stays put); ``_base`` the one
    tensor the parts are slices of, when all trained blocks are copied as one view
    (:meth:`_stacked`)."""

    def _views(self, full: Tensor) -> list[Tensor]:
        """The trained blocks of ``full``, as views."""
        raise NotImplementedError

    def _stacked(self, full: Tensor) -> Tensor | None:
        """All trained blocks of ``full`` as one view (blocks, ...), where their layout allows."""
        return None

    def pieces(self, full: Tensor) -> list[Tensor]:
        return [v.contiguous() for v in self._views(full)]

    def write(self, full: Tensor, pieces: list[Tensor]) -> None:
        torch._foreach_copy_(self._views(full), pieces)

    def parts_from(self, weight: Tensor) -> list[Tensor]:
        w = weight.detach()
        stacked = self._stacked(w)
        if stacked is None:
            self._in, self._base = self._views(w), None
            return super().parts_from(weight)
        self._at = _where(weight)
        self._in, self._base = [stacked], stacked.contiguous()
        return list(self._base.unbind(0))

    def _dense(self, parts: list[Tensor]) -> list[Tensor]:
        return parts if self._base is None else [self._base]

    def load(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> bool:
        if _where(weight) != self._at:
            return False
        copies.add(self._dense(parts), self._in)
        return True

    def grads(self, grad: Tensor, parts: list[Tensor], copies: _Copies) -> list[Tensor]:
        views = self._views(grad) if self._base is None else [self._stacked(grad)]
        out = [_dense_like(v) for v in views]  # the gradient's dtype: a copy must not cast
        copies.add(out, views)
        return out if self._base is None else list(out[0].unbind(0))

    def store(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> None:
        copies.add(self._in, self._dense(parts))


class _Rows(_Blocks):
    """Blocks of dim 0: each part is a view of the weight (and its gradient a view of the
    weight's gradient), so nothing is ever copied. A weight that is not contiguous (stored
    transposed, say) would give strided views, which fused optimizer kernels step wrongly: its
    blocks are copied in and out around a step instead, as ``cols`` blocks are."""

    def __init__(self, target: _Target) -> None:
        super().__init__(target)
        ends = [b for _, b in self.bounds]
        covers = [a for a, _ in self.bounds] == [0] + ends[:-1] and ends[-1:] == [self.shape[0]]
        self._tiles = [b - a for a, b in self.bounds] if covers else None

    def _views(self, full: Tensor) -> list[Tensor]:
        return [full[a:b] for a, b in self.bounds]

    def parts_from(self, weight: Tensor) -> list[Tensor]:
        parts = super().parts_from(weight)  # views of a contiguous weight (contiguous() keeps)
        if weight.is_contiguous():
            self._in = None
        return parts

    @property
    def copied(self) -> bool:
        return self._in is not None

    def load(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> bool:
        if self._in is None:  # the parts are views of the weight's memory
            return _where(weight) == self._at
        return super().load(weight, parts, copies)

    def grads(self, grad: Tensor, parts: list[Tensor], copies: _Copies) -> list[Tensor]:
        if self._in is None and grad.is_contiguous():  # views of the gradient
            if self._tiles:  # the trained blocks cover dim 0: one call cuts them all
                return list(torch.split_with_sizes(grad, self._tiles))
            return self._views(grad)
        return super().grads(grad, parts, copies)

    def store(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> None:
        if self._in is not None:  # else the parts are the weight's own memory
            super().store(weight, parts, copies)


class _Cols(_Blocks):
    """Blocks of dim 1: each part is a dense copy of a block of columns. Trained blocks of one
    width that follow each other (a fused projection's q / k / v, the two halves of a layer)
    are copied by one strided copy each way, their parts being slices of one base tensor."""

    def __init__(self, target: _Target) -> None:
        super().__init__(target)
        widths = {b - a for a, b in self.bounds}
        follow = all(b == a2 for (_, b), (a2, _) in zip(self.bounds, self.bounds[1:]))
        self._even = (self.bounds[0][0], len(self.bounds), widths.pop()) \
            if len(widths) == 1 and follow else None

    def _views(self, full: Tensor) -> list[Tensor]:
        return [full.narrow(1, a, b - a) for a, b in self.bounds]

    def _stacked(self, full: Tensor) -> Tensor | None:
        if self._even is None:
            return None
        a, k, w = self._even
        return full.narrow(1, a, k * w).unflatten(1, (k, w)).movedim(1, 0)


class _Mask(_Layout):
    """Any set of elements: the trained elements, sorted by region, are gathered into one 1-D
    base whose slices are the parts; ``perm`` holds their flat positions in the weight. A part
    has its weight's ndim (shape ``(1, ..., 1, n)``), so code that groups tensors by ``ndim``
    (decay for ``p.dim() >= 2``) treats it as it treats the weight.

    When the trained regions cover every element (no FROZEN region), the base is a permutation
    of the weight, and it is written back by a gather too, through the inverse permutation
    ``inv``: a gather is several times cheaper than a scatter on the CPU, and int32 indices
    (both of them: the memory of one int64 ``perm``) cheaper still. Otherwise ``perm`` is int64
    and the write-back a ``scatter_`` of the trained elements only."""

    def __init__(self, target: _Target) -> None:
        super().__init__(target)
        ids = target.region_ids
        assert ids is not None
        if len(self.trained) <= 8:  # one pass per region: cheaper than sorting them all
            perm = torch.cat([torch.nonzero(ids == i).flatten() for i in self.trained])
        else:
            order = torch.argsort(ids, stable=True)
            trained = torch.zeros(len(self.regions), dtype=torch.bool)
            trained[self.trained] = True
            perm = order[trained[ids[order].long()]]
        self.inv: Tensor | None = None
        if perm.numel() == ids.numel() and perm.numel() < 2**31:  # a permutation of the weight
            perm = perm.to(torch.int32)
            self.inv = torch.empty_like(perm)
            self.inv[perm] = torch.arange(perm.numel(), dtype=torch.int32)
        self.perm = perm
        # perm and inv are on the CPU; per device in _on
        self._on: dict[torch.device, tuple[Tensor, Tensor | None]] = {}
        self.sizes = [self.regions[i].numel for i in self.trained]

    def _region_ids(self) -> Tensor:
        """Rebuilt from ``perm``: not kept, it would cost a byte per element at rest. Elements
        outside ``perm`` are in the one untrained (FROZEN) region, if any."""
        numel = 1
        for n in self.shape:
            numel *= n
        untrained = [i for i in range(len(self.regions)) if i not in self.trained]
        dtype = torch.uint8 if len(self.regions) <= 255 else torch.int32
        ids = torch.full((numel,), untrained[0] if untrained else 0, dtype=dtype)
        ids[self.perm] = torch.repeat_interleave(torch.tensor(self.trained, dtype=dtype),
                                                 torch.tensor(self.sizes))
        return ids

    def _index(self, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """``perm`` and ``inv`` on ``like``'s device."""
        on = self._on.get(like.device)
        if on is None:
            on = self._on[like.device] = (self.perm.to(like.device), None if self.inv is None
                                          else self.inv.to(like.device))
        return on

    def pieces(self, full: Tensor) -> list[Tensor]:
        flat = full.reshape(-1)
        lead = (1,) * (len(self.shape) - 1)
        return [t.view(lead + (n,)) for t, n in zip(
            torch.split_with_sizes(flat.index_select(0, self._index(flat)[0]), self.sizes),
            self.sizes)]

    def parts_from(self, weight: Tensor) -> list[Tensor]:
        pieces = super().parts_from(weight)
        self._base = _base(pieces)  # the parts are slices of it
        w = weight.detach()
        self._flat = w.view(-1) if w.is_contiguous() else None
        return pieces

    def load(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> bool:
        if _where(weight) != self._at:
            return False
        flat = self._flat if self._flat is not None else weight.detach().reshape(-1)
        torch.index_select(flat, 0, self._index(flat)[0], out=self._base)
        return True

    def store(self, weight: Tensor, parts: list[Tensor], copies: _Copies) -> None:
        if self._flat is not None:
            self._put(self._flat, self._base)
        else:
            self.write(weight.detach(), [self._base])

    def write(self, full: Tensor, pieces: list[Tensor]) -> None:
        values = _base(pieces) if len(pieces) > 1 else pieces[0].reshape(-1)
        if values is None:
            values = torch.cat([p.reshape(-1) for p in pieces])
        if full.is_contiguous():
            self._put(full.view(-1), values)
        else:
            flat = full.flatten()
            self._put(flat, values)
            full.copy_(flat.view(full.shape))

    def _put(self, flat: Tensor, values: Tensor) -> None:
        """``flat[perm] = values``: a gather through ``inv`` where ``perm`` covers ``flat``, else a
        ``scatter_`` (the positions are distinct; faster than ``index_copy_``)."""
        perm, inv = self._index(flat)
        if inv is not None:
            torch.index_select(values, 0, inv, out=flat)
        else:
            flat.scatter_(0, perm, values)


def _dense_like(t: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``t``'s shape, dtype and device."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _where(t: Tensor) -> tuple[object, ...]:
    return t.data_ptr(), t.dtype, t.device, t.stride(), t.storage_offset()


def _base(parts: list[Tensor]) -> Tensor | None:
    """The 1-D tensor of which ``parts`` are consecutive dense slices, or ``None``."""
    first = parts[0]
    if not first.is_contiguous():
        return None
    total = 0
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if (not p.is_contiguous() or p.untyped_storage().data_ptr() != storage
                or p.storage_offset() != offset + total):
            return None
        total += p.numel()
    return first.detach().as_strided((total,), (1,), offset)


_KINDS: dict[str, type[_Layout]] = {"rows": _Rows, "cols": _Cols, "mask": _Mask, "sparse": _Mask}


def _layout(target: _Target) -> _Layout:
    return _KINDS[target.kind](target)


def _digest(target: _Target) -> str:
    """A short fingerprint of where each trained element of the parameter lives among the parts."""
    regions: list[_Region] = target.regions
    h = hashlib.sha1(repr((target.kind, tuple(target.param.shape), target.dim, target.bounds,
                           [(r.numel, r.options is None) for r in regions])).encode())
    if target.region_ids is not None:
        h.update(target.region_ids.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
