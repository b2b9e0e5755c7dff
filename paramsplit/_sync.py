"""The step synchronisation: parts and weights meet once per optimizer step, nowhere else.

The model keeps its parameters. For each split parameter (the *weight*) paramsplit makes parts,
one per trained region, and puts them, together with the weight, in the param groups. Between
steps, the gradient lives in one place, ``weight.grad``, where backward, DDP, FSDP,
``clip_grad_norm_(model.parameters())``, ``GradScaler.unscale_`` and ``optimizer.zero_grad()``
find it (the optimizer holds the weight too). Two global optimizer-step hooks do the rest:

* before a step: check the weight is still the model's (else rebind or raise), bring its values
  into the parts (``cols``/``mask``: a gather; ``rows`` parts are views of it), give the parts
  their share of ``weight.grad``, and hide ``weight.grad`` from the optimizer for the step;
* after a step: write the parts back into the weight (``cols``/``mask``: a copy back), give the
  weight its gradient back (as the step left the parts' gradients), and drop the parts'.

Weights with per-element weight decay (``_decay``) are decayed around the step instead. With
``step(closure)`` the weights are handed back before each evaluation of the closure and over
again after it. A wrapper that steps the optimizer it wraps (Lookahead, SAM) holds the weights
for both steps. A step that raised is abandoned at the next one. Optimizers that hold neither
pay a check of their groups' identities per step.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.optim import optimizer as _optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ._decay import DECAY_GROUP, _Decay, _form, _lr, _scale, _stepping_classes
from ._layout import _Copies, _Layout, _layout
from ._spec import _Region, _Target

_DATA = torch._C.TensorBase.data  # the plain ``.data`` descriptor; see _Part


class _Part(nn.Parameter):
    """A part: one trained region of a split weight, held by the optimizer only.

    It is an ordinary ``nn.Parameter`` except that assigning its ``.data`` raises: engines that
    flatten the optimizer's parameters into buffers of their own (DeepSpeed ZeRO) would then
    step the weight as a whole and ignore the regions, silently. paramsplit moves a part's
    storage itself, through ``_DATA``.
    """

    @property
    def data(self) -> Tensor:  # type: ignore[override]
        return _DATA.__get__(self)

    @data.setter
    def data(self, value: Tensor) -> None:
        old = _DATA.__get__(self)
        if (value.data_ptr() == old.data_ptr() and value.shape == old.shape
                and value.stride() == old.stride() and value.dtype == old.dtype
                and value.device == old.device):  # e.g. bitsandbytes' p.data = p.data.contiguous()
            _DATA.__set__(self, value)
            return
        split, i = getattr(self, _PART)
        raise RuntimeError(
            f"paramsplit: something replaced the storage of a part of {split.name!r} (region "
            f"{split.regions[split.layout.trained[i]].label!r}): an engine that flattens the "
            f"optimizer's parameters into its own buffers, such as DeepSpeed ZeRO (stages 1-3), "
            f"would step {split.name!r} as a whole and ignore its regions. paramsplit does not "
            f"support that: use DistributedDataParallel, FSDP2 (fully_shard) or DeepSpeed "
            f"without ZeRO (stage 0).")

    def __getattr__(self, name: str) -> Any:  # only for attributes a part does not have
        split = self.__dict__.get(_PART, (None,))[0]
        if split is not None and hasattr(split.weight, "ds_id"):
            raise RuntimeError(
                f"paramsplit: DeepSpeed ZeRO stage 3 asked a part of {split.name!r} for {name!r}: "
                f"it partitions the optimizer's tensors into its own buffers, which would step "
                f"{split.name!r} as a whole and ignore its regions. paramsplit does not support "
                f"ZeRO: use DistributedDataParallel, FSDP2 (fully_shard) or DeepSpeed without "
                f"ZeRO (stage 0, fp32).")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce_ex__(self, protocol: Any) -> Any:  # a copy of an optimizer holds plain tensors
        return nn.Parameter, (_DATA.__get__(self), self.requires_grad)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Parameter:
        out = nn.Parameter(_DATA.__get__(self).clone(), self.requires_grad)
        memo[id(self)] = out
        return out


# torch's optimizers take their multi-tensor (foreach) path by default (on CUDA) only for tensors
# whose type is in this list, and fall back to a for-loop over the tensors for any other type:
# per part and op, a kernel launch. A part steps as a Parameter; torch.distributed.tensor
# registers DTensor the same way. One of the two private torch structures paramsplit touches
# (tests/test_optimizers.py pins it).
if _Part not in _optimizer._foreach_supported_types:
    _optimizer._foreach_supported_types.append(_Part)

#: Group key holding the fingerprints of the parts a group was made with (see ``_groups``).
LAYOUT_KEY = "paramsplit_layout"
#: Key paramsplit sets on a per-element weight_decay group once its ``weight_decay`` was set
#: to another value than 0 (a weight-decay schedule): its weights are stepped whole from then on.
SCHEDULED_KEY = "paramsplit_weight_decay_scheduled"
_PART = "_paramsplit_part"  # attribute of a part: (its _Split, its index)

#: model given to split -> its _Splits by first name; a _Split lives as long as its model (or
#: an optimizer holding its parts)
_ROOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


class _Registry:
    """weight -> its live _Split. Weights are never weakly referenced (``torch.utils.
    swap_tensors``, which ``module.to()`` uses for DTensors, refuses tensors with weak
    references); entries point weakly to the _Split, which holds its weight."""

    def __init__(self) -> None:
        self._by_id: dict[int, weakref.ref[_Split]] = {}

    def get(self, weight: Any) -> _Split | None:
        ref = self._by_id.get(id(weight))
        split = ref() if ref is not None else None
        return split if split is not None and split.weight is weight else None

    def __getitem__(self, weight: Any) -> _Split:
        split = self.get(weight)
        if split is None:
            raise KeyError("paramsplit: this tensor is not a planned parameter")
        return split

    def __setitem__(self, weight: Any, split: _Split) -> None:
        if len(self._by_id) > 64 and len(self._by_id) % 64 == 0:  # drop dead entries now and then
            self._by_id = {k: r for k, r in self._by_id.items() if r() is not None}
        self._by_id[id(weight)] = weakref.ref(split)

    def pop(self, weight: Any) -> None:
        if self.get(weight) is not None:
            del self._by_id[id(weight)]

    def __len__(self) -> int:
        return len(self._by_id)


_SPLITS = _Registry()


def _register(root: nn.Module, split: _Split) -> None:
    old = _SPLITS.get(split.weight)
    if old is not None:
        _ROOTS.get(old.root(), {}).pop(old.name, None)
    _SPLITS[split.weight] = split
    _ROOTS.setdefault(root, {})[split.name] = split


def _take_over(model: nn.Module) -> None:
    """Let the splits of ``model`` (and of its submodules) take over replaced weights."""
    for module in model.modules():
        for split in list(_ROOTS.get(module, {}).values()):
            split.current()


class _Split:
    """One planned parameter of a model: where it lives, its regions and (when split) its parts."""

    def __init__(self, root: nn.Module, names: list[str], target: _Target,
                 per_element_decay: bool = True) -> None:
        self.root = weakref.ref(root)
        self.names = names  # every name of the weight in root (tied parameters have several)
        self.name = names[0]
        self.regions: list[_Region] = target.regions
        self.label = target.kind
        self.decay: _Decay | None = None
        whole = target.kind == "whole"
        if per_element_decay and not whole and all(
                r.options is not None and set(r.options) <= {"weight_decay"}
                for r in target.regions):
            if len({(r.options or {}).get("weight_decay") for r in target.regions}) == 1:
                whole, self.label = True, "whole"  # one weight_decay (or none) for every element
            else:
                self.decay, self.label = _Decay(target), "decay"
        self.layout: _Layout | None = None if whole or self.decay else _layout(target)
        self._active = self.layout  # the layout of the tensor the parts cut: see _local
        self.weight: Tensor = target.param
        self.parts: list[nn.Parameter] = []
        self._stash: Tensor | None = None
        self._given: list[tuple[Tensor, int]] = []  # the parts' gradients and their versions
        self._links: list[tuple[dict[str, Any], str, Any]] = []  # see current()
        if self.layout is not None:
            self._make_parts(target.param)

    @property
    def part_options(self) -> list[dict[str, Any]]:
        assert self.layout is not None
        return [self.regions[i].options or {} for i in self.layout.trained]

    def part_digest(self, i: int) -> str:
        assert self.layout is not None
        return f"{self.layout.digest}:{i}"

    def _make_parts(self, weight: Tensor) -> None:
        """Parts with the weight's current values; existing parts are pointed at them (the
        optimizer holds them and keys its state by them) or, across device types (meta to
        cpu), replaced in every optimizer that holds them."""
        local, self._active = self._local(weight)
        with torch.no_grad():
            values = self._active.parts_from(local)
        old = self.parts
        self.parts = []
        for i, v in enumerate(values):
            if old and old[i].device.type == v.device.type:
                _DATA.__set__(old[i], v)
                part = old[i]
            else:
                part = _Part(v, requires_grad=True)
                setattr(part, _PART, (self, i))
                if old:
                    _replace_in_optimizers(old[i], part)
            self.parts.append(part)

    def _local(self, t: Tensor) -> tuple[Tensor, _Layout]:
        """The tensor the parts cut (``t``, or this rank's shard of a DTensor such as FSDP2's)
        and its layout. Shards must be blocks of rows (``Shard(0)``, any ``Replicate``)."""
        assert self.layout is not None
        if not _is_wrapper(t):
            return t, self.layout
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(t, DTensor):
            raise RuntimeError(f"paramsplit: parameter {self.name!r} is a {type(t).__name__}; "
                               f"paramsplit steps plain tensors and DTensors only")
        local = t.to_local()
        shards = [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]
        if (any(not isinstance(pl, (Shard, Replicate)) for pl in t.placements) or len(shards) > 1
                or any(t.placements[i].dim != 0 for i in shards)):
            raise RuntimeError(f"paramsplit: parameter {self.name!r} is a DTensor placed as "
                               f"{t.placements}; paramsplit supports shards of dim 0 (FSDP2's "
                               f"fully_shard) and replicas")
        n = self.layout.shape[0]
        start, stop = 0, n
        if shards:
            k = t.device_mesh.size(shards[0])
            chunk = -(-n // k)
            start = min(t.device_mesh.get_local_rank(shards[0]) * chunk, n)
            stop = min(start + chunk, n)
        if local.shape[0] != stop - start:
            raise RuntimeError(f"paramsplit: the shard of {self.name!r} on this rank has "
                               f"{local.shape[0]} rows, expected {stop - start} (torch.chunk)")
        if self._active is not None and self._active.shape == tuple(local.shape) and (
                start, stop) == getattr(self._active, "rows", None):
            return local, self._active
        layout = self.layout.local(start, stop) if (start, stop) != (0, n) else self.layout
        layout.rows = (start, stop)  # type: ignore[attr-defined]
        return local, layout

    # -- the weight in the model ----------------------------------------------------------------

    def current(self) -> Tensor:
        """The weight the model uses now. A weight replaced by one of the same shape (an
        ``assign=True`` load, ``to_empty``, pruning's reparametrisation) is taken over; one that
        cannot be raises, naming the parameter and the remedy."""
        links = self._links
        if links:
            for d, k, v in links:
                if d.get(k) is not v:
                    break
            else:
                return self.weight  # every module on the way to every name is still in place
        weight = self._find()
        self._links = _links(self.root(), self.names)
        return weight

    def _find(self) -> Tensor:
        weight, root = self.weight, self.root()
        if root is None:  # the model is gone; the optimizer still holds the weight
            return weight
        found: list[Any] = []
        for name in self.names:
            mname, _, attr = name.rpartition(".")
            try:
                module = root.get_submodule(mname)
            except AttributeError:
                found.append(None)
                continue
            held = module._parameters.get(attr)
            if held is not weight and not any(q is weight for q in module._parameters.values()):
                found.append(held)
        if not found:
            return weight
        new = found[0]
        if (len(found) == len(self.names) and all(f is new for f in found)
                and isinstance(new, nn.Parameter) and tuple(new.shape) == self._shape()
                and new.is_floating_point()):
            self._rebind(new)
            return new
        what = ("is no longer in the model" if new is None else
                f"was replaced by a tensor of shape {tuple(new.shape)} and dtype {new.dtype}"
                if isinstance(new, Tensor) else f"was replaced by {type(new).__name__}")
        if len(found) < len(self.names):
            what = "was replaced under some of its names only (its tie was broken)"
        raise RuntimeError(
            f"paramsplit: parameter {self.name!r} {what} after split, so the optimizer would "
            f"step a stale copy. Split the model again (paramsplit.split(model, spec)) and build "
            f"a new optimizer from the groups it returns (or from paramsplit.param_groups(model)); "
            f"paramsplit.merged_optimizer_state carries the optimizer state across.")

    def _shape(self) -> tuple[int, ...]:
        planned = self.layout or self.decay
        return planned.shape if planned is not None else tuple(self.weight.shape)

    def checked(self) -> Tensor:
        """The weight the model uses now (:meth:`current`); raises if it no longer has the
        shape its regions were planned for."""
        weight = self.current()
        if tuple(weight.shape) != self._shape():
            raise RuntimeError(
                f"paramsplit: parameter {self.name!r} has shape {tuple(weight.shape)} now, "
                f"{self._shape()} when it was split (resized in place, or flattened by an "
                f"engine such as FSDP1 or DeepSpeed, which paramsplit does not support), so its "
                f"regions no longer fit. Split the model again (paramsplit.split(model, spec)) "
                f"and build a new optimizer from the groups it returns.")
        return weight

    def _rebind(self, new: nn.Parameter) -> None:
        old = self.weight
        _SPLITS.pop(old)
        _replace_in_optimizers(old, new)
        self.weight = new
        _SPLITS[new] = self
        if self.layout is not None:
            self._make_parts(new)

    # -- around an optimizer step ---------------------------------------------------------------

    def before_step(self, copies: _Copies) -> None:
        """Parts take the weight's values and their share of its gradient, which the optimizer
        then does not see (called under ``torch.no_grad()``; copies deferred to ``copies``)."""
        weight = self.checked()
        plain = not _is_wrapper(weight)
        local, layout = (weight, self.layout) if plain else self._local(weight)
        if layout is not self._active or not layout.load(local, self.parts, copies):
            self._make_parts(weight)
        grad = self._stash = weight.grad
        if grad is None:
            for p in self.parts:
                p.grad = None
            return
        grads = self._active.grads(grad if plain else grad.to_local(), self.parts, copies)
        for p, g in zip(self.parts, grads):
            p.grad = g
        weight.grad = None  # the optimizer steps the parts, not the weight

    def given(self) -> None:
        """Note the parts' gradients as the hand-over leaves them (after its copies), so that
        :meth:`_grad_after` can tell whether the step changed them."""
        self._given = [] if self._stash is None else [
            (p.grad, -1 if p.grad is None else p.grad._version) for p in self.parts]

    def untouched(self) -> bool:
        """Whether the weight's gradient is as :meth:`before_step` left it (hidden)."""
        return self.weight.grad is None

    def abandon(self) -> None:
        """Undo :meth:`before_step` for a step that did not finish (refused during the hand-over,
        or raised inside the optimizer): the weight gets its gradient back unless it was cleared
        or given a new one since (``zero_grad``, a backward). Its values stay as the model has
        them (``rows`` parts are its memory); the parts take them again at the next step."""
        stash, self._stash, self._given = self._stash, None, []
        if stash is not None and self.weight.grad is None and any(
                p.grad is not None for p in self.parts):
            self.weight.grad = stash
        for p in self.parts:
            p.grad = None

    def after_step(self, copies: _Copies) -> None:
        """The weight takes the parts' values (by ``copies``) and its gradient back (under
        ``no_grad``)."""
        weight = self.weight
        self._active.store(weight.to_local() if _is_wrapper(weight) else weight, self.parts,
                           copies)
        if self._stash is not None:
            weight.grad, self._stash = self._grad_after(), None
            self._given = []  # (holding them would keep a gradient alive until the next step)
            for p in self.parts:
                p.grad = None

    def _grad_after(self) -> Tensor | None:
        """The weight's gradient after a step: the one it had, unless the step changed the
        parts' (a wrapper's ``zero_grad`` before its closure, a gradient transform in place):
        then theirs, or None if they were all set to None."""
        stash, now = self._stash, [p.grad for p in self.parts]
        assert stash is not None
        if all(n is g and (n is None or n._version == v) for n, (g, v) in zip(now, self._given)):
            return stash
        if all(n is None for n in now):
            return None
        self._active.write(stash.to_local() if _is_wrapper(stash) else stash,
                           [torch.zeros_like(g) if n is None else n
                            for n, (g, _) in zip(now, self._given)])
        return stash


class _Decaying:
    """A weight with per-element decay in one optimizer's param group: decays it around a step
    the way that optimizer decays (see ``_decay``)."""

    def __init__(self, split: _Split, optimizer: torch.optim.Optimizer,
                 group: dict[str, Any]) -> None:
        form = _form(optimizer, group)
        if form is None:
            raise RuntimeError(
                f"paramsplit: {split.name!r} has per-element weight_decay (the 'decay' layout), "
                f"and paramsplit does not know how {type(optimizer).__name__} applies weight "
                f"decay{' with maximize=True' if group.get('maximize') else ''}, so it cannot "
                f"apply it per element. Split with paramsplit.split(..., "
                f"per_element_decay=False) to give the regions parts of their own instead.")
        self.split, self.optimizer, self.group, self.form = split, optimizer, group, form
        self._saved: Tensor | None = None
        self._seen: tuple[Any, int] = (None, 0)  # weight.grad and its version after before_step

    def check(self) -> None:
        """Raise now, before any weight of the step is decayed, if this one cannot be."""
        if getattr(self.optimizer, "found_inf", None) is not None:
            raise RuntimeError(
                f"paramsplit: GradScaler steps this fused {type(self.optimizer).__name__} "
                f"itself: the kernel unscales the gradients and skips a step with inf "
                f"gradients, after paramsplit's hook, which cannot know either, so it cannot "
                f"apply the per-element weight_decay of {self.split.name!r}. Use the foreach "
                f"implementation (fused=False), or split with per_element_decay=False.")
        weight = self.split.checked()
        if _is_wrapper(weight) and weight.grad is not None:
            raise RuntimeError(f"paramsplit: per-element weight_decay of {self.split.name!r} "
                               f"does not support {type(weight).__name__} parameters; "
                               f"split with per_element_decay=False")

    def before_step(self, copies: _Copies) -> None:
        """Decay the weight (``pre``), its gradient (``coupled``), or save it (``post``); only
        after :meth:`check` passed for every decaying weight of the step."""
        split = self.split
        assert split.decay is not None
        weight = split.weight
        self._saved = None
        if weight.grad is not None:
            decays = split.decay.values(self.optimizer.defaults.get("weight_decay", 0.0))
            if self.form == "pre":
                lr, by = float(self.group["lr"]), _scale(self.optimizer)
                split.decay.scale_(weight,
                                   [1 - lr * (d / by if by != 1.0 else d) for d in decays])
            elif self.form == "coupled":
                self._saved = weight.grad
                grad = weight.grad.clone()
                split.decay.add_scaled_(grad, weight, decays)
                weight.grad = grad
            else:
                self._saved = weight.detach().clone()
        grad = weight.grad
        self._seen = (grad, 0 if grad is None else grad._version)

    def untouched(self) -> bool:
        """Whether the weight's gradient is as :meth:`before_step` left it."""
        grad = self.split.weight.grad
        return grad is self._seen[0] and (grad is None or grad._version == self._seen[1])

    def abandon(self) -> None:
        """Undo :meth:`before_step` where it can be undone, for a step that did not finish: the
        weight gets its own gradient back while it still holds the decayed one (``coupled``:
        the gradient :meth:`before_step` gave it)."""
        saved, self._saved = self._saved, None
        if self.form == "coupled" and saved is not None and \
                self.split.weight.grad is self._seen[0]:
            self.split.weight.grad = saved

    def after_step(self, copies: _Copies) -> None:
        split, saved, self._saved = self.split, self._saved, None
        assert split.decay is not None
        if saved is None:
            return
        weight = split.weight
        if self.form == "coupled":
            weight.grad = saved
        elif self.form == "post":
            lr = _lr(self.optimizer, self.group, weight)
            decays = split.decay.values(self.optimizer.defaults.get("weight_decay", 0.0))
            split.decay.add_scaled_(weight, saved, [-lr * d for d in decays])


def _links(root: nn.Module | None, names: list[str]) -> list[tuple[dict[str, Any], str, Any]]:
    """``(dict, key, value)`` for every module and parameter on the way from ``root`` to each
    name: while each ``dict[key] is value``, every name still holds what it held."""
    out: list[tuple[dict[str, Any], str, Any]] = []
    for name in names if root is not None else ():
        module: Any = root
        *path, attr = name.split(".")
        for key in path:
            child = module._modules.get(key)
            if child is None:
                return []
            out.append((module._modules, key, child))
            module = child
        out.append((module._parameters, attr, module._parameters.get(attr)))
    return out


def _replace_in_optimizers(old: Tensor, new: Tensor) -> None:
    """Put ``new`` where ``old`` is in the param groups (and state) of every optimizer seen."""
    for opt in list(_CACHE.keys()):
        for g in opt.param_groups:
            g["params"] = [new if p is old else p for p in g["params"]]
        if old in opt.state:
            opt.state[new] = opt.state.pop(old)


def _is_wrapper(t: Tensor) -> bool:
    """Whether ``t`` is a wrapper tensor subclass such as FSDP2's DTensor."""
    return type(t) is not nn.Parameter and type(t) is not Tensor and \
        is_traceable_wrapper_subclass(t)


# -- the optimizer-step hooks ------------------------------------------------------------------

_CACHE: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, list[Any]]] = \
    weakref.WeakKeyDictionary()


