"""Pins for the out-of-core merges (adamerge/merging/iso_stream.py, ties_stream.py, tsv_stream.py). The
streams here record every read, so a merge that reads a tensor whole where the stream offers row blocks
(more memory, same numbers) is caught; a stream with only the protocol's two-argument
``task_vector_tensor`` catches a merge that always passes ``rows``. Shapes are non-square and the task
vectors random, so a matrix merged by the wrong rule (flat spectrum against the mean) differs everywhere."""

from __future__ import annotations

import pytest
import torch

from adamerge.merging.dispatch import merge_pool, merge_stream
from adamerge.merging.iso_stream import iso_c_stream, summed_task_vector
from adamerge.merging.task_vectors import MergeError
from adamerge.merging.ties import ties_threshold
from adamerge.merging.ties_stream import _walk, stream_thresholds


class Stream:
    """θ_0 and three experts' task vectors in memory; optional row blocks per key; every read recorded."""

    def __init__(self, shapes, blocks=None, seed=0, tasks=("a", "b", "c")):
        g = torch.Generator().manual_seed(seed)
        self.base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        self.taus = {t: {k: torch.randn(s, generator=g) for k, s in shapes.items()} for t in tasks}
        self.tasks, self.reads = list(tasks), []
        if blocks is not None:
            self.row_blocks = lambda key: blocks.get(key)

    def check_tasks(self, tasks):
        return list(self.tasks if tasks is None else tasks)

    def merge_keys(self):
        return list(self.base)

    def pretrained_tensor(self, key, rows=None):
        self.reads.append(("pre", key, rows))
        return (self.base[key] if rows is None else self.base[key][rows]).clone()

    def task_vector_tensor(self, task, key, rows=None):
        self.reads.append(("tv", task, key, rows))
        return (self.taus[task][key] if rows is None else self.taus[task][key][rows]).clone()

    # the in-memory view, for merge_pool
    def pretrained_state(self):
        return {k: v.clone() for k, v in self.base.items()}

    def task_vectors(self, tasks=None):
        for t in self.check_tasks(tasks):
            yield t, {k: v.clone() for k, v in self.taus[t].items()}


class ProtocolOnly(Stream):
    """Only what TensorStream requires: no row blocks, ``task_vector_tensor(task, key)`` without ``rows``."""

    def pretrained_tensor(self, key):
        return super().pretrained_tensor(key)

    def task_vector_tensor(self, task, key):
        return super().task_vector_tensor(task, key)


SHAPES = {"w": (7, 3), "b": (7,)}


def test_the_summed_task_vector_is_read_by_the_streams_row_blocks():
    blocks = [slice(0, 4), slice(4, 7)]
    s = Stream(SHAPES, blocks={"w": blocks})
    got = summed_task_vector(s, ["c", "a"], "w")
    torch.testing.assert_close(got, s.taus["c"]["w"] + s.taus["a"]["w"], rtol=0, atol=0)
    assert s.reads == [("tv", t, "w", r) for r in blocks for t in ("c", "a")]
    s.reads.clear()
    summed_task_vector(s, ["b"], "b")  # no row blocks for this key: read whole
    assert s.reads == [("tv", "b", "b", None)]


def test_iso_c_stream_on_a_protocol_only_stream_equals_the_in_memory_merge():
    s = ProtocolOnly(SHAPES)
    got = dict(iso_c_stream(s, s.tasks, lam=0.7))
    want = merge_pool(s, "iso_c", lam=0.7)
    for key in SHAPES:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("pick", [True, False])
def test_iso_c_stream_follows_is_matrix_on_matrices_only(pick):
    """is_matrix chooses the rule for 2-D tensors only: True everywhere still averages the bias (an SVD of
    a vector is not taken), False everywhere averages the matrix too."""
    s = Stream(SHAPES)
    got = dict(merge_stream(s, "iso_c", lam=1.0, is_matrix=lambda key, t: pick))
    delta = {k: sum(s.taus[t][k] for t in s.tasks) for k in SHAPES}
    torch.testing.assert_close(got["b"], s.base["b"] + delta["b"] / 3)
    if pick:
        u, sv, vh = torch.linalg.svd(delta["w"], full_matrices=False)
        torch.testing.assert_close(got["w"], s.base["w"] + sv.mean() * u @ vh, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got["w"], s.base["w"] + delta["w"] / 3)


