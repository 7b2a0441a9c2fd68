"""DARE: drop and rescale, a pre-processing step for task vectors.

    τ̃ = (m ⊙ τ) / (1 − p),     m_i ~ Bernoulli(1 − p)  (each entry dropped with probability p)

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, arXiv 2311.03099. E[τ̃] = τ, so the merged model is unchanged in expectation while
most entries become zero (less interference). Use it before task arithmetic or TIES, either through
their ``dare=`` argument or by composing explicitly::

    taus = dare_all(taus, drop=0.9, seed=0)
    merged = ties_merge(pretrained, taus)     # "DARE + TIES" as in the paper's tables

RNG contract (so results are reproducible): one ``torch.Generator``; keys in the state dict's
order; for each float key the mask is ``torch.rand(shape, generator=g) >= p`` (True = kept), drawn in
float32 on the CPU. :func:`dare_all` draws the task vectors one after another from one generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_ratio, check_taus
from adamerge.merging.task_vectors import MergeError, StateDict, check_finite, is_mergeable

__all__ = ["DaredStream", "dare", "dare_all", "dare_each"]


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise MergeError("pass either seed or generator to dare, not both")
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def dare(
    tau: StateDict,
    drop: float = 0.9,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Drop each entry of τ with probability ``drop`` and rescale the rest by 1/(1 − drop).

    Args:
        tau: a task vector (float keys are processed, other keys copied).
        drop: drop rate p in [0, 1); 0 returns a copy of τ (p = 1 would divide by zero).
        seed: seed for a fresh generator (default 0 when neither seed nor generator is given).
        generator: a ``torch.Generator`` to draw from (advanced in place), instead of ``seed``.
    """
    p = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    check_finite(tau, name="task vector")
    g = _generator(seed, generator)
    out: dict[str, Tensor] = {}
    for key, t in tau.items():
        if not is_mergeable(t):
            out[key] = t.clone()
            continue
        keep = (torch.rand(t.shape, generator=g) >= p).to(t.device)  # drawn on the CPU, used where τ is
        out[key] = (t.float() * keep / (1.0 - p)).to(t.dtype)
    return out


def dare_all(taus: Sequence[StateDict], drop: float = 0.9, seed: int = 0) -> list[dict[str, Tensor]]:
    """:func:`dare` on each task vector in turn, all drawn from one generator seeded with ``seed``.

    Args:
        taus: the task vectors.
        drop: drop rate p in [0, 1).
        seed: seed of the shared generator.
    """
    taus = check_taus(taus)
    g = _generator(seed, None)
    return [dare(tau, drop=drop, generator=g) for tau in taus]


def dare_each(taus: Iterable[StateDict], drop: float = 0.9, seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """:func:`dare_all` lazily: each task vector dropped as it comes (a pool's stream holds one at a time).

    Yields the same task vectors as ``dare_all(list(taus), drop, seed)``.

    Args:
        taus: the task vectors (a list or a generator).
        drop: drop rate p in [0, 1).
        seed: seed of the shared generator.
    """
    g = _generator(seed, None)
    for tau in taus:
        dropped = dare(tau, drop=drop, generator=g)
        del tau  # the original goes before the consumer asks for the next one
        yield dropped
        del dropped


class DaredStream:
    """A tensor stream whose task vectors are DARE'd exactly as :func:`dare_each` draws them.

    The masks of :func:`dare_each` come from one generator, task after task, key after key; out of
    core the tensors are visited key after key. So a first pass walks the draws in their order,
    keeping the generator's state before each (task, key) (5 KB each) and discarding the numbers;
    afterwards the mask of any (task, key) is redrawn from its state, as often as a merge reads it.

    Args:
        stream: the :class:`~adamerge.merging.registry.TensorStream` of the original task vectors.
        tasks: the tasks, in the order the masks are drawn.
        drop: drop rate p in [0, 1).
        seed: seed of the one generator.
    """

    def __init__(self, stream, tasks, drop: float = 0.9, seed: int = 0) -> None:
        self.stream, self.tasks = stream, list(tasks)
        self.drop = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
        g = _generator(seed, None)
        self._states: dict[tuple[str, str], Tensor] = {}
        for task in self.tasks:
            for key in stream.merge_keys():
                self._states[task, key] = g.get_state()
                shape = stream.pretrained_tensor(key).shape
                torch.rand(shape, generator=g)

    def check_tasks(self, tasks):
        tasks = self.stream.check_tasks(tasks)
        if tasks != self.tasks:
            raise MergeError(f"the DARE masks were drawn for tasks {self.tasks}, not {tasks}")
        return tasks

    def merge_keys(self) -> list[str]:
        return self.stream.merge_keys()

    def pretrained_tensor(self, key: str) -> Tensor:
        return self.stream.pretrained_tensor(key)

    def task_vector_tensor(self, task: str, key: str) -> Tensor:
        g = torch.Generator()
        g.set_state(self._states[task, key])
        return dare({key: self.stream.task_vector_tensor(task, key)}, drop=self.drop, generator=g)[key]
