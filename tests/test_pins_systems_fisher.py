"""FisherMerging (adamerge/systems/fisher.py): option checks, memory chunking and summary, pinned exactly.

The per-example gradients are computed in chunks of at most ``chunk`` gradient vectors: ``per_class``
cotangents per ``vmap`` of the pull-back (all classes for ``exact``, one for ``sampled``) and
``chunk // (per_class + 1)`` examples per outer ``vmap``. The chunk sizes are observed by wrapping the
module's ``vmap``, so every plausible off-by-one (``+ 2``, ``max(2, …)``, ``<=``, the wrong estimator's
class count) gives another sequence of sizes. Data for that: task2 has 5 classes, so ``chunk=3``
splits the classes 3 + 2 and leaves one example per call, ``chunk=12`` gives two examples of all 5
classes, ``chunk=11`` only one, and ``sampled`` with ``chunk=4`` two examples of one label. The default
chunk is pinned by setting ``CHUNK_BYTES`` to 1 byte (at least one vector), 12 and 12 − 1/byte
multiples of the encoder's size. A batch of 5 examples (more than the 3 image channels) is checked
against per-example autograd Fishers (tests/test_systems_statistics.py), so that a batch split that
drops or misaligns examples is seen. Error messages are matched whole (``^…$``); a task left without
batches shows that the merge names experts by their task; the merge options are all set away from
their defaults (and each shown to change the merge), so that an option not passed on is seen.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_systems_statistics import per_example_fisher
from test_systems_statistics import pool as wide_pool

import adamerge.systems.fisher as fisher_module
from adamerge.merging import MergeError
from adamerge.merging.fisher import fisher_merge
from adamerge.systems.fisher import ESTIMATORS, FisherMerging


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vmap_sizes(monkeypatch):
    """The leading size of every ``vmap`` call in the module, in call order (outer ones: examples;
    inner ones, made inside an outer call: cotangents)."""
    sizes: list[int] = []
    real = fisher_module.vmap

    def spy(f, *args, **kwargs):
        mapped = real(f, *args, **kwargs)

        def run(*inputs):
            sizes.append(int(inputs[0].shape[0]))
            return mapped(*inputs)

        return run

    monkeypatch.setattr(fisher_module, "vmap", spy)
    return sizes


# ---- options ------------------------------------------------------------------------------------------------
def test_option_messages_and_bounds():
    p = wide_pool()
    assert ESTIMATORS == ("exact", "sampled", "batch")
    with pytest.raises(ValueError, match="^estimator must be one of exact, sampled, batch, got 'hard'$"):
        FisherMerging(p, estimator="hard")
    with pytest.raises(ValueError, match="^smoothing must be one of floor, add, got 'none'$"):
        FisherMerging(p, smoothing="none")
    for floor, shown in ((-1, "-1"), (-1e-9, "-1e-09"), (math.inf, "inf"), (math.nan, "nan"), ("1", "'1'")):
        with pytest.raises(ValueError, match=f"^floor must be a finite number >= 0, got {shown}$"):
            FisherMerging(p, floor=floor)
    for chunk in (0, -2):
        with pytest.raises(ValueError, match=f"^chunk must be at least 1, got {chunk}$"):
            FisherMerging(p, chunk=chunk)
    edge = FisherMerging(p, floor=0, chunk=1)  # both bounds are allowed
    assert edge.floor == 0.0 and isinstance(edge.floor, float) and edge.chunk == 1
    assert FisherMerging(p, chunk=2.0).chunk == 2 and FisherMerging(p).chunk is None


def test_the_tasks_chosen_are_the_tasks_merged():
    p = wide_pool()
    system = FisherMerging(p, tasks=["task2", "task0"], estimator="batch")
    assert system.tasks == ["task2", "task0"] and set(system.fishers()) == {"task2", "task0"}
    assert system.expert_logits("task2", images(1, 0)).shape == (1, 5)


def test_the_summary_names_every_option():
    system = FisherMerging(wide_pool(), estimator="batch", normalize=False, floor=0.5, smoothing="add")
    system.training_step({"task0": images(2, 1), "task1": images(3, 2)}, 0)
    assert system.statistics_summary() == {
        "batches_seen": 1, "images_seen": {"task0": 2, "task1": 3, "task2": 0},
        "estimator": "batch", "normalize": False, "floor": 0.5, "smoothing": "add"}


def test_the_merge_uses_every_merge_option():
    """normalize, floor and smoothing all away from their defaults, floor large enough to matter."""
    p = wide_pool()
    system = FisherMerging(p, estimator="batch", normalize=False, floor=0.5, smoothing="add")
    system.training_step({t: images(3, 10 + i) for i, t in enumerate(p.tasks)}, 0)
    fishers = system.fishers()
    states = [p.expert_state(t) for t in p.tasks]
    expected = fisher_merge(states, [fishers[t] for t in p.tasks], normalize=False, floor=0.5, smoothing="add")
    merged = system.merged_state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-7)
    for options in ({"normalize": True}, {"floor": 1e-6}, {"smoothing": "floor"}):  # each one changes the merge
        other = fisher_merge(states, [fishers[t] for t in p.tasks],
                             **{"normalize": False, "floor": 0.5, "smoothing": "add", **options})
        assert max(float((other[k] - expected[k]).abs().max()) for k in expected) > 1e-4, options


def test_a_task_without_batches_is_named_when_merging():
    system = FisherMerging(wide_pool(), estimator="batch")
    system.training_step({"task0": images(2, 1), "task1": None, "task2": images(2, 3)}, 0)
    with pytest.raises(MergeError, match=r"^the Fisher of expert 'task1': has no key '[^']+', unlike that of "
                                         r"expert 'task0'$"):
        system.merged_state_dict()


# ---- chunks of per-example gradients -----------------------------------------------------------------------
def test_exact_chunks_split_the_classes_and_keep_every_example(vmap_sizes):
    p = wide_pool()
    system = FisherMerging(p, chunk=3)
    x = images(5, 4)  # 5 examples: more than the 3 channels of an image
    system.accumulate("task2", x)
    assert vmap_sizes == [1, 3, 2] * 5  # one example per call (3 // (3 + 1) -> at least 1), classes 3 + 2
    expected = per_example_fisher(p, "task2", [x])
    got = system.fishers()["task2"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("chunk", "sizes"), [(12, [2, 5, 2, 5, 1, 5]), (11, [1, 5] * 5)])
def test_exact_chunks_hold_examples_times_classes_plus_a_running_sum(vmap_sizes, chunk, sizes):
    system = FisherMerging(wide_pool(), chunk=chunk)
    system.accumulate("task2", images(5, 4))
    assert vmap_sizes == sizes


def test_sampled_chunks_hold_one_label_per_example(vmap_sizes):
    system = FisherMerging(wide_pool(), estimator="sampled", chunk=4)
    system.accumulate("task2", images(5, 4))
    assert vmap_sizes == [2, 1, 2, 1, 1, 1]  # 4 // (1 + 1) examples, one cotangent each


def test_the_default_chunk_is_as_many_vectors_as_fit_in_chunk_bytes(vmap_sizes, monkeypatch):
    p = wide_pool()
    size = sum(v.numel() * v.element_size() for v in p.encoder.state_dict().values())
    for budget, sizes in ((1, [1] + [1] * 5), (12 * size, [2, 5]), (12 * size - 1, [1, 5, 1, 5])):
        monkeypatch.setattr(fisher_module, "CHUNK_BYTES", budget)
        vmap_sizes.clear()
        FisherMerging(p).accumulate("task2", images(2, 5))
        assert vmap_sizes == sizes * (2 if budget == 1 else 1), budget