def _signature(optimizer: torch.optim.Optimizer) -> tuple[tuple[Any, ...], ...]:
    """What :func:`_splits_of` depends on: the groups, their tensors, and the ``weight_decay`` of
    the per-element decay groups (a weight-decay schedule that sets it steps the weight whole)."""
    return tuple((id(g), id(g["params"]), len(g["params"]),
                  g.get("weight_decay") if g.get("name") == DECAY_GROUP else None)
                 for g in optimizer.param_groups)


def _splits_of(optimizer: torch.optim.Optimizer) -> list[Any]:
    """What to do around a step of ``optimizer``: the splits whose parts it holds, and its
    weights with per-element decay; checked once per change of its groups."""
    signature = _signature(optimizer)
    cached = _CACHE.get(optimizer)
    if cached is not None and cached[0] == signature:
        return cached[1]
    splits: dict[int, _Split] = {}
    held: set[int] = set()
    for g in optimizer.param_groups:
        fingerprints = g.get(LAYOUT_KEY)
        for p in g["params"]:
            held.add(id(p))
            tag = getattr(p, _PART, None)
            if tag is None:
                continue
            split, i = tag
            splits[id(split)] = split
            if fingerprints is not None and split.part_digest(i) not in fingerprints:
                raise RuntimeError(
                    f"paramsplit: param group {g.get('name', '?')!r} of this optimizer was saved "
                    f"(optimizer.state_dict()) for parameters split another way, so its state "
                    f"would land on the wrong elements of {split.name!r}. Split the model with "
                    f"the spec of the run that saved it, or carry the state with "
                    f"paramsplit.merged_optimizer_state / load_merged_optimizer_state.")
    if not splits and any(g.get(LAYOUT_KEY) for g in optimizer.param_groups):
        raise RuntimeError(
            "paramsplit: this optimizer's param groups were made by paramsplit.split for parts "
            "it no longer holds: the groups were pickled or copied (e.g. into a ddp_spawn "
            "worker), or an engine put copies of its tensors in their place (DeepSpeed's bf16 "
            "and fp16 optimizers), so split weights would be stepped whole. Split in the "
            "process that trains, and give the optimizer the groups paramsplit.split returns "
            "there.")
    for split in splits.values():
        for part in split.parts:
            _fit_state(optimizer, part, split)
        if id(split.weight) not in held:
            raise RuntimeError(
                f"paramsplit: this optimizer steps parts of {split.name!r} but does not hold "
                f"{split.name!r} itself, which carries their gradient between steps (and is "
                f"cleared by optimizer.zero_grad()). Keep the parameters of paramsplit's groups "
                f"together in one optimizer (regrouping them within it is fine).")
    steppers: list[Any] = list(splits.values())
    unsplit: list[_Split] = []
    for g in optimizer.param_groups:
        if g.get("name") == DECAY_GROUP and g.get("weight_decay", 0.0) != 0.0:
            g[SCHEDULED_KEY] = True  # set from outside (a schedule): whole from now on
        for p in g["params"]:
            s = _SPLITS.get(p)
            if (s is not None and s.decay is not None and g.get("name") == DECAY_GROUP
                    and g.get("weight_decay", 0.0) == 0.0 and not g.get(SCHEDULED_KEY)):
                if _form(optimizer, g) is not None or _wrapped(optimizer, g) is None:
                    steppers.append(_Decaying(s, optimizer, g))  # (else the wrapped one decays)
            elif s is not None and s.decay is not None and p.requires_grad:
                unsplit.append(s)  # its group decays it as a whole
            elif s is not None and s.parts and id(s) not in splits and p.requires_grad:
                unsplit.append(s)
    copies = [s.name for s in splits.values() if s._active is not None and s._active.copied]
    if copies and "ScheduleFree" in type(optimizer).__name__:
        raise RuntimeError(
            f"paramsplit: {type(optimizer).__name__} moves its tensors between their training and "
            f"evaluation values in train() / eval(), outside a step, and the parts of "
            f"{', '.join(repr(n) for n in copies)} are copies (cols / mask layouts, or rows of a "
            f"weight that is not contiguous), so the model would not see those moves. Use rows "
            f"blocks of a contiguous weight, per-element weight_decay alone (the 'decay' layout), "
            f"or another optimizer.")
    if splits and not _elementwise(optimizer):
        name = type(optimizer).__name__
        does = (f"{name} computes" if name in _PER_TENSOR else
                f"paramsplit does not know whether {name} updates each element from its own "
                f"gradient and state alone. If it computes")
        warnings.warn(
            f"paramsplit: {does} statistics of each whole tensor (factored moments, "
            f"orthogonalised updates, trust ratios, quantisation blocks, centralised gradients), "
            f"so it treats each part of {', '.join(repr(s.name) for s in splits.values())} as "
            f"a tensor of its own: not what it would do with the unsplit tensor. For "
            f"per-element weight_decay alone, a plan whose regions differ only in weight_decay "
            f"keeps the tensor whole (the 'decay' layout).", stacklevel=4)
    if unsplit:
        decays = any(u.decay is not None for u in unsplit)
        frozen = any(r.options is None for u in unsplit for r in u.regions)
        warnings.warn(
            f"paramsplit: this optimizer steps {', '.join(repr(u.name) for u in unsplit)} as "
            f"{'a whole tensor' if len(unsplit) == 1 else 'whole tensors'}, ignoring the region "
            f"options paramsplit.split was given for {'it' if len(unsplit) == 1 else 'them'}"
            + (f" (for per-element weight_decay: outside a group named {DECAY_GROUP!r} with "
               f"weight_decay 0)" if decays else "")
            + (f" and training {'its' if len(unsplit) == 1 else 'their'} FROZEN elements"
               if frozen else "")
            + ": it was not built from paramsplit's groups. Build it as "
            "`torch.optim.AdamW(groups, ...)` with the groups paramsplit.split returned (or "
            "paramsplit.param_groups(model)).",
            stacklevel=4)
    _CACHE[optimizer] = (signature, steppers)
    return steppers


