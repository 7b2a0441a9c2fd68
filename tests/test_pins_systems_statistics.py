"""StatisticsMerge (adamerge/systems/statistics.py): the shared statistics pass, pinned exactly.

The system under test is :class:`Summing`, a minimal subclass whose statistic is the sum of every image
value read since the last reset and whose "merge" sets every weight to that sum. Its merged weights thus
say, independently of the base class's bookkeeping, which batches the current statistics hold: a merge
that was not recomputed (a stale version counter), a pass that kept the previous pass's batches, or a
batch read from the wrong element of an ``(images, labels)`` item all give another number. Unlike
RegMean and Fisher merging it does not call ``reset_statistics`` in ``__init__``, so the base's own
initial values (counters at 0, the version counters) are what is observed. Labels are chosen with a sum
unlike the images'; a pass is run twice with one step each (a counter bumped by the wrong amount, or
reset to a constant, then meets the previous merge's version). Messages are matched whole (``^…$``);
warning filters are checked against the exact Lightning message, another UserWarning, and the same
message under another category. A stand-in trainer object gives ``world_size=2`` without DDP.
"""

from __future__ import annotations

import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_pool
from safetensors.torch import load_file

from adamerge.models.pool import zero_shot_logits
from adamerge.systems.runs import CheckpointMismatchError
from adamerge.systems.statistics import StatisticsMerge

NO_OPTIMIZER = "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer"


class Summing(StatisticsMerge):
    """Statistic: the sum of every image value since the last reset; merge: every weight set to it."""

    def __init__(self, pool, tasks=None, export_dir=None):
        super().__init__(pool, tasks, export_dir=export_dir)
        self.total = 0.0

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.total = 0.0

    def accumulate(self, task, images):
        self.total += float(images.sum())

    def merge_statistics(self):
        return {k: torch.full_like(v, self.total) for k, v in self.expert_weights(self.tasks[0]).items()}


class Bare(StatisticsMerge):
    """A subclass that implements none of the hooks."""


def images(value: float, n: int = 2) -> torch.Tensor:
    """``n`` 16x16 RGB images filled with ``value`` (sum: value · n · 768)."""
    return torch.full((n, 3, 16, 16), float(value))


def merged_value(system: StatisticsMerge) -> float:
    """The one value every merged weight of a :class:`Summing` system holds."""
    values = {float(v.flatten()[0]) for v in system.merged_state_dict().values()}
    values |= {float(v.flatten()[-1]) for v in system.merged_state_dict().values()}
    assert len(values) == 1
    return values.pop()


def stand_in_trainer(world_size: int = 1, sanity_checking: bool = False) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, sanity_checking=sanity_checking, datamodule=None,
                           strategy=SimpleNamespace(checkpoint_io=None))


# ---- construction -----------------------------------------------------------------------------------------
def test_a_fresh_system_has_read_nothing_and_refuses_to_merge():
    system = Summing(make_tiny_pool(2))
    assert system.batches_seen == 0 and system.progress_step == 0
    assert system.images_seen == {"task0": 0, "task1": 0}
    assert system.statistics_summary() == {"batches_seen": 0, "images_seen": {"task0": 0, "task1": 0}}
    assert system.automatic_optimization is False
    assert system.configure_optimizers() is None
    with pytest.raises(RuntimeError, match=r"^Summing has no statistics yet: run fit \(one pass over the "
                                           r"unlabeled stream\) before validate, test or export$"):
        system.merged_state_dict()


def test_the_tasks_chosen_are_the_experts_held_in_that_order():
    pool = make_tiny_pool(3)
    system = Summing(pool, tasks=["task2", "task0"])
    assert system.tasks == ["task2", "task0"] and len(system.experts) == 2
    assert system.images_seen == {"task2": 0, "task0": 0}
    for task in ("task2", "task0"):
        state = pool.expert_state(task)
        weights = system.expert_weights(task)
        assert list(weights) == list(state) and all(torch.equal(weights[k], state[k]) for k in state)
    message = "task 'task1' is not one of this system's tasks ['task2', 'task0']"
    with pytest.raises(KeyError, match=f"^{re.escape(repr(message))}$"):
        system.expert("task1")


def test_hooks_left_unimplemented_say_which_class_lacks_them():
    system = Bare(make_tiny_pool(1))
    with pytest.raises(NotImplementedError, match=r"^Bare must implement accumulate\(task, images\)$"):
        system.accumulate("task0", images(1))
    with pytest.raises(NotImplementedError, match=r"^Bare must implement merge_statistics\(\)$"):
        system.merge_statistics()


def test_train_mode_reaches_the_metrics_but_never_the_frozen_encoders():
    system = Summing(make_tiny_pool(2))
    system.eval()
    assert system.train() is system
    assert system.training and all(m.training for m in system.val_acc)
    assert not system.merged_encoder.training and not any(e.training for e in system.experts)
    system.train(False)
    assert not system.training and not any(m.training for m in system.val_acc)


