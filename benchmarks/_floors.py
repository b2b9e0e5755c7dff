"""Floors: the unsplit model plus only the work a split of a given layout cannot avoid.

A split keeps its parts in a storage of its own and hands the owner an assembled weight; a floor
does the same extra work on the unsplit model, with no library in the way:

* rows' floor is the unsplit step itself (a block of rows is dense: the parts alias the weight).
* ``cols_floor``: two weight-sized copies per step. Forward reads a fresh copy of the weight
  (``w.clone()``, in the autograd graph, whose backward passes the gradient through unchanged),
  and after backward the weight's gradient is copied once (``w.grad = w.grad.clone()``: splitting
  a gradient into dense column blocks is one copy of it).
* ``mask_floor``: two index gathers per step with int32 permutation indices. Forward reads
  ``w.view(-1).index_select(0, perm)`` and backward gathers the gradient back with the inverse
  permutation (one ``index_select`` each, as an autograd function, so no scatter). ``perm`` is
  the permutation that sorts the elements by the ``mask`` variant's random 50% mask (stable: the
  gather a mask split of that mask must do). A uniformly random permutation would be no floor:
  its gathers miss the cache at every element (measured 5.8x the whole unsplit step of the
  Linear at batch 8 on 2 cores, while the mask split took 1.6x). The forward computes with
  permuted weights, which costs the same.

The assembled weight reaches the owner's unchanged forward as an instance attribute: the
parameter is re-registered as ``<attr>_orig``, a forward pre-hook sets ``owner.<attr>`` to the
assembled tensor and a forward hook deletes it again (so it lives exactly as long as autograd
needs it, like a split's assembled tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _reroute(model: nn.Module, names: list[str],
             assemble: Callable[[nn.Parameter], Callable[[], Tensor]]) -> list[nn.Parameter]:
    """Make every owner's forward read ``assemble(p)()`` as ``owner.<attr>``; return the params."""
    params = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = getattr(owner, attr)
        delattr(owner, attr)
        owner.register_parameter(attr + "_orig", p)
        fn = assemble(p)

        def pre(mod: nn.Module, args: Any, attr: str = attr, fn: Callable[[], Tensor] = fn) -> None:
            setattr(mod, attr, fn())

        def post(mod: nn.Module, args: Any, out: Any, attr: str = attr) -> None:
            delattr(mod, attr)

        owner.register_forward_pre_hook(pre)
        owner.register_forward_hook(post)
        params.append(p)
    return params


def cols_floor(model: nn.Module, names: list[str], device: torch.device,
               masks: dict[str, Tensor]) -> Callable[[], None]:
    params = _reroute(model, names, lambda p: p.clone)

    def split_grads() -> None:
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.clone()

    return split_grads


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.inv = inv
        return w.reshape(-1).index_select(0, perm).view(w.shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        return g.reshape(-1).index_select(0, ctx.inv).view(g.shape), None, None


def mask_floor(model: nn.Module, names: list[str], device: torch.device,
               masks: dict[str, Tensor]) -> None:
    """``masks``: name -> the bool mask (CPU) whose sorting permutation is gathered."""
    by_param = {}
    for name in names:
        perm = torch.argsort(masks[name].reshape(-1).to(torch.uint8), stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        by_param[name] = perm.to(torch.int32).to(device), inv.to(torch.int32).to(device)
    params = dict(model.named_parameters())
    indices = {id(params[n]): by_param[n] for n in names}

    def assemble(p: nn.Parameter) -> Callable[[], Tensor]:
        perm, inv = indices[id(p)]
        return lambda: _Gather.apply(p, perm, inv)

    _reroute(model, names, assemble)
    return None
