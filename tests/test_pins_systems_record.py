"""Pins for the run record (adamerge/systems/record.py): the seed it records, the ``metrics.json`` fields
that results tables read (method, benchmark, seed, split, accuracy, steps), and its two warnings, matched
whole and attributed to the code that called ``on_export``.

The data are chosen so that the near misses disagree: a given seed (11) and a different global seed in
``PL_GLOBAL_SEED`` (3), so dropping either source or reading another variable shows; a benchmark id other
than ``write_metrics``' default ``"mini"`` and an evaluated split other than its default ``"test"`` (so a
dropped argument shows); a datamodule with ``eval_split="val"``, one without the attribute and none at all
(each gives its own split); a logged metric that is not a per-task accuracy (kept in ``logged``, not in
``accuracy``). ``on_export`` is called straight from each test function, so ``stacklevel=2`` names this file,
while 1 names record.py and 3 pytest's own code.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from test_data_datamodule import TinySource

from adamerge.data.datamodule import TestTimeDataModule
from adamerge.systems.record import RunRecord

LOGGED = {"val/acc/task0": 0.5, "val/acc/task1": 0.75, "val/acc/avg": 0.625, "val/loss/task0": 1.5}


class ProbeSystem:
    """What ``on_export`` reads from a TestTimeSystem, and nothing else (no Trainer needed)."""

    def __init__(self, metrics=LOGGED, step=4, measured=4) -> None:
        self.tasks = ("task0", "task1")
        self.last_metrics = dict(metrics)
        self.progress_step, self.last_metrics_step = step, measured
        self.method_label = "probe-label"
        self.pool = SimpleNamespace(benchmark_id="tiny-bench")


@pytest.fixture
def global_seed(monkeypatch):
    """Lightning's global seed set to 3 (as ``seed_everything(3)`` does), under its exact name only."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    monkeypatch.delenv("pl_global_seed", raising=False)


def test_the_given_seed_wins_over_the_global_one(global_seed):
    assert RunRecord(seed=11).record_seed() == 11
    seed = RunRecord(seed=np.int64(12)).record_seed()  # a numpy seed is recorded as a plain int
    assert seed == 12 and type(seed) is int


def test_without_a_given_seed_the_global_seed_is_recorded(global_seed, monkeypatch):
    seed = RunRecord().record_seed()
    assert seed == 3 and type(seed) is int
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert RunRecord().record_seed() is None


def test_the_record_holds_seed_benchmark_split_accuracy_and_steps(tmp_path, global_seed):
    datamodule = TestTimeDataModule(TinySource(n=4), tasks=["task0", "task1"], eval_split="val")
    path = RunRecord(seed=11).on_export(SimpleNamespace(datamodule=datamodule), ProbeSystem(), tmp_path)
    assert path == tmp_path / "metrics.json"
    assert json.loads(path.read_text()) == {
        "method": "probe-label", "benchmark": "tiny-bench", "seed": 11, "split": "val",
        "accuracy": {"task0": 0.5, "task1": 0.75}, "avg": 0.625,
        "steps": 4, "evaluated_at_step": 4, "logged": LOGGED,
    }


@pytest.mark.parametrize("datamodule", [None, L.LightningDataModule()], ids=["no datamodule", "no eval_split"])
def test_the_split_is_test_unless_the_datamodule_names_another(tmp_path, global_seed, datamodule):
    path = RunRecord().on_export(SimpleNamespace(datamodule=datamodule), ProbeSystem(), tmp_path)
    record = json.loads(path.read_text())
    assert record["split"] == "test" and record["seed"] == 3


def test_no_validation_warns_naming_the_system_and_writes_nothing(tmp_path):
    trainer = SimpleNamespace(datamodule=None)
    metrics = {"val/acc/other": 0.5, "train/loss": 1.0}  # nothing for the system's own tasks
    with pytest.warns(UserWarning) as caught:
        assert RunRecord(seed=1).on_export(trainer, ProbeSystem(metrics), tmp_path) is None
    assert [str(w.message) for w in caught] == [f"ProbeSystem: no validation ran, so no metrics.json in {tmp_path}"]
    # the caller of on_export, not record.py's warn line (stacklevel=2; mutmut's trampoline adds a frame, so the
    # test says "not record.py" rather than naming this file)
    assert Path(caught[0].filename).name != "record.py"
    assert list(tmp_path.iterdir()) == []


def test_a_validation_older_than_the_export_warns_and_records_both_steps(tmp_path):
    trainer = SimpleNamespace(datamodule=None)
    with pytest.warns(UserWarning) as caught:
        path = RunRecord(seed=1).on_export(trainer, ProbeSystem(step=3, measured=2), tmp_path)
    message = ("ProbeSystem: the last validation ran at step 2, the exported model is from step 3; metrics.json "
               "records the former (make max_steps a multiple of the validation interval)")
    assert [str(w.message) for w in caught] == [message]
    # the caller of on_export, not record.py's warn line (stacklevel=2; mutmut's trampoline adds a frame, so the
    # test says "not record.py" rather than naming this file)
    assert Path(caught[0].filename).name != "record.py"
    record = json.loads(path.read_text())
    assert record["steps"] == 3 and record["evaluated_at_step"] == 2
