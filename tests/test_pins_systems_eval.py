"""TestTimeSystem (adamerge/systems/base.py), continued from test_pins_systems_base.py: training and evaluation
steps, epoch-end metrics (micro accuracy, sanity checks, a one-process DDP run for ``sync_dist``) and the
checkpoint identity of systems and components, each input telling the promised behaviour from a near miss.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from test_pins_systems_base import FiveParameters, one_task_data
from test_systems_base import ScaledProbe

from adamerge.systems.base import CheckpointMismatchError, TestTimeSystem


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [{}, {"task0": None}])
def test_an_empty_training_batch_is_refused_with_the_documented_message(batch):
    # no task at all, or only tasks whose batch is None (skipped): nothing to adapt on
    with pytest.raises(ValueError, match=r"^empty training batch: expected one batch per task$"):
        ScaledProbe(make_tiny_pool(1)).training_step(batch, 0)


# ---- evaluation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, split", [("validation", "val"), ("test", "test")])
def test_an_eval_step_with_one_dataloader_evaluates_the_first_task(stage, split):
    # Lightning calls validation_step/test_step(batch, batch_idx) without dataloader_idx when there is
    # one dataloader: the default index must be 0, the only task (index 1 has no task here)
    system = ScaledProbe(make_tiny_pool(1))
    step, metric = getattr(system, f"{stage}_step"), getattr(system, f"{split}_acc")[0]
    images, labels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    step((images, labels), 0)
    assert int(metric.update_count) == 1
    expected = (system.task_logits("task0", images).argmax(-1) == labels).float().mean()
    torch.testing.assert_close(metric.compute(), expected)
    # the index one past the last task: refused by name, not by a bare list IndexError
    with pytest.raises(IndexError, match=r"^dataloader 1 has no task \(tasks: \['task0'\]\)$"):
        step((images, labels), 0, 1)


class DirectLogits(TestTimeSystem):
    """``task_logits`` are the images themselves (``[B, C]`` rows): the metric sees exactly what is given."""

    def task_logits(self, task, images):
        return images


@pytest.mark.parametrize("stage, split", [("validation", "val"), ("test", "test")])
def test_accuracy_is_micro_averaged_over_exactly_the_heads_classes(stage, split):
    # predictions 0,0,0,1 for labels 0,0,0,2 (task0 has 3 classes): 3 of 4 right, micro 0.75; a per-class
    # (macro) mean would be 1/3. Logits with a 4th column are refused, not scored as a 4-class task.
    system = DirectLogits(make_tiny_pool(1))
    step, metric = getattr(system, f"{stage}_step"), getattr(system, f"{split}_acc")[0]
    step((torch.eye(3)[[0, 0, 0, 1]], torch.tensor([0, 0, 0, 2])), 0)
    assert metric.compute().item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"`preds.shape\[1\]` should be equal to number of classes"):
        step((torch.eye(4), torch.arange(4)), 0)


def test_epoch_end_reports_every_evaluated_task_after_one_that_got_no_batch():
    # three tasks, batches only for the 2nd and 3rd: the empty first task is skipped, the others reported
    system = ScaledProbe(make_tiny_pool(3))
    logged = []
    system.log_dict = lambda values, **kwargs: logged.append(dict(values))  # no trainer attached
    g = torch.Generator().manual_seed(0)
    expected = {}
    for idx, task in ((1, "task1"), (2, "task2")):
        images, labels = torch.randn(6, 3, 16, 16, generator=g), torch.arange(6) % 3
        system.test_step((images, labels), 0, idx)
        expected[f"test/acc/{task}"] = (system.task_logits(task, images).argmax(-1) == labels).float().mean().item()
    system.on_test_epoch_end()
    expected["test/acc/avg"] = (expected["test/acc/task1"] + expected["test/acc/task2"]) / 2
    assert system.last_metrics == pytest.approx(expected)
    assert len(logged) == 1 and {k: float(v) for k, v in logged[0].items()} == pytest.approx(expected)


class SeenAfterSanityCheck(L.Callback):
    """Records the system's ``last_metrics`` and ``last_metrics_step`` right after the sanity check."""

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.seen = (dict(pl_module.last_metrics), pl_module.last_metrics_step)


