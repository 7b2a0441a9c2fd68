"""TestTimeSystem (adamerge/systems/base.py): what the shared loop promises, pinned exactly.

Each input is one that tells the promised behaviour from a near miss: error messages matched whole
(``^…$``), more wrong keys than a message lists, a checkpoint without ``state_dict``, ``assign=True``
seen through tensor identity, one eval dataloader with Lightning's default index, imbalanced labels
(micro vs macro accuracy), a sanity check before the first validation, a one-process DDP run (gloo,
no subprocess) for ``sync_dist``, export dirs that would swallow the run's logs or checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import lightning as L
import pytest
import torch
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from safetensors import safe_open
from test_data_datamodule import TinySource
from test_systems_base import ScaledProbe
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adamerge.data.datamodule import TestTimeDataModule
from adamerge.files import read_manifest
from adamerge.systems.base import CheckpointMismatchError, TestTimeSystem, default_optimizer
from adamerge.systems.record import RunRecord
from adamerge.systems.runs import AtomicCheckpointIO, ConfigError, RunExistsError


class FiveParameters(nn.Module):
    """A component with five learnable vectors ``p0`` … ``p4`` holding 0 … 4 (never run forward here)."""

    def __init__(self, pool, tasks):
        super().__init__()
        for i in range(5):
            self.register_parameter(f"p{i}", nn.Parameter(torch.full((2,), float(i))))


def five_parameter_system() -> TestTimeSystem:
    """Learnable names ``model.p0`` … ``model.p4``: more than the three an error message lists."""
    return TestTimeSystem(make_tiny_pool(1), model=FiveParameters)


def one_task_data() -> TestTimeDataModule:
    """Data for ``make_tiny_pool(1)``: one task, 3 classes, 4 examples; one step per epoch."""
    return TestTimeDataModule(TinySource(n=4, classes=(3,)), batch_size=2, eval_batch_size=4, steps_per_epoch=1)


# ---- the default optimizer -------------------------------------------------------------------------
def test_the_default_optimizer_is_adam_with_the_documented_lr_and_betas():
    opt = default_optimizer([nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["lr"] == 1e-3 and tuple(opt.defaults["betas"]) == (0.9, 0.999)


def test_optimizer_errors_name_the_system():
    # the message starts with the system's class (not "None" or "NoneType"), and is matched whole
    with pytest.raises(ValueError, match=r"^TestTimeSystem has no learnable parameters$"):
        TestTimeSystem(make_tiny_pool(1)).configure_optimizers()  # no component: nothing learns
    zero_lr = ScaledProbe(make_tiny_pool(1), optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    with pytest.raises(ConfigError, match=r"^ScaledProbe: optimizer lr \(param group 0\) must be a positive finite "
                                          r"number at most 10, got 0\.0$"):
        zero_lr.configure_optimizers()


# ---- hooks -------------------------------------------------------------------------------------------
def test_a_system_without_component_or_task_logits_names_its_class():
    # the class name must be the system's own (not None's "NoneType"), and the message whole
    system = TestTimeSystem(make_tiny_pool(1))
    with pytest.raises(NotImplementedError, match=r"^TestTimeSystem must implement task_logits\(task, images\)$"):
        system.task_logits("task0", torch.zeros(1, 3, 16, 16))


def test_only_the_learnable_parameters_are_state():
    # the frozen heads are non-persistent buffers: the state is the five learnable vectors
    system = TestTimeSystem(make_tiny_pool(1), model=FiveParameters, optimizer=default_optimizer,
                            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    assert list(system.state_dict()) == [f"model.p{i}" for i in range(5)]


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="under mutmut, its trampolines hide __init__'s frame from Lightning's save_hyperparameters")
def test_only_plain_arguments_are_hyperparameters():
    # the pool, optimizer, component factory and schedule are objects, never hyper-parameters (loggers record them)
    system = TestTimeSystem(make_tiny_pool(1), model=FiveParameters, optimizer=default_optimizer,
                            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    assert dict(system.hparams) == {"tasks": None, "export_dir": None}


def test_a_pool_that_is_not_a_model_pool_is_refused_with_its_type():
    with pytest.raises(TypeError, match=r"^pool must be a ModelPool, got dict$"):
        TestTimeSystem({"task0": None})


def test_the_head_of_an_unknown_task_is_refused_by_name():
    # KeyError's text is the repr of its message (hence the outer double quotes)
    system = TestTimeSystem(make_tiny_pool(2), tasks=["task1"])
    with pytest.raises(KeyError, match=r"""^"task 'task0' is not one of this system's tasks \['task1'\]"$"""):
        system.head("task0")


# ---- load_state_dict --------------------------------------------------------------------------------
def test_strict_load_lists_at_most_three_missing_and_three_unexpected_names():
    # five learnable names missing and four unexpected ones: a fourth name in either list would show
    system = five_parameter_system()
    with pytest.raises(CheckpointMismatchError, match=(
        r"^checkpoint state does not match the learnable parameters: "
        r"missing \['model.p0', 'model.p1', 'model.p2'\], unexpected \[\]$"
    )):
        system.load_state_dict({})
    full = {f"model.p{i}": torch.zeros(2) for i in range(5)}
    extra = {f"x{i}": torch.zeros(2) for i in range(4)}
    with pytest.raises(CheckpointMismatchError, match=(
        r"^checkpoint state does not match the learnable parameters: "
        r"missing \[\], unexpected \['x0', 'x1', 'x2'\]$"
    )):
        system.load_state_dict({**full, **extra})
    system.load_state_dict({**full, **extra}, strict=False)  # not strict: extra names are ignored
    assert torch.equal(system.model.p4.detach(), torch.zeros(2))


def test_load_copies_into_the_parameters_by_default_and_assigns_only_when_asked():
    # assign=False keeps the module's Parameter objects (the optimizer's) and copies values in;
    # assign=True makes the parameters share the given tensors' storage
    system = five_parameter_system()
    before = system.model.p0
    given = {f"model.p{i}": torch.full((2,), 10.0 + i) for i in range(5)}
    system.load_state_dict(given)
    assert system.model.p0 is before and torch.equal(before.detach(), torch.full((2,), 10.0))
    assert system.model.p0.data_ptr() != given["model.p0"].data_ptr()
    system.load_state_dict(given, assign=True)
    assert system.model.p0 is not before
    assert system.model.p0.data_ptr() == given["model.p0"].data_ptr()
    assert isinstance(system.model.p0, nn.Parameter) and system.model.p0.requires_grad


# ---- export -----------------------------------------------------------------------------------------
def test_export_creates_missing_parent_folders_and_records_the_task_order(tmp_path):
    # two folder levels that do not exist yet, and tasks not in the pool's order: the metadata must
    # hold this system's order, as JSON under "tasks"
    system = TestTimeSystem(make_tiny_pool(2), tasks=["task1", "task0"], model=FiveParameters)
    out = tmp_path / "runs" / "first"
    system.export(out)
    assert sorted(p.name for p in out.iterdir()) == ["learned.safetensors"]  # no merged_state_dict: no model
    with safe_open(str(out / "learned.safetensors"), framework="pt") as f:
        assert f.metadata() == {"tasks": json.dumps(["task1", "task0"])}
        assert sorted(f.keys()) == [f"model.p{i}" for i in range(5)]
        assert torch.equal(f.get_tensor("model.p3"), torch.full((2,), 3.0))


# ---- set-up --------------------------------------------------------------------------------------
def test_setup_silences_exactly_lightnings_eval_mode_notice():
    # frozen encoders stay in eval mode: Lightning's PossibleUserWarning about it is silenced, but not
    # other PossibleUserWarnings, nor the same words sent as another category
    notice = "Found 2 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    with warnings.catch_warnings(record=True) as caught:  # restores the filters setup() adds
        warnings.simplefilter("always")
        ScaledProbe(make_tiny_pool(1)).setup("fit")
        warnings.warn(notice, PossibleUserWarning)
        warnings.warn(notice, UserWarning)
        warnings.warn("The 'train_dataloader' does not have many workers", PossibleUserWarning)
    assert [(w.category, str(w.message)[:9]) for w in caught] == [
        (UserWarning, "Found 2 m"), (PossibleUserWarning, "The 'trai"),
    ]


class PlainData(L.LightningDataModule):
    """A datamodule that is not adamerge's: no ``tasks`` (nothing to check); data of one task."""

    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader([{"task0": x} for x in self.images], batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, torch.tensor([0, 1, 2, 0])), batch_size=4)


