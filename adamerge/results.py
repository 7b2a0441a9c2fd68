"""Results are data: every run writes ``metrics.json`` in its run folder; tables are generated.

The record format lives in :mod:`adamerge.records` (:func:`write_metrics`, :func:`read_metrics`,
re-exported here)::

    {"method": "Task arithmetic (λ=0.3)", "benchmark": "mini", "seed": 0, "split": "test",
     "accuracy": {"<task>": 0.93, ...}, "avg": 0.91, ...extra}

Accuracies are fractions in [0, 1]; tables show percentages. ``python -m adamerge.results RUNS_DIR
--readme README.md`` collects every ``metrics.json`` under RUNS_DIR, averages over seeds (mean ± sd)
and writes one row per method (first cell the name, a column per task, last column "Avg") between
the ``<!-- results:start -->`` / ``<!-- results:end -->`` markers of the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.files import write_text
from adamerge.records import METRICS_FILE, read_metrics, write_metrics

__all__ = [
    "benchmarks_of",
    "collect",
    "main",
    "publish",
    "read_metrics",
    "render_regime",
    "render_table",
    "update_readme",
    "write_metrics",
]

# Rows of known methods come in this order (the papers' tables); other methods follow, first seen first.
METHOD_ORDER = (
    "Zero-shot", "Weight averaging", "RegMean", "RegMean++", "Fisher merging", "Task arithmetic (λ=0.3)", "Task arithmetic (λ on val)", "TIES-Merging",
    "PCB-Merging", "OPCM (continual)", "DARE-TA", "DARE-TIES", "Consensus TA", "TSV-M", "Iso-C", "Iso-CTS", "CART",
    "WUDI", "EMR-Merging (task id)", "TALL masks (task id)", "AdaMerging (task-wise)", "AdaMerging (layer-wise)",
    "AdaMerging++ (layer-wise)", "AdaMerging+CART (layer-wise)", "AdaRank",
    "AdaRank+CART", "Surgery on TA", "SurgeryV2 on TA", "Surgery on AdaMerging",
    "SurgeryV2 on AdaMerging", "E-WEMoE", "WEMoE", "Individual experts",
)
START, END = "<!-- results:start -->", "<!-- results:end -->"


def collect(root: str | os.PathLike, benchmark: str | None = None) -> list[dict[str, Any]]:
    """Every metrics record under ``root`` (optionally of one benchmark), in path order.

    One record per (benchmark, method, seed): when a run was repeated (the demo's run and a user's own
    run of the same config and seed), the newest file counts and a note names the ones left out.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no runs folder at {root}")
    paths = sorted(root.rglob(METRICS_FILE))
    records = {p: read_metrics(p) for p in paths}
    if benchmark is not None:
        records = {p: r for p, r in records.items() if r.get("benchmark", "mini") == benchmark}
    newest: dict[tuple, Path] = {}
    for p, r in records.items():
        key = (str(r.get("benchmark", "mini")), r["method"], r.get("seed"))
        if key not in newest or p.stat().st_mtime > newest[key].stat().st_mtime:
            newest[key] = p
    kept = set(newest.values())
    for p in records:
        if p not in kept:
            r = records[p]
            print(f"note: {p} left out: {newest[(str(r.get('benchmark', 'mini')), r['method'], r.get('seed'))]} "
                  f"is a newer record of {r['method']!r}, seed {r.get('seed')}", file=sys.stderr)
    return [r for p, r in records.items() if p in kept]