def _fit_state(optimizer: torch.optim.Optimizer, part: Tensor, split: _Split) -> None:
    """An element-wise optimizer's state (kept in its tensor's shape) saved by paramsplit 0.3.0,
    whose mask parts were 1-D, viewed in the part's shape (its weight's ndim). Such state of
    another shape was saved for other tensors (by an optimizer not built from the groups, which
    carries no fingerprints): refused here rather than by a broadcasting error in the step."""
    state = optimizer.state.get(part)
    if not state or not _elementwise(optimizer) or type(optimizer).__name__ == "LBFGS":
        return  # (others keep state of other shapes: factored moments, quantised blocks)
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape == part.shape:
            continue
        if value.dim() == 1 and value.numel() == part.numel():
            state[key] = value.view(part.shape)
        else:
            raise RuntimeError(
                f"paramsplit: the optimizer's state {key!r} of a part of {split.name!r} has "
                f"shape {tuple(value.shape)}, the part {tuple(part.shape)}: the state was saved "
                f"for other tensors (by an optimizer over the unsplit model, or split another "
                f"way). Carry optimizer state across layouts with "
                f"paramsplit.merged_optimizer_state / load_merged_optimizer_state.")


def _wrapped(optimizer: torch.optim.Optimizer,
             group: dict[str, Any]) -> torch.optim.Optimizer | None:
    """The optimizer ``optimizer`` wraps and delegates the steps of ``group`` to (Lookahead, SAM,
    OrthoGrad: an attribute that is an optimizer holding the same group), or None."""
    for value in vars(optimizer).values():
        if isinstance(value, torch.optim.Optimizer) and value is not optimizer and any(
                g is group for g in value.param_groups):
            return value
    return None