class TaskData(PlainData):
    """Names its tasks but gives no ``num_classes``: the tasks are checked, the class counts are not."""

    tasks = ("task0",)


@pytest.mark.parametrize("data", [PlainData, TaskData])
def test_a_datamodule_without_tasks_or_class_counts_is_checked_only_for_what_it_gives(tmp_path, data):
    # nothing (else) to compare: the run trains, and evaluates its one loader as the system's first task
    system = ScaledProbe(make_tiny_pool(1))
    tr = trainer(tmp_path, max_steps=1, limit_train_batches=1)
    tr.fit(system, data())
    assert tr.global_step == 1 and set(system.last_metrics) == {"val/acc/task0", "val/acc/avg"}


class OwnCheckpointIO(TorchCheckpointIO):
    """A user's checkpoint IO (a subclass of Lightning's default)."""


def test_setup_makes_checkpoint_writes_atomic_but_keeps_a_users_checkpoint_io(tmp_path):
    # Lightning's default TorchCheckpointIO is replaced by adamerge's atomic one; any other is kept
    for plugins, expected in (([], AtomicCheckpointIO), ([OwnCheckpointIO()], OwnCheckpointIO)):
        system, tr = ScaledProbe(make_tiny_pool(1)), trainer(tmp_path, plugins=plugins)
        system.trainer = tr
        system.setup("fit")
        assert type(tr.strategy.checkpoint_io) is expected


