"""Published average accuracies (%) that ``adamerge reproduce`` puts beside its own.

Two references per method, model and task set (the column key ``"B/32×8"``: model, ×, task count):

* :data:`PAPER`: the papers' tables and the authors' official logs, measured with the task_vectors
  checkpoints (8 tasks) or TALL-masks' (14 and 20 tasks);
* :data:`FUSIONBENCH`: FusionBench's re-runs with *its* Hugging Face checkpoints
  (``tanganke/clip-vit-*_<task>``), the ones ``adamerge reproduce`` downloads, so the closer reference.

The numbers are those of ``docs/parity.md`` ("Paper numbers", which also says where each comes from;
``tests/test_parity.py`` checks the two agree) and ``../shared/reference/results.md``. A method or column
without a published number is absent; nothing here is estimated.
"""

from __future__ import annotations

__all__ = ["FUSIONBENCH", "PAPER", "column", "reference"]

PAPER: dict[str, dict[str, float]] = {
    "experts": {"B/32×8": 90.5, "L/14×8": 94.2},
    "weight_averaging": {"B/32×8": 65.8, "L/14×8": 79.6},
    "task_arithmetic": {"B/32×8": 69.1, "L/14×8": 84.5, "B/32×14": 65.3, "B/32×20": 60.5},
    "ties": {"B/32×8": 72.4, "L/14×8": 86.0, "B/32×14": 68.0, "B/32×20": 63.4},
    "pcb": {"B/32×8": 76.3, "L/14×8": 87.5},
    "consensus_ta": {"B/32×8": 75.0, "B/32×14": 70.4, "B/32×20": 65.4},
    "tsv_m": {"B/32×8": 85.9, "B/32×14": 80.1, "B/32×20": 77.1},
    "iso_c": {"B/32×8": 86.3, "B/32×14": 80.3, "B/32×20": 75.5},
    "iso_cts": {"B/32×8": 86.2, "L/14×8": 94.7, "B/32×14": 81.7, "B/32×20": 78.1},
    "cart": {"B/32×8": 84.7, "B/32×14": 79.5, "B/32×20": 76.3},
    "wudi": {"B/32×8": 85.2, "L/14×8": 92.6},
    "emr": {"B/32×8": 88.7, "L/14×8": 93.7},
    "adamerging_task": {"B/32×8": 71.1},
    "adamerging_layer": {"B/32×8": 80.1, "L/14×8": 90.8},
    "adamerging_plusplus": {"B/32×8": 81.1, "L/14×8": 91.0},
    "adamerging_cart": {"B/32×8": 85.8, "B/32×14": 82.3, "B/32×20": 82.7},
    "adarank": {"B/32×8": 89.2},
    "surgery_ta": {"B/32×8": 80.9, "L/14×8": 89.0},
    "wemoe": {"B/32×8": 89.4, "L/14×8": 93.6},
    "ewemoe": {"B/32×8": 89.2, "L/14×8": 93.5},
}
PAPER_SOURCE = "paper"

FUSIONBENCH: dict[str, dict[str, float]] = {
    "experts": {"B/32×8": 90.3},
    "task_arithmetic": {"B/32×8": 68.0},
    "ties": {"B/32×8": 72.2},
    "tsv_m": {"B/32×8": 83.1},
    "regmean": {"B/32×8": 82.4, "L/14×8": 90.4},
    "regmean_plusplus": {"B/32×8": 84.4, "L/14×8": 91.0},
    "fisher": {"B/32×8": 70.6, "L/14×8": 80.3},
    "adamerging_task": {"B/32×8": 68.7},
    "adamerging_layer": {"B/32×8": 82.6, "L/14×8": 91.0},
    "wemoe": {"B/32×8": 89.2, "L/14×8": 93.8},
    "ewemoe": {"B/32×8": 89.1},
}
FUSIONBENCH_SOURCE = "FusionBench (same checkpoints)"


def column(model: str, num_tasks: int) -> str:
    """The column key of an open_clip model name (``ViT-B-32``, ``ViT-B-32-quickgelu``) and a task count."""
    short = model.removeprefix("ViT-").removesuffix("-quickgelu").replace("-", "/")
    return f"{short}×{num_tasks}"


def reference(method: str, model: str, num_tasks: int) -> tuple[float, str] | None:
    """(published average %, where from) for ``method`` on ``model`` × ``num_tasks`` tasks: FusionBench's
    re-run with the same checkpoints where there is one, else the paper's; None if neither published it."""
    key = column(model, num_tasks)
    for table, source in ((FUSIONBENCH, FUSIONBENCH_SOURCE), (PAPER, PAPER_SOURCE)):
        if key in table.get(method, {}):
            return table[method][key], source
    return None
