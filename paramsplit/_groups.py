"""Optimizer param groups for a split model.

Every trainable parameter appears exactly once: a split one as its parts plus the weight itself,
which carries the parts' gradient between steps (the step hooks in ``_sync`` hide it from the
optimizer during a step, so it is never stepped as a whole). Parameters no spec names, and
regions whose options are empty, go to the ``"default"`` group (the optimizer's defaults apply);
regions and parameters with equal options share one group, named after its options. FROZEN
regions are in no group. Under FSDP2 the parts of a sharded weight are plain tensors (this rank's
elements), so they get groups of their own, named ``"<options> (shards)"``: foreach kernels
refuse lists mixing DTensors and plain tensors. Each group also carries
``"paramsplit_layout"``, the fingerprints of the parts it was made with: saved with
``optimizer.state_dict()``, it lets a step refuse optimizer state that was saved for a model
split another way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._spec import _options_key, _options_label
from ._decay import DECAY_GROUP
from ._sync import _SPLITS, LAYOUT_KEY, _is_wrapper


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    groups: dict[Any, dict[str, Any]] = {(_options_key({}), False, None): {
        "name": "default", "params": [], LAYOUT_KEY: []}}

    def add(p: Any, opts: dict[str, Any], fingerprint: str | None = None,
            shards: bool = False, name: str | None = None) -> None:
        key = (_options_key(opts), shards, name)
        if key not in groups:
            name = name or (_options_label(opts) if opts else "default")
            groups[key] = {"name": f"{name} (shards)" if shards else name, "params": [], **opts,
                           LAYOUT_KEY: []}
        groups[key]["params"].append(p)
        if fingerprint is not None:
            groups[key][LAYOUT_KEY].append(fingerprint)

    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        split = _SPLITS.get(p)
        if split is None:
            add(p, {})
        elif split.decay is not None:  # decayed per element by the step hooks, not the group
            add(p, {"weight_decay": 0.0}, name=DECAY_GROUP)
        elif split.layout is None:
            if split.regions[0].options is not None:
                add(p, split.regions[0].options)
        else:
            shards = _is_wrapper(p)  # parts of a DTensor are plain tensors: a group apart
            for i, (part, opts) in enumerate(zip(split.parts, split.part_options)):
                add(part, opts, split.part_digest(i), shards)
            add(p, split.part_options[0])  # the carrier of the parts' gradient
    out = [g for g in groups.values() if g["params"]]
    for g in out:
        g[LAYOUT_KEY] = sorted(g[LAYOUT_KEY])
    return out
