"""Checks that could be deleted without any other test failing: each input here is one the check exists for.

Each test names the wrong behaviour it rules out: a silent broadcast or truncation, a duplicated task
trained twice, a resume from a foreign checkpoint, a corrupt file blamed on pickling, a tied weight
that safetensors refuses.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from safetensors.torch import load_file
from test_data_datamodule import TinySource
from test_systems_base import ScaledProbe, fit_with_checkpoint

from adamerge.components.adamerging import AdaMergingModel
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.merging.task_vectors import MergeError, unflatten
from adamerge.models.checkpoints import (
    CheckpointError,
    PickledCheckpointError,
    load_visual_state,
    save_state_dict,
)
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.base import CheckpointMismatchError
from adamerge.systems.runs import check_learnable_state


# ---- task counts ---------------------------------------------------------------------------------
def test_task_names_must_match_the_task_vectors_one_to_one():
    pool = make_tiny_pool(3)
    taus = [pool.task_vector(t) for t in pool.tasks]
    with pytest.raises(ValueError, match="2 task names for 3 task vectors"):  # zip would drop task 2
        AdaMergingModel.from_task_vectors(pool.encoder, pool.pretrained_state(), taus, ["a", "b"])
    with pytest.raises(ValueError, match="4 task names for 3 task vectors"):
        AdaMergingModel.from_task_vectors(pool.encoder, pool.pretrained_state(), taus, ["a", "b", "c", "d"])


def test_coefficients_for_another_task_count_are_refused_on_resume():
    # λ of a 2-task run loaded into a 3-task model: the error names the key and both shapes
    expected = {"model.lambdas": torch.zeros(3, 1)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"'model.lambdas' is torch.float32 \(2, 1\), this run learns torch.float32 \(3, 1\)"):
        check_learnable_state({"model.lambdas": torch.zeros(2, 1)}, expected)
    with pytest.raises(CheckpointMismatchError, match=r"\(3, 8\), this run learns torch.float32 \(3, 1\)"):
        check_learnable_state({"model.lambdas": torch.zeros(3, 8)}, expected)  # layer-wise into task-wise
    check_learnable_state({"model.lambdas": torch.ones(3, 1)}, expected)  # the right shape passes


# ---- duplicate tasks -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["pool.task_vectors", "datamodule", "system", "adamerging"])
def test_a_task_listed_twice_is_refused_everywhere(where):
    pool, dup = make_tiny_pool(3), ["task1", "task0", "task1"]
    with pytest.raises(ValueError, match=r"task 'task1' is listed twice"):
        if where == "pool.task_vectors":
            list(pool.task_vectors(dup))  # would stream (and merge) task1 twice
        elif where == "datamodule":
            TestTimeDataModule(TinySource(n=8), tasks=dup)
        elif where == "system":
            ScaledProbe(pool, tasks=dup)
        else:
            AdaMerging(pool, tasks=dup)


# ---- resume ----------------------------------------------------------------------------------------
def test_a_resume_checkpoint_without_adamerge_metadata_is_refused(tmp_path):
    pool = make_tiny_pool()
    path = fit_with_checkpoint(tmp_path / "first", ScaledProbe(pool))
    ckpt = torch.load(path, weights_only=False)
    del ckpt["adamerge"]  # what a plain Lightning checkpoint of the same parameters looks like
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    system = ScaledProbe(pool)
    before = system.temperature.detach().clone()
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4)
    with pytest.raises(CheckpointMismatchError, match="not an adamerge checkpoint: it has no 'adamerge' metadata"):
        trainer(tmp_path / "second", max_steps=5).fit(system, dm, ckpt_path=foreign)
    assert torch.equal(system.temperature.detach(), before)  # nothing was loaded or trained
    with pytest.raises(CheckpointMismatchError, match="not an adamerge checkpoint"):
        ScaledProbe(pool).on_load_checkpoint({"state_dict": ckpt["state_dict"], "adamerge": "v1"})


# ---- checkpoint files ------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\x00not a checkpoint" * 20, b"\x80\x02garbage after a pickle header" * 8])
def test_a_corrupt_non_zip_file_is_called_corrupt_not_a_pickle(tmp_path, content):
    path = tmp_path / "expert.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"expert\.pt: not a readable torch checkpoint \(corrupt") as err:
        load_visual_state(path)
    assert not isinstance(err.value, PickledCheckpointError)  # allow_pickle would not help: no such advice


def test_tied_weights_sharing_one_storage_are_saved_as_safetensors(tmp_path):
    # the same tensor under two keys (tied embeddings): safetensors refuses shared storage unless the
    # saver makes one of them its own copy
    w = torch.arange(12.0).view(3, 4)
    state = {"embed.weight": w, "head.weight": w, "other": torch.ones(2)}
    path = save_state_dict(state, tmp_path / "tied.safetensors")
    back = load_file(str(path))
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    assert torch.equal(w, torch.arange(12.0).view(3, 4))  # the caller's tensor untouched


# ---- flat vectors ---------------------------------------------------------------------------------
def test_unflatten_refuses_a_vector_of_the_right_size_but_not_one_dimensional():
    like = {"w": torch.zeros(2), "v": torch.zeros(1, 1)}
    with pytest.raises(MergeError, match="vector has 3 entries, state dict needs 3"):
        unflatten(torch.arange(3.0).view(1, 3), like)  # slicing a [1, 3] would cut rows, not entries
    with pytest.raises(MergeError, match="vector has 5 entries, state dict needs 3"):
        unflatten(torch.arange(5.0), like)  # too long: the last two entries would be dropped silently
    out = unflatten(torch.arange(3.0), like)
    assert torch.equal(out["w"], torch.tensor([0.0, 1.0])) and torch.equal(out["v"], torch.tensor([[2.0]]))