@pytest.mark.parametrize("hist,rank,want", [
    ([1, 0, 2], 1, (2, 1)),  # in the top bin: nothing above it
    ([1, 0, 2], 2, (2, 2)),
    ([1, 3, 2], 4, (1, 2)),  # the second bin from the top: the top bin's 2 entries are above
    ([1, 3, 2], 6, (0, 1)),  # the smallest entry
])
def test_walk_finds_the_bin_and_the_rank_within_it(hist, rank, want):
    """_walk counts from the top: a rank-th largest entry in the top bin has no entries above it, one in a
    lower bin has the whole bins above it (wrong guards there shift the rank within the bin)."""
    counts = torch.tensor(hist, dtype=torch.int64)
    assert _walk(counts, rank) == want
    top, within = want  # the same by hand: entries sorted from the largest, with their bins
    order = [b for b in reversed(range(len(hist))) for _ in range(hist[b])]
    assert order[rank - 1] == top and order[:rank].count(top) == within


@pytest.mark.parametrize("tasks", [["b"], ["c", "a"]])
def test_stream_thresholds_read_by_row_blocks_equal_the_in_memory_ones(tasks):
    """One task too: the entry count d comes from the first task's reads (a count taken from any other
    task would be 0 with one task). Row blocks are honoured in both passes."""
    blocks = [slice(0, 2), slice(2, 7)]
    s = Stream(SHAPES, blocks={"w": blocks})
    got = stream_thresholds(s, tasks, 0.3)
    assert got == [ties_threshold(s.taus[t], 0.3) for t in tasks]
    reads = [r for r in s.reads if r[2] == "w"]
    assert reads == [("tv", t, "w", r) for _ in range(2) for r in blocks for t in tasks]  # two passes


def test_stream_thresholds_errors_in_full():
    s = Stream(SHAPES)
    with pytest.raises(MergeError) as err:
        stream_thresholds(s, ["a"], 1.5)
    assert str(err.value) == "ties keep ratio must lie in (0, 1], got 1.5"
    s.base = {}
    with pytest.raises(MergeError) as err:
        stream_thresholds(s, ["a"], 0.2)
    assert str(err.value) == "the model has no floating-point tensors to merge"


def test_stream_thresholds_count_exactly_past_float32s_integers():
    """2^24 + 1 entries share the threshold's upper 16 bits: counts kept in float32 would round 2^24 + 1 to
    2^24 and walk off the end of the lower-bits histogram. Integer counts find 1.0 exactly."""
    s = Stream({"w": (1,)}, tasks=("a",))
    tau = torch.ones(2**24 + 2)
    tau[0] = 1.0 + 2.0**-23  # the same upper 16 bits as 1.0, one step above it
    s.base, s.taus = {"w": torch.zeros(tau.shape)}, {"a": {"w": tau}}
    assert stream_thresholds(s, ["a"], 1.0) == [1.0]


def test_iso_c_stream_takes_the_flat_spectrum_of_a_one_by_one_matrix():
    """A 1×1 matrix is a matrix: its flat spectrum σ̄ U Vᵀ is Δ itself, not the mean Δ / T."""
    s = Stream({"w": (1, 1)})
    got = dict(iso_c_stream(s, s.tasks, lam=1.0))
    delta = sum(s.taus[t]["w"] for t in s.tasks)
    torch.testing.assert_close(got["w"], s.base["w"] + delta)


def test_ties_stream_reads_every_pass_by_row_blocks_and_equals_the_in_memory_merge():
    blocks = [slice(0, 3), slice(3, 7)]
    s = Stream(SHAPES, blocks={"w": blocks, "b": blocks})
    got = dict(merge_stream(s, "ties", keep=0.4, lam=0.5))
    want = merge_pool(s, "ties", keep=0.4, lam=0.5)
    for key in SHAPES:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert s.reads and all(rows is not None for *_, rows in s.reads)
    # four passes over every block: two for the thresholds, one for the elected signs' total, one to merge
    assert sum(r == ("tv", "a", "w", slice(3, 7)) for r in s.reads) == 4


