"""TestTimeDataModule: unlabeled endless per-task streams, rank-disjoint, resumable; labeled eval loaders."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from adamerge.data.datamodule import ImagesOnly, StreamSampler, TestTimeDataModule


class TinySource:
    """A TaskSource matching tests/conftest.py's tiny pool: 16x16 images, classes 3, 4, 5 for task0..2.

    Image i of a task is filled with the value ``i`` (so tests can tell which example a batch holds);
    labels are ``i % C``. ``classes`` overrides the class counts (to build mismatches).
    """

    def __init__(self, n: int = 24, classes: tuple[int, ...] = (3, 4, 5), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = {}
        for k, c in enumerate(classes):
            split = {}
            for s, split_name in enumerate(("train", "val", "test")):
                x = torch.randn(n, 3, 16, 16, generator=g) * 0.1
                x += torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
                split[split_name] = TensorDataset(x, torch.arange(n) % c)
            self.data[f"task{k}"] = split

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def dataset(self, task: str, split: str):
        return self.data[task][split]


def ids(images: torch.Tensor) -> list[int]:
    """The example indices of a TinySource image batch."""
    return images.mean(dim=(1, 2, 3)).round().long().tolist()


class FakeTrainer:
    def __init__(self, global_step: int = 0, world_size: int = 1, global_rank: int = 0) -> None:
        self.global_step, self.world_size, self.global_rank = global_step, world_size, global_rank


def train_batches(dm: TestTimeDataModule, trainer: FakeTrainer | None = None) -> list[dict]:
    dm.trainer = trainer
    loader = dm.train_dataloader()
    iter(loader)  # CombinedLoader needs its iterator before len()
    return [batch for batch, _, _ in loader]


def test_defaults_and_task_validation():
    src = TinySource()
    dm = TestTimeDataModule(src)
    assert dm.tasks == ["task0", "task1", "task2"] and dm.batch_size == 16 and dm.eval_batch_size == 256
    assert dm.num_classes == {"task0": 3, "task1": 4, "task2": 5}
    assert TestTimeDataModule(src, tasks=["task2", "task0"]).tasks == ["task2", "task0"]
    with pytest.raises(ValueError, match="task 'mnist' is not in the data source"):
        TestTimeDataModule(src, tasks=["task0", "mnist"])
    with pytest.raises(ValueError, match="empty task list"):
        TestTimeDataModule(src, tasks=[])
    with pytest.raises(ValueError, match=r"task 'task2' is listed twice in \['task2', 'task0', 'task2'\]"):
        TestTimeDataModule(src, tasks=["task2", "task0", "task2"])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TestTimeDataModule(src, batch_size=0)
    with pytest.raises(ValueError, match="unknown split"):
        TestTimeDataModule(src, eval_split="dev")


def test_num_classes_prefers_the_source():
    class Counted(TinySource):
        def num_classes(self, task: str) -> int:
            return 10

    assert TestTimeDataModule(Counted()).num_classes["task1"] == 10


def test_task_info_is_the_registry_lookup_handed_to_pools():
    from adamerge.data.registry import get_task

    dm = TestTimeDataModule(TinySource())
    assert dm.task_info is get_task
    assert dm.task_info("mnist").classnames[:2] == ("0", "1")


def test_train_stream_is_unlabeled_one_batch_per_task_and_shuffled_test_split():
    src = TinySource(n=24)
    dm = TestTimeDataModule(src, batch_size=4, steps_per_epoch=9)
    batches = train_batches(dm)
    assert len(batches) == 9
    for batch in batches:
        assert list(batch) == dm.tasks
        for task, images in batch.items():
            assert isinstance(images, torch.Tensor) and images.shape == (4, 3, 16, 16)  # no labels
    seen = {t: [i for b in batches for i in ids(b[t])] for t in dm.tasks}
    for task, stream in seen.items():
        # 36 draws = one full pass over the 24 test images, then half of a fresh permutation
        assert sorted(stream[:24]) == list(range(24)) and stream[:24] != list(range(24))
        torch.testing.assert_close(batches[0][task], src.dataset(task, "test").tensors[0][stream[:4]])
    assert seen["task0"] != seen["task1"]  # each task has its own shuffle


def test_stream_is_seeded_and_continues_from_global_step():
    src = TinySource()
    full = train_batches(TestTimeDataModule(src, batch_size=4, steps_per_epoch=6, seed=5))
    again = train_batches(TestTimeDataModule(src, batch_size=4, steps_per_epoch=6, seed=5))
    other = train_batches(TestTimeDataModule(src, batch_size=4, steps_per_epoch=6, seed=6))
    assert all(ids(a["task0"]) == ids(b["task0"]) for a, b in zip(full, again))
    assert [ids(b["task0"]) for b in full] != [ids(b["task0"]) for b in other]
    # A resumed run (global_step 4) picks up exactly where the uninterrupted one was.
    resumed = train_batches(TestTimeDataModule(src, batch_size=4, steps_per_epoch=2, seed=5), FakeTrainer(4))
    for a, b in zip(full[4:6], resumed):
        assert ids(a["task2"]) == ids(b["task2"])


def test_ranks_see_disjoint_batches():
    src = TinySource(n=24)
    dm = TestTimeDataModule(src, batch_size=3, steps_per_epoch=4)
    r0 = train_batches(dm, FakeTrainer(world_size=2, global_rank=0))
    r1 = train_batches(dm, FakeTrainer(world_size=2, global_rank=1))
    for task in dm.tasks:
        a = [i for b in r0 for i in ids(b[task])]
        b = [i for b in r1 for i in ids(b[task])]
        assert not set(a) & set(b)  # one pass split across two ranks: disjoint
        assert sorted(a + b) == list(range(24))


def test_stream_sampler_pads_uneven_ranks_like_distributed_sampler():
    data = TensorDataset(torch.arange(5))
    s0 = StreamSampler(data, 3, seed=0, stream_id=0, num_replicas=2, rank=0)
    s1 = StreamSampler(data, 3, seed=0, stream_id=0, num_replicas=2, rank=1)
    assert sorted(set(s0) | set(s1)) == list(range(5)) and len(s0) == 3
    with pytest.raises(ValueError, match="empty dataset"):
        StreamSampler(TensorDataset(torch.zeros(0)), 3, 0, 0)


def test_eval_loaders_are_labeled_in_task_order():
    src = TinySource(n=10)
    dm = TestTimeDataModule(src, tasks=["task2", "task0"], eval_batch_size=4)
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and len(dm.test_dataloader()) == 2
    images, labels = next(iter(loaders[0]))
    torch.testing.assert_close(images, src.dataset("task2", "test").tensors[0][:4])
    assert labels.tolist() == [0, 1, 2, 3]
    assert sum(len(b[1]) for b in loaders[1]) == 10


def test_eval_split_val_and_images_only():
    src = TinySource(n=6)
    dm = TestTimeDataModule(src, eval_split="val", eval_batch_size=6)
    images, _ = next(iter(dm.val_dataloader()[1]))
    torch.testing.assert_close(images, src.dataset("task1", "val").tensors[0])
    assert torch.equal(ImagesOnly(src.dataset("task0", "test"))[2], src.dataset("task0", "test")[2][0])


def test_train_loaders_are_resumable_and_warn_on_changed_stream():
    src = TinySource()
    loader = TestTimeDataModule(src, batch_size=4, seed=1).train_dataloader().flattened[0]
    state = loader.state_dict()
    assert state == {"seed": 1, "batch_size": 4, "num_replicas": 1, "stream_id": 0}
    loader.load_state_dict(state)  # same stream: silent
    other = TestTimeDataModule(src, batch_size=8, seed=1).train_dataloader().flattened[0]
    with pytest.warns(UserWarning, match="different data stream.*batch_size"):
        other.load_state_dict(state)