#: optimizers (by class name) whose update of a tensor depends on statistics of the whole tensor
_PER_TENSOR = {"Adafactor", "Muon", "LAMB", "Lamb", "LARS", "Lars", "Shampoo", "SOAP",
               "AdamW8bit", "Adam8bit", "PagedAdamW8bit", "PagedAdam8bit", "AdamW4bit",
               "AdamWFp8", "Lion8bit", "PagedLion8bit", "SGD8bit", "OrthoGrad", "CAME",
               "AdaFactor", "AdamP", "SGDP", "Nero", "Fromage", "SM3", "Ranger", "Ranger21"}

#: module -> the optimizers (class names; None: all) that update each element from its own
#: gradient and state alone, or from statistics of all tensors together (SAM's gradient norm,
#: Prodigy's and D-Adaptation's step sizes): a split changes nothing in their math.
#: tests/test_optimizers.py checks each against the unsplit run.
_ELEMENTWISE: dict[str, set[str] | None] = {
    "torch.optim": {"SGD", "Adam", "AdamW", "RAdam", "NAdam", "Adamax", "Adadelta", "Adagrad",
                    "RMSprop", "ASGD", "Rprop", "SparseAdam", "LBFGS"},
    "lion_pytorch": {"Lion"},
    "schedulefree": None,
    "pytorch_optimizer": {"Lookahead", "SAM", "Adan", "AdaBelief", "Lion", "Tiger", "Prodigy",
                          "DAdaptAdam"},
    "bitsandbytes": {"Adam", "AdamW", "Lion", "SGD", "Adam32bit", "AdamW32bit", "Lion32bit",
                     "SGD32bit", "PagedAdam", "PagedAdamW", "PagedLion", "PagedAdam32bit",
                     "PagedAdamW32bit", "PagedLion32bit"},
}


