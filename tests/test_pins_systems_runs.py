"""Pins for :mod:`adamerge.systems.runs`: the checks that make a run safe to resume, kill or repeat.

Each function is called directly, with data chosen so that a plausible wrong version disagrees:

* ``AtomicCheckpointIO`` — a local path goes through ``atomic_path`` and never through Lightning's own
  writer (spied on), the file loads back equal and no temporary is left; a remote (``memory://``) path
  goes through Lightning's writer and loads back equal; ``storage_options`` is refused by exact message.
* ``compare_identity`` — top-level names carry no prefix, nested names are dotted (``experts.task2``), a
  mapping recorded as a scalar is a mismatch (not a crash), keys only the checkpoint has are ignored, a key
  it lacks is named, and equal identities pass.
* ``check_learnable_state`` — a dtype-only and a shape-only mismatch are each refused (an ``and`` instead of
  ``or`` would pass them), extra keys and integer tensors pass, NaN/Inf are refused, exact messages.
* ``check_data`` — the *first* extra / missing task is named (two candidates, so ``[1]`` differs), class
  counts of ``None`` and of tasks without a head are skipped, a wrong count names both numbers.
* ``check_learning_rates`` — both ends of (0, MAX_LR]: 0 refused, 10 accepted, 10.5 refused; ``True``,
  a string, ``None``, NaN, Inf refused; a 0-d tensor accepted; the failing group's index is named.
* ``check_export_dir`` — a log folder inside (or equal to) ``export_dir`` is refused by name, a sibling
  with a common prefix (``export2``) is not; a dead run's temporary in the parent is swept; a missing or
  empty folder passes, a file is refused, another run's or a foreign folder is refused with its exact
  message unless ``overwrite``; the same run (whose manifest lists a file that no longer matches its hash,
  so only an unverified read accepts it) is allowed to resume.
"""

from __future__ import annotations

import json
import math
import re

import fsspec
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from adamerge.systems.runs import (
    MAX_LR,
    AtomicCheckpointIO,
    CheckpointMismatchError,
    ConfigError,
    RunExistsError,
    check_data,
    check_export_dir,
    check_learnable_state,
    check_learning_rates,
    compare_identity,
)

DEAD_PID = 2**30  # above any pid_max: os.kill reports no such process


# ---- AtomicCheckpointIO ------------------------------------------------------------------------------
def test_storage_options_are_refused_by_exact_message(tmp_path):
    with pytest.raises(TypeError, match=r"^AtomicCheckpointIO does not take storage_options, got \{'a': 1\}$"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "c.ckpt", storage_options={"a": 1})
    assert not (tmp_path / "c.ckpt").exists()


def test_a_local_checkpoint_is_written_atomically_not_by_lightnings_writer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", lambda *a, **k: calls.append(a))
    path = tmp_path / "sub" / "last.ckpt"  # the folder does not exist yet: atomic_path makes it
    ckpt = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 7}
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    assert calls == []
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_a_remote_checkpoint_goes_through_lightnings_writer():
    path = "memory://hruns-pins/remote/last.ckpt"
    ckpt = {"state_dict": {"w": torch.tensor([1.5, -2.0])}, "epoch": 3}
    try:
        assert AtomicCheckpointIO().save_checkpoint(ckpt, path) is None
        with fsspec.open(path, "rb") as f:
            loaded = torch.load(f, weights_only=True)
        assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.tensor([1.5, -2.0]))
    finally:
        fsspec.filesystem("memory").rm("/hruns-pins", recursive=True)


# ---- compare_identity --------------------------------------------------------------------------------
def test_equal_identities_pass_and_keys_only_the_checkpoint_has_are_ignored():
    mine = {"system": "AdaMerging", "experts": {"task0": "aa", "task1": "bb"}, "num_classes": 4}
    theirs = {**mine, "experts": {"task0": "aa", "task1": "bb", "old": "cc"}, "extra": 1}
    assert compare_identity(theirs, mine) is None


def test_a_top_level_mismatch_is_named_without_a_prefix():
    with pytest.raises(CheckpointMismatchError,
                       match=r"^cannot resume: the checkpoint was made with tasks = \['a'\], this run has \['b'\]$"):
        compare_identity({"tasks": ["a"], "system": "S"}, {"system": "S", "tasks": ["b"]})


