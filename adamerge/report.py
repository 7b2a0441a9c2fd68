"""What a run produced, printed at its end: per-task accuracy and the paths it wrote.

:class:`RunReport` is a Lightning callback (the CLI adds it to every trainer). When ``fit``,
``validate`` or ``test`` completes, rank 0 prints to stdout

* one row per task: its accuracy (``<split>/acc/<task>`` of the system's ``last_metrics``: the
  last validation for ``fit``/``validate``, the test for ``test``), and, when the pool records its
  experts' accuracy on the same split, the expert's and the normalized accuracy
  ``acc_k(merged) / acc_k(expert k)`` (arXiv 2305.12827); then the average;
* the paths written: ``export_dir`` and its files, checkpoints, the saved config, the log folders.

It prints from ``teardown``, which Lightning calls after the LightningModule's ``on_fit_end`` (where
the export is written), so the export it lists is complete. A run that failed prints nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from lightning.pytorch.callbacks import Callback

__all__ = ["RunReport", "accuracy_table", "expert_accuracy"]

_STAGES = {"fit": "val", "validate": "val", "test": "test"}


def expert_accuracy(pool: Any, split: str) -> dict[str, float] | None:
    """Task → accuracy of that task's expert on ``split``, when the pool records it, else None.

    Accuracies are fractions in [0, 1], like the system's metrics. The built-in mini benchmark
    records each expert's test accuracy, in percent, when it is built (its manifest's
    ``metrics["expert"]``). Other pools record none: their normalized accuracy needs the experts
    evaluated on the same split (:func:`adamerge.evaluation.evaluate_experts`).
    """
    manifest = getattr(getattr(pool, "benchmark", None), "manifest", None)
    if split != "test" or not isinstance(manifest, Mapping):
        return None
    expert = manifest.get("metrics", {}).get("expert")
    if not isinstance(expert, Mapping):
        return None
    return {str(t): float(a) / 100.0 for t, a in expert.items()}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def accuracy_table(
    tasks: Sequence[str], accuracy: Mapping[str, float], average: float | None = None,
    expert: Mapping[str, float] | None = None,
) -> str:
    """A plain-text table: one row per task (accuracy %, and expert % / normalized % when ``expert``
    is given), then the average row (``average``, default the mean of the tasks' accuracies)."""
    rows: list[list[str]] = []
    normalized: dict[str, float] = {}
    for task in tasks:
        acc = accuracy.get(task)
        row = [task, _percent(acc)]
        if expert is not None:
            exp = expert.get(task)
            if acc is not None and exp:
                normalized[task] = acc / exp
            row += [_percent(exp), _percent(normalized.get(task))]
        rows.append(row)
    known = [accuracy[t] for t in tasks if t in accuracy]
    if average is None and known:
        average = sum(known) / len(known)
    footer = ["average", _percent(average)]
    if expert is not None:
        experts = [expert[t] for t in tasks if t in expert]
        footer += [_percent(sum(experts) / len(experts) if experts else None),
                   _percent(sum(normalized.values()) / len(normalized) if normalized else None)]
    header = ["task", "accuracy %"] + (["expert %", "normalized %"] if expert is not None else [])
    widths = [max(len(r[i]) for r in [header, *rows, footer]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows), rule, line(footer)])


def _show(path: str) -> str:
    """An absolute local path; a URL (``s3://...``) as it is."""
    return str(path) if "://" in str(path) else os.path.abspath(path)


def _checkpoints(trainer: Any) -> list[str]:
    paths: list[str] = []
    for cb in trainer.checkpoint_callbacks:
        found = [*getattr(cb, "best_k_models", {}), getattr(cb, "best_model_path", ""),
                 getattr(cb, "last_model_path", "")]
        paths += [p for p in found if p and p not in paths and os.path.isfile(p)]
    return sorted(paths)


def _log_dirs(trainer: Any) -> list[str]:
    """Each logger's folder, read from the logger itself (``trainer.log_dir`` is a collective call,
    and only rank 0 prints)."""
    dirs = []
    for logger in trainer.loggers:
        path = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if path and str(path) not in dirs:
            dirs.append(str(path))
    return dirs


class RunReport(Callback):
    """Print per-task accuracy and the paths a run wrote when ``fit``/``validate``/``test`` ends.

    Reads the system's ``last_metrics`` (``{"val/acc/<task>": float, "val/acc/avg": float, ...}``),
    ``tasks``, ``pool`` and ``export_dir``; the datamodule's ``eval_split``; the trainer's checkpoint
    callbacks and loggers; and ``config_path`` of any callback that saved the run's configuration.

    Args:
        stream: where to print (default ``sys.stdout`` at the time of printing).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        if stage in _STAGES and trainer.is_global_zero:
            print(self.report(trainer, pl_module, stage), file=self.stream or sys.stdout, flush=True)

    def report(self, trainer: Any, pl_module: Any, stage: str) -> str:
        """The report's text for ``stage`` (``fit``, ``validate`` or ``test``)."""
        split = getattr(getattr(trainer, "datamodule", None), "eval_split", None)
        label = getattr(pl_module, "method_label", None) or type(pl_module).__name__
        step = getattr(pl_module, "progress_step", trainer.global_step) if stage == "fit" else trainer.global_step
        lines = [f"adamerge {stage}: {label}, step {step}"]
        lines += self._accuracy(pl_module, _STAGES[stage], split, stage)
        lines += ["", "written:"] + self._paths(trainer, pl_module, stage)
        return "\n".join(lines)

    @staticmethod
    def _accuracy(pl_module: Any, prefix: str, split: str | None, stage: str) -> list[str]:
        metrics = getattr(pl_module, "last_metrics", None) or {}
        tasks = list(getattr(pl_module, "tasks", None) or [])
        accuracy = {t: float(metrics[f"{prefix}/acc/{t}"]) for t in tasks if f"{prefix}/acc/{t}" in metrics}
        if not accuracy:
            return ["", f"no {'validation' if prefix == 'val' else 'test'} batch ran, so no accuracy to report"]
        title = f"accuracy on the {split} split" if split else "accuracy"
        step = getattr(pl_module, "last_metrics_step", None)
        if stage == "fit" and step is not None:
            title += f", validated at step {step}"
        pool = getattr(pl_module, "pool", None)
        expert = expert_accuracy(pool, split) if split else None
        if expert is not None and not all(t in expert for t in accuracy):
            expert = None
        average = metrics.get(f"{prefix}/acc/avg")
        lines = ["", title + ":", accuracy_table(tasks, accuracy, None if average is None else float(average), expert)]
        if expert is None:
            lines.append(f"normalized accuracy (merged / expert): not shown, the pool records no expert accuracy "
                         f"on the {split or 'evaluated'} split (adamerge.evaluation.evaluate_experts measures it)")
        return lines

    @staticmethod
    def _paths(trainer: Any, pl_module: Any, stage: str) -> list[str]:
        out: list[str] = []
        export_dir = getattr(pl_module, "export_dir", None)
        if stage == "fit" and export_dir and os.path.isdir(export_dir):
            files = sorted(os.listdir(export_dir))
            out.append(f"  export      {_show(export_dir)}" + (f"  ({', '.join(files)})" if files else ""))
        if stage == "fit":
            out += [f"  checkpoint  {_show(p)}" for p in _checkpoints(trainer)]
        configs = [getattr(cb, "config_path", None) for cb in trainer.callbacks]
        out += [f"  config      {_show(p)}" for p in configs if p]
        out += [f"  logs        {_show(d)}" for d in _log_dirs(trainer)]
        return out or ["  nothing (no export_dir, checkpoint, saved config or logger)"]
