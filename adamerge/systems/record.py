"""The run record: a Lightning Callback that puts ``metrics.json`` into a run's export set.

Every test-time system adds one :class:`RunRecord` through ``configure_callbacks`` when it exports,
so a run started from the CLI, the demo or a plain ``Trainer`` writes the same record. At the end of
``fit`` the system writes its export into a temporary folder (:meth:`TestTimeSystem.on_fit_end`) and
calls :meth:`RunRecord.on_export` on it, so the record joins the set that is swapped in whole, with
the model it describes. The record's format is :func:`adamerge.records.write_metrics`'; it holds the
last validation's per-task accuracy (``val/acc/<task>``), the method's label, the seed, the
benchmark, the split and the step the accuracy was measured at.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from adamerge.records import METRICS_FILE, write_metrics

__all__ = ["RunRecord"]


class RunRecord(Callback):
    """Write ``metrics.json`` (the results record) into the export set at the end of ``fit``.

    Args:
        seed: the seed written in the record; default Lightning's global seed (``seed_everything``,
            which the CLI's ``seed_everything`` sets), or none when no seed was set.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def record_seed(self) -> int | None:
        """The seed to record: the given one, else Lightning's global seed."""
        if self.seed is not None:
            return int(self.seed)
        seed = os.environ.get("PL_GLOBAL_SEED")
        return int(seed) if seed is not None else None

    def on_export(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: Path) -> Path | None:
        """Write ``directory/metrics.json`` from the system's last validation; nothing (and a warning)
        when no validation ran (``limit_val_batches=0``)."""
        tasks = list(pl_module.tasks)
        metrics = pl_module.last_metrics
        accuracy = {t: metrics[f"val/acc/{t}"] for t in tasks if f"val/acc/{t}" in metrics}
        name = type(pl_module).__name__
        if not accuracy:
            warnings.warn(f"{name}: no validation ran, so no {METRICS_FILE} in {directory}", stacklevel=2)
            return None
        step, measured = pl_module.progress_step, pl_module.last_metrics_step
        if measured != step:
            warnings.warn(f"{name}: the last validation ran at step {measured}, the exported model is from step "
                          f"{step}; {METRICS_FILE} records the former (make max_steps a multiple of the "
                          "validation interval)", stacklevel=2)
        split = getattr(trainer.datamodule, "eval_split", "test") if trainer.datamodule is not None else "test"
        return write_metrics(directory, pl_module.method_label, accuracy, seed=self.record_seed(),
                             benchmark=pl_module.pool.benchmark_id, split=split, steps=step,
                             evaluated_at_step=measured, logged=dict(metrics))