def test_a_run_record_is_added_only_to_an_exporting_run_that_has_none(tmp_path):
    # metrics.json is written by a RunRecord: one per exporting run, none without an export_dir
    pool = make_tiny_pool(1)
    plain, exporting = ScaledProbe(pool), ScaledProbe(pool, export_dir=str(tmp_path / "out"))
    for system, callbacks, added in ((plain, [], 0), (exporting, [], 1), (exporting, [RunRecord()], 0)):
        system.trainer = trainer(tmp_path, callbacks=callbacks)
        assert [type(c) for c in system.configure_callbacks()] == [RunRecord] * added


# ---- fit start -----------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["log dir", "checkpoint dir 0"])
def test_an_export_dir_that_would_hold_the_runs_logs_or_checkpoints_is_refused_by_name(tmp_path, what):
    # the export replaces the whole folder at the end: logs or checkpoints written inside it would be lost
    out = tmp_path / "export"
    system = ScaledProbe(make_tiny_pool(1), export_dir=str(out))
    before = system.temperature.detach().clone()
    if what == "log dir":
        kwargs = {"logger": CSVLogger(str(out))}
    else:
        kwargs = {"enable_checkpointing": True, "callbacks": [ModelCheckpoint(dirpath=out / "ckpt")]}
    with pytest.raises(ValueError, match=rf"^export_dir {re.escape(str(out))} would contain the run's {what} "
                                         rf"{re.escape(str(out))}{re.escape(os.sep)}"):
        trainer(tmp_path, max_steps=1, **kwargs).fit(system, one_task_data())
    assert torch.equal(system.temperature.detach(), before)  # refused before the first step


