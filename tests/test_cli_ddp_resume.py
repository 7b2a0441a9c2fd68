"""Distributed (DDP on CPU, gloo) and crash/resume behaviour of the real entry point, in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MINI_BASE = ROOT / "configs" / "mini" / "base.yaml"
CONFIG = ROOT / "configs" / "mini" / "adamerging_layer.yaml"  # layered on MINI_BASE: args[4] is the method config


def cli_args(tmp: Path, cache: Path, *extra: str, callbacks: str = "") -> list[str]:
    """``fit`` on the tiny mini benchmark, layer-wise AdaMerging, run folder ``tmp`` (so the export goes to
    ``tmp/export``)."""
    cfg = tmp / "callbacks.yaml"
    cfg.write_text("trainer:\n  callbacks:\n" + callbacks if callbacks else "trainer:\n  callbacks: []\n")
    return [
        "fit", "--config", str(MINI_BASE), "--config", str(CONFIG), "--config", str(cfg),
        "--data.init_args.source.init_args.preset=tiny", f"--data.init_args.source.init_args.cache_dir={cache}",
        "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4", "--data.init_args.steps_per_epoch=3",
        f"--trainer.default_root_dir={tmp}", *extra,  # the export goes to <run folder>/export
    ]


def _train(tmp: Path, cache: Path, *extra: str, callbacks: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "train.py"), *cli_args(tmp, cache, *extra, callbacks=callbacks)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def _dump(out: Path) -> str:
    return (f"    - class_path: probes.DumpLearned\n      init_args: {{out: {out}}}\n")


def _checkpoint(dirpath: Path) -> str:
    return ("    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {dirpath}, save_last: true, every_n_train_steps: 1, save_top_k: -1}}\n")


def test_ddp_two_cpu_ranks_end_with_identical_coefficients(tmp_path, mini_tiny_cache):
    out = tmp_path / "dump"
    r = _train(tmp_path, mini_tiny_cache, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3",
               callbacks=_dump(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(out / f"rank{i}.pt") for i in (0, 1)]
    assert all(d["world_size"] == 2 for d in ranks)
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() and len(s0) > 0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # and training did move the coefficients away from their 0.3 init
    assert any(not torch.allclose(v, torch.full_like(v, 0.3)) for v in s0.values())


def test_killed_run_resumed_from_last_checkpoint_matches_uninterrupted(tmp_path, mini_tiny_cache):
    full, crash = tmp_path / "full", tmp_path / "crash"
    full.mkdir(), crash.mkdir()
    r = _train(full, mini_tiny_cache, "--trainer.max_steps=6", callbacks=_dump(full / "dump"))
    assert r.returncode == 0, r.stderr[-3000:]
    # Dies (os._exit) at step 4, after step 3's checkpoint was written.
    r = _train(crash, mini_tiny_cache, "--trainer.max_steps=6",
               callbacks=_checkpoint(crash / "ckpt") + "    - class_path: probes.KillAtStep\n      init_args: {step: 4}\n")
    assert r.returncode == 137, r.stderr[-3000:]
    assert not (crash / "export").exists()
    last = crash / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the crash lost nothing before step 4
    r = _train(crash, mini_tiny_cache, "--trainer.max_steps=6", f"--ckpt_path={last}",
               callbacks=_dump(crash / "dump"))
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(full / "dump" / "rank0.pt")["state"]
    b = torch.load(crash / "dump" / "rank0.pt")["state"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k


def test_resume_from_another_task_list_fails_before_training(tmp_path, mini_tiny_cache):
    first = tmp_path / "a"
    first.mkdir()
    r = _train(first, mini_tiny_cache, "--trainer.max_steps=1", callbacks=_checkpoint(first / "ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    other = tmp_path / "b"
    other.mkdir()
    r = _train(other, mini_tiny_cache, "--trainer.max_steps=2", "--data.init_args.tasks=[mini_fashion,mini_digits]",
               f"--ckpt_path={first / 'ckpt' / 'last.ckpt'}", callbacks=_dump(other / "dump"))
    assert r.returncode == 2
    assert "adamerge: error: cannot resume: the checkpoint was made with tasks = [" in r.stderr
    assert "Traceback" not in r.stderr  # one line, not a traceback wall
    assert not (other / "dump").exists()