def _elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether one of the classes whose ``step`` ``optimizer`` runs (its own, or a base's it
    keeps) is in ``_ELEMENTWISE``, and for bitsandbytes' classes it keeps 32-bit state."""
    if getattr(getattr(optimizer, "args", None), "optim_bits", 32) != 32:
        return False
    for cls in _stepping_classes(optimizer):
        module = cls.__module__
        names = _ELEMENTWISE["torch.optim"] if module.startswith("torch.optim") else \
            _ELEMENTWISE.get(module.split(".")[0], set())
        if names is None or cls.__name__ in names:
            return cls.__name__ not in _PER_TENSOR
    return False


#: optimizer -> the steppers its step under way has handed over (parts holding the weights'
#: values and gradients), the frame of that step (torch's hook-running wrapper of ``step``;
#: None under torch.compile) and its thread, until it hands them back
_STEPPING: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[list[Any], Any, int]] = \
    weakref.WeakKeyDictionary()


def _split_of(stepper: Any) -> _Split:
    return stepper if isinstance(stepper, _Split) else stepper.split


def _hand_over(optimizer: torch.optim.Optimizer, steppers: list[Any], frame: Any) -> None:
    """Before a step: every check first, then the parts take values and gradients (their copies
    made together), then the per-element decay, which alone changes weights. A refusal on the
    way undoes what was done: every weight keeps its values and its gradient. Weights that a
    step still under way holds (a wrapper such as Lookahead stepping the optimizer it wraps)
    are left to it; those of a step that raised are taken back from it first."""
    held: set[int] = set()
    for other, entry in list(_STEPPING.items()):
        if other is not optimizer:
            others = entry[0]
            if _alive(*entry):
                held.update(id(_split_of(s)) for s in others)
            else:
                _abandon(other)
    steppers = [s for s in steppers if id(_split_of(s)) not in held]
    splits = [s for s in steppers if isinstance(s, _Split)]
    decaying = [s for s in steppers if not isinstance(s, _Split)]
    copies, done = _Copies(), []
    with torch.no_grad():
        try:
            for split in splits:
                split.before_step(copies)
                done.append(split)
            for stepper in decaying:
                stepper.check()
            copies.run()
            for split in splits:
                split.given()
            for stepper in decaying:
                stepper.before_step(copies)
                done.append(stepper)
        except BaseException:
            for stepper in reversed(done):
                stepper.abandon()
            raise
    _STEPPING[optimizer] = (steppers, frame, threading.get_ident())


