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
