"""The mini benchmark's cache under concurrency and tampering: one builder at a time, checked loads.

Builds use the small synthetic sources of ``test_mini_benchmark`` (``env``); a tiny build takes ~1 s.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_mini_benchmark import _copy_entry, built, env  # noqa: F401  (fixtures and helper reused)

from adamerge.data.mini import MiniBenchmark
from adamerge.data.mini import build as mini_build
from adamerge.data.mini.cache import (
    CacheEntryError,
    CheckedSafetensors,
    entry_lock,
    file_digest,
    verify_entry,
)

RACE_WORKERS, RACE_ROUNDS = 3, 3


# ---- race: several processes build one key at once ------------------------------------------------
def _race_phase(cache: Path, barrier, rebuild: bool) -> dict:
    """Wait for the others, then build (or load) the tiny entry and load every expert through the pool."""
    barrier.wait()
    runs = mini_build.TRAINING_RUNS["pretrain"]
    try:
        b = MiniBenchmark("tiny", 0, cache_dir=str(cache), rebuild=rebuild, progress=False).build()
        pool = b.pool()
        for t in pool.tasks:
            pool.expert_state(t)
        error = None
    except Exception as e:  # noqa: BLE001  (reported to the parent, which fails the test with it)
        error = f"{type(e).__name__}: {e}"
    return {"built": mini_build.TRAINING_RUNS["pretrain"] - runs, "error": error}


def _race_worker(rank: int, root: str, rounds: int, barrier, queue) -> None:
    """Per round: all build a fresh entry at once; then rank 0 rebuilds it while the others load it."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = []
    for r in range(rounds):
        cache = Path(root) / f"round{r}"
        fresh = _race_phase(cache, barrier, rebuild=False)
        replace = _race_phase(cache, barrier, rebuild=rank == 0)
        barrier.wait()
        b = MiniBenchmark("tiny", 0, cache_dir=str(cache), progress=False)
        manifest, why = verify_entry(b.entry, b.key, [])
        files = {rel: file_digest(manifest, rel) for rel in manifest["files"]} if manifest else {}
        out.append({"fresh": fresh, "replace": replace, "why": why, "key": b.key, "files": files})
    queue.put((rank, out))


def test_concurrent_builders_share_one_build(env, tmp_path):  # noqa: F811
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(RACE_WORKERS, timeout=300), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(i, str(tmp_path), RACE_ROUNDS, barrier, queue))
             for i in range(RACE_WORKERS)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    for r in range(RACE_ROUNDS):
        rows = [results[i][r] for i in range(RACE_WORKERS)]
        errors = [x[phase]["error"] for x in rows for phase in ("fresh", "replace") if x[phase]["error"]]
        assert errors == [], f"round {r}: {errors}"
        assert sum(x["fresh"]["built"] for x in rows) == 1, f"round {r}: the entry was built more than once"
        assert [x["replace"]["built"] for x in rows] == [1] + [0] * (RACE_WORKERS - 1)
        assert all(x["why"] == "" for x in rows), [x["why"] for x in rows]
        assert len({json.dumps([x["key"], x["files"]], sort_keys=True) for x in rows}) == 1
        assert len(rows[0]["files"]) == 2 + len(MiniBenchmark("tiny").tasks)
        leftovers = sorted(p.name for p in (tmp_path / f"round{r}" / "mini").iterdir())
        assert len(leftovers) == 2 and leftovers[1] == leftovers[0] + ".lock", leftovers  # no temporaries


# ---- readers wait for a build in progress ---------------------------------------------------------
def test_reader_waits_while_the_entry_is_locked(built, tmp_path):  # noqa: F811
    b, _ = _copy_entry(built, tmp_path)
    done = threading.Event()
    reader = threading.Thread(target=lambda: (b.build(), done.set()))
    with entry_lock(b.entry):
        reader.start()
        time.sleep(0.5)
        assert not done.is_set(), "build() read the entry while another holder had its lock"
    reader.join(timeout=30)
    assert done.is_set() and b.manifest["files"] == built.manifest["files"]


# ---- every load is checked -------------------------------------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_expert_modified_after_verification_is_refused(built, tmp_path):  # noqa: F811
    b, dst = _copy_entry(built, tmp_path)
    pool = b.build().pool()
    src = pool._experts["mini_digits"]
    assert isinstance(src, CheckedSafetensors) and src.path == dst / "experts" / "mini_digits.safetensors"
    assert str(src.path) in repr(src) and src.sha256[:12] in repr(src)
    before = pool.expert_state("mini_digits")
    _flip_last_byte(src.path)
    with pytest.raises(CacheEntryError, match=r"mini_digits\.safetensors changed after .*--rebuild"):
        pool.expert_state("mini_digits")
    with pytest.raises(CacheEntryError, match=r"mini_digits\.safetensors changed after"):
        src()
    torch.testing.assert_close(pool.expert_state("mini_mnist")["proj"], built.pool().expert_state("mini_mnist")["proj"])
    (dst / "experts" / "mini_mnist.safetensors").unlink()
    with pytest.raises(CacheEntryError, match=r"mini_mnist\.safetensors is missing"):
        pool.expert_state("mini_mnist")
    assert before["proj"].abs().sum() > 0


def test_pretrained_and_model_config_are_checked_at_load(built, tmp_path):  # noqa: F811
    b, dst = _copy_entry(built, tmp_path)
    b.build()
    _flip_last_byte(dst / "pretrained.safetensors")
    with pytest.raises(CacheEntryError, match=r"pretrained\.safetensors changed after"):
        b.clip_model()
    b, dst = _copy_entry(built, tmp_path / "other")
    b.build()
    cfg = dst / f"{b.model_name}.json"
    cfg.write_text(cfg.read_text().replace('"width": 32', '"width": 64', 1))
    with pytest.raises(CacheEntryError, match=rf"{b.model_name}\.json changed after"):
        b.pool()


def test_older_manifest_layout_still_verifies(built, tmp_path):  # noqa: F811
    """Entries written before the ``{"sha256", "bytes"}`` table (``files: {rel: sha256}``) stay valid."""
    b, dst = _copy_entry(built, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"] = {rel: info["sha256"] for rel, info in m["files"].items()}
    (dst / "manifest.json").write_text(json.dumps(m))
    runs = dict(mini_build.TRAINING_RUNS)
    pool = b.build().pool()
    assert mini_build.TRAINING_RUNS == runs
    torch.testing.assert_close(pool.expert_state("mini_fashion")["proj"],
                               built.pool().expert_state("mini_fashion")["proj"])


# ---- temporaries of killed builders ----------------------------------------------------------------
def test_stale_temporary_of_a_dead_builder_is_swept(env, tmp_path):  # noqa: F811
    b = MiniBenchmark("tiny", 0, cache_dir=str(tmp_path), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = b.entry.parent / f".{b.entry.name}.tmp-{dead}-0badf00d"
    live = b.entry.parent / f".{b.entry.name}.tmp-{os.getpid()}-00c0ffee"
    for tmp in (stale, live):
        (tmp / "experts").mkdir(parents=True)
        (tmp / "experts" / "mini_mnist.safetensors").write_bytes(b"half written")
    b.build()
    assert not stale.exists(), "the temporary of a dead process was left behind"
    assert live.exists(), "the temporary of a live process was removed"
    assert verify_entry(b.entry, b.key, [])[0] is not None