def _hand_back(optimizer: torch.optim.Optimizer) -> None:
    """After a step: what :func:`_hand_over` gave the parts goes back to the weights."""
    steppers = _STEPPING.pop(optimizer, ([], None, 0))[0]
    if steppers:
        with torch.no_grad():
            _after(steppers)


def _abandon(optimizer: torch.optim.Optimizer) -> None:
    """A step of ``optimizer`` raised after the hand-over, so its hand-back never ran: give the
    weights their gradients back (unless replaced since) and let the next step start afresh."""
    for stepper in _STEPPING.pop(optimizer, ([], None, 0))[0]:
        stepper.abandon()


def _alive(steppers: list[Any], frame: Any, thread: int) -> bool:
    """Whether the step that handed ``steppers`` over is still under way: its frame is on its
    thread's call stack. Under torch.compile (no frame): whether no weight's gradient changed
    since (a new one means a new backward after a step that raised)."""
    if frame is None:
        return all(s.untouched() for s in steppers)
    if thread == threading.get_ident():
        return _running(frame, sys._getframe(1))
    top = sys._current_frames().get(thread)
    return top is not None and _running(frame, top)


def _running(frame: Any, top: Any) -> bool:
    """Whether ``frame`` is on the call stack that ``top`` is the top of."""
    f = top
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def _after(steppers: list[Any]) -> None:
    """After a step: every weight takes its parts' values (the copies made together) and its
    gradient back; one that fails does not keep the others from it (the error is raised after)."""
    copies, error = _Copies(), None
    for stepper in steppers:
        try:
            stepper.after_step(copies)
        except BaseException as e:  # noqa: PERF203
            error = error or e
    copies.run()
    if error is not None:
        raise error


