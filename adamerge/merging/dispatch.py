"""Run any static merging method on a pool of experts by name.

    merged = merge_pool(pool, "ties", keep=0.2, merge="sum", lam=0.3)

A pool is anything with ``pretrained_state()`` and ``task_vectors(tasks)`` (:class:`TaskVectorSource`;
the loaders' model pools are one), so merging knows no loader. Methods register themselves in their
own files (:mod:`adamerge.merging.registry`); task vectors are streamed from ``pool.task_vectors()``:
task arithmetic and weight averaging keep a running sum, OPCM consumes them one at a time (O(1)
models), the others need the list of all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.merging.registry import (
    DIRECTION_PRESETS,
    DIRECTIONS,
    METHODS,
    PER_TENSOR,
    PRESETS,
    STREAMING,
    OneTensor,
    TaskVectorSource,
    TensorStream,
    by_row_blocks,
    row_blocks,
)
from adamerge.merging.task_vectors import MergeError

__all__ = ["METHODS", "TaskVectorSource", "call_registered", "merge_directions", "merge_pool", "merge_stream",
           "out_of_core"]


@torch.no_grad()
def merge_pool(
    pool: TaskVectorSource, method: str, tasks: Sequence[str] | None = None, preset: str | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Merge the pool's experts with a static method chosen by name; returns a new state dict.

    Args:
        pool: the model pool (θ_0 and the experts, read as streamed task vectors).
        method: a registered method (``METHODS``: weight_average, task_arithmetic, ties, pcb, opcm,
            optmerge, and any registered with :func:`adamerge.merging.register_method`).
        tasks: the tasks whose experts are merged, in this order (default: all, pool order). The
            order matters only for OPCM.
        preset: a named official setting of the method (its ``PRESETS``, e.g. TIES ``"paper"``);
            ``kwargs`` override single values of it.
        **kwargs: the method's own arguments (``lam``, ``keep``, ``merge``, ``dare``, ``alpha``,
            ``iters`` …), as documented on the method's function.
    """
    return call_registered(METHODS, PRESETS, "merging method", method, pool, tasks, preset, kwargs)


@torch.no_grad()
def merge_directions(
    pool: TaskVectorSource, method: str = "task_arithmetic", tasks: Sequence[str] | None = None,
    preset: str | None = None, **kwargs: Any,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(origin, [d_1..d_K]): the merge ``method`` written as origin + Σ_k d_k, one direction per task.

    What AdaMerging learns its coefficients on (θ = origin + Σ_k λ_k d_k): ``task_arithmetic`` (θ_0,
    the τ_k), ``ties`` (θ_0, TIES-trimmed and sign-elected τ̂_k: AdaMerging++), ``cart`` (θ_avg, the
    low-rank centred vectors), ``tsv_m`` (θ_0, each task's block of the orthogonalised TSV-M
    subspace); any method that registers :func:`~adamerge.merging.registry.register_directions`.

    Args:
        pool: the model pool.
        method: the registered method whose directions are taken.
        tasks: the tasks, in this order (default: all, pool order).
        preset: a named official setting of the direction arguments.
        **kwargs: the method's direction arguments (``keep`` for ties, ``rank_ratio`` for cart …).
    """
    return call_registered(DIRECTIONS, DIRECTION_PRESETS, "directions method", method, pool, tasks, preset, kwargs)


def out_of_core(method: str) -> str | None:
    """How ``method`` merges out of core: ``"per tensor"`` (each tensor's merge reads that tensor
    alone), ``"exact passes"`` (a streaming version reads the stream several times for its whole-model
    statistics), or None (it needs the whole model in memory). A per-tensor method may have a
    streaming version too (Iso-C's, leaner in memory); :func:`merge_stream` runs it."""
    if method in PER_TENSOR:
        return "per tensor"
    return "exact passes" if method in STREAMING else None


@torch.no_grad()
def merge_stream(
    stream: TensorStream, method: str, tasks: Sequence[str] | None = None, preset: str | None = None,
    **kwargs: Any,
) -> Iterator[tuple[str, Tensor]]:
    """Merge out of core: yields ``(key, merged θ[key])`` for each of ``stream.merge_keys()`` in order,
    holding one tensor of θ_0 and of each expert at a time. The result is :func:`merge_pool` on the
    same weights exactly, for the methods :func:`out_of_core` names; any other is a
    :class:`MergeError` (merge it in memory).

    Args: as :func:`merge_pool`, with a :class:`~adamerge.merging.registry.TensorStream` for the pool.
    """
    tasks = stream.check_tasks(tasks)
    kind = out_of_core(method)
    if method in METHODS and kind is None:
        raise MergeError(f"merging method {method!r} needs a whole-model statistic and has no out-of-core version: "
                         "merge it in memory")
    if method in STREAMING:
        yield from call_registered(STREAMING, PRESETS, "merging method", method, stream, tasks, preset, kwargs)
        return
    elementwise = method in ELEMENTWISE and kwargs.get("dare") is None and preset is None
    for key in stream.merge_keys():
        blocks = row_blocks(stream, key) if elementwise else None

        def merged(rows: slice | None, key: str = key) -> Tensor:  # one block of rows of θ_0 and each expert
            return call_registered(METHODS, PRESETS, "merging method", method, OneTensor(stream, key, rows), tasks,
                                   preset, kwargs)[key]

        yield key, by_row_blocks(blocks, merged)


# per-tensor methods whose merged entry depends on the same entry of θ_0 and the experts alone: merged
# out of core one block of rows at a time (with ``dare`` unset: its masks are drawn per tensor)
ELEMENTWISE = {"task_arithmetic", "weight_average"}


def call_registered(table: dict, presets: dict, kind: str, name: str, pool: TaskVectorSource,
                    tasks: Sequence[str] | None, preset: str | None, kwargs: dict[str, Any]) -> Any:
    """Run ``table[name](pool, tasks, **kwargs)`` with ``preset``'s values under ``kwargs``; an unknown
    name or preset, or an argument the method does not take, is a :class:`MergeError` naming it
    (``kind``: how errors call a method of ``table``)."""
    if name not in table:
        known = ", ".join(sorted(table))
        raise MergeError(f"unknown {kind} {name!r}; known {kind.split()[-1]}s: {known}")
    if preset is not None:
        known_presets = presets.get(name, {})
        if preset not in known_presets:
            raise MergeError(f"{kind} {name!r} has no preset {preset!r}; its presets: "
                             f"{', '.join(sorted(known_presets)) or 'none'}")
        kwargs = {**known_presets[preset], **kwargs}
    try:
        return table[name](pool, tasks, **kwargs)
    except TypeError as e:  # an argument the method does not take
        if "unexpected keyword argument" in str(e):
            raise MergeError(f"{kind} {name!r}: {e}") from None
        raise
