"""Where builds live and how a cache entry is checked: a manifest with the sha256 of every file.

Layout of an entry ``<root>/mini/seed<seed>-<key12>/`` (the key hashes config, sources and seed)::

    manifest.json            config, source hashes, sha256 of every file, metrics, build time
    <model_name>.json        the open_clip model config (``open_clip.add_model_config``)
    pretrained.safetensors   the full pretrained CLIP state dict
    experts/<task>.safetensors   each expert's vision-tower state dict

``root`` is ``$ADAMERGE_CACHE``, else ``$XDG_CACHE_HOME/adamerge``, else ``~/.cache/adamerge``.
An entry is written in a temporary folder and moved into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["cache_root", "sha256_file", "verify_entry", "write_manifest", "MANIFEST"]

MANIFEST = "manifest.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADAMERGE_CACHE"):
        return Path(os.environ["ADAMERGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adamerge"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(entry: Path, manifest: dict, files: list[str]) -> dict:
    """Hash ``files`` (relative to ``entry``) into ``manifest['files']`` and write manifest.json."""
    manifest = dict(manifest, files={f: sha256_file(entry / f) for f in sorted(files)})
    text = json.dumps(manifest, indent=2, sort_keys=True)
    tmp = entry / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, entry / MANIFEST)
    return json.loads(text)  # what a reload will see (tuples become lists)


def verify_entry(entry: Path, key: str, required: list[str]) -> tuple[dict | None, str]:
    """(manifest, "") if ``entry`` is complete and intact for ``key``, else (None, why not)."""
    path = entry / MANIFEST
    if not path.is_file():
        return None, "no manifest"
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"manifest {path} is not valid JSON ({e})"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None, f"manifest {path} was written for another configuration"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None, f"manifest {path} lists no files"
    for rel in required:
        if rel not in files:
            return None, f"manifest {path} does not list {rel}"
    for rel, digest in files.items():
        f = entry / rel
        if not f.is_file():
            return None, f"file {f} is missing"
        if sha256_file(f) != digest:
            return None, f"file {f} does not match its sha256 in the manifest (corrupt or modified)"
    return manifest, ""
