"""What a W&B run shows: per-task accuracy against its references, and each method's own diagnostics.

:class:`WandbStory` is a Lightning callback. After every validation (not the sanity check) and every
test, rank 0 logs to each ``WandbLogger`` of the trainer (nothing when there is none), at the
trainer's global step:

* ``<split>/acc/table``: one row per task and an ``average`` row; the merged model's accuracy in %
  (the system's ``last_metrics``), and zero-shot, expert and normalized (merged / expert) accuracy
  when they are known; ``<split>/acc/chart``: the same as grouped bars (merged vs zero-shot vs experts);
* the system's ``diagnostics()`` (plain data from the core), drawn here:
  ``coefficients`` (AdaMerging) → ``coefficients/heatmap`` (tasks × tensors, labelled by block and
  kind, a diverging colour map centred on the initial λ over a fixed range) and ``coefficients/table``;
  ``ranks`` (AdaRank) → ``ranks/heatmap`` (tasks × masked matrices, the kept fraction of each
  matrix's singular components on a fixed [0, 1] scale, counts in the cells) and ``ranks/table``;
  ``routing`` (WEMoE) → ``wemoe/routing`` (per task: the mean routing weight per block and expert as a
  heatmap, the per-sample spread per expert as a box plot) and ``wemoe/routing_table``;
  ``layer_loss`` (Surgery) → ``surgery/layer_loss`` (the last step's L1 per layer, one line per task)
  and ``surgery/layer_loss_table``.

References: ``references`` names a folder of results records (``metrics.json``,
:mod:`adamerge.records`); the records of the pool's benchmark (``pool.benchmark_id``) and the
evaluated split whose method is "Zero-shot" or "Individual experts" are averaged over seeds. Without
expert records the pool's own record of its experts is used (the mini benchmark keeps one,
:func:`adamerge.report.expert_accuracy`). This module is reporting: the core never imports it
(tests/test_imports.py), and it reads the system only through ``tasks``, ``pool``, ``last_metrics``
and ``diagnostics()``.
"""

from __future__ import annotations

import io
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "WandbStory",
    "accuracy_chart",
    "accuracy_rows",
    "coefficient_heatmap",
    "colour_range",
    "diagnostics_media",
    "layer_label",
    "layer_loss_figure",
    "rank_heatmap",
    "reference_accuracy",
    "routing_figure",
]

COLUMN_INCH = 0.12  # heatmap width per tensor: a 6 pt label fits, 158 tensors (ViT-B/32) take 19 in
LABEL_PT = 6
DPI = 100
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|layers)\.(\d+)\.(.+)$")
_SUFFIX = re.compile(r"([._])(weight|bias)$")
_PREFIXES = ("model.", "visual.", "vision_model.", "image_encoder.")


# ---- tables -------------------------------------------------------------------------------------
def _reference_kind(method: str) -> str | None:
    name = re.sub(r"[^a-z]", "", method.lower())
    if name == "zeroshot":
        return "zero-shot"
    if name.startswith("individual") or name == "experts":
        return "experts"
    return None


def reference_accuracy(root: str | os.PathLike, benchmark: str, split: str | None = None) -> dict[str, dict[str, float]]:
    """``{"zero-shot": {task: acc}, "experts": {task: acc}}`` (fractions, mean over seeds) from the
    records under ``root`` of ``benchmark`` (and ``split``, when records and caller name one)."""
    from adamerge.results import collect

    found: dict[str, dict[str, list[float]]] = {}
    for record in collect(root, benchmark):
        kind = _reference_kind(str(record["method"]))
        if kind is None or (split is not None and record.get("split", split) != split):
            continue
        for task, acc in record["accuracy"].items():
            found.setdefault(kind, {}).setdefault(task, []).append(float(acc))
    return {kind: {t: statistics.mean(v) for t, v in per.items()} for kind, per in found.items()}


