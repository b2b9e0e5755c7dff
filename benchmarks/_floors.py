"""Floors: the unsplit step plus only the work a split of a given layout cannot avoid.

paramsplit 0.3 leaves the model alone: forward and backward are the unsplit model's, and the
weight's gradient is the unsplit gradient (``W.grad``). The optimizer steps *parts* instead of the
weight, and optimizer-step hooks move values and gradients between the weight and the parts once
per step. What a layout cannot avoid is therefore a number of copies per step, around the
optimizer step; a floor is the unsplit model and its unsplit ``AdamW`` step (the optimizer steps
the weight itself, in the unsplit model's param groups) plus exactly those copies, done with plain
torch calls into buffers allocated once (the least a copying layout could do):

* rows' floor is the unsplit step itself: row blocks are dense, so the parts are views of the
  weight and their gradients views of ``W.grad``; nothing is copied, ever.
* ``cols_floor``: the unsplit step + 3 weight-sized copies per step (the trained columns: for the
  ``cols`` and ``forum`` variants, every column, in 2 blocks of half the columns each). Before
  the step, a copy of the trained columns' values into dense buffers (``foreach_copy_`` from the
  column views of the weight) and a copy of their gradient (from the column views of ``W.grad``);
  after the step, a copy of the values back into the weight's columns.
* ``mask_floor``: the unsplit step + ``index_select`` of the values, ``index_select`` of the
  gradient and an ``index_select`` back through the inverse permutation, per weight and step,
  over the flat weight, with the int32 permutation that sorts the elements by the ``mask``
  variant's random 50% mask (stable: the order a mask split of that mask keeps its trained
  elements in) and its inverse. Both regions are trained, so the permutation covers every
  element, and a gather through its inverse writes the values back (several times cheaper than
  a ``scatter_`` on the CPU). ``sparse`` is the same mechanism over fewer elements (no floor of its own: the
  sparse and many tables set it against full fine-tuning).

What a split does beyond its floor is what it is judged on: the extra param groups (AdamW loops
over each group), the optimizer state per part, and the Python of the step hooks.

The copy back writes the values copied in before the step, so a floor's split weights do not move
from step to step (the step's update is overwritten): a floor is a cost model, the same tensors
copied in the same order around the same optimizer step, and the cost of forward, backward and
AdamW does not depend on the values. The buffers live from the build on: peak memory holds them as
it holds a split's parts and its parts' gradients during the step. So a floor's peak memory is the
unsplit model's plus persistent buffers for the parts' values and their gradients (``mask_floor``:
and the two int32 permutations), the least a copying layout needs; the gpt124m tables measure cols and
mask against it (``_report.GPT124M_MEM_TARGETS``).

Each maker returns ``(before_step, after_step)``, called after ``backward`` and after
``optimizer.step()`` (``_variants.build``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Hooks = tuple[Callable[[], None], Callable[[], None]]


def _targets(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def cols_floor(model: nn.Module, names: list[str], device: torch.device,
               masks: dict[str, Tensor]) -> Hooks:
    """3 copies of the trained columns per step: values in, gradient in, values back."""
    params = _targets(model, names)
    bounds = [((0, p.shape[1] // 2), (p.shape[1] // 2, p.shape[1])) for p in params]
    with torch.no_grad():
        views = [p.detach().narrow(1, a, b - a) for p, bs in zip(params, bounds) for a, b in bs]
        values = [v.contiguous() for v in views]
    grads = [torch.empty_like(v) for v in values]

    def before_step() -> None:
        with torch.no_grad():
            torch._foreach_copy_(values, views)
            torch._foreach_copy_(grads, [p.grad.narrow(1, a, b - a)  # type: ignore[union-attr]
                                         for p, bs in zip(params, bounds) for a, b in bs])

    def after_step() -> None:
        with torch.no_grad():
            torch._foreach_copy_(views, values)

    return before_step, after_step


def mask_floor(model: nn.Module, names: list[str], device: torch.device,
               masks: dict[str, Tensor]) -> Hooks:
    """``masks``: name -> the bool mask (CPU) whose sorting permutation is gathered."""
    params = _targets(model, names)
    perms = [torch.argsort(masks[n].reshape(-1).to(torch.uint8), stable=True).int()
             for n in names]
    invs = [torch.empty_like(p).index_copy_(0, p.long(), torch.arange(len(p), dtype=p.dtype))
            .to(device) for p in perms]
    perms = [p.to(device) for p in perms]
    with torch.no_grad():
        flats = [p.detach().view(-1) for p in params]
    values = [torch.empty_like(f) for f in flats]
    grads = [torch.empty_like(f) for f in flats]

    def before_step() -> None:
        with torch.no_grad():
            for p, f, perm, v, g in zip(params, flats, perms, values, grads):
                torch.index_select(f, 0, perm, out=v)
                torch.index_select(p.grad.view(-1), 0, perm, out=g)  # type: ignore[union-attr]

    def after_step() -> None:
        with torch.no_grad():
            for f, inv, v in zip(flats, invs, values):
                torch.index_select(v, 0, inv, out=f)

    return before_step, after_step
