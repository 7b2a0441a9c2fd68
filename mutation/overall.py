"""The cumulative mutation score of adamerge's core: each module's latest measurement, over every record.

    python3 mutation/overall.py              # table to stdout, benchmarks/results/mutation_overall.json

Every run of ``scripts/mutation.sh`` writes a record (``benchmarks/results/mutation_*.json``) of the modules it
measured; a later record of a module (a rerun of its survivors after pins, or a fresh run after its source
changed) replaces the earlier one. Records are ordered by their ``date`` (when the run wrote them). Each row is
rescored from its per-mutant statuses with today's ``mutation/equivalent.txt``, so an equivalent listed after a
run counts without running it again. Score = killed / (checked - equivalent), timeouts counting as killed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # mutation/run.py: the record format and the equivalents file

RESULTS = run.ROOT / "benchmarks" / "results"
OUT = RESULTS / "mutation_overall.json"


def latest_rows(results: Path) -> dict[str, tuple[str, dict]]:
    """module → (record file name, its row) of the latest record measuring it (records ordered by date)."""
    records = []
    for path in sorted(results.glob("mutation_*.json")):
        if path == results / OUT.name:
            continue
        data = json.loads(path.read_text())
        records.append((data.get("date", ""), path.name, data.get("modules", {})))
    latest: dict[str, tuple[str, dict]] = {}
    for _, name, modules in sorted(records):
        for module, row in modules.items():
            if row.get("status") or row.get("mutants"):
                latest[module] = (name, row)
    return latest


def rescore(row: dict, equivalent: dict[str, str]) -> dict:
    """A record's row counted again from its statuses with the given equivalents (statuses left out)."""
    scored = run.score(row.get("status", {}), equivalent)
    return {k: v for k, v in scored.items() if k != "status"}


def main() -> int:
    equivalent = run.read_equivalent(run.ROOT / "mutation" / "equivalent.txt")
    rows, sources = {}, {}
    for module, (name, row) in sorted(latest_rows(RESULTS).items()):
        rows[module], sources[module] = rescore(row, equivalent), name
    overall = run.summary(rows)
    print(run.table(rows, overall))
    low = [m for m, r in rows.items() if r["score"] is not None and r["score"] < 0.9]
    print(f"\n{len(rows)} modules; under 90 %: {', '.join(low) or 'none'}")
    record = {"score": "killed / (checked - equivalent); timeouts count as killed; equivalents as of today",
              "overall": overall, "modules": {m: {**r, "record": sources[m]} for m, r in rows.items()}}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, OUT)
    print(f"record: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