# TSV-M out of core. A fused q;k;v (`in_proj_weight`, [3d, d]) splits into three names, so a loop that stops
# at the first averaged or zero-rank part (`break` for `continue`) leaves the other two unmerged.
FUSED = {"blk.attn.in_proj_weight": (12, 4), "blk.attn.in_proj_bias": (12,), "blk.mlp.w": (5, 9)}


def _tsv_both(s, **kwargs):
    got = dict(merge_stream(s, "tsv_m", **kwargs))
    want = merge_pool(s, "tsv_m", **kwargs)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    return got


def test_tsv_stream_below_rank_one_leaves_theta_0_and_merges_what_follows():
    """K = 3 tasks: a 2×9 and a 9×2 matrix keep ⌊2/3⌋ = 0 components, so their τ is zero and θ = θ_0; the
    fused q;k;v of d = 2 has three zero-rank parts in a row and must still fuse all three."""
    shapes = {"w": (2, 9), "v": (9, 2), "blk.attn.in_proj_weight": (6, 2), "blk.attn.in_proj_bias": (6,),
              "b": (9,), "m": (4, 5)}
    s = Stream(shapes)
    got = _tsv_both(s, lam=0.7)
    for key in ("w", "v", "blk.attn.in_proj_weight"):
        torch.testing.assert_close(got[key], s.base[key], rtol=0, atol=0, msg=key)
    mean_b = torch.stack([s.taus[t]["b"] for t in s.tasks]).mean(0)
    torch.testing.assert_close(got["b"], s.base["b"] + 0.7 * mean_b)
    assert not torch.equal(got["m"], s.base["m"])  # ⌊4/3⌋ = 1 component per task: merged, not skipped


def test_tsv_stream_zero_rank_tau_is_float32_whatever_the_default_dtype():
    """The zero τ of a below-rank matrix is float32 (as every merged τ), not the process's default dtype."""
    from adamerge.merging.tsv_stream import _merged_tau

    s = Stream({"w": (2, 9)})
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tau = _merged_tau(s, s.tasks, "w", lambda name, t: True, True, None)
    finally:
        torch.set_default_dtype(before)
    assert tau.dtype == torch.float32 and tau.shape == (2, 9) and not tau.any()


@pytest.mark.parametrize("split_qkv", [True, False])
def test_tsv_stream_fused_qkv_split_or_whole_equals_the_in_memory_merge(split_qkv):
    """split_qkv=False takes one SVD of the whole [12, 4] tensor (rank ⌊4/3⌋ = 1 per task); split, each 4×4
    part keeps 1 too, but the three bases differ, so the two results differ from each other."""
    s = Stream(FUSED)
    got = _tsv_both(s, split_qkv=split_qkv)
    other = dict(merge_stream(s, "tsv_m", split_qkv=not split_qkv))
    assert not torch.allclose(got["blk.attn.in_proj_weight"], other["blk.attn.in_proj_weight"])


def test_tsv_stream_is_svd_merged_sees_the_split_names_and_matrices_only():
    """Only k is SVD-merged: q and v (matrices the predicate refuses) and the bias parts are averaged; an
    averaged q first must not stop the loop before k and v. The predicate is asked about matrices only."""
    asked = []

    def only_k(name, t):
        asked.append((name, t.dim()))
        return name.endswith("k_proj.weight")

    s = Stream(FUSED)
    got = _tsv_both(s, is_svd_merged=only_k)
    assert asked and all(dim == 2 for _, dim in asked)
    assert {name for name, _ in asked} >= {"blk.attn.q_proj.weight", "blk.attn.k_proj.weight", "blk.mlp.w"}
    d = 4
    mean = torch.stack([s.taus[t]["blk.attn.in_proj_weight"] for t in s.tasks]).mean(0)
    w, base = got["blk.attn.in_proj_weight"], s.base["blk.attn.in_proj_weight"]
    for part in (slice(0, d), slice(2 * d, 3 * d)):  # q and v: θ_0 + mean τ
        torch.testing.assert_close(w[part], base[part] + mean[part])
    assert not torch.allclose(w[d:2 * d], base[d:2 * d] + mean[d:2 * d])  # k: SVD-merged
    mean_w = torch.stack([s.taus[t]["blk.mlp.w"] for t in s.tasks]).mean(0)
    torch.testing.assert_close(got["blk.mlp.w"], s.base["blk.mlp.w"] + mean_w)  # refused by name