def test_a_nested_mismatch_is_named_by_its_dotted_path():
    theirs = {"experts": {"task1": "aa", "task2": "bb"}}
    mine = {"experts": {"task1": "aa", "task2": "cc"}}
    with pytest.raises(CheckpointMismatchError,
                       match=r"^cannot resume: the checkpoint was made with experts\.task2 = 'bb', this run has 'cc'$"):
        compare_identity(theirs, mine)
    with pytest.raises(CheckpointMismatchError, match=r"^cannot resume: .* with m\.experts\.task2 = 'bb'"):
        compare_identity({"m": theirs}, {"m": mine})
    with pytest.raises(CheckpointMismatchError, match=r"^cannot resume: .* with run\.experts\.task2 = 'bb'"):
        compare_identity(theirs, mine, "run")


def test_a_mapping_recorded_as_a_scalar_is_a_mismatch_not_a_crash():
    with pytest.raises(CheckpointMismatchError,
                       match=r"^cannot resume: the checkpoint was made with method = 5, this run has \{'x': 1\}$"):
        compare_identity({"method": 5}, {"method": {"x": 1}})


def test_a_field_the_checkpoint_lacks_is_named():
    with pytest.raises(CheckpointMismatchError,
                       match=r"^cannot resume: the checkpoint does not record method\.lr \(this run: 0\.5\)$"):
        compare_identity({"method": {"name": "x"}}, {"method": {"name": "x", "lr": 0.5}})
    with pytest.raises(CheckpointMismatchError, match=r"^cannot resume: the checkpoint does not record 3 \(this run: 'v'\)$"):
        compare_identity({}, {3: "v"})


# ---- check_learnable_state ---------------------------------------------------------------------------
def test_a_matching_finite_state_passes_and_keys_it_does_not_learn_are_not_compared():
    expected = {"lambdas": torch.zeros(2, 3)}
    state = {"lambdas": torch.ones(2, 3), "other": torch.ones(5, dtype=torch.float64), "n": torch.tensor([1, 2])}
    assert check_learnable_state(state, expected) is None
    assert check_learnable_state({"n": torch.tensor([7])}, {"n": torch.tensor([0])}) is None  # integer: no NaN test


def test_a_dtype_only_or_shape_only_difference_is_refused_by_exact_message():
    expected = {"lambdas": torch.zeros(2, 3)}
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint state 'lambdas' is torch\.float64 \(2, 3\), "
                                                      r"this run learns torch\.float32 \(2, 3\)$"):
        check_learnable_state({"lambdas": torch.zeros(2, 3, dtype=torch.float64)}, expected)
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint state 'lambdas' is torch\.float32 \(3, 2\), "
                                                      r"this run learns torch\.float32 \(2, 3\)$"):
        check_learnable_state({"lambdas": torch.zeros(3, 2)}, expected)


def test_a_non_tensor_is_refused_naming_its_type():
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint state 'lambdas' is not a tensor \(list\)$"):
        check_learnable_state({"ok": torch.zeros(1), "lambdas": [0.5]}, {})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_state_is_refused(bad):
    with pytest.raises(CheckpointMismatchError,
                       match=r"^checkpoint state 'w' holds NaN or Inf: refusing to resume from it$"):
        check_learnable_state({"w": torch.tensor([0.0, bad])}, {"w": torch.zeros(2)})


# ---- check_data ----------------------------------------------------------------------------------------
def test_matching_data_passes_skipping_unknown_counts_and_tasks_without_a_head():
    nc = {"a": 3, "b": 4}
    assert check_data(["a", "b"], nc, ["b", "a"], {"a": 3, "b": None, "z": 9}) is None
    assert check_data(["a", "b"], nc, ["a", "b"], None) is None


def test_the_first_extra_data_task_is_named():
    with pytest.raises(ValueError, match=r"^the data has task 'c' that the model does not \(model tasks: \['a', 'b'\]\)$"):
        check_data(["a", "b"], {}, ["a", "c", "b", "d"], None)


def test_the_first_missing_data_task_is_named():
    with pytest.raises(ValueError, match=r"^the model has task 'b' that the data does not \(data tasks: \['a'\]\)$"):
        check_data(["a", "b", "c"], {}, ["a"], None)


def test_a_wrong_class_count_names_the_task_and_both_counts():
    with pytest.raises(ValueError, match=r"^task 'b': the zero-shot head has 4 classes but the data has 5$"):
        check_data(["a", "b"], {"a": 3, "b": 4}, ["a", "b"], {"a": 3, "b": 5})


