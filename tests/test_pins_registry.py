"""The method registry (adamerge/merging/registry.py) and the by-name dispatch (adamerge/merging/dispatch.py)
pinned with methods registered by the test itself (registration at import time happens before any test,
so only a registration made here exercises ``register_*``). The toy methods return values that depend on
the order and number of the task vectors (a weighted sum with weights 1, 10, 100, ...), so a wrapper
that drops, reorders or re-reads them gives other numbers."""

from __future__ import annotations

import pytest
import torch

from adamerge.merging import registry
from adamerge.merging.dispatch import call_registered, out_of_core
from adamerge.merging.registry import (
    OneTensor,
    block_of,
    register_directions,
    register_method,
    register_streaming,
    row_blocks,
    streamed_sum,
)
from adamerge.merging.task_vectors import MergeError

TABLES = ("METHODS", "LABELS", "PRESETS", "_ORIGINS", "DIRECTIONS", "DIRECTION_PRESETS", "STREAMING")


@pytest.fixture
def clean_registry(monkeypatch):
    """Every table of the registry restored after the test."""
    for name in TABLES:
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))
    monkeypatch.setattr(registry, "PER_TENSOR", set(registry.PER_TENSOR))
    return registry


class Pool:
    """θ_0 and three experts; ``task_vectors`` yields them in the order asked for and counts the reads."""

    tasks = ("a", "b", "c")

    def __init__(self):
        self.pre = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
        self.taus = {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 1.0])},
                     "c": {"w": torch.tensor([2.0, 2.0])}}
        self.reads = []

    def pretrained_state(self):
        return {k: v.clone() for k, v in self.pre.items()}

    def task_vectors(self, tasks=None):
        for t in self.tasks if tasks is None else tasks:
            self.reads.append(t)
            yield t, {k: v.clone() for k, v in self.taus[t].items()}


def weighted(pretrained, taus, scale=1.0):
    """Toy list method: θ_0 + scale · Σ_k 10^k τ_k (order-sensitive)."""
    return {"w": pretrained["w"] + scale * sum(10.0 ** k * t["w"] for k, t in enumerate(taus))}


# ---- register_method ----------------------------------------------------------------------------------
def test_a_list_method_is_wrapped_to_read_the_pool_in_order(clean_registry):
    reg = clean_registry
    assert register_method("pin_weighted")(weighted) is weighted  # the decorator returns the function
    run = reg.METHODS["pin_weighted"]
    assert run is not weighted and run.__wrapped__ is weighted and run.__doc__ == weighted.__doc__
    pool = Pool()
    got = run(pool, ["c", "a"], scale=2.0)
    # θ_0 + 2 (τ_c + 10 τ_a) = [1, 2] + 2 ([2, 2] + [10, 0])
    assert torch.equal(got["w"], torch.tensor([25.0, 6.0])) and pool.reads == ["c", "a"]
    assert torch.equal(run(Pool())["w"], torch.tensor([1 + 1 + 200.0, 2 + 10 + 200.0]))  # tasks=None: all
    assert reg.LABELS["pin_weighted"] == "pin_weighted" and reg.PRESETS["pin_weighted"] == {}
    assert "pin_weighted" not in reg.PER_TENSOR
    assert reg._ORIGINS["pin_weighted"] == f"{__name__}.weighted"


def test_pool_level_label_presets_and_per_tensor(clean_registry):
    reg = clean_registry

    def pool_fn(pool, tasks=None, scale=1.0):
        return {"scale": torch.tensor(scale)}

    presets = {"paper": {"scale": 3.0}}
    assert register_method("pin_pool", pool_level=True, label="PIN", presets=presets, per_tensor=True)(pool_fn) \
        is pool_fn
    assert reg.METHODS["pin_pool"] is pool_fn  # pool-level: registered as it is
    assert reg.LABELS["pin_pool"] == "PIN" and "pin_pool" in reg.PER_TENSOR
    assert reg.PRESETS["pin_pool"] == {"paper": {"scale": 3.0}}
    presets["paper"]["scale"] = 9.0  # the registry keeps its own copy of each preset
    presets["other"] = {}
    assert reg.PRESETS["pin_pool"] == {"paper": {"scale": 3.0}}


