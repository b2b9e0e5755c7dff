"""paramsplit: different optimizer settings for parts of one tensor.

Example::

    >>> split_model, groups = paramsplit.split(model, {"fc": paramsplit.cols({(0, 5): {"weight_decay": 0.1}})})
    >>> opt = torch.optim.AdamW(groups, lr=1e-3)
"""

from ._spec import FROZEN, Blocks, Regions, SpecError, cols, rows
from ._resplit import resplit
from ._split import describe, param_groups, split
from ._state import (
    load_merged_optimizer_state,
    load_merged_state_dict,
    merge,
    merged_optimizer_state,
    merged_state_dict,
)

__version__ = "0.3.0"

__all__ = [
    "FROZEN",
    "Blocks",
    "Regions",
    "SpecError",
    "cols",
    "describe",
    "load_merged_optimizer_state",
    "load_merged_state_dict",
    "merge",
    "merged_optimizer_state",
    "merged_state_dict",
    "param_groups",
    "resplit",
    "rows",
    "split",
]
