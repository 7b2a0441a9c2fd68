"""Callbacks the CLI tests inject into runs in subprocesses (this folder is put on PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


class DumpLearned(L.Callback):
    """At the end of fit every rank saves its learnable state to ``out/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.learnable_state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size}, self.out / f"rank{trainer.global_rank}.pt")


class KillAtStep(L.Callback):
    """Simulates a crash: the process dies (no clean-up) when training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(137)


class KillInExport(L.Callback):
    """Dies half way through the export: after the model files, inside the export set (a SIGKILL, no clean-up)."""

    def on_export(self, trainer, pl_module, directory) -> None:
        import signal

        assert any(Path(directory).iterdir()), "expected export files written before the kill"
        os.kill(os.getpid(), signal.SIGKILL)


class KillInCheckpointSave(L.Callback):
    """The ``call``-th ``torch.save`` writes half its bytes and the process is SIGKILLed (a crash mid-checkpoint)."""

    def __init__(self, call: int) -> None:
        self.call = call

    def setup(self, trainer, pl_module, stage) -> None:
        import io
        import signal

        original, count = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == self.call:
                buf = io.BytesIO()
                original(obj, buf)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(obj, f, *args, **kwargs)

        torch.save = save