def test_registering_twice(clean_registry):
    reg = clean_registry
    register_method("pin_twice")(weighted)
    register_method("pin_twice")(weighted)  # the same function again (a module reloaded): accepted

    def other(pretrained, taus):
        return dict(pretrained)

    with pytest.raises(ValueError) as err:
        register_method("pin_twice")(other)
    assert str(err.value) == (f"merging method 'pin_twice' is registered twice: by {__name__}.weighted and "
                              f"{__name__}.test_registering_twice.<locals>.other")
    assert reg.METHODS["pin_twice"].__wrapped__ is weighted


def test_register_streaming_and_directions(clean_registry):
    reg = clean_registry

    def stream_fn(stream, tasks, **kw):
        yield from ()

    assert register_streaming("pin_stream")(stream_fn) is stream_fn and reg.STREAMING["pin_stream"] is stream_fn

    def directions(pretrained, taus, k=1):
        return pretrained, [{"w": t["w"] * k} for t in taus]

    presets = {"official": {"k": 2}}
    assert register_directions("pin_dirs", presets=presets)(directions) is directions
    run = reg.DIRECTIONS["pin_dirs"]
    assert run.__wrapped__ is directions  # list-level by default: wrapped to read the pool
    origin, dirs = run(Pool(), ["b", "c"], k=3)
    assert torch.equal(origin["w"], torch.tensor([1.0, 2.0]))
    assert [d["w"].tolist() for d in dirs] == [[0.0, 3.0], [6.0, 6.0]]
    presets["official"]["k"] = 5
    assert reg.DIRECTION_PRESETS["pin_dirs"] == {"official": {"k": 2}}
    register_directions("pin_dirs_pool", pool_level=True)(directions)
    assert reg.DIRECTIONS["pin_dirs_pool"] is directions and reg.DIRECTION_PRESETS["pin_dirs_pool"] == {}


# ---- streams ------------------------------------------------------------------------------------------
class Stream:
    """A tensor stream recording what it was asked for; ``rows`` selects a block of rows."""

    def __init__(self, blocks=None):
        self.calls = []
        if blocks is not None:
            self.row_blocks = lambda key: blocks[key]

    def check_tasks(self, tasks):
        self.calls.append(("check", tasks))
        return ["x", "y"] if tasks is None else list(tasks)

    def pretrained_tensor(self, key, rows=None):
        self.calls.append(("pre", key, rows))
        t = torch.arange(6.0).view(3, 2)
        return t if rows is None else t[rows]

    def task_vector_tensor(self, task, key, rows=None):
        self.calls.append(("tv", task, key, rows))
        t = torch.full((3, 2), 1.0 if task == "x" else 2.0)
        return t if rows is None else t[rows]


def test_one_tensor_reads_one_key_whole_or_by_rows():
    s = Stream()
    one = OneTensor(s, "k")
    assert torch.equal(one.pretrained_state()["k"], torch.arange(6.0).view(3, 2))
    got = list(one.task_vectors())
    assert [t for t, _ in got] == ["x", "y"] and [list(d) for _, d in got] == [["k"], ["k"]]
    assert torch.equal(got[1][1]["k"], torch.full((3, 2), 2.0))
    assert s.calls == [("pre", "k", None), ("check", None), ("tv", "x", "k", None), ("tv", "y", "k", None)]
    s = Stream()
    rows = OneTensor(s, "k", slice(1, 3))
    assert torch.equal(rows.pretrained_state()["k"], torch.arange(2.0, 6.0).view(2, 2))
    assert [(t, d["k"].shape) for t, d in rows.task_vectors(["y"])] == [("y", torch.Size([2, 2]))]
    assert s.calls == [("pre", "k", slice(1, 3)), ("check", ["y"]), ("tv", "y", "k", slice(1, 3))]


def test_block_of_and_row_blocks():
    seen = []

    def read(*args):
        seen.append(args)
        return torch.zeros(1)

    block_of(read, "a", "b")
    block_of(read, "a", rows=slice(0, 2))
    assert seen == [("a", "b"), ("a", slice(0, 2))]
    assert row_blocks(Stream(), "k") is None
    assert row_blocks(Stream({"k": [slice(0, 2), slice(2, 3)]}), "k") == [slice(0, 2), slice(2, 3)]


def test_streamed_sum_reads_each_expert_once_in_float32():
    pool = Pool()
    pool.taus["b"] = {"w": torch.tensor([0.5, 1.5], dtype=torch.float16)}
    total, count = streamed_sum(pool, ["a", "b"])
    assert count == 2 and pool.reads == ["a", "b"]
    assert total["w"].dtype == torch.float32 and torch.equal(total["w"], torch.tensor([1.5, 1.5]))
    total, count = streamed_sum(Pool(), None)
    assert count == 3 and torch.equal(total["w"], torch.tensor([3.0, 3.0]))


