"""Pins for task-conditioned merges (adamerge/merging/conditioned.py). Registration at import time happens
before any test, so only a conditioned merge registered by the test itself exercises
``register_conditioned``; its toy merge's shared vector is Σ_k 10^k τ_k and its scales grow with k, so a
wrapper that drops, reorders or re-reads the task vectors, or loses the task names, gives other values.
Also the file format's version check, a merge without task names on disk, and the storage of an empty θ_0."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_pins_registry import Pool  # θ_0 and three experts, reads recorded

from adamerge.merging import MergeError, conditioned
from adamerge.merging.conditioned import TaskConditionedMerge, merge_pool_conditioned, register_conditioned

TABLES = ("CONDITIONED", "CONDITIONED_LABELS", "CONDITIONED_PRESETS", "_ORIGINS")


@pytest.fixture
def clean(monkeypatch):
    """The conditioned registry's tables restored after the test."""
    for name in TABLES:
        monkeypatch.setattr(conditioned, name, dict(getattr(conditioned, name)))
    return conditioned


def scaled(pretrained, taus, scale=1.0):
    """Toy conditioned merge: τ_uni = Σ_k 10^k τ_k, every mask all True, λ_k = scale · (k + 1)."""
    vector = {"w": sum(10.0 ** k * t["w"] for k, t in enumerate(taus))}
    masks = [{"w": torch.ones(2, dtype=torch.bool)} for _ in taus]
    return TaskConditionedMerge(pretrained, vector, masks, [scale * (k + 1) for k in range(len(taus))],
                                method="pin")


def test_a_registered_merge_runs_on_the_pool_in_order_with_its_task_names(clean):
    assert register_conditioned("pin_scaled", label="PIN", presets={"paper": {"scale": 3.0}})(scaled) is scaled
    run = clean.CONDITIONED["pin_scaled"]
    assert run is not scaled and run.__wrapped__ is scaled and run.__doc__ == scaled.__doc__
    pool = Pool()
    got = merge_pool_conditioned(pool, "pin_scaled", tasks=["c", "a"], scale=2.0)
    assert pool.reads == ["c", "a"] and got.tasks == ("c", "a") and got.method == "pin"
    assert torch.equal(got.vector["w"], torch.tensor([12.0, 2.0]))  # τ_c + 10 τ_a
    assert got.scales == (2.0, 4.0)
    assert torch.equal(got.state_for("a")["w"], torch.tensor([1 + 48.0, 2 + 8.0]))  # θ_0 + 4 τ_uni
    assert torch.equal(got.state_for("a")["ids"], torch.tensor([0, 1]))
    every = merge_pool_conditioned(Pool(), "pin_scaled", preset="paper")  # tasks=None: all, pool order
    assert every.tasks == ("a", "b", "c") and every.scales == (3.0, 6.0, 9.0)
    assert torch.equal(every.vector["w"], torch.tensor([1 + 200.0, 10 + 200.0]))
    assert merge_pool_conditioned(Pool(), "pin_scaled", preset="paper", scale=1.0).scales == (1.0, 2.0, 3.0)
    assert clean.CONDITIONED_LABELS["pin_scaled"] == "PIN"
    assert clean._ORIGINS["pin_scaled"] == f"{__name__}.scaled"


def test_label_and_presets_default_and_are_copied(clean):
    presets = {"paper": {"scale": 3.0}}
    register_conditioned("pin_plain")(scaled)
    register_conditioned("pin_preset", presets=presets)(scaled)
    assert clean.CONDITIONED_LABELS["pin_plain"] == "pin_plain" and clean.CONDITIONED_PRESETS["pin_plain"] == {}
    presets["paper"]["scale"] = 9.0  # the registry keeps its own copy of each preset
    presets["other"] = {}
    assert clean.CONDITIONED_PRESETS["pin_preset"] == {"paper": {"scale": 3.0}}


def test_registering_twice(clean):
    register_conditioned("pin_twice")(scaled)
    register_conditioned("pin_twice")(scaled)  # the same function again (a module reloaded): accepted

    def other(pretrained, taus):
        return scaled(pretrained, taus)

    with pytest.raises(ValueError) as err:
        register_conditioned("pin_twice")(other)
    assert str(err.value) == (f"conditioned merge 'pin_twice' is registered twice: by {__name__}.scaled and "
                              f"{__name__}.test_registering_twice.<locals>.other")
    assert clean.CONDITIONED["pin_twice"].__wrapped__ is scaled