#: optimizer -> the ids of its own step hooks that hand over (kept last among its pre hooks)
#: and back (kept first among its post hooks)
_OWN: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, int]] = \
    weakref.WeakKeyDictionary()


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global pre hook (see :func:`_place`)."""
    if not torch.compiler.is_compiling():
        _place(optimizer)
    elif _SPLITS:
        _eagerly(_place)(optimizer)


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global post hook: the hand-back, in case the optimizer's own one was removed."""
    if not torch.compiler.is_compiling():
        _back(optimizer, sys._getframe(1))
    elif _SPLITS:
        _eagerly(_back)(optimizer, None)


def _eagerly(fn: Any) -> Any:
    """``fn``, run as a graph break under ``torch.compile(optimizer.step)``: the hooks do their
    work eagerly there too. While no model is split they do nothing, so a compiled step of an
    optimizer stays one graph. (Called only while compiling: ``torch.compiler.disable`` loads
    torch._dynamo, which importing paramsplit does not.)"""
    return torch.compiler.disable(fn)


def _place(optimizer: torch.optim.Optimizer) -> None:
    """Run before any hook of the optimizer's own, at each of its steps. For an optimizer that
    holds parts, it places paramsplit's hand-over last among the optimizer's own pre hooks and
    its hand-back first among its post hooks, so that every other hook sees the weights as the
    model has them (a pre hook clipping ``weight.grad``, a post hook averaging weights for an
    EMA). torch offers no order for these hooks: this reorders the optimizer's two hook dicts,
    the one private structure paramsplit touches besides the foreach types above
    (tests/test_tools.py pins it)."""
    if not _splits_of(optimizer):
        return
    pre, post = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
    ids = _OWN.get(optimizer)
    if ids is None or ids[0] not in pre or ids[1] not in post:
        ids = (optimizer.register_step_pre_hook(_hand_over_hook).id,
               optimizer.register_step_post_hook(_hand_back_hook).id)
        _OWN[optimizer] = ids
    if next(reversed(pre)) != ids[0]:
        pre[ids[0]] = pre.pop(ids[0])
    if next(iter(post)) != ids[1]:
        first, rest = post.pop(ids[1]), list(post.items())
        post.clear()
        post[ids[1]] = first
        post.update(rest)