# ---- check_learning_rates --------------------------------------------------------------------------------
def _opt(*lrs):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def test_learning_rates_in_the_half_open_range_pass():
    opt = _opt(1e-6, 0.5, MAX_LR)
    opt.param_groups[1]["lr"] = torch.tensor(0.5)
    assert check_learning_rates(opt, "S") is None


@pytest.mark.parametrize("bad", [0.0, -0.5, 10.5, 20, math.nan, math.inf, True, "0.1", None])
def test_a_bad_learning_rate_is_refused_naming_owner_and_group(bad):
    opt = _opt(0.1, 0.2)
    opt.param_groups[1]["lr"] = bad
    msg = f"S: optimizer lr (param group 1) must be a positive finite number at most 10, got {bad!r}"
    with pytest.raises(ConfigError, match="^" + re.escape(msg) + "$"):
        check_learning_rates(opt, "S")


# ---- check_export_dir ------------------------------------------------------------------------------------
def _manifest(folder, run_id, files=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"files": files or {}, "run_id": run_id}))


def test_run_paths_inside_or_equal_to_the_export_dir_are_refused_by_name(tmp_path):
    out = tmp_path / "export"
    for what, path in (("log dir", out / "logs" / "v0"), ("checkpoint dir", out)):
        msg = (f"export_dir {out} would contain the run's {what} {path}: the export replaces the whole folder at "
               "the end of fit; point the logger / checkpoints elsewhere (e.g. its parent)")
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            check_export_dir(out, "r1", False, {"log dir": None, what: str(path)})


def test_run_paths_outside_the_export_dir_pass(tmp_path):
    out = tmp_path / "export"
    paths = {"log dir": str(tmp_path / "export2" / "logs"), "checkpoint dir": str(tmp_path), "other": None}
    assert check_export_dir(out, "r1", False, paths) is None
    assert check_export_dir(str(out), "r1", False, {}) is None  # a str export_dir, missing folder


def test_a_dead_runs_temporaries_next_to_the_export_dir_are_swept(tmp_path):
    dead = tmp_path / f".export.tmp-{DEAD_PID}-0123abcd"
    dead.mkdir()
    (dead / "x.bin").write_bytes(b"x")
    keep = tmp_path / "unrelated.txt"
    keep.write_text("k")
    check_export_dir(tmp_path / "export", "r1", False, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]


def test_an_empty_folder_passes_and_a_file_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    assert check_export_dir(out, "r1", False, {}) is None
    (tmp_path / "f").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(RunExistsError, match=rf"^export_dir {re.escape(str(tmp_path / 'f'))} is a file$"):
            check_export_dir(tmp_path / "f", "r1", overwrite, {})


def test_another_runs_export_is_refused_by_exact_message_unless_overwrite(tmp_path):
    out = tmp_path / "export"
    _manifest(out, "other-run")
    msg = (f"export_dir {out} already holds run other-run (manifest.json); "
           "choose another export_dir or pass --overwrite=true to replace it")
    with pytest.raises(RunExistsError, match="^" + re.escape(msg) + "$"):
        check_export_dir(out, "r1", False, {})
    assert check_export_dir(out, "r1", True, {}) is None


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"run_id": "r1"})])
def test_a_folder_without_a_valid_manifest_is_refused_as_foreign(tmp_path, content):
    out = tmp_path / "export"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w")
    if content is not None:
        (out / "manifest.json").write_text(content)  # unreadable, or without a 'files' table
    msg = (f"export_dir {out} already holds files not written by an adamerge export (no manifest); "
           "choose another export_dir or pass --overwrite=true to replace it")
    with pytest.raises(RunExistsError, match="^" + re.escape(msg) + "$"):
        check_export_dir(out, "r1", False, {})
    assert check_export_dir(out, "r1", True, {}) is None


def test_the_same_run_may_resume_into_its_export_without_verifying_its_files(tmp_path):
    out = tmp_path / "export"
    _manifest(out, "r1", files={"learned.safetensors": {"sha256": "0" * 64}})  # missing, hash would fail
    assert check_export_dir(out, "r1", False, {}) is None
    with pytest.raises(RunExistsError, match=r"already holds run r1 \(manifest\.json\)"):
        check_export_dir(out, "r2", False, {})

