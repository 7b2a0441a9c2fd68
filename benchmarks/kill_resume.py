"""Kill runs at controlled points and count what survives (issue #10's kill/resume figures).

Each trial, on the tiny mini benchmark through the real entry point (``train.py``, subprocesses):

* **mid-export**: a finished run's export, then a second run (``--overwrite=true``) SIGKILLed after
  its model files and before ``metrics.json``; counted: the first export's sha256 manifest still
  verifies, one temporary is left, the next start sweeps it and lands a new verified export.
* **mid-checkpoint**: a run SIGKILLed half way through writing its ``call``-th checkpoint file (call
  drawn per trial); counted: ``last.ckpt`` still loads with ``weights_only=True``, the resumed run
  sweeps the temporary, and its final learned coefficients equal an uninterrupted run's bit for bit.

    python benchmarks/kill_resume.py --trials 5 --out benchmarks/results/kill_resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MINI_BASE = ROOT / "configs" / "mini" / "base.yaml"
CONFIG = ROOT / "configs" / "mini" / "adamerging_layer.yaml"


def _run(run: Path, cache: Path, *extra: str, callbacks: str = "") -> int:
    cfg = run / "callbacks.yaml"
    run.mkdir(parents=True, exist_ok=True)
    cfg.write_text("trainer:\n  callbacks:\n" + callbacks if callbacks else "trainer:\n  callbacks: []\n")
    args = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(MINI_BASE), "--config", str(CONFIG), "--config", str(cfg),
            "--data.init_args.source.init_args.preset=tiny", f"--data.init_args.source.init_args.cache_dir={cache}",
            "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4",
            "--data.init_args.steps_per_epoch=3", f"--trainer.default_root_dir={run}",
            f"--model.init_args.export_dir={run / 'export'}", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=run, env=env, capture_output=True, text=True, check=False).returncode


def _temporaries(folder: Path) -> int:
    return sum(".tmp-" in p.name for p in folder.iterdir()) if folder.is_dir() else 0


def _manifest_ok(folder: Path) -> dict | None:
    from adamerge.files import read_manifest

    try:
        return read_manifest(folder)
    except ValueError:
        return None


def export_trial(root: Path, cache: Path) -> dict:
    first = _run(root, cache, "--trainer.max_steps=1")
    before = _manifest_ok(root / "export")
    killed = _run(root, cache, "--trainer.max_steps=2", "--overwrite=true",
                  callbacks="    - class_path: probes.KillInExport\n")
    after_kill = _manifest_ok(root / "export")
    left = _temporaries(root)
    rerun = _run(root, cache, "--trainer.max_steps=2", "--overwrite=true")
    final = _manifest_ok(root / "export")
    return {"first_rc": first, "killed_rc": killed, "old_set_intact": before is not None and after_kill == before,
            "temporaries_after_kill": left, "temporaries_after_next_start": _temporaries(root),
            "new_set_verified": rerun == 0 and final is not None and final.get("step") == 2}


def _ckpt_cb(dirpath: Path) -> str:
    return ("    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {dirpath}, save_last: true, every_n_train_steps: 1, save_top_k: -1}}\n")


def _dump_cb(out: Path) -> str:
    return f"    - class_path: probes.DumpLearned\n      init_args: {{out: {out}}}\n"


def checkpoint_trial(root: Path, cache: Path, call: int, reference: dict) -> dict:
    ckpt = root / "ckpt"
    kill = f"    - class_path: probes.KillInCheckpointSave\n      init_args: {{call: {call}}}\n"
    killed = _run(root, cache, "--trainer.max_steps=6", callbacks=_ckpt_cb(ckpt) + kill)
    try:
        step = torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"]
    except Exception:  # noqa: BLE001 - a figure, not a failure
        step = None
    left = _temporaries(ckpt)
    resumed = _run(root, cache, "--trainer.max_steps=6", f"--ckpt_path={ckpt / 'last.ckpt'}",
                   callbacks=_ckpt_cb(ckpt) + _dump_cb(root / "dump"))
    same = False
    if resumed == 0:
        state = torch.load(root / "dump" / "rank0.pt")["state"]
        same = state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    return {"kill_at_save": call, "killed_rc": killed, "last_ckpt_loads": step is not None, "last_ckpt_step": step,
            "temporaries_after_kill": left, "temporaries_after_resume": _temporaries(ckpt),
            "resumed_rc": resumed, "bitwise_equal_to_uninterrupted": same}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from adamerge.data.mini import MiniBenchmark

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        MiniBenchmark("tiny", 0, cache_dir=str(cache), progress=False).build()
        ref = tmp / "reference"
        assert _run(ref, cache, "--trainer.max_steps=6", callbacks=_dump_cb(ref / "dump")) == 0
        reference = torch.load(ref / "dump" / "rank0.pt")["state"]
        t0 = time.time()
        exports = [export_trial(tmp / f"export{i}", cache) for i in range(args.trials)]
        # saves per step: epoch=..-step=N.ckpt then last.ckpt: calls 3..12 hit steps 2..6 (a good last.ckpt exists)
        ckpts = [checkpoint_trial(tmp / f"ckpt{i}", cache, rng.randint(3, 12), reference) for i in range(args.trials)]
    summary = {
        "trials": args.trials,
        "export_old_set_intact": sum(t["old_set_intact"] for t in exports),
        "export_swept_and_replaced": sum(t["temporaries_after_next_start"] == 0 and t["new_set_verified"]
                                         for t in exports),
        "checkpoint_last_loads": sum(t["last_ckpt_loads"] for t in ckpts),
        "checkpoint_resume_bitwise_equal": sum(t["bitwise_equal_to_uninterrupted"] for t in ckpts),
        "checkpoint_swept": sum(t["temporaries_after_resume"] == 0 for t in ckpts),
        "seconds": round(time.time() - t0, 1),
    }
    record = {"summary": summary, "export_trials": exports, "checkpoint_trials": ckpts}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        from adamerge.files import write_text

        write_text(args.out, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
