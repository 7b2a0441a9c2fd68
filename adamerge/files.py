"""Every file adamerge writes goes through here: atomic files, atomic sets of files, and hashes.

* :func:`atomic_path` — a temporary file next to the target, fsynced, given the usual umask
  permissions and ``os.replace``-d over the target: a reader sees the old file or the new one, a
  crash leaves no half file.
* :func:`atomic_dir` — a *set* of files written into a temporary folder next to the target, a
  ``manifest.json`` with the sha256 of every file added, then swapped with the target in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames). A reader sees the whole old set or
  the whole new one.
* :func:`sweep_temporaries` — removes temporaries a killed process left behind (their names carry
  the writer's pid; only those of dead processes are removed).
* :func:`sha256_file`, :func:`file_fingerprint` — full and cheap content hashes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MANIFEST",
    "atomic_dir",
    "atomic_path",
    "file_fingerprint",
    "read_manifest",
    "sha256_file",
    "sweep_temporaries",
    "write_text",
]

MANIFEST = "manifest.json"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- sets of files ---------------------------------------------------------------------------------
def _libc_renameat2():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system can't."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def _install(tmp: Path, target: Path) -> None:
    """Put the folder ``tmp`` at ``target``, replacing any folder there as a whole."""
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # tmp now holds the old set
    else:
        old = _tmp_name(target)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def _manifest(directory: Path, extra: dict | None) -> dict:
    files = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    return {
        **(extra or {}),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {f: {"sha256": sha256_file(directory / f), "bytes": (directory / f).stat().st_size} for f in files},
    }


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, manifest: dict | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path`` as one set.

    A ``manifest.json`` (``manifest`` plus the sha256 and size of every file) is written last. On
    error (or a kill) the target is untouched; the temporary is removed, or swept at the next start.
    A file (not a folder) at ``path`` is refused.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder: refusing to replace it with a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        write_text(tmp / MANIFEST, json.dumps(_manifest(tmp, manifest), indent=2) + "\n")
        mode = 0o777 & ~_umask()
        for p in [tmp, *tmp.rglob("*")]:
            if p.is_dir():
                os.chmod(p, mode)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict | None:
    """The manifest of a set written by :func:`atomic_dir` (None when there is none).

    With ``verify``, every listed file is hashed and a :class:`ValueError` names the first that is
    missing or differs.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path}: not an adamerge manifest (no 'files' table)")  # noqa: TRY004 (bad file content)
    if verify:
        for rel, info in data["files"].items():
            f = Path(directory) / rel
            if not f.is_file():
                raise ValueError(f"{f}: listed in {path} but missing")
            if sha256_file(f) != info.get("sha256"):
                raise ValueError(f"{f}: does not match its sha256 in {path}")
    return data


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or folders) that dead processes left in ``folder``; return them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


# ---- cheap fingerprints ----------------------------------------------------------------------------
_SAMPLES, _SAMPLE_BYTES = 8, 1 << 16


def _safetensors_fingerprint(f, size: int, h) -> None:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise ValueError("header length beyond the end of the file")
    header = f.read(n)
    h.update(header)
    entries = sorted((k, v) for k, v in json.loads(header).items() if k != "__metadata__")
    if not entries:
        return
    picks = {entries[round(i * (len(entries) - 1) / max(_SAMPLES - 1, 1))][0] for i in range(_SAMPLES)}
    for key, info in entries:
        if key in picks:
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            h.update(f.read(min(end - start, _SAMPLE_BYTES)))


def _bytes_fingerprint(f, size: int, h) -> None:
    for i in range(_SAMPLES):
        f.seek(max(0, (size - _SAMPLE_BYTES) * i // max(_SAMPLES - 1, 1)))
        h.update(f.read(_SAMPLE_BYTES))


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content hash of a checkpoint file or folder: size, plus for safetensors the header and
    the first 64 KiB of 8 tensors spread over the keys, for other files 8 spread 64 KiB windows.

    It reads about half a megabyte per file, whatever the file's size; two files that differ in
    their header, size or the sampled bytes get different fingerprints.
    """
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        size = q.stat().st_size
        h.update(f"{q.relative_to(p).as_posix() if p.is_dir() else ''}\0{size}\0".encode())
        with open(q, "rb") as f:
            if q.suffix == ".safetensors" and size >= 8:
                try:
                    _safetensors_fingerprint(f, size, h)
                    continue
                except (ValueError, KeyError, TypeError, struct.error):
                    f.seek(0)
            _bytes_fingerprint(f, size, h)
    return h.hexdigest()[:16]
