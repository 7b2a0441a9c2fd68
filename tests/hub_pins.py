"""Helpers shared by the in-process pins of adamerge.models.hub (tests/test_pins_models_hub.py and
tests/test_pins_models_hub_fetch.py; their docstring says how the cache and the Hub are stood in for;
the fixtures ``hub`` and ``spy`` are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from hubcache import COMMIT, cache_repo

from adamerge.models.hub import HubError

V1 = "1111111111111111111111111111111111111111"  # the commit of tag v1
V2 = "2222222222222222222222222222222222222222"  # the commit of tag v2
HF_NONE = ("model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin")
OC_CONFIG = {"model_cfg": {"embed_dim": 16}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}


def _snap(cache: Path, repo: str, commit: str = COMMIT, repo_type: str = "model") -> str:
    return str(cache / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots" / commit)


def _offline_tail(cache: Path, hint: str) -> str:
    return (f"is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading it: fetch it "
            f"where there is network (`{hint}`) or unset HF_HUB_OFFLINE")


def _raises(fn, *args, **kwargs) -> HubError:
    with pytest.raises(HubError) as info:
        fn(*args, **kwargs)
    return info.value


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "http://127.0.0.1:9/x"))


def _two_revisions(hub: Path, repo: str = "org/name", repo_type: str = "model") -> None:
    """main → COMMIT (a.txt = b'main'), v1 → V1 (a.txt = b'v1'); refs also pr/1 (written last, sorted first
    after main)."""
    cache_repo(hub, repo, {"a.txt": b"main"}, repo_type=repo_type, refs=("main",))
    cache_repo(hub, repo, {"a.txt": b"v1", "b.txt": b"b"}, repo_type=repo_type, commit=V1, refs=("v1",))
    pr = hub / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / "pr"
    pr.mkdir()
    (pr / "1").write_text(V1)
