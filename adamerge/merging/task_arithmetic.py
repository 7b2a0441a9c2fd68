"""Task arithmetic.

    θ = θ_0 + λ Σ_k τ_k,        τ_k = θ_k − θ_0,        λ = 0.3 (AdaMerging / Surgery baselines)

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv 2212.04089. With ``dare=p``
every τ_k is first passed through DARE drop-and-rescale (:mod:`adamerge.merging.dare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_taus
from adamerge.merging.dare import dare_all
from adamerge.merging.registry import TaskVectorSource, register_directions, register_method, streamed_sum
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector, running_sum

__all__ = ["task_arithmetic", "task_arithmetic_directions", "task_arithmetic_pool"]


def task_arithmetic(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    lam: float = 0.3,
    dare: float | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """θ_0 + λ Σ_k τ_k, computed in float32 and returned in θ_0's dtypes.

    Args:
        pretrained: θ_0 (non-float keys and keys absent from the task vectors are copied).
        taus: the task vectors τ_1..τ_K (same keys and shapes, finite).
        lam: the scaling coefficient λ >= 0 (0 gives θ_0).
        dare: if set, the DARE drop rate p in [0, 1) applied to each τ_k before summing.
        seed: seed of the DARE masks (ignored without ``dare``).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    if dare is not None:
        taus = dare_all(taus, drop=dare, seed=seed)
    total, _ = running_sum(taus)
    return add_task_vector(pretrained, total, lam)


@register_method("task_arithmetic", per_tensor=True, pool_level=True, label="TA")
def task_arithmetic_pool(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None, lam: float = 0.3, dare: float | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Task arithmetic: θ_0 + λ Σ_k τ_k, from a running sum of the streamed task vectors.

    One expert is in memory at a time (see :func:`task_arithmetic`); with ``dare`` every task vector
    is needed at once."""
    if dare is not None:
        taus = [tau for _, tau in pool.task_vectors(tasks)]
        return task_arithmetic(pool.pretrained_state(), taus, lam=lam, dare=dare, seed=seed)
    lam = check_lam(lam)
    total, _ = streamed_sum(pool, tasks)
    return add_task_vector(pool.pretrained_state(), total, lam)


class _Streamed(Sequence):
    """The pool's task vectors as a lazy sequence: item k is read from the pool when asked for."""

    def __init__(self, pool: TaskVectorSource, tasks: Sequence[str]) -> None:
        self.pool, self.tasks = pool, list(tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: Any) -> dict[str, Tensor]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        (_, tau), = self.pool.task_vectors([self.tasks[i]])
        return tau


@register_directions("task_arithmetic", pool_level=True)
def task_arithmetic_directions(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None,
) -> tuple[dict[str, Tensor], Sequence[dict[str, Tensor]]]:
    """(θ_0, [τ_1..τ_K]): task arithmetic's directions, the task vectors, read lazily one at a time.

    Args:
        pool: the model pool.
        tasks: the tasks, in order (default: all of the pool's).
    """
    names = list(tasks) if tasks is not None else list(getattr(pool, "tasks", None) or [])
    if not names:
        raise MergeError("task_arithmetic directions need the task names: pass tasks")
    return pool.pretrained_state(), _Streamed(pool, names)