def test_without_a_logger_the_root_dir_may_lie_inside_the_export_dir(tmp_path):
    # no logger and no checkpoints: nothing is written to default_root_dir (which Lightning reports as
    # trainer.log_dir even then), so a root dir inside export_dir is no reason to refuse the run
    out = tmp_path / "export"
    system = ScaledProbe(make_tiny_pool(1), export_dir=str(out))
    trainer(out / "root", max_steps=1).fit(system, one_task_data())
    assert {"learned.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}


def test_the_export_manifest_names_its_run_which_alone_or_overwrite_may_replace_it(tmp_path):
    # three runs into one export_dir: the same run id again is a resume (allowed), another run is
    # refused until it sets overwrite (the CLI's --overwrite)
    pool, out = make_tiny_pool(1), tmp_path / "export"
    first = ScaledProbe(pool, export_dir=str(out))
    trainer(tmp_path, max_steps=1).fit(first, one_task_data())
    manifest = read_manifest(out)
    assert {k: manifest[k] for k in ("run_id", "system", "method", "tasks", "step")} == {
        "run_id": first.run_id, "system": "ScaledProbe", "method": "ScaledProbe", "tasks": ["task0"], "step": 1,
    }
    resumed = ScaledProbe(pool, export_dir=str(out))
    resumed.run_id = first.run_id
    trainer(tmp_path, max_steps=1).fit(resumed, one_task_data())
    other = ScaledProbe(pool, export_dir=str(out))
    with pytest.raises(RunExistsError, match=rf"^export_dir {re.escape(str(out))} already holds run {first.run_id} "):
        trainer(tmp_path, max_steps=1).fit(other, one_task_data())
    other.overwrite = True
    trainer(tmp_path, max_steps=1).fit(other, one_task_data())
    assert read_manifest(out)["run_id"] == other.run_id


class DirlessCheckpoint(Checkpoint):
    """A checkpoint callback of the plain ``Checkpoint`` kind: it has no ``dirpath``."""


def test_a_checkpoint_callback_without_a_dirpath_is_allowed(tmp_path):
    system = ScaledProbe(make_tiny_pool(1))
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=True,
                 callbacks=[DirlessCheckpoint()])
    tr.fit(system, one_task_data())
    assert tr.global_step == 1


# ---- on_load_checkpoint -----------------------------------------------------------------------------
def test_a_checkpoint_without_adamerge_metadata_gets_exactly_the_documented_message():
    with pytest.raises(CheckpointMismatchError,
                       match=r"^not an adamerge checkpoint: it has no 'adamerge' metadata$"):
        ScaledProbe(make_tiny_pool(1)).on_load_checkpoint({"state_dict": {}})


def test_the_checkpoint_state_is_checked_and_a_missing_state_dict_is_allowed():
    pool = make_tiny_pool(1)
    system = ScaledProbe(pool)
    meta = {**system.checkpoint_metadata(), "run_id": "0123456789ab"}
    # the state under "state_dict" is read: a NaN there is refused before it is loaded
    with pytest.raises(CheckpointMismatchError,
                       match=r"^checkpoint state 'temperature' holds NaN or Inf: refusing to resume from it$"):
        system.on_load_checkpoint({"adamerge": meta, "state_dict": {"temperature": torch.tensor([float("nan")])}})
    # metadata but no "state_dict" key: nothing to check, the run id is still taken over
    system.on_load_checkpoint({"adamerge": meta})
    assert system.run_id == "0123456789ab"


def test_a_resumed_run_takes_the_checkpoints_run_id():
    pool = make_tiny_pool(1)
    first, second = ScaledProbe(pool), ScaledProbe(pool)
    assert first.run_id != second.run_id and re.fullmatch("[0-9a-f]{12}", first.run_id)  # 12 hex digits
    checkpoint = {}  # no "hyper_parameters" to drop: saving must not need one
    first.on_save_checkpoint(checkpoint)
    assert set(checkpoint) == {"state_dict", "adamerge"}
    second.on_load_checkpoint(checkpoint)
    assert second.run_id == first.run_id
    checkpoint = {"hyper_parameters": {"tasks": ["task0"]}}  # what Lightning writes: dropped
    first.on_save_checkpoint(checkpoint)
    assert set(checkpoint) == {"state_dict", "adamerge"}