def accuracy_rows(
    tasks: Sequence[str], merged: Mapping[str, float], references: Mapping[str, Mapping[str, float]]
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the accuracy table, in %: ``task``, ``merged``, each reference (``zero-shot``,
    ``experts``) and ``normalized`` (merged / experts) when experts are known; one row per task of
    ``merged``, then ``average`` (a column's mean, or None when a task's value is missing)."""
    tasks = [t for t in tasks if t in merged]
    names = [n for n in ("zero-shot", "experts") if references.get(n)]
    columns = ["task", "merged", *names] + (["normalized"] if "experts" in names else [])
    rows: list[list[Any]] = []
    for t in tasks:
        row = [t, 100 * merged[t]] + [100 * references[n][t] if t in references[n] else None for n in names]
        if "experts" in names:
            expert = references["experts"].get(t)
            row.append(100 * merged[t] / expert if expert else None)
        rows.append(row)
    average = ["average"]
    for i in range(1, len(columns)):
        values = [r[i] for r in rows]
        average.append(None if not values or None in values else statistics.mean(values))
    return columns, [*rows, average]


# ---- figures ------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no GUI backend

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def layer_label(name: str) -> tuple[int | None, str]:
    """``(block, kind)`` of a parameter-tensor name: ``transformer.resblocks.3.attn.in_proj_weight`` →
    ``(3, "attn.in_proj_w")``; outside the blocks ``(None, "conv1.w")`` (``model.``/``visual.`` dropped)."""
    match = _BLOCK.search(name)
    block, kind = (int(match.group(1)), match.group(2)) if match else (None, name)
    while block is None and kind.startswith(_PREFIXES):
        kind = kind.split(".", 1)[1]
    return block, _SUFFIX.sub(lambda m: m.group(1) + m.group(2)[0], kind)


def colour_range(init_lam: float, clamp: bool) -> tuple[float, float, float]:
    """``(vmin, centre, vmax)`` of the coefficient colour map: centred on the initial λ; clamped λ
    spans [0, 1], else init_lam ± max(|init_lam|, |1 − init_lam|); fixed, so heatmaps of one run compare."""
    if clamp and 0.0 < init_lam < 1.0:
        return 0.0, float(init_lam), 1.0
    r = max(abs(init_lam), abs(1.0 - init_lam))
    return init_lam - r, float(init_lam), init_lam + r


def _label_tensor_columns(ax, layers: Sequence[str]) -> None:
    """Label a heatmap's columns by tensor (``b3 attn.in_proj_w``), name the blocks above them and
    separate the blocks by lines."""
    n = len(layers)
    labelled = [layer_label(name) for name in layers]
    ax.set_xticks(range(n), labels=[kind if b is None else f"b{b} {kind}" for b, kind in labelled],
                  rotation=90, fontsize=LABEL_PT)
    blocks = [b for b, _ in labelled]
    starts = [i for i in range(n) if blocks[i] is not None and (i == 0 or blocks[i - 1] != blocks[i])]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.3", linewidth=0.5)
    top = ax.secondary_xaxis("top")
    centres = [(s + next((e for e in range(s, n) if blocks[e] != blocks[s]), n) - 1) / 2 for s in starts]
    top.set_xticks(centres, labels=[f"block {blocks[s]}" for s in starts], fontsize=LABEL_PT + 1)


def coefficient_heatmap(values, tasks: Sequence[str], layers: Sequence[str], init_lam: float = 0.3, clamp: bool = True):
    """The ``[K, L]`` coefficients as a heatmap: a column per tensor, labelled ``b3 attn.in_proj_w``
    (blocks also named above and separated by lines), colours ``RdBu_r`` centred on ``init_lam``."""
    from matplotlib.colors import TwoSlopeNorm

    values = values.float().numpy() if hasattr(values, "numpy") else values
    k, n = values.shape
    fig = _figure(max(4.0, 2.5 + COLUMN_INCH * n), 2.6 + 0.3 * k)
    ax = fig.add_subplot()
    vmin, centre, vmax = colour_range(init_lam, clamp)
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                   norm=TwoSlopeNorm(vcenter=centre, vmin=vmin, vmax=vmax))
    ax.set_yticks(range(k), labels=list(tasks))
    _label_tensor_columns(ax, layers)
    ax.set_title(f"AdaMerging coefficients λ: {k} tasks × {n} tensors (white = initial λ {init_lam:g})")
    fig.colorbar(im, ax=ax, label="λ", fraction=0.02 if n > 40 else 0.1)
    return fig


def rank_heatmap(values, tasks: Sequence[str], layers: Sequence[str], full: Sequence[int]):
    """AdaRank's kept ranks ``[K, M]`` as a heatmap: a column per masked matrix (labelled as the
    coefficients' tensors), colour = kept / min(m, n) on a fixed [0, 1] scale; counts written in the
    cells while there are few enough columns to read them."""
    import numpy as np

    counts = np.asarray(values.float().numpy() if hasattr(values, "numpy") else values, dtype=float)
    k, n = counts.shape
    fraction = counts / np.asarray(full, dtype=float)[None, :]
    fig = _figure(max(4.0, 2.5 + COLUMN_INCH * n), 2.6 + 0.3 * k)
    ax = fig.add_subplot()
    im = ax.imshow(fraction, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(k), labels=list(tasks))
    _label_tensor_columns(ax, layers)
    if n <= 40:
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, f"{c:.0f}", ha="center", va="center", fontsize=LABEL_PT,
                    color="white" if fraction[i, j] < 0.5 else "black")
    ax.set_title(f"AdaRank kept ranks: {k} tasks × {n} matrices (colour: kept / min(m, n))")
    fig.colorbar(im, ax=ax, label="kept fraction", fraction=0.02 if n > 40 else 0.1)
    return fig


def accuracy_chart(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "accuracy"):
    """Grouped bars of :func:`accuracy_rows`: per task (and the average) merged vs zero-shot vs experts."""
    series = [c for c in columns[1:] if c != "normalized"]
    fig = _figure(max(5.0, 1.5 + 0.25 * len(series) * len(rows)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        col = columns.index(name)
        xs = [i + (j - (len(series) - 1) / 2) * width for i, r in enumerate(rows) if r[col] is not None]
        ax.bar(xs, [r[col] for r in rows if r[col] is not None], width, label=name)
    ax.set_xticks(range(len(rows)), labels=[r[0] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy %")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def routing_figure(mean, samples: Mapping[str, Any], tasks: Sequence[str], experts: Sequence[str],
                   layers: Sequence[str]):
    """Per evaluated task: the mean routing weight per block × expert (heatmap, one colour scale) and
    the spread over samples of each expert's weight, averaged over blocks (box plot); own expert bold."""
    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig = _figure(cols * (1.6 + 0.35 * len(experts)), rows * (2.4 + 0.25 * len(layers)))
    grid = fig.add_gridspec(2 * rows, cols)
    mean = mean.float()
    lo, hi = float(mean.min()), float(mean.max())
    for i, task in enumerate(tasks):
        r, c = divmod(i, cols)
        ax, box = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        im = ax.imshow(mean[i].numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=LABEL_PT + 1)
        ax.set_xticks(range(len(experts)), labels=[])
        ax.set_title(f"{task}: mean routing weight", fontsize=8)
        per_sample = samples[task].float().mean(dim=1).numpy()  # [n, K], averaged over blocks
        box.boxplot([per_sample[:, k] for k in range(len(experts))], positions=range(len(experts)))
        box.set_xticks(range(len(experts)), labels=list(experts), rotation=45, ha="right", fontsize=LABEL_PT + 1)
        for label in box.get_xticklabels():
            label.set_fontweight("bold" if label.get_text() == task else "normal")
        box.set_ylabel(f"per sample (n={per_sample.shape[0]})", fontsize=LABEL_PT + 1)
    fig.colorbar(im, ax=fig.axes, label="routing weight (blocks × experts)", fraction=0.02)
    return fig


def layer_loss_figure(values, tasks: Sequence[str], layers: Sequence[str]):
    """Surgery's alignment L1 per layer (blocks, then the final embedding), one line per task."""
    fig = _figure(max(4.5, 2.0 + 0.4 * len(layers)), 3.2)
    ax = fig.add_subplot()
    for task, row in zip(tasks, values.float().numpy()):
        ax.plot(range(len(layers)), row, marker="o", label=task)
    ax.set_xticks(range(len(layers)), labels=list(layers))
    ax.set_xlabel("layer (block outputs' token means, then the final embedding)")
    ax.set_ylabel("L1 to the expert")
    ax.set_title("Surgery alignment loss per layer, last training step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---- the callback -------------------------------------------------------------------------------
def _image(fig):
    import wandb
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    return wandb.Image(Image.open(buf))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]):
    import wandb

    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])


