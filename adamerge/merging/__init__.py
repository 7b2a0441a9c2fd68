"""Static merging methods: pure functions on state dicts (no Lightning).

Every function takes state dicts (``Mapping[str, Tensor]``) and returns a new one; inputs are never
modified. Float tensors are computed in float32 and returned in their own dtype; other tensors pass
through from θ_0. Bad input raises :class:`MergeError` naming the problem. Each method's file
registers it by name (``@register_method``) for :func:`merge_pool`. Methods that work per matrix
(SVD, low rank, projections) see open_clip's fused attention q;k;v as three matrices through
:func:`splits_fused_qkv` / :class:`QKVLayout` (:mod:`adamerge.merging.fused`).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from adamerge.merging.dare import dare, dare_all
from adamerge.merging.dispatch import METHODS, TaskVectorSource, merge_pool
from adamerge.merging.fused import QKVLayout, split_qkv, splits_fused_qkv
from adamerge.merging.opcm import OPCMerger, opcm_project
from adamerge.merging.optmerge import optmerge
from adamerge.merging.pcb import pcb_merge
from adamerge.merging.registry import register_method
from adamerge.merging.task_arithmetic import task_arithmetic
from adamerge.merging.task_vectors import MergeError, add_task_vector, check_compatible, task_vector
from adamerge.merging.ties import ties_elect_sign, ties_merge, ties_preprocess, ties_trim
from adamerge.merging.weight_averaging import weight_average

__all__ = [
    "METHODS",
    "MergeError",
    "OPCMerger",
    "QKVLayout",
    "TaskVectorSource",
    "add_task_vector",
    "check_compatible",
    "dare",
    "dare_all",
    "merge_pool",
    "opcm_project",
    "optmerge",
    "pcb_merge",
    "register_method",
    "split_qkv",
    "splits_fused_qkv",
    "task_arithmetic",
    "task_vector",
    "ties_elect_sign",
    "ties_merge",
    "ties_preprocess",
    "ties_trim",
    "weight_average",
]

# Every module of the package registers its methods on import: a new method is one new file.
for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
