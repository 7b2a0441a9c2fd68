"""The results table of a reproduce run, generated from its records: markdown, CSV and JSON, one set.

One row per method with a record: our accuracy per task and on average (%), the published average beside
it (:func:`adamerge.reproduce.published.reference`), the difference (ours − published) and where the
published number comes from. Written with :func:`adamerge.files.atomic_dir` into ``<out>/results/``,
so the three files always describe the same records.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from adamerge.files import atomic_dir
from adamerge.records import read_metrics
from adamerge.reproduce.published import reference
from adamerge.reproduce.setup import Setup, record_path

__all__ = ["render_csv", "render_markdown", "rows", "write_table"]


def rows(setup: Setup) -> list[dict]:
    """One row per method of the setup that has a record, in table order."""
    out = []
    for method in setup.methods:
        path = record_path(setup, method)
        if not path.exists():
            continue
        record = read_metrics(path)
        acc = {t: 100 * record["accuracy"][t] for t in setup.tasks if t in record["accuracy"]}
        avg = sum(acc.values()) / len(acc)
        ref = reference(method.key, setup.arch, len(setup.tasks))
        out.append({"method": method.key, "label": method.label, "accuracy": acc, "avg": avg,
                    "published": ref[0] if ref else None, "source": ref[1] if ref else None,
                    "difference": avg - ref[0] if ref else None, "record": str(path)})
    return out


def _num(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def render_markdown(setup: Setup, table: list[dict]) -> str:
    """The table in markdown, titled by the model and task set."""
    head = ["method", *setup.tasks, "Avg", "published", "Δ", "published by"]
    lines = [f"### {setup.benchmark}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["label"], *(_num(r["accuracy"].get(t)) for t in setup.tasks), f"**{r['avg']:.1f}**",
                 _num(r["published"]), _num(r["difference"], sign=True), r["source"] or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(setup: Setup, table: list[dict]) -> str:
    """The table as CSV (accuracies in %, empty where nothing is published)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "label", *setup.tasks, "avg", "published", "difference", "source"])
    for r in table:
        writer.writerow([r["method"], r["label"], *(f"{r['accuracy'][t]:.2f}" if t in r["accuracy"] else ""
                                                     for t in setup.tasks),
                         f"{r['avg']:.2f}", "" if r["published"] is None else r["published"],
                         "" if r["difference"] is None else f"{r['difference']:.2f}", r["source"] or ""])
    return buf.getvalue()


def write_table(setup: Setup) -> tuple[Path, str]:
    """Write ``<out>/results/results.{md,csv,json}`` as one set; returns the folder and the markdown."""
    table = rows(setup)
    markdown = render_markdown(setup, table)
    document = {"benchmark": setup.benchmark, "model": setup.model, "arch": setup.arch, "tasks": setup.tasks,
                "pretrained": setup.pretrained, "experts": setup.experts, "datasets": setup.datasets,
                "image_folders": setup.folders, "steps": setup.steps, "rows": table}
    folder = setup.out / "results"
    with atomic_dir(folder) as tmp:
        (tmp / "results.md").write_text(markdown, encoding="utf-8")
        (tmp / "results.csv").write_text(render_csv(setup, table), encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder, markdown
