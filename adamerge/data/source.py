"""What a data source is: anything that hands out a labeled dataset per task and split.

The test-time DataModule reads images only through this protocol, so the mini benchmark, image
folders on disk and users' own datasets are interchangeable. Splits: ``"test"`` is the unlabeled
adaptation stream *and* the evaluation set (as in the papers); ``"val"`` is a held-out labeled split
for choosing hyper-parameters (e.g. task arithmetic's λ); ``"train"`` is what experts were tuned on.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")

__all__ = ["TaskSource", "SPLITS", "check_split"]


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
