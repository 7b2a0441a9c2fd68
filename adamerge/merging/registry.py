"""Static merging methods by name: each method's own file registers it with :func:`register_method`.

    @register_method("ties", label="TIES")
    def ties_merge(pretrained, task_vectors, keep=0.2, merge="sum", lam=0.3): ...

Two kinds of function are registered:

* list methods, ``fn(pretrained, task_vectors, **kwargs) -> state dict`` (every task vector at once);
* pool methods (``pool_level=True``), ``fn(pool, tasks=None, **kwargs) -> state dict``, which read
  the pool's streamed task vectors themselves (task arithmetic keeps a running sum, OPCM one
  expert at a time).

:data:`METHODS` maps every name to a pool-level callable; :func:`adamerge.merging.merge_pool` runs
them. Every module of ``adamerge.merging`` is imported with the package, so a new method is one
file; a method in a file of your own is registered when that file is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from torch import Tensor

from adamerge.merging.task_vectors import running_sum

__all__ = [
    "DIRECTIONS",
    "DIRECTION_PRESETS",
    "LABELS",
    "METHODS",
    "PER_TENSOR",
    "PRESETS",
    "STREAMING",
    "OneTensor",
    "TaskVectorSource",
    "TensorStream",
    "by_row_blocks",
    "plus_pretrained",
    "register_directions",
    "register_method",
    "register_streaming",
    "streamed_sum",
]

MergeFn = Callable[..., dict[str, Tensor]]
METHODS: dict[str, MergeFn] = {}
LABELS: dict[str, str] = {}  # name → short row name ("TIES"), e.g. in "Surgery on TIES"
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}  # name → {preset: the official run's arguments}
_ORIGINS: dict[str, str] = {}
# name → fn(pool, tasks=None, **kwargs) -> (origin, [d_1..d_K]): a merge written as origin + Σ_k d_k, the
# per-task directions a learned coefficient can scale (AdaMerging on any base, AdaRank)
DIRECTIONS: dict[str, Callable[..., tuple[dict[str, Tensor], list[dict[str, Tensor]]]]] = {}
DIRECTION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {}
# out-of-core merging (:func:`adamerge.merging.dispatch.merge_stream`): methods whose merge of a tensor
# reads that tensor alone, and exact streaming versions of methods with a whole-model statistic
PER_TENSOR: set[str] = set()
STREAMING: dict[str, Callable[..., Iterator[tuple[str, Tensor]]]] = {}


class TaskVectorSource(Protocol):
    """What a pool method reads from a pool: θ_0 and the experts' task vectors, streamed."""

    def pretrained_state(self) -> dict[str, Tensor]:
        """A copy of θ_0's state dict."""
        ...

    def task_vectors(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """(task, τ_k = θ_k − θ_0) pairs for ``tasks`` (default all), in order, one at a time."""
        ...


class TensorStream(Protocol):
    """What out-of-core merging reads: θ_0 and the task vectors one tensor at a time (float32, on the
    device the merge runs on), never a whole model (:class:`adamerge.models.hf_pool.HFPool`)."""

    def check_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        """``tasks`` validated (None: every task, in pool order)."""
        ...

    def merge_keys(self) -> list[str]:
        """The names of the tensors that are merged, in the order the merge visits them."""
        ...

    def pretrained_tensor(self, key: str) -> Tensor:
        """θ_0[key]."""
        ...

    def task_vector_tensor(self, task: str, key: str) -> Tensor:
        """τ_task[key] = θ_task[key] − θ_0[key]."""
        ...


class OneTensor:
    """One tensor of a :class:`TensorStream` as a :class:`TaskVectorSource`: what a per-tensor method
    reads to merge that tensor."""

    def __init__(self, stream: TensorStream, key: str, rows: slice | None = None) -> None:
        self.stream, self.key, self.rows = stream, key, rows

    def pretrained_state(self) -> dict[str, Tensor]:
        return {self.key: block_of(self.stream.pretrained_tensor, self.key, rows=self.rows)}

    def task_vectors(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        for task in self.stream.check_tasks(tasks):
            yield task, {self.key: block_of(self.stream.task_vector_tensor, task, self.key, rows=self.rows)}


def block_of(read: Callable[..., Tensor], *args: str, rows: slice | None = None) -> Tensor:
    """``read(*args)``, or ``read(*args, rows)`` (a block of rows) when ``rows`` is given."""
    return read(*args) if rows is None else read(*args, rows)


def row_blocks(stream: TensorStream, key: str) -> list[slice] | None:
    """The stream's row blocks of ``key`` for an elementwise merge (None: the tensor whole)."""
    blocks = getattr(stream, "row_blocks", None)
    return blocks(key) if blocks is not None else None


def by_row_blocks(blocks: list[slice] | None, part: Callable[[slice | None], Tensor]) -> Tensor:
    """``part(None)`` when ``blocks`` is None; else one tensor whose rows ``r`` are ``part(r)`` for each
    block, computed one block at a time (the streams' row blocks: :func:`row_blocks`)."""
    if blocks is None:
        return part(None)
    whole = None
    for rows in blocks:
        piece = part(rows)
        if whole is None:
            whole = piece.new_empty((blocks[-1].stop, *piece.shape[1:]))
        whole[rows] = piece
        del piece
    return whole


def plus_pretrained(stream: TensorStream, key: str, tau: Tensor, lam: float) -> Tensor:
    """θ_0[key] + λ·τ as :func:`~adamerge.merging.task_vectors.add_task_vector` computes it (float32),
    written over ``tau``'s own buffer a block of rows of θ_0 at a time (the stream's row blocks), so a
    streaming merge holds no second float32 copy of a big tensor."""
    for rows in row_blocks(stream, key) or [slice(None)]:
        base = stream.pretrained_tensor(key) if rows == slice(None) else stream.pretrained_tensor(key, rows)
        tau[rows] = base.float() + lam * tau[rows].float()
    return tau


def _on_pool(fn: MergeFn) -> MergeFn:
    def run(pool: TaskVectorSource, tasks: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Tensor]:
        return fn(pool.pretrained_state(), [tau for _, tau in pool.task_vectors(tasks)], **kwargs)

    run.__doc__, run.__wrapped__ = fn.__doc__, fn  # type: ignore[attr-defined]
    return run


def register_method(
    name: str, pool_level: bool = False, label: str | None = None,
    presets: dict[str, dict[str, Any]] | None = None, per_tensor: bool = False,
) -> Callable[[MergeFn], MergeFn]:
    """Register a static merge under ``name`` (returns the function unchanged).

    Args:
        name: the name :func:`adamerge.merging.merge_pool` and the CLI know it by.
        pool_level: the function takes ``(pool, tasks=None, **kwargs)`` instead of
            ``(pretrained, task_vectors, **kwargs)``.
        label: the short name results tables use for a model built on this merge (default ``name``).
        presets: named official settings, ``{"paper": {"merge": "mean", "lam": 1.0}}``: the arguments
            of one published run each (``merge_pool(pool, name, preset="paper")``; docs/parity.md).
        per_tensor: the merged value of each tensor depends on that tensor of θ_0 and the experts
            alone (no whole-model statistic): out-of-core merging runs the method one tensor at a time
            and the result is the whole-model merge exactly (tests/test_hf_merge.py checks each).
    """

    def decorate(fn: MergeFn) -> MergeFn:
        origin = f"{fn.__module__}.{fn.__qualname__}"
        if name in METHODS and _ORIGINS[name] != origin:
            raise ValueError(f"merging method {name!r} is registered twice: by {_ORIGINS[name]} and {origin}")
        METHODS[name], _ORIGINS[name] = (fn if pool_level else _on_pool(fn)), origin
        LABELS[name] = label or name
        PRESETS[name] = {k: dict(v) for k, v in (presets or {}).items()}
        if per_tensor:
            PER_TENSOR.add(name)
        return fn

    return decorate


def register_streaming(name: str) -> Callable[[Callable], Callable]:
    """Register the exact out-of-core version of the method ``name``, one that needs a whole-model
    statistic (TIES' per-task magnitude threshold) and so reads the stream in several passes.

    The function takes ``(stream, tasks, **kwargs)`` (a :class:`TensorStream`, the validated task
    list, the method's arguments) and yields ``(key, merged θ[key])`` for every key of
    ``stream.merge_keys()``, in that order.
    """

    def decorate(fn: Callable) -> Callable:
        STREAMING[name] = fn
        return fn

    return decorate


def register_directions(
    name: str, pool_level: bool = False, presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[Callable], Callable]:
    """Register how the merge ``name`` splits into an origin and one direction per task.

    The function returns ``(origin, [d_1..d_K])`` with ``origin + Σ_k d_k`` the merge at unit scale
    (task arithmetic: θ_0 and the τ_k; TIES: θ_0 and the trimmed, sign-elected τ̂_k; CART: θ_avg and
    the low-rank centred vectors); methods that learn a coefficient per task (and layer) scale the
    d_k (:func:`adamerge.merging.dispatch.merge_directions`). ``name`` is the merge's registered name,
    so tables label the result with the merge's label.

    Args:
        name: the registered method whose directions these are.
        pool_level: the function takes ``(pool, tasks=None, **kwargs)`` (reads the stream itself)
            instead of ``(pretrained, task_vectors, **kwargs)``.
        presets: named official settings of the direction arguments (``{"official": {...}}``).
    """

    def decorate(fn: Callable) -> Callable:
        DIRECTIONS[name] = fn if pool_level else _on_pool(fn)
        DIRECTION_PRESETS[name] = {k: dict(v) for k, v in (presets or {}).items()}
        return fn

    return decorate


def streamed_sum(pool: TaskVectorSource, tasks: Sequence[str] | None) -> tuple[dict[str, Tensor], int]:
    """(Σ_k τ_k over float keys in float32, K) of the pool's experts, reading one expert at a time
    (:func:`~adamerge.merging.task_vectors.running_sum` over ``pool.task_vectors(tasks)``)."""
    return running_sum(tau for _, tau in pool.task_vectors(tasks))
