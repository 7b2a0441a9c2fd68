"""The test-time DataModule: unlabeled adaptation streams for training, labeled loaders for evaluation.

Training (what AdaMerging, WEMoE and Surgery adapt on): per task an endless, shuffled stream of
its *test* split, images only (labels are dropped before batching, so no method can read them).
Each step yields ``{task: images [B, 3, H, W]}`` with one batch per task (a ``CombinedLoader``).
An epoch is ``steps_per_epoch`` steps.

The stream is a pure function of ``(seed, task, rank, world size, position)``: pass c over the
data is ``randperm(n)`` drawn from a generator seeded by ``(seed, task index, c)``, split across
ranks like ``DistributedSampler`` (rank r takes entries r, r+W, …), so under DDP every rank sees
different images. An epoch starts at position ``trainer.global_step · B``, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have seen (with
``accumulate_grad_batches=1``), also mid-epoch; the loaders' checkpointed state only records what
the stream depends on (seed, batch size, world size), to warn when a resumed run changes them.

Evaluation: ``val_dataloader``/``test_dataloader`` return one labeled loader per task, in task
order (``dataloader_idx`` → ``tasks[dataloader_idx]``), over ``eval_split``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from adamerge.data.registry import TaskInfo, UnknownTaskError, get_task
from adamerge.data.source import TaskSource, check_split

__all__ = ["ImagesOnly", "StreamLoader", "StreamSampler", "TestTimeDataModule"]


class ImagesOnly(Dataset):
    """A view of a labeled dataset that returns the image and drops the label."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0] if isinstance(item, (tuple, list)) else item


class StreamSampler(DistributedSampler):
    """Endless, seeded, rank-aware shuffling; one epoch = ``num_samples`` indices from ``start()``.

    A ``DistributedSampler`` subclass so Lightning keeps it instead of injecting its own.

    Args:
        dataset: the dataset to index (only its length is used).
        num_samples: indices per epoch (``steps_per_epoch · batch_size``).
        seed: base seed; with ``stream_id`` (the task index) it seeds every pass over the data.
        stream_id: distinguishes the streams of different tasks.
        num_replicas: world size.
        rank: this process's rank.
        start: returns the stream position (in samples) the next epoch starts at.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_samples: int,
        seed: int,
        stream_id: int,
        num_replicas: int = 1,
        rank: int = 0,
        start: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        if len(dataset) == 0:
            raise ValueError("cannot stream an empty dataset")
        self.n = len(dataset)
        self.per_rank = math.ceil(self.n / num_replicas)
        self.num_samples = num_samples
        self.stream_id = stream_id
        self.start = start or (lambda: 0)
        self._cache: tuple[int, list[int]] | None = None

    def _pass(self, c: int) -> list[int]:
        if self._cache is None or self._cache[0] != c:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.stream_id * 7_919 + c)
            perm = torch.randperm(self.n, generator=g).tolist()
            perm += perm[: self.per_rank * self.num_replicas - self.n]  # pad like DistributedSampler
            self._cache = (c, perm[self.rank :: self.num_replicas])
        return self._cache[1]

    def index(self, position: int) -> int:
        """The dataset index at ``position`` of this rank's stream."""
        c, offset = divmod(position, self.per_rank)
        return self._pass(c)[offset]

    def __iter__(self) -> Iterator[int]:
        first = int(self.start())
        for p in range(first, first + self.num_samples):
            yield self.index(p)

    def __len__(self) -> int:
        return self.num_samples


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`StreamSampler`, resumable without stored positions.

    Lightning's resumable-loader interface: the state only records what the stream depends on
    (the position itself comes from ``trainer.global_step``); a resumed run with another seed,
    batch size or world size is told that its stream differs from the interrupted one.
    """

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "seed": int(s.seed),
            "batch_size": self.batch_size,
            "num_replicas": s.num_replicas,
            "stream_id": s.stream_id,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            warnings.warn(
                f"resuming with a different data stream than the checkpoint's ({changed}); the batches "
                "will not be those of an uninterrupted run",
                stacklevel=2,
            )


def _count_classes(source: TaskSource, task: str, dataset: Dataset) -> int | None:
    """The class count of ``task``: from the source, the dataset, the task registry, or its labels."""
    fn = getattr(source, "num_classes", None)
    if callable(fn):
        return int(fn(task))
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    try:
        return get_task(task).num_classes
    except UnknownTaskError:
        pass
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return int(dataset.tensors[1].max()) + 1
    return None


class TestTimeDataModule(L.LightningDataModule):
    """Unlabeled per-task test streams for adaptation; labeled per-task loaders for evaluation.

    Args:
        source: where the datasets come from (mini benchmark, image folders, your own TaskSource).
        tasks: the tasks to serve, in order; default all of the source's tasks.
        batch_size: training images per task per step (16 in the papers).
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffled training streams.
        eval_split: the labeled split evaluated by validate/test (``"test"`` as in the papers).
        steps_per_epoch: training steps per epoch (validation runs at epoch ends).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        source: TaskSource,
        tasks: list[str] | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        eval_split: str = "test",
        steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("steps_per_epoch", steps_per_epoch),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        available = list(source.tasks)
        self.tasks = list(available if tasks is None else tasks)
        if not self.tasks:
            raise ValueError("empty task list")
        unknown = [t for t in self.tasks if t not in available]
        if unknown:
            raise ValueError(f"task {unknown[0]!r} is not in the data source (source tasks: {available})")
        dup = next((t for i, t in enumerate(self.tasks) if t in self.tasks[:i]), None)
        if dup is not None:
            raise ValueError(f"task {dup!r} is listed twice in {self.tasks}")
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.eval_split = check_split(eval_split)
        self.steps_per_epoch = int(steps_per_epoch)
        self._num_classes: dict[str, int | None] | None = None

    # ---- datasets --------------------------------------------------------------------------
    def dataset(self, task: str, split: str) -> Dataset:
        ds = self.source.dataset(task, check_split(split))
        if len(ds) == 0:
            raise ValueError(f"task {task!r}: the {split!r} split is empty")
        return ds

    @property
    def task_info(self) -> Callable[[str], TaskInfo]:
        """Each task's class names and templates (the task registry's :func:`get_task`), for the zero-shot
        heads: the CLI links it into the model pool, so a loader never looks a task up itself."""
        return get_task

    @property
    def num_classes(self) -> dict[str, int | None]:
        """Class count per task (``None`` where the source gives no way to know)."""
        if self._num_classes is None:
            self._num_classes = {
                t: _count_classes(self.source, t, self.dataset(t, self.eval_split)) for t in self.tasks
            }
        return self._num_classes

    # ---- loaders ---------------------------------------------------------------------------
    def _start(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.global_step) * self.batch_size

    def train_dataloader(self) -> CombinedLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        loaders = {}
        for i, task in enumerate(self.tasks):
            data = ImagesOnly(self.dataset(task, "test"))
            sampler = StreamSampler(
                data, self.steps_per_epoch * self.batch_size, self.seed, i, world, rank, start=self._start
            )
            loaders[task] = StreamLoader(
                data,
                batch_size=self.batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _eval_loaders(self) -> list[DataLoader]:
        return [
            DataLoader(
                self.dataset(t, self.eval_split),
                batch_size=self.eval_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
            )
            for t in self.tasks
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
