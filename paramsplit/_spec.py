"""Spec parsing: which parameters a spec names, and what it asks for each.

A spec maps names (parameter names, module names meaning that module's ``.weight``, or shell
wildcards over both) to plans; or it is a callable ``(name, param) -> plan | None``. This module
turns it into one :class:`_Target` per parameter, validating everything before the model is
touched. Every error names the spec key it comes from.

A plan may make at most :data:`MAX_REGIONS` regions per parameter (after regions with equal options
are merged) unless ``_resolve`` is given a larger ``max_regions``: each region becomes its own
sub-parameter, so a per-element decay tensor such as ``torch.rand(1024, 1024)`` would otherwise make
a million of them.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

__all__ = ["FROZEN", "Regions", "Blocks", "rows", "cols", "SpecError"]

#: Default limit on the regions (sub-parameters) one parameter is split into.
MAX_REGIONS = 1024


class SpecError(ValueError, TypeError):
    """A spec that cannot be applied. Subclasses both ``ValueError`` and ``TypeError``.

    The message starts with the offending key, e.g. ``spec['fc.weight']: ...``.
    """


class _Frozen:
    """Marker for regions that must not train (no gradient, no optimizer state)."""

    _instance: _Frozen | None = None

    def __new__(cls) -> _Frozen:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "paramsplit.FROZEN"

    def __reduce__(self) -> str:
        return "FROZEN"


#: Use in place of an options dict to freeze a region: its elements never change.
FROZEN = _Frozen()

Options = Mapping[str, Any]
RegionOptions = Union[Options, _Frozen]


@dataclass(frozen=True)
class Regions:
    """Regions of a parameter given by an integer or boolean mask of the parameter's shape.

    Elements with the same mask value form one region; ``options`` maps each value present in the
    mask to optimizer options (or :data:`FROZEN`).

    Example::

        >>> mask = torch.zeros(4, 3, dtype=torch.long); mask[:, 0] = 1
        >>> plan = paramsplit.Regions(mask, {0: {"weight_decay": 0.0}, 1: {"weight_decay": 0.1}})
    """

    mask: torch.Tensor
    options: Mapping[Any, RegionOptions]


@dataclass(frozen=True)
class Blocks:
    """Contiguous blocks along one dimension; built by :func:`rows` and :func:`cols`."""

    dim: int
    blocks: Mapping[tuple[int, int | None], RegionOptions]


def rows(blocks: Mapping[tuple[int, int | None], RegionOptions]) -> Blocks:
    """Blocks of dim 0, keyed by ``(start, stop)``; ``stop=None`` means to the end, and negative
    bounds count from the end, as in slicing (``(-8, None)``: the last 8 rows).

    Rows no block covers keep the optimizer's defaults.

    Example::

        >>> plan = paramsplit.rows({(0, 50257): paramsplit.FROZEN})  # train only added tokens
    """
    return Blocks(0, dict(blocks))


def cols(blocks: Mapping[tuple[int, int | None], RegionOptions]) -> Blocks:
    """Blocks of dim 1 (input features of a ``Linear``), keyed like :func:`rows`.

    Example::

        >>> plan = paramsplit.cols({(0, 5): {"weight_decay": 0.01}, (5, None): {"weight_decay": 0.1}})
    """
    return Blocks(1, dict(blocks))


Plan = Union[torch.Tensor, Regions, Blocks, Options, _Frozen]
Spec = Union[Mapping[str, Plan], Callable[[str, nn.Parameter], Union[Plan, None]]]


@dataclass
class _Region:
    """One region of a parameter: its options (``None`` when frozen) and a readable label."""

    label: str
    options: dict[str, Any] | None
    numel: int


@dataclass
class _Target:
    """A validated plan for one parameter.

    ``kind`` is ``"whole"`` (no split), ``"rows"``/``"cols"`` (``bounds`` are the blocks along
    ``dim``) or ``"mask"`` (``region_ids`` holds each element's region index, flattened).
    """

    key: str
    name: str
    param: nn.Parameter
    kind: str
    regions: list[_Region]
    dim: int = 0
    bounds: list[tuple[int, int]] | None = None
    region_ids: torch.Tensor | None = None


def _fail(key: str, message: str) -> SpecError:
    return SpecError(f"spec[{key!r}]: {message}")


_RANGES: dict[str, Callable[[float], bool]] = {
    "a finite non-negative number": lambda x: x >= 0,
    "a finite number in [0, 1]": lambda x: 0 <= x <= 1,
    "a finite number in [0, 1)": lambda x: 0 <= x < 1,
}
#: The options of torch's optimizers whose values are checked, and the range each must be in
#: (``betas``: each element; ``eps`` may also be a tuple of them and ``None``, as for Adafactor).
_CHECKED = {name: "a finite non-negative number" for name in (
    "lr", "weight_decay", "eps", "momentum", "alpha", "lr_decay", "initial_accumulator_value",
    "rho")}
_CHECKED.update(dampening="a finite number in [0, 1]", betas="a finite number in [0, 1)")


#: names other libraries use for torch.optim's options (Hugging Face's TrainingArguments, ...)
_OTHER_NAMES = {"learning_rate": "lr", "wd": "weight_decay", "l2": "weight_decay",
                "decay": "weight_decay"}


@functools.cache
def _known_options() -> tuple[str, ...]:
    """The option names of torch's optimizers, and ``name`` (a group label)."""
    names = {"name"}
    for cls in vars(torch.optim).values():
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            names.update(n for n, p in inspect.signature(cls.__init__).parameters.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return tuple(sorted(names - {"self", "params", "defaults"}))


def _number(key: str, where: str, what: str, v: Any, rng: str) -> Any:
    """Check one number (``rng`` is a key of ``_RANGES``); numpy scalars become Python numbers,
    one-element tensors stay."""
    x = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        got = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
        raise _fail(key, f"{where}: {what} must be a number, got {got}")
    if not (math.isfinite(float(x)) and _RANGES[rng](float(x))):
        raise _fail(key, f"{where}: {what} must be {rng}, got {v!r}")
    return v if isinstance(v, torch.Tensor) or not hasattr(v, "item") else v.item()


def _options(key: str, value: Any, where: str,
             untrainable: str | None = None) -> dict[str, Any] | None:
    """Validate one region's options; ``None`` means frozen. ``untrainable`` says why the
    parameter takes no options, if it does not."""
    if value is FROZEN:
        return None
    if not isinstance(value, Mapping):
        raise _fail(key, f"{where}: expected a dict of optimizer options or paramsplit.FROZEN, "
                         f"got {type(value).__name__}")
    if untrainable:
        raise _fail(key, f"{where}: {untrainable}, so options would have no effect; use "
                         f"paramsplit.FROZEN or leave it out of the spec")
    out = dict(value)
    for name, v in out.items():
        if not isinstance(name, str):
            raise _fail(key, f"{where}: option names must be strings, got {name!r}")
        if name == "params":
            raise _fail(key, f"{where}: 'params' is set by paramsplit, not by the spec")
        if name in _OTHER_NAMES:  # torch's optimizers would silently ignore these
            raise _fail(key, f"{where}: unknown option {name!r}; did you mean "
                             f"{_OTHER_NAMES[name]!r}? (torch's optimizers call it that)")
        if name not in _known_options():
            # names far from torch's, or extending one (beta1, eps2, eta), are other optimizers'
            close = [c for c in difflib.get_close_matches(name, _known_options(), n=1, cutoff=0.85)
                     if not (name.startswith(c) or c.startswith(name))]
            if close:
                raise _fail(key, f"{where}: unknown option {name!r}; did you mean {close[0]!r}?")
        elif name == "betas" or (name == "eps" and isinstance(v, (tuple, list))):
            if not isinstance(v, (tuple, list)) or not v:
                raise _fail(key, f"{where}: {name} must be a tuple of numbers, got {v!r}")
            out[name] = tuple(None if x is None and name == "eps"
                              else _number(key, where, f"{name}[{i}]", x, _CHECKED[name])
                              for i, x in enumerate(v))
        elif name in _CHECKED:
            out[name] = _number(key, where, name, v, _CHECKED[name])
    return out


def _untrainable(name: str, param: nn.Parameter) -> str | None:
    """Why options for ``param`` would go nowhere, if they would."""
    if not (param.dtype.is_floating_point or param.dtype.is_complex):
        return f"parameter {name!r} has dtype {param.dtype}, which no optimizer trains"
    if not param.requires_grad:
        return f"parameter {name!r} has requires_grad=False"
    return None


def _check_count(key: str, count: int, what: str, hint: str, max_regions: int) -> None:
    if count > max_regions:
        raise _fail(key, f"{count} regions ({what}) exceed max_regions={max_regions}; {hint}, or "
                         f"pass split(..., max_regions=N)")


def _options_key(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """A hashable key: regions with equal keys share a sub-parameter and an optimizer group.

    Values are compared exactly (see :func:`_value_key`), never by how they print: two tensor
    learning rates that print alike are different options."""
    if options is None:
        return None
    return tuple(sorted((k, _value_key(v)) for k, v in options.items()))


def _value_key(v: Any) -> Any:
    """A hashable stand-in for one option value; two values get equal keys only if they are
    exactly equal: floats by value (``-0.0`` apart from ``0.0``; every NaN alike), ``bool``
    apart from numbers, tensors and numpy arrays by dtype, shape, device and bytes, numpy scalars
    as their Python value, tuples/lists/dicts item by item, anything else by ``==`` where it is
    hashable, else by ``repr``."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, float):
        if v != v:
            return ("float", "nan")
        if v == 0:
            return ("float", "-0.0" if math.copysign(1.0, v) < 0 else "+0.0")
        return ("number", v)
    if isinstance(v, int):
        return ("number", v)
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if type(v).__module__ == "numpy" and hasattr(v, "dtype") and hasattr(v, "tobytes"):
        if type(v).__name__ != "ndarray":  # a numpy scalar: its Python value
            return _value_key(v.item())
        return ("ndarray", str(v.dtype), tuple(v.shape), v.tobytes())
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_value_key(x) for x in v))
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__, frozenset(_value_key(x) for x in v))
    if isinstance(v, Mapping):
        items = [(_value_key(k), _value_key(x)) for k, x in v.items()]
        return ("mapping", tuple(sorted(items, key=repr)))
    try:
        hash(v)
    except TypeError:
        return ("repr", type(v).__qualname__, repr(v))
    return ("object", v)


def _tensor_key(t: torch.Tensor) -> Any:
    """Tensors are equal options if dtype, shape, device and every byte agree."""
    t = t.detach()
    head = ("tensor", str(t.dtype), tuple(t.shape), str(t.device))
    if t.device.type == "meta" or type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        return head + (("id", id(t)),)  # no values to compare (meta, a subclass): itself only
    return head + (bytes(t.cpu().clone(memory_format=torch.contiguous_format)
                         .untyped_storage()),)


def _options_label(options: dict[str, Any] | None) -> str:
    if options is None:
        return "FROZEN"
    if not options:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


def _mask_target(key: str, name: str, param: nn.Parameter, ids: torch.Tensor,
                 options: list[dict[str, Any] | None], labels: list[str],
                 max_regions: int) -> _Target:
    """Merge regions with equal options, drop empty ones, and build a mask target; with one region
    or none (a parameter without elements), a whole one."""
    merged: dict[Any, int] = {}
    remap = []
    regions: list[_Region] = []
    for opts, label in zip(options, labels):
        k = _options_key(opts)
        if k not in merged:
            merged[k] = len(regions)
            regions.append(_Region(label, opts, 0))
        else:
            regions[merged[k]].label += f" + {label}"
        remap.append(merged[k])
    _check_count(key, len(regions), "distinct options", "use fewer distinct options", max_regions)
    flat = torch.tensor(remap, dtype=torch.long)[ids.reshape(-1).long()]
    # the smallest dtype that holds the region ids: less memory, and a faster sort in _plan
    flat = flat.to(torch.uint8 if len(regions) <= 255 else torch.int32)
    counts = torch.bincount(flat.long(), minlength=len(regions)).tolist()
    for r, c in zip(regions, counts):
        r.numel = c
    keep = [i for i, c in enumerate(counts) if c > 0]
    if len(keep) < len(regions):
        new_index = torch.full((len(regions),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        flat = new_index[flat.long()].to(flat.dtype)
        regions = [regions[i] for i in keep]
    if len(regions) <= 1:
        return _whole(key, name, param, regions[0] if regions else _Region("all", {}, 0))
    return _as_blocks(key, name, param, flat, regions) or _as_sparse(key, name, param, flat,
                                                                      regions) or \
        _Target(key, name, param, "mask", regions, region_ids=flat)


#: A mask whose FROZEN region holds at least this share of the elements takes the ``sparse``
#: layout (see ``_layout``); measured crossover with the gather layout: see the README.
SPARSE_FROZEN_SHARE = 0.5


def _as_sparse(key: str, name: str, param: nn.Parameter, flat: torch.Tensor,
               regions: list[_Region]) -> _Target | None:
    """The ``sparse`` target of a mask whose FROZEN region is most of it, or ``None``."""
    frozen = next((r for r in regions if r.options is None), None)
    if frozen is None or frozen.numel < SPARSE_FROZEN_SHARE * flat.numel():
        return None
    return _Target(key, name, param, "sparse", regions, region_ids=flat)


def _as_blocks(key: str, name: str, param: nn.Parameter, flat: torch.Tensor,
               regions: list[_Region]) -> _Target | None:
    """The rows or cols target equal to a mask whose every region is one block of whole rows
    (or columns), or ``None``: the same parts and groups, without a gather (rows: no copy)."""
    shape = tuple(param.shape)
    for dim in (0, 1):
        if len(shape) <= dim or shape[dim] < 2:
            continue
        ids = flat.view(shape[:1] + (-1,)) if dim == 0 else \
            flat.view(shape[0], shape[1], -1).transpose(0, 1).reshape(shape[1], -1)
        line = ids[:, 0]
        if not bool((ids == line[:, None]).all()):
            continue
        starts = [0] + (torch.nonzero(line[1:] != line[:-1]).flatten() + 1).tolist()
        if len(starts) != len(regions):  # a region in several blocks: keep the mask
            return None
        bounds = list(zip(starts, starts[1:] + [shape[dim]]))
        ids_of = line[starts].tolist()
        which = "rows" if dim == 0 else "cols"
        per_slice = param.numel() // shape[dim]
        blocks = [_Region(f"{which} {a}:{b} ({regions[i].label})", regions[i].options,
                          (b - a) * per_slice) for (a, b), i in zip(bounds, ids_of)]
        return _Target(key, name, param, which, blocks, dim=dim, bounds=bounds)
    return None


def _whole(key: str, name: str, param: nn.Parameter, region: _Region) -> _Target:
    """A plan with one region: no split, only its own group (or none, when FROZEN)."""
    return _Target(key, name, param, "whole", [region])


def _check_mask(key: str, param: nn.Parameter, mask: Any, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise _fail(key, f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(param.shape):
        raise _fail(key, f"{what} has shape {tuple(mask.shape)}, but the parameter has shape "
                         f"{tuple(param.shape)}")
    if mask.device.type == "meta":
        raise _fail(key, f"{what} is on the meta device; masks need values")
    return mask.detach().cpu()


def _plan_target(key: str, name: str, param: nn.Parameter, plan: Any,
                 max_regions: int) -> _Target:
    """Validate ``plan`` for ``param`` and describe its regions."""
    numel = param.numel()
    why = _untrainable(name, param)
    if plan is FROZEN or isinstance(plan, Mapping):
        return _whole(key, name, param, _Region("all", _options(key, plan, "options", why), numel))

    if isinstance(plan, Regions):
        mask = _check_mask(key, param, plan.mask, "Regions mask")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise _fail(key, f"Regions mask must be an integer or bool tensor, got {mask.dtype}")
        if not isinstance(plan.options, Mapping):
            raise _fail(key, "Regions options must be a dict {region_id: options}")
        uniq, ids = torch.unique(mask.reshape(-1), return_inverse=True)
        values = uniq.tolist()
        missing = [v for v in values if v not in plan.options]
        if missing:
            raise _fail(key, f"region ids {missing} appear in the mask but have no options")
        region_opts = [_options(key, plan.options[v], f"region {v!r}", why) for v in values]
        return _mask_target(key, name, param, ids, region_opts,
                            [f"region {v!r}" for v in values], max_regions)

    if isinstance(plan, Blocks):
        return _blocks_target(key, name, param, plan, why, max_regions)

    if isinstance(plan, torch.Tensor):
        wd = _check_mask(key, param, plan, "weight-decay tensor")
        if not wd.dtype.is_floating_point:
            raise _fail(key, f"a tensor plan holds per-element weight_decay and must be floating, "
                             f"got {wd.dtype} (use paramsplit.Regions for integer masks)")
        if why:
            raise _fail(key, f"weight-decay tensor: {why}, so options would have no effect; "
                             f"leave it out of the spec")
        if torch.isnan(wd).any():
            raise _fail(key, "weight-decay tensor contains NaN")
        if (wd < 0).any():
            raise _fail(key, "weight-decay tensor contains negative values")
        values, ids = _distinct(wd.reshape(-1))
        _check_count(key, len(values), "distinct weight_decay values",
                     "use fewer distinct values, or a paramsplit.Regions mask", max_regions)
        decays: list[dict[str, Any] | None] = [{"weight_decay": float(v)}
                                                for v in values.tolist()]
        return _mask_target(key, name, param, ids, decays,
                            [f"weight_decay={float(v)}" for v in values.tolist()], max_regions)

    raise _fail(key, f"unsupported plan of type {type(plan).__name__}; expected a weight-decay "
                     f"tensor, paramsplit.Regions, paramsplit.rows/cols, an options dict or "
                     f"paramsplit.FROZEN")


def _distinct(flat: torch.Tensor, few: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(flat, return_inverse=True)`` for a floating tensor: with at most ``few``
    distinct values (a decay tensor usually holds two or three), one pass per value instead of a
    sort of every element (two values: about 3x faster); more values fall back to the sort.
    -0.0 and 0.0 are one value, 0.0."""
    values, left = [], flat
    while left.numel() and len(values) < few:
        values.append(left.min())
        left = left[left > values[-1]]
    if left.numel():
        return torch.unique(flat, return_inverse=True)
    found = torch.stack(values) + 0.0 if values else flat[:0]  # + 0.0: -0.0 becomes 0.0
    return found, torch.bucketize(flat, found)


def _blocks_target(key: str, name: str, param: nn.Parameter, plan: Blocks, why: str | None,
                   max_regions: int) -> _Target:
    which = "rows" if plan.dim == 0 else "cols"
    if param.dim() <= plan.dim:
        raise _fail(key, f"{which} needs a parameter with at least {plan.dim + 1} dims, "
                         f"got shape {tuple(param.shape)}")
    size = param.shape[plan.dim]
    spans: list[tuple[int, int, dict[str, Any] | None, Any]] = []
    for span, value in plan.blocks.items():
        if (not isinstance(span, tuple) or len(span) != 2
                or not all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                           for b in span) or span[0] is None):
            raise _fail(key, f"{which} keys must be (start, stop) tuples of ints, got {span!r}")
        start, stop = span[0], size if span[1] is None else span[1]
        start, stop = start + size if start < 0 else start, stop + size if stop < 0 else stop
        if not 0 <= start < stop <= size:
            raise _fail(key, f"{which} block {span!r} is out of range or empty for size {size}")
        spans.append((start, stop, _options(key, value, f"{which} block {span!r}", why), span))
    spans.sort(key=lambda s: s[0])
    for (_, a1, _, a), (b0, _, _, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail(key, f"{which} blocks {a!r} and {b!r} overlap (size {size})")
    full: list[tuple[int, int, dict[str, Any] | None]] = []
    at = 0
    for start, stop, opts, _ in spans + [(size, size, {}, None)]:
        if at < start:
            full.append((at, start, {}))
        if start < stop:
            full.append((start, stop, opts))
        at = stop
    per_slice = param.numel() // size if size else 0
    regions = [_Region(f"{which} {a}:{b}", o, (b - a) * per_slice) for a, b, o in full]
    _check_count(key, len(regions), f"{which} blocks", "use fewer blocks", max_regions)
    if len(full) == 1:
        return _whole(key, name, param, regions[0])
    if all(r.options is None for r in regions):  # every block FROZEN: the weight is frozen
        return _whole(key, name, param, _Region("all", None, param.numel()))
    if param.numel() == 0:  # nothing to split: the blocks' options if they agree, else defaults
        agree = len({_options_key(r.options) for r in regions}) == 1
        return _whole(key, name, param, regions[0] if agree else _Region("all", {}, 0))
    return _Target(key, name, param, which, regions, dim=plan.dim,
                   bounds=[(a, b) for a, b, _ in full])


def _module_weight(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a module name stands for: its ``weight``, or the originals of a parametrized
    ``weight`` (several for e.g. ``weight_norm``); none if it has neither."""
    param = module._parameters.get("weight")
    if isinstance(param, nn.Parameter):
        return [("weight", param)]
    plist = getattr(module, "parametrizations", None)
    if isinstance(plist, nn.ModuleDict) and "weight" in plist:
        return [(f"parametrizations.weight.{n}", p)
                for n, p in plist["weight"].named_parameters(recurse=False)]
    return []


def _resolve(model: nn.Module, spec: Spec, max_regions: int = MAX_REGIONS) -> list[_Target]:
    """One validated target per parameter the spec names, in model order; each split into at most
    ``max_regions`` regions."""
    targets = _targets(model, spec, max_regions)
    _check_sparse(model, targets)
    return targets


def _check_sparse(model: nn.Module, targets: list[_Target]) -> None:
    """Refuse to split the weight of an ``Embedding``/``EmbeddingBag`` with ``sparse=True``: its
    gradient is a sparse tensor, which cannot be cut into regions. A whole-parameter plan (one
    options dict, or FROZEN) makes no parts and is allowed."""
    split = {id(t.param): t for t in targets if t.kind != "whole"}
    if not split:
        return
    for mname, module in model.named_modules(remove_duplicate=False):
        if not (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse):
            continue
        t = split.get(id(module._parameters.get("weight")))
        if t is not None:
            raise _fail(t.key, f"parameter {t.name!r} is the weight of module {mname!r} "
                               f"({type(module).__name__}(..., sparse=True)), whose gradient is a "
                               f"sparse tensor, which paramsplit cannot split into regions "
                               f"(layout {t.kind!r}); build {mname!r} with sparse=False (and a dense "
                               f"optimizer such as AdamW instead of SparseAdam), or give the whole "
                               f"weight one options dict (no split)")


def _targets(model: nn.Module, spec: Spec, max_regions: int) -> list[_Target]:
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise SpecError(f"max_regions must be a positive int, got {max_regions!r}")
    named = list(model.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, p in named:
        canonical.setdefault(id(p), name)
    by_name = dict(named)

    if callable(spec) and not isinstance(spec, Mapping):
        targets = []
        for name, p in model.named_parameters():
            try:
                plan = spec(name, p)
            except Exception as exc:
                raise _fail(name, f"spec(name, param) raised {type(exc).__name__}: {exc}") from exc
            if plan is not None:
                targets.append(_plan_target(name, name, p, plan, max_regions))
        return targets
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec must be a dict or a callable (name, param) -> plan, "
                        f"got {type(spec).__name__}")

    candidates: dict[str, nn.Parameter] = dict(by_name)
    modules: dict[str, nn.Module] = {}
    several: dict[str, list[str]] = {}  # modules whose weight is parametrized from several tensors
    for mname, module in model.named_modules(remove_duplicate=False):
        found = _module_weight(module)
        if mname:
            modules.setdefault(mname, module)
        if mname and len(found) == 1:
            candidates.setdefault(mname, found[0][1])
        elif mname and found:
            several.setdefault(mname, [f"{mname}.{n}" for n, _ in found])

    chosen: dict[int, tuple[str, Any]] = {}
    for key, plan in spec.items():
        if not isinstance(key, str):
            raise SpecError(f"spec keys must be strings, got {key!r}")
        if key in candidates:
            params = [candidates[key]]
        elif any(c in key for c in "*?["):
            params = [p for n, p in candidates.items() if fnmatch.fnmatchcase(n, key)]
            if not params:
                raise _fail(key, "this pattern matches no parameter or module")
        elif key in several:
            raise _fail(key, f"module {key!r} ({type(modules[key]).__name__}) has a weight "
                             f"parametrized from several tensors; name them instead: "
                             f"{', '.join(repr(n) for n in several[key])}")
        elif key in modules:
            names = [f"{key}.{n}" for n, _ in modules[key].named_parameters()]
            shown = (f"its parameters are: {names[:8]}{' ...' if len(names) > 8 else ''}"
                     if names else "it has no parameters")
            raise _fail(key, f"module {key!r} ({type(modules[key]).__name__}) has no parameter "
                             f"'weight'; {shown}")
        else:
            close = difflib.get_close_matches(key, list(candidates), n=3)
            names = list(dict(model.named_parameters()))
            hint = (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else
                    f"; the model's parameters are {', '.join(repr(n) for n in names[:6])}"
                    f"{f' ... ({len(names)} in all)' if len(names) > 6 else ''}" if names else
                    "; the model has no parameters")
            raise _fail(key, f"no parameter or module with this name{hint}")
        for p in dict.fromkeys(params):  # dedupe by identity, keep order
            if id(p) in chosen:
                other = chosen[id(p)][0]
                raise _fail(key, f"names parameter {canonical[id(p)]!r}, which spec[{other!r}] "
                                 f"already names")
            chosen[id(p)] = (key, plan)

    targets = []
    for name, p in model.named_parameters():
        if id(p) in chosen:
            key, plan = chosen[id(p)]
            targets.append(_plan_target(key, name, p, plan, max_regions))
    return targets