def benchmarks_of(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The benchmarks the records come from, sorted."""
    return sorted({str(r.get("benchmark", "mini")) for r in records})


def _cell(values: Sequence[float]) -> str:
    pct = [100.0 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def render_table(records: Sequence[Mapping[str, Any]], tasks: Sequence[str] | None = None) -> str:
    """A markdown table: one row per method (:data:`METHOD_ORDER`, then first seen), a column per task, then "Avg".

    Cells are the mean over the records (seeds) of a method, with ± the sample standard deviation
    when there is more than one. A method missing a task gets "–" in that column.
    """
    if not records:
        raise ValueError("no metrics records to tabulate")
    benchmarks = benchmarks_of(records)
    if len(benchmarks) > 1:
        raise ValueError(f"the records come from {len(benchmarks)} benchmarks ({', '.join(benchmarks)}); "
                         "one table is one benchmark: pick one with --benchmark (or collect(..., benchmark=))")
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    first_seen = {m: i for i, m in enumerate(by_method)}
    by_method = dict(sorted(by_method.items(), key=lambda kv: (rank.get(kv[0], len(rank)), first_seen[kv[0]])))
    if tasks is None:
        tasks = []
        for r in records:
            tasks += [t for t in r["accuracy"] if t not in tasks]
    seeds = sorted({str(r.get("seed")) for r in records})
    lines = [
        "| method | " + " | ".join(tasks) + " | Avg |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for method, rs in by_method.items():
        cells = []
        for t in tasks:
            vals = [r["accuracy"][t] for r in rs if t in r["accuracy"]]
            cells.append(_cell(vals) if vals else "–")
        avgs = [sum(r["accuracy"][t] for t in tasks if t in r["accuracy"]) / len(tasks) for r in rs
                if all(t in r["accuracy"] for t in tasks)]
        cells.append(_cell(avgs) if avgs else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Accuracy (%) on the test split; mean ± sd over seeds {', '.join(seeds)}.")
    return "\n".join(lines)


def _mean_avg(records: Sequence[Mapping[str, Any]], method: str) -> float | None:
    avgs = [100.0 * float(r["avg"]) for r in records if r["method"] == method]
    return statistics.mean(avgs) if avgs else None


def render_regime(records: Sequence[Mapping[str, Any]]) -> str:
    """The papers' regime checks on the seed-mean averages, as markdown lines ("" without the rows).

    Zero-shot ≥ 20 points below the experts; task arithmetic (λ on val) ≥ zero-shot + 5 and ≥ 8
    below the experts; layer-wise AdaMerging above task arithmetic; and the share of the zero-shot →
    expert gap each method closes (papers, ViT-B/32: ~50 % for task arithmetic, ~75 % for AdaMerging).
    """
    zs, ex = _mean_avg(records, "Zero-shot"), _mean_avg(records, "Individual experts")
    ta, am = _mean_avg(records, "Task arithmetic (λ on val)"), _mean_avg(records, "AdaMerging (layer-wise)")
    if zs is None or ex is None or ta is None:
        return ""
    checks = [(f"zero-shot {ex - zs:.1f} points below the experts (≥ 20)", ex - zs >= 20),
              (f"task arithmetic (λ on val) {ta - zs:+.1f} over zero-shot (≥ +5)", ta - zs >= 5),
              (f"task arithmetic (λ on val) {ex - ta:.1f} below the experts (≥ 8)", ex - ta >= 8)]
    if am is not None:
        checks.append((f"layer-wise AdaMerging {am - ta:+.1f} over task arithmetic (> 0)", am > ta))
    gap = ex - zs
    shares = [f"task arithmetic {100 * (ta - zs) / gap:.0f} %"] if gap > 0 else []
    if am is not None and gap > 0:
        shares.append(f"layer-wise AdaMerging {100 * (am - zs) / gap:.0f} %")
    lines = ["Regime checks (seed means): " + "; ".join(f"{'✔' if ok else '✘'} {text}" for text, ok in checks) + "."]
    if shares:
        lines.append("Share of the zero-shot → expert gap closed: " + ", ".join(shares) + ".")
    return "\n".join(lines)


def update_readme(readme: str | os.PathLike, table: str) -> None:
    """Replace the text between the results markers of ``readme`` with ``table`` (atomically)."""
    readme = Path(readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: no {START} / {END} markers to put the table between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, f"{head}{START}\n{table}\n{END}{tail}")


def publish(runs: str | os.PathLike, readme: str | os.PathLike | None = None, benchmark: str | None = None) -> str:
    """Collect the records under ``runs`` and print one table per benchmark; write the table into
    ``readme`` if given (the README holds one benchmark: name it with ``benchmark`` when there are more)."""
    records = collect(runs, benchmark)
    if not records:
        raise ValueError(f"no metrics records under {runs}" + (f" for benchmark {benchmark!r}" if benchmark else ""))
    benchmarks = benchmarks_of(records)
    if readme and len(benchmarks) > 1:
        raise ValueError(f"the records under {runs} come from {len(benchmarks)} benchmarks ({', '.join(benchmarks)}); "
                         "the README shows one: pick it with --benchmark")
    tables = []
    for name in benchmarks:
        rows = [r for r in records if str(r.get("benchmark", "mini")) == name]
        table = render_table(rows)
        regime = render_regime(rows)
        tables.append(f"{table}\n\n{regime}" if regime else table)
    if readme:
        update_readme(readme, tables[0])
    text = tables[0] if len(tables) == 1 else "\n\n".join(
        f"Benchmark {name}:\n\n{t}" for name, t in zip(benchmarks, tables))
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m adamerge.results", description=__doc__.splitlines()[0])
    p.add_argument("runs", help="folder searched recursively for metrics.json files")
    p.add_argument("--benchmark", default=None, help="only records of this benchmark")
    p.add_argument("--readme", default=None, help="write the table between the README's results markers")
    args = p.parse_args(argv)
    return publish(args.runs, args.readme, args.benchmark)


if __name__ == "__main__":
    main()
