"""Pins for DARE (adamerge/merging/dare.py): the error messages, the keep rule at the boundary, the device of
the mask, and DaredStream (the out-of-core DARE) against dare_each, drawn independently in memory."""

import importlib

import pytest
import torch
from conftest import ListPool

from adamerge.merging import MergeError, dare
from adamerge.merging.dare import DaredStream, dare_each


class _Stream:
    """θ_0 and task vectors as in-memory dicts behind the TensorStream protocol; records the keys read."""

    def __init__(self, base, taus):
        self.base, self.taus, self.read = base, taus, []

    def check_tasks(self, tasks):
        return list(self.taus) if tasks is None else list(tasks)

    def merge_keys(self):
        return list(self.base)

    def pretrained_tensor(self, key):
        self.read.append(key)
        return self.base[key]

    def task_vector_tensor(self, task, key):
        self.read.append((task, key))
        return self.taus[task][key]


def _pool():
    # Keys of different shapes and tasks in non-alphabetical order: a mask drawn for the wrong (task, key),
    # with the wrong shape or from the wrong generator state differs in most entries.
    g = torch.Generator().manual_seed(3)
    shapes = {"w": (6, 5), "b": (7,), "v": (3, 4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = {t: {k: torch.randn(s, generator=g) for k, s in shapes.items()} for t in ("z", "a", "m")}
    return base, taus


def test_seed_and_generator_together_is_refused_by_name():
    with pytest.raises(MergeError, match="^pass either seed or generator to dare, not both$"):
        dare({"w": torch.ones(3)}, seed=1, generator=torch.Generator())


def test_a_non_finite_task_vector_is_named_as_one():
    with pytest.raises(MergeError, match=r"^task vector: key 'w' contains NaN values$"):
        dare({"w": torch.tensor([1.0, float("nan")])})


def test_an_entry_drawn_exactly_at_the_drop_rate_is_kept():
    # The contract keeps an entry when rand >= p. Taking p equal to the first number the generator draws
    # (a float32 k/2^24, exact as a Python float) makes `>=` and `>` disagree on entry 0.
    p = float(torch.rand(1, generator=torch.Generator().manual_seed(7))[0])
    out = dare({"w": torch.ones(4)}, drop=p, seed=7)["w"]
    assert out[0] == pytest.approx(1.0 / (1.0 - p))


def test_the_mask_is_moved_to_the_task_vectors_device(monkeypatch):
    # The mask is drawn on the CPU and used where τ is; the meta device stands in for a GPU (a CPU mask
    # times a meta tensor is refused). Meta tensors have no values, so the finiteness check is skipped.
    dare_module = importlib.import_module("adamerge.merging.dare")  # the package's `dare` is the function
    monkeypatch.setattr(dare_module, "check_finite", lambda *args, **kwargs: None)
    out = dare({"w": torch.ones(3, 2, device="meta")}, drop=0.5)["w"]
    assert out.device.type == "meta" and out.shape == (3, 2)


@pytest.mark.parametrize("kwargs", [{}, {"drop": 0.6, "seed": 4}, {"drop": 0.0, "seed": 1}])
def test_dared_stream_equals_dare_each_in_any_reading_order(kwargs):
    base, taus = _pool()
    tasks = list(taus)
    want = dict(zip(tasks, dare_each(iter(taus.values()), **kwargs)))
    stream = DaredStream(_Stream(base, taus), tasks, **kwargs)
    # read out of core: key after key, tasks reversed (not the order the masks were drawn in), twice
    for _ in range(2):
        for key in reversed(stream.merge_keys()):
            for task in reversed(tasks):
                assert torch.equal(stream.task_vector_tensor(task, key), want[task][key]), (task, key)
    assert stream.merge_keys() == ["w", "b", "v"]
    assert torch.equal(stream.pretrained_tensor("b"), base["b"])
    if kwargs.get("drop") == 0.0:
        assert all(torch.equal(want[t][k], taus[t][k]) for t in tasks for k in base)


def test_dared_stream_reads_only_the_asked_key():
    base, taus = _pool()
    inner = _Stream(base, taus)
    stream = DaredStream(inner, list(taus), drop=0.5)
    inner.read.clear()
    stream.task_vector_tensor("m", "v")
    stream.pretrained_tensor("w")
    assert inner.read == [("m", "v"), "w"]


def test_dared_stream_checks_its_tasks_and_drop_rate():
    base, taus = _pool()
    stream = DaredStream(_Stream(base, taus), ["z", "a", "m"])
    assert stream.check_tasks(None) == ["z", "a", "m"]  # the inner stream's answer for "all tasks"
    assert stream.check_tasks(["z", "a", "m"]) == ["z", "a", "m"]
    with pytest.raises(MergeError, match=r"^the DARE masks were drawn for tasks \['z', 'a', 'm'\], not \['a', 'z', 'm'\]$"):
        stream.check_tasks(["a", "z", "m"])
    with pytest.raises(MergeError, match=r"^dare drop rate must lie in \[0, 1\), got 1\.0$"):
        DaredStream(_Stream(base, taus), ["z"], drop=1.0)
    with pytest.raises(MergeError, match=r"^dare drop rate must lie in \[0, 1\), got -0\.1$"):
        DaredStream(_Stream(base, taus), ["z"], drop=-0.1)


# ---- DARE-TA / DARE-TIES (adamerge/merging/dare_merges.py) ----------------------------------------------
@pytest.mark.parametrize("name", ["dare_task_arithmetic", "dare_ties_merge"])
def test_dare_merges_default_seed_is_0(name):
    from adamerge.merging import dare_merges

    fn = getattr(dare_merges, name)
    base, taus = _pool()
    taus = list(taus.values())
    default = fn(base, taus, drop=0.5)
    assert all(torch.equal(default[k], fn(base, taus, drop=0.5, seed=0)[k]) for k in base)
    assert not torch.equal(default["w"], fn(base, taus, drop=0.5, seed=1)["w"])  # the seed shows


@pytest.mark.parametrize("name", ["dare_task_arithmetic_pool", "dare_ties_pool", "dare_ta_directions"])
def test_dare_pool_merges_check_the_first_task_vector_against_theta0(name):
    from adamerge.merging import dare_merges

    base, taus = _pool()
    wrong = {**taus["z"], "w": torch.zeros(5, 6)}
    with pytest.raises(MergeError, match=r"^shape mismatch at key 'w': pretrained \(6, 5\), task vector \(5, 6\)$"):
        getattr(dare_merges, name)(ListPool(base, [wrong]))


@pytest.mark.parametrize("name", ["dare_task_arithmetic_pool", "dare_ties_pool"])
def test_dare_pool_merges_name_a_later_task_vector_that_does_not_fit(name):
    # Only the first task vector is checked against θ0; a later one is named by the merge's own check
    from adamerge.merging import dare_merges

    base, taus = _pool()
    wrong = {**taus["z"], "w": torch.zeros(5, 6)}
    with pytest.raises(MergeError, match=r"^task vector 1: shape mismatch at key 'w': expected \(6, 5\), got \(5, 6\)$"):
        getattr(dare_merges, name)(ListPool(base, [taus["a"], wrong]))