def _hand_over_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
    if torch.compiler.is_compiling():
        return _eagerly(_over)(optimizer, args, kwargs, None)
    return _over(optimizer, args, kwargs, sys._getframe(1))


def _over(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any, frame: Any) -> Any:
    """The hand-over at a step whose hook-running frame is ``frame``. An optimizer still handed
    over is in a step that is still running (a subclass's ``step`` calling ``super().step()``,
    each with its hooks; a copied optimizer's second copy of this hook), which keeps the weights;
    or its step raised, and is abandoned now."""
    held = _STEPPING.get(optimizer)
    if held is not None:
        if not _alive(*held):
            _abandon(optimizer)
        elif frame is not None:
            return None
        else:
            raise RuntimeError(
                f"paramsplit: a compiled step of this {type(optimizer).__name__} started while "
                f"its previous step still holds the split weights: a subclass whose step calls "
                f"super().step() (torch runs the step hooks around both), or a step that raised "
                f"and is retried without a new backward. Under torch.compile paramsplit cannot "
                f"tell these apart: step such an optimizer eagerly, or zero_grad() and backward "
                f"again before stepping after an error.")
    steppers = _splits_of(optimizer)
    if not steppers:
        return None
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        _hand_over(optimizer, steppers, frame)
        return None
    # with a closure the parts take the gradient already there (SAM perturbs the weights by it
    # before its closure runs); the per-element decay waits for the evaluation
    _hand_over(optimizer, [s for s in steppers if isinstance(s, _Split)], frame)

    def evaluate() -> Any:  # each evaluation sees the weights the parts hold, then hands over
        _hand_back(optimizer)
        with torch.enable_grad():
            loss = closure()
        _hand_over(optimizer, steppers, frame)
        return loss

    return args[:1], {**kwargs, "closure": evaluate}


def _hand_back_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        _eagerly(_back)(optimizer, None)
    else:
        _back(optimizer, sys._getframe(1))


def _back(optimizer: torch.optim.Optimizer, frame: Any) -> None:
    """The hand-back at the end of the step (frame) that handed over, not of one nested in it."""
    held = _STEPPING.get(optimizer)
    if held is not None and (held[1] is None or held[1] is frame):
        _hand_back(optimizer)


register_optimizer_step_pre_hook(_pre_step)
register_optimizer_step_post_hook(_post_step)