# ---- dispatch: by name --------------------------------------------------------------------------------
def test_out_of_core_kinds():
    assert out_of_core("task_arithmetic") == "per tensor"
    assert out_of_core("weight_average") == "per tensor"
    assert out_of_core("iso_c") == "per tensor"  # per tensor and streaming: per tensor first
    assert out_of_core("ties") == "exact passes"
    assert out_of_core("dare_ties") == "exact passes"
    assert out_of_core("pcb") is None and out_of_core("opcm") is None and out_of_core("nope") is None


def _table():
    calls = []

    def m(pool, tasks, a=0, b=0):
        calls.append((pool, tasks, a, b))
        return {"a": a, "b": b}

    def broken(pool, tasks):
        raise TypeError("something else went wrong")

    return {"m": m, "broken": broken, "plain": m}, {"m": {"p": {"a": 1, "b": 2}, "q": {"b": 5}}}, calls


def test_call_registered_runs_with_presets_under_kwargs():
    table, presets, calls = _table()
    assert call_registered(table, presets, "merging method", "m", "POOL", ["t"], None, {"a": 7}) == {"a": 7, "b": 0}
    assert call_registered(table, presets, "merging method", "m", "POOL", None, "p", {}) == {"a": 1, "b": 2}
    assert call_registered(table, presets, "merging method", "m", "POOL", None, "p", {"b": 9}) == {"a": 1, "b": 9}
    assert calls[0] == ("POOL", ["t"], 7, 0)
    assert presets == {"m": {"p": {"a": 1, "b": 2}, "q": {"b": 5}}}  # the preset itself is not modified


def test_call_registered_errors_name_the_method():
    table, presets, _ = _table()
    with pytest.raises(MergeError) as err:
        call_registered(table, presets, "merging method", "zz", None, None, None, {})
    assert str(err.value) == "unknown merging method 'zz'; known methods: broken, m, plain"
    with pytest.raises(MergeError) as err:
        call_registered(table, presets, "directions method", "zz", None, None, None, {})
    assert str(err.value) == "unknown directions method 'zz'; known methods: broken, m, plain"
    with pytest.raises(MergeError) as err:  # the list is named by the kind's last word, whatever its length
        call_registered(table, presets, "static merging method", "zz", None, None, None, {})
    assert str(err.value) == "unknown static merging method 'zz'; known methods: broken, m, plain"
    with pytest.raises(MergeError) as err:
        call_registered(table, presets, "merging method", "m", None, None, "r", {})
    assert str(err.value) == "merging method 'm' has no preset 'r'; its presets: p, q"
    with pytest.raises(MergeError) as err:
        call_registered(table, presets, "directions method", "plain", None, None, "p", {})
    assert str(err.value) == "directions method 'plain' has no preset 'p'; its presets: none"
    with pytest.raises(MergeError) as err:
        call_registered(table, presets, "merging method", "m", None, None, None, {"c": 1})
    assert str(err.value).startswith("merging method 'm': ") and "unexpected keyword argument 'c'" in str(err.value)
    with pytest.raises(TypeError, match="^something else went wrong$"):  # any other TypeError is the method's
        call_registered(table, presets, "merging method", "broken", None, None, None, {})


def test_plus_pretrained_whole_or_by_row_blocks_into_taus_buffer():
    # a stream without row blocks is read with the one-argument pretrained_tensor(key) the TensorStream
    # protocol promises (this one takes no rows at all); a stream with row blocks is read block by block
    from adamerge.merging.registry import plus_pretrained

    class Whole:
        def pretrained_tensor(self, key):
            return torch.arange(6.0).view(3, 2)

    tau = torch.ones(3, 2)
    got = plus_pretrained(Whole(), "k", tau, 0.5)
    assert got is tau and torch.equal(got, torch.arange(6.0).view(3, 2) + 0.5)
    s = Stream({"k": [slice(0, 2), slice(2, 3)]})
    tau = torch.full((3, 2), 2.0, dtype=torch.float16).float()
    got = plus_pretrained(s, "k", tau, 3.0)
    assert torch.equal(got, torch.arange(6.0).view(3, 2) + 6.0)
    assert s.calls == [("pre", "k", slice(0, 2)), ("pre", "k", slice(2, 3))]
