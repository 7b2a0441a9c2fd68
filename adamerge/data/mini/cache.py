"""Where builds live, how a cache entry is checked, locked while it is built, and read back safely.

Layout of an entry ``<root>/mini/seed<seed>-<key12>/`` (the key hashes config, sources and seed)::

    manifest.json            config, source hashes, sha256 and size of every file, metrics, build time
    <model_name>.json        the open_clip model config (``open_clip.add_model_config``)
    pretrained.safetensors   the full pretrained CLIP state dict
    experts/<task>.safetensors   each expert's vision-tower state dict

``root`` is ``$ADAMERGE_CACHE``, else ``$XDG_CACHE_HOME/adamerge``, else ``~/.cache/adamerge``.
An entry is written as one set with :func:`adamerge.files.atomic_dir` (its ``manifest.json`` lists
``files: {rel: {"sha256", "bytes"}}``), and only while holding :func:`entry_lock`, a file lock
``<entry>.lock`` next to it; checking an entry takes the same lock, so no process reads one that
another is replacing. Every later load checks the file against the manifest again
(:func:`read_checked`, :class:`CheckedSafetensors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from safetensors.torch import load as load_safetensors
from torch import Tensor

from adamerge.files import MANIFEST, sha256_file

__all__ = [
    "MANIFEST",
    "CacheEntryError",
    "CheckedSafetensors",
    "cache_root",
    "check_file",
    "entry_lock",
    "file_digest",
    "read_checked",
    "sha256_file",
    "verify_entry",
]

log = logging.getLogger(__name__)


class CacheEntryError(RuntimeError):
    """A file of a cache entry is missing or no longer matches its manifest; the message says how to rebuild."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADAMERGE_CACHE"):
        return Path(os.environ["ADAMERGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adamerge"


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold the inter-process lock ``<entry>.lock`` (next to ``entry``) for checking or (re)building it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(entry.parent / f"{entry.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another process is building %s", lock.lock_file, entry)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def file_digest(manifest: dict, rel: str) -> str | None:
    """The sha256 the manifest lists for ``rel`` (``{"sha256": ...}``; a plain string in older manifests)."""
    info = manifest.get("files", {}).get(rel)
    return info.get("sha256") if isinstance(info, dict) else info


def _load_manifest(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, "no manifest"
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"manifest {path} is not valid JSON ({e})"
    except OSError as e:
        return None, f"manifest {path} could not be read ({e})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"manifest {path} lists no files"
    return manifest, ""


def verify_entry(entry: Path, key: str, required: list[str]) -> tuple[dict | None, str]:
    """(manifest, "") if ``entry`` is complete and intact for ``key``, else (None, why not).

    Call it under :func:`entry_lock`; without the lock a concurrent replace shows up as "invalid".
    """
    path = entry / MANIFEST
    manifest, why = _load_manifest(path)
    if manifest is None:
        return None, why
    if manifest.get("key") != key:
        return None, f"manifest {path} was written for another configuration"
    for rel in required:
        if rel not in manifest["files"]:
            return None, f"manifest {path} does not list {rel}"
    for rel in manifest["files"]:
        f, digest = entry / rel, file_digest(manifest, rel)
        if not isinstance(digest, str):
            return None, f"manifest {path} gives no sha256 for {rel}"
        try:
            if sha256_file(f) != digest:
                return None, f"file {f} does not match its sha256 in the manifest (corrupt or modified)"
        except FileNotFoundError:
            return None, f"file {f} is missing"
        except OSError as e:
            return None, f"file {f} could not be read ({e})"
    return manifest, ""


def _changed(path: Path, hint: str) -> CacheEntryError:
    return CacheEntryError(f"{path} changed after its cache entry was verified (its sha256 no longer matches "
                           f"the manifest); {hint}")


def read_checked(path: Path, digest: str, hint: str) -> bytes:
    """The bytes of ``path``, refused unless their sha256 is ``digest`` (the bytes checked are those returned)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheEntryError(f"{path} is missing from its cache entry; {hint}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _changed(path, hint)
    return data


def check_file(path: Path, digest: str, hint: str) -> Path:
    """``path``, after checking its sha256 is ``digest``; for files another library opens by path."""
    try:
        ok = sha256_file(path) == digest
    except FileNotFoundError:
        raise CacheEntryError(f"{path} is missing from its cache entry; {hint}") from None
    if not ok:
        raise _changed(path, hint)
    return Path(path)


class CheckedSafetensors:
    """A zero-argument loader of one safetensors file, checked against its manifest sha256 on every call.

    Args:
        path: the file.
        sha256: its digest in the cache entry's manifest.
        hint: what to do when it does not match (how to rebuild), appended to the error.
    """

    def __init__(self, path: str | os.PathLike, sha256: str, hint: str = "rebuild the cache entry") -> None:
        self.path, self.sha256, self.hint = Path(path), sha256, hint

    def __call__(self) -> dict[str, Tensor]:
        return load_safetensors(read_checked(self.path, self.sha256, self.hint))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, sha256={self.sha256[:12]!r})"