def test_sanity_check_accuracies_are_not_kept_as_the_runs_metrics(tmp_path):
    # the sanity check validates the untrained model: it logs accuracies, but last_metrics (what
    # metrics.json reports) must stay empty until a real validation, which then records its step
    system, seen = ScaledProbe(make_tiny_pool(1)), SeenAfterSanityCheck()
    tr = trainer(tmp_path, max_steps=1, num_sanity_val_steps=1, callbacks=[seen])
    tr.fit(system, one_task_data())
    assert seen.seen == ({}, None)
    assert set(system.last_metrics) == {"val/acc/task0", "val/acc/avg"} and system.last_metrics_step == 1
    # accuracies are logged, but only the training loss is shown in the progress bar
    assert {"val/acc/task0", "val/acc/avg"} <= set(tr.callback_metrics)
    assert set(tr.progress_bar_metrics) == {"train/loss"}


@contextmanager
def restored_process_state():
    """Undo what a one-process DDP run leaves behind: the process group, its env vars, torch's thread count."""
    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        torch.set_num_threads(threads)


def test_epoch_accuracies_are_synced_in_a_distributed_run_without_a_warning(tmp_path):
    # a DDP run (one process, gloo: no subprocess) is distributed: epoch-level values logged without
    # sync_dist=True make Lightning warn "It is recommended to use `self.log(..., sync_dist=True)`"
    system = ScaledProbe(make_tiny_pool(1))
    dm = one_task_data()
    with restored_process_state(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = trainer(tmp_path, strategy="ddp", devices=1).validate(system, dm, verbose=False)[0]
    assert set(metrics) == {"val/acc/task0", "val/acc/avg"}
    assert [str(w.message) for w in caught if "sync_dist=True" in str(w.message)] == []


# ---- checkpoint identity ----------------------------------------------------------------------------
class Ranked(ScaledProbe):
    """A system without a component whose learnable state is defined by the hparam ``rank``."""

    identity = ("rank",)

    def __init__(self, pool, rank: int = 4):
        super().__init__(pool)


def test_identity_hparams_are_recorded_by_value_and_a_different_one_is_refused():
    # rank 4 in the checkpoint, 8 in the resuming run: the values (not None) must reach the metadata
    pool = make_tiny_pool(1)
    saved, resumed = Ranked(pool, rank=4), Ranked(pool, rank=8)
    assert saved.method_identity() == {"rank": 4}
    checkpoint = {}
    saved.on_save_checkpoint(checkpoint)
    assert checkpoint["adamerge"]["method"] == {"rank": 4}
    with pytest.raises(CheckpointMismatchError,
                       match=r"^cannot resume: the checkpoint was made with method\.rank = 4, this run has 8$"):
        resumed.on_load_checkpoint(checkpoint)


class Labelled(FiveParameters):
    """A component that names what defines it (``identity()``)."""

    def identity(self):
        return {"width": 2}


class Recorder(FiveParameters):
    """Keeps the arguments it was built with."""

    def __init__(self, pool, tasks):
        super().__init__(pool, tasks)
        self.built_with = (pool, tasks)


def test_a_component_is_built_from_the_pool_and_a_copy_of_the_systems_tasks():
    # tasks in an order of their own: the component gets this system's list (a copy it may not change)
    pool = make_tiny_pool(2)
    system = TestTimeSystem(pool, tasks=["task1", "task0"], model=Recorder)
    got_pool, got_tasks = system.component.built_with
    assert got_pool is pool and got_tasks == ["task1", "task0"] and got_tasks is not system.tasks


def test_a_model_factory_that_builds_no_module_is_refused_with_what_it_built():
    with pytest.raises(TypeError, match=r"^model must build an nn.Module, got dict$"):
        TestTimeSystem(make_tiny_pool(1), model=lambda pool, tasks: {"lambdas": torch.zeros(1)})


def test_a_components_identity_is_its_class_plus_what_it_declares():
    # a component without identity() (FiveParameters) adds nothing and must not be asked for one
    plain = TestTimeSystem(make_tiny_pool(1), model=FiveParameters).method_identity()
    assert plain == {"component": f"{FiveParameters.__module__}.FiveParameters"}
    labelled = TestTimeSystem(make_tiny_pool(1), model=Labelled).method_identity()
    assert labelled == {"component": f"{__name__}.Labelled", "width": 2}
