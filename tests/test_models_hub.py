"""open_clip models by Hub id, read from a Hugging Face cache laid out on disk in huggingface_hub's real
format (``models--org--name/{refs,blobs,snapshots}``), with ``HF_HUB_OFFLINE=1``.

huggingface_hub reads ``HF_HOME`` / ``HF_HUB_OFFLINE`` when it is imported, so each check runs in a fresh
interpreter with that environment, as a user's run would; nothing of the loading is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
CFG = {"embed_dim": 16, "quick_gelu": True,
       "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hub: Path, repo: str, files: dict[str, bytes]) -> None:
    """One repo in huggingface_hub's cache layout: blobs by hash, a snapshot of links, refs/main."""
    base = hub / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    (home / "tiny.json").write_text(json.dumps(CFG))
    open_clip.add_model_config(home / "tiny.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny")
    weights = home / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)
    config = json.dumps({"model_cfg": CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    _cache_repo(home / "hub", "adamerge-test/tiny-clip",
                {"open_clip_config.json": config.encode(), "open_clip_model.safetensors": weights.read_bytes()})
    _cache_repo(home / "hub", "adamerge-test/no-weights", {"open_clip_config.json": config.encode()})
    expert = home / "expert.safetensors"
    save_file({k: (v + 0.01).contiguous() for k, v in clip.visual.state_dict().items()}, expert)
    return home, clip, expert


def _run(home: Path, body: str) -> dict:
    """Run ``body`` (which sets ``out``) in a fresh interpreter with HF_HOME=home and HF_HUB_OFFLINE=1."""
    script = "import json\nout = {}\n" + textwrap.dedent(body) + "\nprint('RESULT' + json.dumps(out))\n"
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


def test_a_pool_and_a_preprocess_from_an_hf_hub_id_in_the_offline_cache(hub_cache):
    home, clip, expert = hub_cache
    out = _run(home, f"""
        import torch
        from adamerge.data.imagefolder import open_clip_preprocess
        from adamerge.data.registry import get_task, register_task
        from adamerge.models.open_clip_pool import OpenCLIPPool

        register_task("hub_digits", ["zero", "one"], ["a photo of {{}}."])
        pool = OpenCLIPPool("hf-hub:adamerge-test/tiny-clip", None, {{"hub_digits": {str(expert)!r}}},
                            task_info=get_task)
        out["name"], out["quick_gelu"] = pool.name, pool.model_config.get("quick_gelu")
        out["visual"] = {{k: v.double().sum().item() for k, v in pool.pretrained_state().items()}}
        tau = dict(pool.task_vectors())["hub_digits"]
        out["tau"] = sorted({{round(float(v.mean()), 4) for v in tau.values()}})
        out["size"] = list(open_clip_preprocess("hf-hub:adamerge-test/tiny-clip")(
            __import__("PIL.Image").Image.new("RGB", (40, 30))).shape)
    """)
    assert out["name"] == "hf-hub:adamerge-test/tiny-clip" and out["quick_gelu"] is True
    want = {k: v.double().sum().item() for k, v in clip.visual.state_dict().items()}
    assert out["visual"].keys() == want.keys()
    assert all(abs(out["visual"][k] - want[k]) < 1e-6 * max(1.0, abs(want[k])) for k in want)  # the cached weights
    assert out["tau"] == [0.01]  # the expert is θ_0 + 0.01 everywhere
    assert out["size"] == [3, 16, 16]  # the repo's image size


def test_each_way_a_hub_id_can_fail_names_the_id_and_what_to_do(hub_cache):
    home, _, _ = hub_cache
    out = _run(home, """
        from adamerge.models.hub import HubError
        from adamerge.models.open_clip_pool import load_clip

        cases = {"not_cached": ("hf-hub:adamerge-test/elsewhere", None), "no_weights": ("hf-hub:adamerge-test/no-weights", None),
                 "bad_id": ("hf-hub:nope", None), "both": ("hf-hub:adamerge-test/tiny-clip", "openai")}
        for case, (name, pretrained) in cases.items():
            try:
                load_clip(name, pretrained)
                out[case] = "loaded"
            except (HubError, ValueError) as e:
                out[case] = f"{type(e).__name__}: {e}"
    """)
    assert out["not_cached"].startswith("HubError: hf-hub:adamerge-test/elsewhere: open_clip_config.json is not in the "
                                        "Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in out["not_cached"] and "`hf download adamerge-test/elsewhere`" in out["not_cached"]
    assert out["not_cached"].count(str(home / "hub")) == 1  # where it looked
    assert out["no_weights"].startswith("HubError: hf-hub:adamerge-test/no-weights: no open_clip weights "
                                        "(open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    assert out["bad_id"] == "HubError: 'hf-hub:nope': a Hub id is hf-hub:<org>/<name>"
    assert out["both"].startswith("ValueError: pretrained='openai' with model_name='hf-hub:adamerge-test/tiny-clip'")
