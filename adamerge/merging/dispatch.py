"""Run any static merging method on a :class:`~adamerge.models.pool.ModelPool` by name.

    merged = merge_pool(pool, "ties", keep=0.2, merge="sum", lam=0.3)

Task vectors are streamed from ``pool.task_vectors()``: task arithmetic and weight averaging keep a
running sum, OPCM consumes them one at a time (O(1) models), the others need the list of all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adamerge.merging._common import apply_tau, check_lam, float_keys
from adamerge.merging.opcm import OPCMerger
from adamerge.merging.optmerge import optmerge
from adamerge.merging.pcb import pcb_merge
from adamerge.merging.task_arithmetic import task_arithmetic
from adamerge.merging.task_vectors import MergeError
from adamerge.merging.ties import ties_merge

if TYPE_CHECKING:
    from adamerge.models.pool import ModelPool

__all__ = ["METHODS", "merge_pool"]


def _streamed_sum(pool: ModelPool, tasks: Sequence[str] | None) -> tuple[dict[str, Tensor], int]:
    total: dict[str, Tensor] | None = None
    count = 0
    for _, tau in pool.task_vectors(tasks):
        if total is None:
            total = {k: tau[k].float().clone() for k in float_keys(tau)}
        else:
            for k in total:
                total[k].add_(tau[k].float())
        count += 1
    assert total is not None  # pool.task_vectors refuses an empty task list
    return total, count


def _task_arithmetic(pool: ModelPool, tasks=None, lam: float = 0.3, dare: float | None = None, seed: int = 0):
    if dare is not None:
        return task_arithmetic(pool.pretrained_state(), _all(pool, tasks), lam=lam, dare=dare, seed=seed)
    lam = check_lam(lam)
    total, _ = _streamed_sum(pool, tasks)
    return apply_tau(pool.pretrained_state(), total, lam)


def _weight_average(pool: ModelPool, tasks=None):
    total, count = _streamed_sum(pool, tasks)
    return apply_tau(pool.pretrained_state(), total, 1.0 / count)


def _opcm(pool: ModelPool, tasks=None, alpha: float = 0.5, **kwargs: Any):
    merger = OPCMerger(pool.pretrained_state(), alpha=alpha, **kwargs)
    for task, tau in pool.task_vectors(tasks):
        merger.add_task_vector(tau, name=f"task vector {task!r}")
    return merger.merged_state()


def _all(pool: ModelPool, tasks) -> list[dict[str, Tensor]]:
    return [tau for _, tau in pool.task_vectors(tasks)]


def _listed(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    def run(pool: ModelPool, tasks=None, **kwargs: Any) -> dict[str, Tensor]:
        return fn(pool.pretrained_state(), _all(pool, tasks), **kwargs)

    run.__doc__ = fn.__doc__
    return run


METHODS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "weight_average": _weight_average,
    "task_arithmetic": _task_arithmetic,
    "ties": _listed(ties_merge),
    "pcb": _listed(pcb_merge),
    "opcm": _opcm,
    "optmerge": _listed(optmerge),
}


@torch.no_grad()
def merge_pool(
    pool: ModelPool, method: str, tasks: Sequence[str] | None = None, **kwargs: Any
) -> dict[str, Tensor]:
    """Merge the pool's experts with a static method chosen by name; returns a new state dict.

    Args:
        pool: the model pool (θ_0 and the experts, read as streamed task vectors).
        method: one of ``METHODS``: weight_average, task_arithmetic, ties, pcb, opcm, optmerge.
        tasks: the tasks whose experts are merged, in this order (default: all, pool order). The
            order matters only for OPCM.
        **kwargs: the method's own arguments (``lam``, ``keep``, ``merge``, ``dare``, ``ratio``,
            ``alpha``, ``iters`` …), as documented on the method's function.
    """
    if method not in METHODS:
        raise MergeError(f"unknown merging method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[method](pool, tasks, **kwargs)
    except TypeError as e:  # an argument the method does not take
        if "unexpected keyword argument" in str(e):
            raise MergeError(f"merging method {method!r}: {e}") from None
        raise
