"""One way to name a base merge: a method name, a mapping, or a merged state file."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool
from safetensors.torch import save_file

from adamerge.merging.task_vectors import MergeError, add_task_vector, sum_task_vectors
from adamerge.models import checkpoints
from adamerge.systems.base_merge import base_merge_state, is_path


def _ta_state(pool, lam: float = 0.3) -> dict:
    """Task arithmetic written out here (independent of adamerge.merging's dispatcher)."""
    taus = [tau for _, tau in pool.task_vectors()]
    return add_task_vector(pool.pretrained_state(), sum_task_vectors(taus), lam)


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_from_a_state_file_in_either_key_convention(tmp_path):
    pool = make_tiny_pool()
    state = _ta_state(pool)
    save_file({f"visual.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "full.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "visual.safetensors")
    _close(base_merge_state(pool, str(tmp_path / "full.safetensors")), state)
    _close(base_merge_state(pool, tmp_path / "visual.safetensors"), state)
    with pytest.raises(Exception, match=r"^merged_state: .*(not found|does not exist)"):
        base_merge_state(pool, str(tmp_path / "missing.safetensors"), option="merged_state")
    bad = dict(state)
    bad.pop(next(iter(bad)))
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="base_merge: .*missing key"):
        base_merge_state(pool, str(tmp_path / "bad.safetensors"))


def test_by_method_name_or_mapping():
    pool = make_tiny_pool()
    _close(base_merge_state(pool, {"method": "task_arithmetic", "lam": 0.3}), _ta_state(pool, 0.3))
    _close(base_merge_state(pool, {"method": "task_arithmetic", "lam": 0.5}, tasks=["task0", "task2"]),
           add_task_vector(pool.pretrained_state(),
                           sum_task_vectors([pool.task_vector("task0"), pool.task_vector("task2")]), 0.5))
    with pytest.raises(ValueError, match="base_merge: a mapping needs a 'method' name"):
        base_merge_state(pool, {"lam": 0.3})
    with pytest.raises(MergeError, match="unknown merging method 'taskarith'"):
        base_merge_state(pool, "taskarith")


def test_what_counts_as_a_path(tmp_path):
    (tmp_path / "run").mkdir()
    assert is_path("runs/x/merged.safetensors") and is_path("merged.pt") and is_path(str(tmp_path / "run"))
    assert not is_path("task_arithmetic") and not is_path({"method": "ties"})
    assert is_path is checkpoints.is_path  # one guess (also load_clip's), re-exported here


def test_the_label_of_a_base_merge_is_its_methods_or_its_exports(tmp_path):
    from adamerge.files import atomic_dir
    from adamerge.systems.base_merge import base_merge_label

    assert base_merge_label("task_arithmetic") == "TA"
    assert base_merge_label({"method": "ties", "keep": 0.2}) == "TIES"
    assert base_merge_label({"lam": 0.3}) == "TA"  # the mapping's default method
    assert base_merge_label("my_merge") == "my_merge"  # unregistered: its own name
    with atomic_dir(tmp_path / "run" / "export", manifest={"method": "AdaMerging++"}) as d:
        (d / "merged.safetensors").write_bytes(b"x")
    assert base_merge_label(str(tmp_path / "run" / "export" / "merged.safetensors")) == "AdaMerging++"
    (tmp_path / "loose.safetensors").write_bytes(b"x")  # no manifest beside it: the file's stem
    assert base_merge_label(tmp_path / "loose.safetensors") == "loose"


def test_from_a_hub_id_read_through_the_offline_cache(tmp_path):
    """A merged state published on the Hub (``org/name[@rev]``) is a base merge too; its label is the repo's
    name, and an id that is neither cached nor a local path says both."""
    from hubcache import cache_repo, run_offline
    from safetensors.torch import save

    pool = make_tiny_pool()
    state = _ta_state(pool)
    cache_repo(tmp_path / "hub", "adamerge-test/ta-merge",
               {"merged.safetensors": save({k: v.contiguous() for k, v in state.items()})})
    torch.save(state, tmp_path / "want.pt")
    out = run_offline(tmp_path, f"""
        import sys, torch
        sys.path.insert(0, "tests")
        from conftest import make_tiny_pool
        from adamerge.models.hub import HubError
        from adamerge.systems.base_merge import base_merge_label, base_merge_state

        got = base_merge_state(make_tiny_pool(), "adamerge-test/ta-merge")
        want = torch.load({str(tmp_path / "want.pt")!r})
        out["equal"] = got.keys() == want.keys() and all(torch.allclose(got[k], want[k]) for k in want)
        out["label"] = base_merge_label("adamerge-test/ta-merge@main")
        try:
            base_merge_state(make_tiny_pool(), "adamerge-test/elsewhere")
        except HubError as e:
            out["missing"] = str(e)
    """)
    assert out["equal"] and out["label"] == "ta-merge"
    assert out["missing"].startswith("base_merge: adamerge-test/elsewhere: ") and "HF_HUB_OFFLINE=1" in out["missing"]


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "cart", "wudi", "dare_ties", "consensus_ta"])
def test_every_data_free_method_is_a_base_by_name_and_by_preset(name):
    """Surgery / WEMoE build on any registered merge: by name (its defaults) or as a mapping with a preset."""
    from adamerge.merging import merge_pool

    pool = make_tiny_pool()
    _close(base_merge_state(pool, name), merge_pool(pool, name))
    _close(base_merge_state(pool, {"method": name, "preset": "official"}), merge_pool(pool, name, preset="official"))
