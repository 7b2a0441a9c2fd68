"""The run record: ``metrics.json`` in a run folder, written by every run and read by the reports.

A record (written by :func:`write_metrics`)::

    {"method": "Task arithmetic (λ=0.3)", "benchmark": "mini", "seed": 0, "split": "test",
     "accuracy": {"<task>": 0.93, ...}, "avg": 0.91, ...extra}

Accuracies are fractions in [0, 1]. The systems write records; :mod:`adamerge.results` (tables, the
README) only reads them, so the core never imports the reporting.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adamerge.files import write_text

__all__ = ["METRICS_FILE", "read_metrics", "write_metrics"]

METRICS_FILE = "metrics.json"


def write_metrics(
    run_dir: str | os.PathLike,
    method: str,
    accuracy: Mapping[str, float],
    seed: int | None = None,
    benchmark: str = "mini",
    split: str = "test",
    **extra: Any,
) -> Path:
    """Write ``run_dir/metrics.json`` (atomically) and return its path.

    Args:
        run_dir: the run's folder (created if missing).
        method: the row name in results tables.
        accuracy: task → accuracy as a fraction in [0, 1].
        seed: the benchmark/run seed (rows average over seeds).
        benchmark: which benchmark the numbers are on (tables are per benchmark).
        split: the evaluated split.
        extra: anything else JSON-serialisable (λ, steps, timings ...).
    """
    if not accuracy:
        raise ValueError(f"{method}: no per-task accuracy to write")
    for task, acc in accuracy.items():
        if not (isinstance(acc, (int, float)) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
            raise ValueError(f"{method}: accuracy of task {task!r} is {acc!r}, expected a fraction in [0, 1]")
    acc = {t: float(a) for t, a in accuracy.items()}
    record = {
        "method": method,
        "benchmark": benchmark,
        "seed": seed,
        "split": split,
        "accuracy": acc,
        "avg": sum(acc.values()) / len(acc),
        **extra,
    }
    path = Path(run_dir) / METRICS_FILE
    write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read one metrics file, checking it has the fields tables need (the error names the file)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable metrics JSON ({e})") from None
    for field in ("method", "accuracy"):
        if field not in record:
            raise ValueError(f"{path}: missing field {field!r}")
    if not isinstance(record["accuracy"], dict) or not record["accuracy"]:
        raise ValueError(f"{path}: 'accuracy' must be a non-empty task → fraction mapping")
    return record
