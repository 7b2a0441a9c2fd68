"""The mini benchmark's tiny preset, built from small source files written here (seconds)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from adamerge.data.mini import (
    TASK_NAMES,
    MiniBenchmark,
    MiniBenchmarkPool,
    MiniBenchmarkSource,
    MissingSourceError,
)
from adamerge.data.mini import build as mini_build
from adamerge.data.mini.cache import sha256_file, verify_entry
from adamerge.data.registry import check_tasks, get_task
from adamerge.data.source import TaskSource
from adamerge.models.pool import ModelPool


def _idx(path, a: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape) + a.astype(np.uint8).tobytes()
    gzip.open(path, "wb").write(raw)


def _unique_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct 28x28 images: a class-dependent bar plus random noise; pixel (0,0..1) encodes the index."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(y):
        x[i, 4 + 2 * c : 6 + 2 * c, 4:24] = 255
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x.astype(np.uint8), y


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    fx, fy = _unique_images(400, 1)
    (root / "fashion").mkdir()
    _idx(root / "fashion/train-images-idx3-ubyte.gz", fx[:300])
    _idx(root / "fashion/train-labels-idx1-ubyte.gz", fy[:300])
    _idx(root / "fashion/t10k-images-idx3-ubyte.gz", fx[300:])
    _idx(root / "fashion/t10k-labels-idx1-ubyte.gz", fy[300:])
    mx, my = _unique_images(400, 2)
    rows = np.concatenate([mx.reshape(400, -1), my[:, None]], axis=1)
    gzip.open(root / "mnist.csv.gz", "wt").write("\n".join(",".join(map(str, r)) for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAMERGE_FASHION_MNIST_DIR", str(root / "fashion"))
        mp.setenv("ADAMERGE_MNIST_CSV", str(root / "mnist.csv.gz"))
        mp.setenv("ADAMERGE_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def built(env):
    before = dict(mini_build.TRAINING_RUNS)
    b = MiniBenchmark("tiny", seed=0, progress=False).build()
    assert mini_build.TRAINING_RUNS["pretrain"] == before["pretrain"] + 1
    assert mini_build.TRAINING_RUNS["finetune"] == before["finetune"] + len(TASK_NAMES)
    return b


def test_manifest_lists_hashes_and_metrics(built):
    m = json.loads(built.paths["manifest"].read_text())
    assert m["preset"] == "tiny" and m["seed"] == 0 and m["key"] == built.key
    expected = {built.paths["pretrained"], built.paths["model_config"], *built.paths["experts"].values()}
    assert {built.entry / f for f in m["files"]} == expected
    for f, info in m["files"].items():
        assert hashlib.sha256((built.entry / f).read_bytes()).hexdigest() == info["sha256"]
    for kind in ("zero_shot", "expert"):
        assert set(m["metrics"][kind]) == set(TASK_NAMES)
        assert all(0 <= v <= 100 for v in m["metrics"][kind].values())
    assert m["build_seconds"] > 0 and m["build_cpu_seconds"] > 0
    assert m["config"]["vision"]["width"] == 32


def test_reload_from_cache_trains_nothing(built):
    runs = dict(mini_build.TRAINING_RUNS)
    mtimes = {p: p.stat().st_mtime_ns for p in built.entry.rglob("*")}
    again = MiniBenchmark("tiny", seed=0, progress=False).build()
    assert again.entry == built.entry and again.manifest == built.manifest
    assert mini_build.TRAINING_RUNS == runs
    assert {p: p.stat().st_mtime_ns for p in built.entry.rglob("*")} == mtimes
    other_seed = MiniBenchmark("tiny", seed=1, progress=False)
    assert other_seed.entry != built.entry and not other_seed.entry.exists()


def _copy_entry(built, tmp_path):
    """The same cache entry under another cache root (the key does not depend on the root)."""
    dst = tmp_path / "mini" / built.entry.name
    shutil.copytree(built.entry, dst)
    return MiniBenchmark("tiny", seed=0, cache_dir=str(tmp_path), progress=False), dst


def test_corrupt_expert_is_detected_and_rebuilt_deterministically(built, tmp_path):
    b, dst = _copy_entry(built, tmp_path)
    f = dst / "experts" / "mini_digits.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    manifest, why = verify_entry(dst, built.key, [])
    assert manifest is None and "mini_digits.safetensors does not match its sha256" in why
    runs = mini_build.TRAINING_RUNS["pretrain"]
    with pytest.warns(UserWarning, match="mini_digits.safetensors does not match its sha256"):
        b.build()
    assert mini_build.TRAINING_RUNS["pretrain"] == runs + 1
    # the same seed rebuilds bit-identical files
    assert sha256_file(f) == built.manifest["files"]["experts/mini_digits.safetensors"]["sha256"]


def test_manifest_of_other_config_and_missing_file_are_rebuilt(built, tmp_path):
    b, dst = _copy_entry(built, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["key"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(m))
    assert "another configuration" in verify_entry(dst, built.key, [])[1]
    (dst / "pretrained.safetensors").unlink()
    runs = mini_build.TRAINING_RUNS["pretrain"]
    with pytest.warns(UserWarning, match="another configuration"):
        b.build()
    assert mini_build.TRAINING_RUNS["pretrain"] == runs + 1
    assert verify_entry(dst, built.key, [])[0] is not None


def test_rebuild_flag_forces_training(built, tmp_path):
    b, _ = _copy_entry(built, tmp_path)
    b.rebuild = True
    runs = mini_build.TRAINING_RUNS["pretrain"]
    b.build()
    assert mini_build.TRAINING_RUNS["pretrain"] == runs + 1


def test_tasks_registered_with_own_names(built):
    assert check_tasks(list(TASK_NAMES)) == list(TASK_NAMES)
    assert get_task("mini_mnist_rot").classnames[:3] == ("null", "eins", "zwei")
    assert get_task("mini_mnist_small").classnames[5] == "cinco"
    assert get_task("mini_fashion_coarse").num_classes == 4
    names = [get_task(t).classnames for t in TASK_NAMES]
    assert len(set(names)) == len(names)  # no two tasks share class names


def test_datasets_shaped_and_disjoint(built):
    cfg = built.config
    for task in TASK_NAMES:
        seen = {}
        for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
            ds = built.dataset(task, split)
            assert len(ds) == n
            x, y = ds[0]
            assert x.shape == (3, cfg.image_size, cfg.image_size) and x.dtype == torch.float32
            assert isinstance(y, int) and 0 <= y < get_task(task).num_classes
            xs = torch.stack([ds[i][0] for i in range(len(ds))])
            assert -1.0 - 1e-6 <= xs.min() and xs.max() <= 1.0 + 1e-6  # normalised with mean=std=0.5
            seen[split] = {hashlib.sha1(v.numpy().tobytes()).hexdigest() for v in xs}
            assert len(seen[split]) == n
        assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
        assert not (seen["train"] & seen["val"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        built.dataset("mini_mnist", "dev")
    with pytest.raises(ValueError, match="unknown mini-benchmark task 'mnist'"):
        built.dataset("mnist", "test")


def test_pool_usable(built):
    pool = built.pool()
    assert isinstance(pool, ModelPool) and pool.tasks == list(TASK_NAMES)
    d = built.config.embed_dim
    for t in TASK_NAMES:
        h = pool.head(t)
        assert h.shape == (get_task(t).num_classes, d)
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(len(h)))
        tau = pool.task_vector(t)
        assert tau["proj"].abs().sum() > 0 and tau["ln_post.weight"].abs().sum() > 0
        for k, v in tau.items():  # exactly the frozen prefixes stay at θ0
            assert (v.abs().sum() == 0) == k.startswith(built.config.ft_freeze), k
    x = torch.stack([built.dataset("mini_fashion", "test")[i][0] for i in range(4)])
    assert pool.build_encoder(pool.expert_state("mini_fashion"))(x).shape == (4, d)
    assert pool.logit_scale == pytest.approx(built.manifest["logit_scale"], rel=1e-6)


def test_benchmark_id_names_the_design_not_the_seed(built):
    other_seed = MiniBenchmark("tiny", seed=1, cache_dir=built.root)
    assert other_seed.key != built.key and other_seed.benchmark_id == built.benchmark_id
    assert built.benchmark_id.startswith("mini-tiny-")
    assert MiniBenchmark("default", seed=0).benchmark_id != built.benchmark_id
    assert built.pool().benchmark_id == built.benchmark_id


def test_clip_model_loads_through_open_clip(built):
    from safetensors.torch import load_file

    clip = built.clip_model()
    saved = load_file(str(built.paths["pretrained"]))
    for k, v in clip.state_dict().items():
        if k in saved:
            torch.testing.assert_close(v, saved[k])
    assert set(saved) <= set(clip.state_dict())
    cfg = json.loads(built.paths["model_config"].read_text())
    assert cfg["vision_cfg"]["width"] == built.config.vision["width"]


def test_wrappers_share_the_cache(built):
    runs = dict(mini_build.TRAINING_RUNS)
    src = MiniBenchmarkSource(preset="tiny", seed=0)
    pool = MiniBenchmarkPool(preset="tiny", seed=0)
    assert mini_build.TRAINING_RUNS == runs
    assert isinstance(src, TaskSource) and src.tasks == list(TASK_NAMES)
    assert len(src.dataset("mini_digits", "val")) == built.config.n_val
    assert isinstance(pool, ModelPool) and pool.tasks == list(TASK_NAMES)
    torch.testing.assert_close(pool.expert_state("mini_mnist")["proj"],
                               built.pool().expert_state("mini_mnist")["proj"])


def test_bad_preset_and_missing_source(env, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown mini-benchmark preset 'huge'"):
        MiniBenchmark("huge")
    monkeypatch.setenv("ADAMERGE_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        MiniBenchmark("tiny", cache_dir=str(tmp_path)).build()
