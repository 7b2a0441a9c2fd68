"""adamerge.files: atomic files, atomic sets of files, sweeping temporaries, fingerprints."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from adamerge.files import (
    MANIFEST,
    atomic_dir,
    atomic_path,
    file_fingerprint,
    read_manifest,
    sha256_file,
    sweep_temporaries,
    write_text,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_replaces_whole_file_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = write_text(tmp_path / "a.txt", "old")
        with pytest.raises(RuntimeError), atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
        assert target.read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary left
        write_text(target, "new")
        assert target.read_text() == "new" and _mode(target) == 0o644
    finally:
        os.umask(old)


def _files(directory) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir()}


def test_atomic_dir_swaps_the_set_and_writes_a_verifiable_manifest(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "export"
        with atomic_dir(target, manifest={"run_id": "r1"}) as d:
            (d / "a.txt").write_text("1")
            (d / "b.txt").write_text("2")
        m = read_manifest(target)
        assert m["run_id"] == "r1"
        assert m["files"]["a.txt"]["sha256"] == sha256_file(target / "a.txt")
        assert _mode(target) == 0o755
        # the new set replaces the old one whole: b.txt of the old set does not survive
        with atomic_dir(target, manifest={"run_id": "r2"}) as d:
            (d / "a.txt").write_text("3")
        assert _files(target) == {"a.txt": "3", MANIFEST: (target / MANIFEST).read_text()}
        assert read_manifest(target)["run_id"] == "r2"
        # a failure half way leaves the old set as it was, and no temporary
        with pytest.raises(RuntimeError), atomic_dir(target) as d:
            (d / "a.txt").write_text("4")
            raise RuntimeError("killed")
        assert (target / "a.txt").read_text() == "3" and read_manifest(target)["run_id"] == "r2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    finally:
        os.umask(old)


def test_read_manifest_names_a_modified_file(tmp_path):
    with atomic_dir(tmp_path / "e") as d:
        (d / "w.bin").write_bytes(b"abc")
    (tmp_path / "e" / "w.bin").write_bytes(b"abd")
    with pytest.raises(ValueError, match=r"w.bin: does not match its sha256"):
        read_manifest(tmp_path / "e")


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "x").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"), atomic_dir(tmp_path / "x"):
        pass
    assert (tmp_path / "x").read_text() == "a file"


def test_sweep_removes_only_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    stale_dir = tmp_path / f".export.tmp-{dead_pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "merged.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".last.ckpt.tmp-{dead_pid}-89abcdef"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".export.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    user = tmp_path / ".export.tmp-notours"
    user.mkdir()
    removed = sweep_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_file.name])
    assert live.exists() and user.exists() and not stale_dir.exists() and not stale_file.exists()


def test_file_fingerprint_sees_headers_sampled_tensors_and_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(20)}
    save_file(state, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors")
    assert file_fingerprint(tmp_path / "a.safetensors") == file_fingerprint(tmp_path / "b.safetensors")
    changed = dict(state, w0=state["w0"].clone())
    changed["w0"][0, 0] += 1.0  # w0 is one of the sampled tensors (the first key)
    save_file(changed, tmp_path / "c.safetensors")
    assert file_fingerprint(tmp_path / "c.safetensors") != file_fingerprint(tmp_path / "a.safetensors")
    renamed = {("v" + k[1:] if k == "w5" else k): v for k, v in state.items()}
    save_file(renamed, tmp_path / "d.safetensors")  # same bytes, another key: the header differs
    assert file_fingerprint(tmp_path / "d.safetensors") != file_fingerprint(tmp_path / "a.safetensors")
    # other formats: size and spread windows; folders: every file
    (tmp_path / "x.pt").write_bytes(b"\0" * 300_000)
    (tmp_path / "y.pt").write_bytes(b"\0" * 150_000 + b"\1" + b"\0" * 149_999)
    assert file_fingerprint(tmp_path / "x.pt") != file_fingerprint(tmp_path / "y.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"a": 1}))
    before = file_fingerprint(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"a": 2}))
    assert file_fingerprint(tmp_path / "hf") != before