# ---- the file ---------------------------------------------------------------------------------------------
PRE = {"w": torch.tensor([1.0, 2.0, 3.0]), "ids": torch.tensor([7])}


def _merge(tasks=None):
    masks = [{"w": torch.tensor([True, False, True])}, {"w": torch.tensor([False, True, True])}]
    return TaskConditionedMerge(PRE, {"w": torch.tensor([0.5, -1.0, 2.0])}, masks, [1.0, 3.0], tasks=tasks,
                                method="by hand")


def test_a_merge_without_task_names_round_trips(tmp_path):
    _merge().save(tmp_path / "m.safetensors")
    back = TaskConditionedMerge.load(tmp_path / "m.safetensors", PRE)
    assert back.tasks is None and back.scales == (1.0, 3.0) and back.method == "by hand"
    assert torch.equal(back.state_for(1)["w"], torch.tensor([1.0, 2 - 3.0, 3 + 6.0]))


def test_another_format_version_is_refused_by_name(tmp_path):
    path = tmp_path / "m.safetensors"
    _merge(tasks=["x", "y"]).save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a handle is not iterable)
        meta = json.loads(f.metadata()["adamerge"])
    save_file(tensors, str(path), metadata={"adamerge": json.dumps(dict(meta, version=2))})
    with pytest.raises(MergeError) as err:
        TaskConditionedMerge.load(path, PRE)
    assert str(err.value) == f"{path}: unsupported format version 2"
    save_file(tensors, str(path), metadata={"adamerge": json.dumps(dict(meta, format="other"))})
    with pytest.raises(MergeError) as err:
        TaskConditionedMerge.load(path, PRE)
    assert str(err.value) == (f"{path} is not a task-conditioned merge file "
                              "(no 'adamerge.task_conditioned_merge' metadata)")


def test_storage_of_an_empty_theta0():
    """No θ_0 bytes: the ratio to the experts is infinite, not a division by zero."""
    got = TaskConditionedMerge({}, {}, [{}], [1.0]).storage_bytes()
    assert got == {"tasks": 1, "entries": 0, "pretrained": 0, "vector": 0, "masks": 0, "scales": 4, "total": 4,
                   "experts": 0, "ratio": math.inf}


def test_the_merge_holds_its_own_frozen_copies():
    """Changing the dicts and the list passed in changes nothing in the merge: every field is copied once,
    masks and scales into tuples."""
    pre, vector = dict(PRE), {"w": torch.tensor([0.5, -1.0, 2.0])}
    masks = [{"w": torch.tensor([True, False, True])}]
    merge = TaskConditionedMerge(pre, vector, masks, [2.0], tasks=["x"])
    pre["w"], vector["w"] = torch.zeros(3), torch.zeros(3)
    masks[0]["w"] = torch.zeros(3, dtype=torch.bool)
    masks.append({"w": torch.ones(3, dtype=torch.bool)})
    assert isinstance(merge.masks, tuple) and isinstance(merge.scales, tuple) and merge.tasks == ("x",)
    assert len(merge) == 1 and torch.equal(merge.masks[0]["w"], torch.tensor([True, False, True]))
    assert torch.equal(merge.state_for("x")["w"], torch.tensor([1 + 1.0, 2.0, 3 + 4.0]))
    with pytest.raises(MergeError) as err:
        TaskConditionedMerge(PRE, {"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.bool)}, [1.0])
    assert str(err.value) == "masks must be a list with one mask dict per task, got a single dict"


@pytest.mark.parametrize("method,named", [("", "merge"), ("EMR-Merging", "EMR-Merging")])
def test_a_name_without_task_names_names_the_method(method, named):
    merge = TaskConditionedMerge(PRE, {"w": torch.zeros(3)}, [{"w": torch.zeros(3, dtype=torch.bool)}], [1.0],
                                 method=method)
    with pytest.raises(MergeError) as err:
        merge.state_for("a")
    assert str(err.value) == f"this {named} has no task names: pass task 'a' by index"


def test_container_errors_in_full():
    """The whole message, where the shared tests match only its end."""
    with pytest.raises(MergeError) as err:
        TaskConditionedMerge(PRE, {"w": torch.tensor([0.0, float("inf"), 0.0])}, [{"w": torch.ones(3) > 0}], [1.0])
    assert str(err.value) == "shared task vector: key 'w' contains Inf values"
    with pytest.raises(MergeError) as err:
        TaskConditionedMerge(PRE, {"w": torch.zeros(3)}, [], [])
    assert str(err.value) == "no task masks: need at least one task"