# ---- the pass -----------------------------------------------------------------------------------------------
def test_a_step_reads_images_of_every_item_and_counts_them():
    system = Summing(make_tiny_pool(2))
    labels = torch.tensor([5, 7])  # sum 12: unlike any image sum below
    system.training_step({"task0": (images(1), labels), "task1": [images(2, n=3), labels]}, 0)
    assert system.total == 1 * 2 * 768 + 2 * 3 * 768
    assert system.images_seen == {"task0": 2, "task1": 3} and system.batches_seen == 1
    system.training_step({"task0": images(3, n=1), "task1": None}, 1)  # a task without a batch is skipped
    assert system.images_seen == {"task0": 3, "task1": 3} and system.batches_seen == 2 == system.progress_step
    assert merged_value(system) == 1 * 2 * 768 + 2 * 3 * 768 + 3 * 768
    with pytest.raises(ValueError, match="^empty training batch: expected one batch per task$"):
        system.training_step({"task0": None, "task1": None}, 2)


def test_the_merge_follows_each_step_and_a_new_pass_forgets_the_last():
    system = Summing(make_tiny_pool(2))
    system.training_step({"task0": images(1)}, 0)  # the first step of a system never reset
    assert merged_value(system) == 2 * 768
    system.on_train_start()  # a second pass of one step: only its own batch counts
    assert system.batches_seen == 0 and system.images_seen == {"task0": 0, "task1": 0}
    system.training_step({"task1": images(5)}, 0)
    assert merged_value(system) == 5 * 2 * 768
    system.on_train_start()  # and a third
    system.training_step({"task0": images(-1)}, 0)
    assert merged_value(system) == -2 * 768
    system.training_step({"task0": images(-1)}, 1)
    assert merged_value(system) == -4 * 768


def test_expert_logits_run_the_experts_own_weights_unless_others_are_given():
    pool = make_tiny_pool(2)
    system = Summing(pool)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for task in pool.tasks:
        enc = pool.build_encoder(pool.expert_state(task))
        expected = zero_shot_logits(enc(x), pool.heads[task], pool.logit_scale)
        torch.testing.assert_close(system.expert_logits(task, x), expected)
    other = pool.build_encoder(pool.expert_state("task1"))
    expected = zero_shot_logits(other(x), pool.heads["task0"], pool.logit_scale)
    torch.testing.assert_close(system.expert_logits("task0", x, params=pool.expert_state("task1")), expected)


# ---- Lightning hooks ----------------------------------------------------------------------------------------
def test_setup_silences_exactly_lightnings_no_optimizer_warning():
    system = Summing(make_tiny_pool(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        system.setup("fit")  # no trainer attached: allowed
        warnings.warn(NO_OPTIMIZER, UserWarning)
        warnings.warn("another user warning", UserWarning)
        warnings.warn(NO_OPTIMIZER, RuntimeWarning)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (UserWarning, "another user warning"), (RuntimeWarning, NO_OPTIMIZER)]


def test_setup_refuses_more_than_one_process():
    system = Summing(make_tiny_pool(1))
    system._trainer = stand_in_trainer(world_size=1)
    system.setup("fit")
    system._trainer = stand_in_trainer(world_size=2)
    with pytest.raises(RuntimeError, match=r"^Summing runs on one device: its statistics are not reduced across 2 "
                                           r"processes \(set trainer.devices=1\)$"):
        system.setup("fit")


def test_validation_without_a_dataloader_index_is_the_first_tasks():
    system = Summing(make_tiny_pool(2))
    system.training_step({"task0": images(0)}, 0)
    system._trainer = stand_in_trainer()
    system.validation_step((images(0, n=4), torch.tensor([0, 1, 2, 0])), 0)
    assert [int(m.update_count) for m in system.val_acc] == [1, 0]
    system.validation_step((images(0, n=4), torch.tensor([0, 1, 2, 3])), 0, 1)
    assert [int(m.update_count) for m in system.val_acc] == [1, 1]


def test_export_creates_missing_folders_and_writes_the_summary(tmp_path):
    pool = make_tiny_pool(2)
    system = Summing(pool, tasks=["task1", "task0"])
    system.training_step({"task1": images(0.5, n=3)}, 0)
    target = tmp_path / "a" / "b"
    system.export(target)
    summary = {"system": "Summing", "tasks": ["task1", "task0"], "batches_seen": 1,
               "images_seen": {"task1": 3, "task0": 0}}
    assert (target / "statistics.json").read_text() == json.dumps(summary, indent=1)
    weights = load_file(target / "merged.safetensors")
    assert set(weights) == set(pool.encoder.state_dict())
    assert all(torch.equal(v, torch.full_like(v, 0.5 * 3 * 768)) for v in weights.values())
    assert not (target / "learned.safetensors").exists()


def test_a_checkpoint_is_refused_with_the_reason():
    message = ("Summing keeps its statistics out of checkpoints (nothing learns, and they are as large as the "
               "experts): a checkpoint cannot resume or restore it; run the pass again without ckpt_path")
    with pytest.raises(CheckpointMismatchError, match=f"^{re.escape(message)}$"):
        Summing(make_tiny_pool(1)).on_load_checkpoint({})
