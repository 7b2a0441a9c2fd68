"""What a data source is: anything that hands out a labeled dataset per task and split.

The test-time DataModule reads images only through this protocol, so the mini benchmark, image
folders on disk and users' own datasets are interchangeable. Splits: ``"test"`` is the unlabeled
adaptation stream *and* the evaluation set (as in the papers); ``"val"`` is a held-out labeled split
for choosing hyper-parameters (e.g. task arithmetic's λ); ``"train"`` is what experts were tuned on.
:class:`CombinedSource` joins sources, so one run may read some tasks from the Hub and others from
image folders.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")

__all__ = ["SPLITS", "CombinedSource", "TaskSource", "check_split"]


@runtime_checkable
class TaskSource(Protocol):
    """A provider of per-task datasets of ``(image_tensor [3,H,W], int label)`` pairs."""

    @property
    def tasks(self) -> list[str]:
        """The tasks this source can serve."""
        ...

    def dataset(self, task: str, split: str) -> Dataset:
        """The dataset of ``task`` for ``split`` (one of :data:`SPLITS`)."""
        ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


class CombinedSource:
    """Several sources as one: their tasks in order, each served by the one source that has it.

    The class count of a task comes from its dataset (``classes``) or the task registry, as for any
    source without ``num_classes``.

    Args:
        sources: the sources to join; no task may be served by two of them.
    """

    def __init__(self, sources: list[TaskSource]) -> None:
        if not sources:
            raise ValueError("CombinedSource needs at least one source")
        self.sources = list(sources)
        self._owner: dict[str, TaskSource] = {}
        for source in self.sources:
            for task in source.tasks:
                other = self._owner.setdefault(task, source)
                if other is not source:
                    raise ValueError(
                        f"task {task!r} is served by two sources ({type(other).__name__} and "
                        f"{type(source).__name__}): drop it from one of them"
                    )

    @property
    def tasks(self) -> list[str]:
        return list(self._owner)

    def dataset(self, task: str, split: str) -> Dataset:
        """The dataset of ``task`` / ``split`` from the source that serves ``task``."""
        if task not in self._owner:
            raise ValueError(f"task {task!r} is not served by any of the sources (tasks: {self.tasks})")
        return self._owner[task].dataset(task, check_split(split))