def diagnostics_media(diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    """W&B media for what a system's ``diagnostics()`` returned (unknown entries are skipped)."""
    out: dict[str, Any] = {}
    if "coefficients" in diagnostics:
        d = diagnostics["coefficients"]
        out["coefficients/heatmap"] = _image(coefficient_heatmap(d["values"], d["tasks"], d["layers"],
                                                                 d.get("init_lam", 0.3), d.get("clamp", True)))
        out["coefficients/table"] = _table(["task", *d["layers"]],
                                           [[t, *row] for t, row in zip(d["tasks"], d["values"].tolist())])
    if "ranks" in diagnostics:
        d = diagnostics["ranks"]
        out["ranks/heatmap"] = _image(rank_heatmap(d["values"], d["tasks"], d["layers"], d["full"]))
        out["ranks/table"] = _table(["task", *d["layers"]],
                                    [[t, *row] for t, row in zip(d["tasks"], d["values"].tolist())])
    if "routing" in diagnostics:
        d = diagnostics["routing"]
        out["wemoe/routing"] = _image(routing_figure(d["mean"], d["samples"], d["tasks"], d["experts"], d["layers"]))
        out["wemoe/routing_table"] = _table(
            ["task", "layer", *d["experts"]],
            [[t, layer, *w] for t, m in zip(d["tasks"], d["mean"].tolist()) for layer, w in zip(d["layers"], m)])
    if "layer_loss" in diagnostics:
        d = diagnostics["layer_loss"]
        out["surgery/layer_loss"] = _image(layer_loss_figure(d["values"], d["tasks"], d["layers"]))
        out["surgery/layer_loss_table"] = _table(["task", *d["layers"]],
                                                 [[t, *row] for t, row in zip(d["tasks"], d["values"].tolist())])
    return out


class WandbStory(Callback):
    """Log the accuracy table and chart and the system's diagnostics to W&B after validation and test.

    Args:
        references: a folder of results records (``metrics.json``, searched recursively) with the
            benchmark's "Zero-shot" and "Individual experts" rows, shown beside the merged accuracy;
            None: the pool's record of its experts, if any.
    """

    def __init__(self, references: str | None = None) -> None:
        if references is not None and not os.path.isdir(references):
            raise FileNotFoundError(f"WandbStory: no references folder at {references}")
        self.references = references
        self._cache: dict[tuple, dict] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # called after the system's epoch end: last_metrics is current
            self.log_story(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self.log_story(trainer, pl_module, "test")

    def reference(self, pl_module, split: str | None) -> dict[str, dict[str, float]]:
        """Zero-shot / expert accuracy (fractions) for this run's benchmark and split, when known."""
        pool = getattr(pl_module, "pool", None)
        key = (getattr(pool, "benchmark_id", None), split)
        if key not in self._cache:
            refs = reference_accuracy(self.references, key[0], split) if self.references and key[0] else {}
            if not refs.get("experts") and split:
                from adamerge.report import expert_accuracy

                expert = expert_accuracy(pool, split)
                if expert:
                    refs["experts"] = expert
            self._cache[key] = refs
        return self._cache[key]

    def story(self, trainer, pl_module, prefix: str) -> dict[str, Any]:
        """Everything logged for one evaluation (``prefix``: ``val`` or ``test``), by W&B key."""
        metrics = getattr(pl_module, "last_metrics", {}) or {}
        tasks = list(getattr(pl_module, "tasks", []))
        merged = {t: float(metrics[f"{prefix}/acc/{t}"]) for t in tasks if f"{prefix}/acc/{t}" in metrics}
        out: dict[str, Any] = {}
        if merged:
            split = getattr(getattr(trainer, "datamodule", None), "eval_split", None)
            columns, rows = accuracy_rows(tasks, merged, self.reference(pl_module, split))
            out[f"{prefix}/acc/table"] = _table(columns, rows)
            title = f"accuracy on {split or prefix}, step {trainer.global_step}"
            out[f"{prefix}/acc/chart"] = _image(accuracy_chart(columns, rows, title))
        diagnostics = getattr(pl_module, "diagnostics", None)
        out.update(diagnostics_media(diagnostics() if callable(diagnostics) else {}))
        return out

    def log_story(self, trainer, pl_module, prefix: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        story = self.story(trainer, pl_module, prefix)
        if story:
            for logger in loggers:
                logger.experiment.log({**story, "trainer/global_step": trainer.global_step})
