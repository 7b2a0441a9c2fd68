"""What a user sees when the Hub answers "no": a gated repository, an unknown or private one, a revision
or a file it does not have, for models and datasets.

A local HTTP server stands in for huggingface.co (``HF_ENDPOINT``): it answers huggingface_hub's requests
with the status codes and ``X-Error-Code`` headers the Hub sends, so huggingface_hub's own error handling
runs, online (``HF_HUB_OFFLINE`` unset), into an empty cache. Only the server is made up.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hubcache import ROOT

ANSWERS = {  # repository → (status, X-Error-Code) for every request about it
    "adamerge-test/gated": (403, "GatedRepo"),
    "adamerge-test/unknown": (401, "RepoNotFound"),
    "adamerge-test/no-such-file": (404, "EntryNotFound"),
    "adamerge-test/no-such-revision": (404, "RevisionNotFound"),
}


LISTED = "adamerge-test/listed"  # a repository the server lists (its API's repo_info with file sizes)
LISTED_FILES = {"config.json": 500, "model.safetensors": 350_000_000, "pytorch_model.bin": 350_001_000,
                "data/test-00000-of-00002.parquet": 40_000_000, "data/test-00001-of-00002.parquet": 30_000_000,
                "data/train-00000-of-00001.parquet": 900_000_000}


SEEN_TOKENS: list[str] = []  # the Authorization headers the server was sent


class _Hub(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        SEEN_TOKENS.append(self.headers.get("Authorization", ""))
        if self.path.startswith((f"/api/models/{LISTED}", f"/api/datasets/{LISTED}")):
            siblings = [{"rfilename": f, "size": n} for f, n in LISTED_FILES.items()]
            body = json.dumps({"id": LISTED, "sha": "1" * 40, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        repo = next((r for r in ANSWERS if f"/{r}/" in self.path or self.path.endswith(f"/{r}")), None)
        status, code = ANSWERS.get(repo, (404, "RepoNotFound"))
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _online_env(endpoint: str, home: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        env.pop(key, None)
    return env


def test_the_dry_run_online_lists_what_would_be_downloaded_with_the_hub_s_sizes(endpoint, tmp_path):
    args = ["--tasks", "mnist,eurosat", "--arch", "ViT-B-32-quickgelu", "--pretrained", LISTED, "--experts", LISTED,
            "--dataset", f"mnist={LISTED}", "--out", str(tmp_path / "out"), "--dry-run"]
    r = subprocess.run([sys.executable, "-m", "adamerge.reproduce", *args], env=_online_env(endpoint, tmp_path),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    # config.json and model.safetensors (not the .bin: safetensors first), from the Hub's listing
    assert f"  pretrained: {LISTED} — 2 files, 350.0 MB (download 350.0 MB; listing from the Hub)" in lines
    assert sum(line.startswith("  expert ") and "2 files, 350.0 MB (download" in line for line in lines) == 2
    assert f"  dataset mnist (test split): {LISTED} — 2 files, 70.0 MB (download 70.0 MB; listing from the Hub)" \
        in lines  # both test shards, not the train shard
    eurosat = next(line for line in lines if line.startswith("  dataset eurosat"))
    assert "tanganke/eurosat" in eurosat and "no such dataset repository on the Hub" in eurosat
    assert "In all: 1.1 GB to download, 0 B already cached." in lines


def test_gated_unknown_and_missing_repositories_files_and_revisions_name_the_id_and_what_to_do(endpoint, tmp_path):
    body = textwrap.dedent("""
        from adamerge.models.hub import HubError, resolve_checkpoint, hub_snapshot
        from adamerge.models.open_clip_pool import load_clip

        def attempt(fn):
            try:
                fn()
                return "no error"
            except HubError as e:
                return str(e)

        out["gated"] = attempt(lambda: resolve_checkpoint("adamerge-test/gated", label="expert for task 'mnist'"))
        out["unknown"] = attempt(lambda: resolve_checkpoint("adamerge-test/unknown"))
        out["revision"] = attempt(lambda: resolve_checkpoint("adamerge-test/no-such-revision@v9"))
        out["hf_hub_file"] = attempt(lambda: load_clip("hf-hub:adamerge-test/no-such-file", None))
        out["dataset"] = attempt(lambda: hub_snapshot("adamerge-test/gated", repo_type="dataset",
                                                      label="task 'mnist': dataset adamerge-test/gated"))
    """)
    script = "import json\nout = {}\n" + body + "\nprint('RESULT' + json.dumps(out))\n"
    SEEN_TOKENS.clear()
    env = {**_online_env(endpoint, tmp_path), "HF_TOKEN": "hf_adamergetesttoken"}  # a token from the environment
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert out["gated"].startswith("expert for task 'mnist': the repository is gated: accept its terms at "
                                   "https://huggingface.co/adamerge-test/gated and set HF_TOKEN")
    assert out["unknown"].startswith("adamerge-test/unknown: no such repository on the Hub, or it is private (set "
                                     "HF_TOKEN")
    assert out["revision"] == ("adamerge-test/no-such-revision@v9: the repository has no revision 'v9': name one of "
                              "its branches, tags or commits")
    assert out["hf_hub_file"] == ("hf-hub:adamerge-test/no-such-file: the repository has no open_clip_config.json: "
                                  "not an open_clip repository (an HF CLIPModel repository such as "
                                  "openai/clip-vit-base-patch32 goes by its id alone, without hf-hub:, as pretrained)")
    assert out["dataset"].startswith("task 'mnist': dataset adamerge-test/gated: the dataset repository is gated: "
                                     "accept its terms at https://huggingface.co/datasets/adamerge-test/gated")
    assert not any(Path(tmp_path, "hub").glob("*/blobs/*"))  # nothing half-downloaded
    assert SEEN_TOKENS and set(SEEN_TOKENS) == {"Bearer hf_adamergetesttoken"}  # sent with every request


def test_an_open_clip_tag_goes_through_the_hugging_face_cache(tmp_path):
    """open_clip's tags (``openai``) live in Hub repos (``timm/vit_base_patch32_clip_224.openai``): offline and
    not cached the error names the tag, the repository and what to do; a cached tag loads from the cache."""
    import open_clip
    import torch
    from hubcache import TINY_CFG, cache_repo, run_offline
    from safetensors.torch import save

    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "tiny.json")
    torch.manual_seed(3)
    clip = open_clip.create_model("tiny")
    weights = save({k: v.contiguous() for k, v in clip.state_dict().items()})
    cache_repo(tmp_path / "hub", "adamerge-test/tiny-tag", {"open_clip_model.safetensors": weights})
    out = run_offline(tmp_path, f"""
        import open_clip, torch
        from adamerge.models.hub import HubError
        from adamerge.models.open_clip_pool import load_clip

        try:
            load_clip("ViT-B-32-quickgelu", "openai")
        except HubError as e:
            out["missing"] = str(e)
        open_clip.add_model_config({str(tmp_path / "tiny.json")!r})
        open_clip.pretrained._PRETRAINED["tiny"] = {{"testtag": open_clip.pretrained._pcfg(
            hf_hub="adamerge-test/tiny-tag/", quick_gelu=True)}}
        clip, _, identity = load_clip("tiny", "testtag")
        out["sum"] = sum(float(v.double().sum()) for v in clip.state_dict().values() if v.is_floating_point())
    """)
    assert out["missing"].startswith("ViT-B-32-quickgelu pretrained='openai' (open_clip keeps it at "
                                     "hf-hub:timm/vit_base_patch32_clip_224.openai): ")
    assert "HF_HUB_OFFLINE=1" in out["missing"] and "`hf download timm/vit_base_patch32_clip_224.openai`" in out["missing"]
    want = sum(float(v.double().sum()) for v in clip.state_dict().values() if v.is_floating_point())
    assert out["sum"] == pytest.approx(want, rel=1e-9)
