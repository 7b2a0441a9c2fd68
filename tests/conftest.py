"""Shared fixtures: tiny open_clip models and pools built in the test, in well under a second."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# jsonargparse 4.49+ deprecations raised by Lightning's own CLI code (lightning/pytorch/cli.py), not ours.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import open_clip
import pytest
import torch
import torch.nn.functional as F

from adamerge.models.pool import ModelPool

# Tests use tiny models: one thread is as fast, deterministic, and avoids multi-threaded LAPACK
# (SVD in OPCM/OptMerge) thrashing on a busy 2-core machine (a 96x32 SVD: 1.2 s with 2 threads, 0.3 ms with 1).
torch.set_num_threads(1)

# Files whose tests train, kill and resume real runs in subprocesses (most of the suite's time): collected first
# so that under pytest-xdist (`--dist loadfile`, one file per worker at a time) they start at once on every
# worker instead of trailing on one while the others idle. The order within each file is kept.
SLOW_FILES = ("test_reproduce.py", "test_cli_ddp_resume.py", "test_cli_safety.py", "test_gpu_suite.py",
              "test_demo.py", "test_mini_cache_lock.py", "test_hub_online_errors.py")


def pytest_configure(config):
    # pytest-xdist's loadfile otherwise hands out files by their number of tests, most first, whatever the order
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


TINY_VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0}
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_EMBED = 16


class ListPool:
    """θ_0 and a list of task vectors behind the TaskVectorSource protocol (tasks named t0, t1, …)."""

    def __init__(self, pretrained, taus):
        self.pretrained, self.taus = pretrained, taus

    def pretrained_state(self):
        return dict(self.pretrained)

    def task_vectors(self, tasks=None):
        yield from ((f"t{i}", tau) for i, tau in enumerate(self.taus))


def make_tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """A 2-block ViT CLIP (16x16 images, patch 8) with open_clip's real classes."""
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=TINY_EMBED, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).eval()


def make_tiny_pool(num_tasks: int = 3, seed: int = 0, scale: float = 0.05) -> ModelPool:
    """Pool over a tiny CLIP's visual tower: experts are θ0 + seeded noise, heads random unit rows."""
    clip = make_tiny_clip(seed)
    base = clip.visual
    g = torch.Generator().manual_seed(seed + 1)
    experts, heads = {}, {}
    for k in range(num_tasks):
        task = f"task{k}"
        experts[task] = {
            n: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for n, v in base.state_dict().items()
        }
        heads[task] = F.normalize(torch.randn(3 + k, TINY_EMBED, generator=g), dim=-1)
    return ModelPool(base, experts, heads, logit_scale=100.0, name="tiny")


def quiet_trainer(tmp_path, **kwargs):
    """A CPU Lightning Trainer for tests: no logger, checkpoints, progress bar, summary or sanity check."""
    import lightning as L

    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
                "num_sanity_val_steps": 0}
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture
def tiny_pool():
    return make_tiny_pool()


@pytest.fixture(scope="session")
def mini_tiny_cache(tmp_path_factory):
    """Cache root holding one build of the mini benchmark's ``tiny`` preset (seed 0), shared by the session.
    Under pytest-xdist every worker points at one root next to the workers' own temp folders: the build's
    lock lets one worker build while the others wait, then reuse it (tests/test_mini_cache_lock.py)."""
    from adamerge.data.mini import MiniBenchmark

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "adamerge-cache"
    root.mkdir(exist_ok=True)
    MiniBenchmark("tiny", 0, cache_dir=str(root)).build()
    return root


# ---- the in-process pins of adamerge.models.hub (tests/test_pins_models_hub*.py; helpers in tests/hub_pins.py)
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, read offline; the cwd is tmp_path (no stray local paths)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # (belt and braces: a closed local port)
    monkeypatch.chdir(tmp_path)
    return cache


@pytest.fixture
def spy(monkeypatch):
    """Records every huggingface_hub.hf_hub_download call (repo_id, filename, revision, repo_type) and serves it
    from the cache as usual."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    calls: list[tuple] = []

    def download(**kw):
        calls.append((kw["repo_id"], kw["filename"], kw["revision"], kw["repo_type"]))
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


@pytest.fixture
def c_locale():
    """LC_CTYPE set to C (ASCII) for one test: a file read or written without ``encoding="utf-8"`` then fails on
    non-ASCII text (Python's UTF-8 mode, PYTHONUTF8=1, would hide that: the test then passes and proves less)."""
    import locale

    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
