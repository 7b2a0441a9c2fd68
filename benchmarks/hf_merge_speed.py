"""Is `adamerge merge` at least as fast as mergekit? Both tools, alternating, several rounds, medians.

One run per tool (``hf_merge_memory.py``) is not enough to compare times on a shared machine: there
mergekit's task-arithmetic merge took 8.8 s in one run and 19.5 s in the next. This script runs the
out-of-core ``adamerge merge`` and ``mergekit-yaml`` on the same folders (the memory benchmark's
Qwen2-0.5B-shaped bf16 base and K experts, built or reused in ``--work``), one after the other in
each round, each in a fresh process with the files read into the page cache first, and reports per
method the median merge time (after imports) and wall time (the whole command) of each tool, the
median of the per-round ratios adamerge ÷ mergekit, and every round's numbers.

    python benchmarks/hf_merge_speed.py [--rounds 5] [--methods task_arithmetic ties] [--out X.json]

mergekit lives in its own venv (``python -m venv --system-site-packages /tmp/mkvenv &&
/tmp/mkvenv/bin/pip install mergekit``); without it only adamerge runs and the record says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_merge_memory as mem  # the models, the commands and the measured worker


def rounds_of(plan: list[dict], paths: dict, rounds: int) -> list[list[dict]]:
    """``rounds`` × every run of ``plan`` in order; each row the worker's numbers (or an error)."""
    out = []
    for i in range(rounds):
        rows = []
        for p in plan:
            shutil.rmtree(p["out"], ignore_errors=True)
            print(f"round {i + 1}/{rounds}: {p['label']} ...", flush=True)
            row = mem.run_one(p, paths.values())
            if "error" in row:
                raise SystemExit(f"{p['label']} failed (exit {row['returncode']}): {row['error'][-1500:]}")
            rows.append({k: row[k] for k in ("run", "method", "tool", "merge_s", "wall_s", "import_s",
                                             "peak_gib", "load_before")})
        out.append(rows)
    return out


def summary(rounds: list[list[dict]], methods: list[str]) -> dict:
    """Per method and tool the median times; per method the median of the per-round ratios."""
    result = {}
    for method in methods:
        per_round = [{r["tool"]: r for r in rows if r["method"] == method} for rows in rounds]
        entry = {}
        for tool in per_round[0]:
            entry[tool] = {f"median_{k}": statistics.median(r[tool][k] for r in per_round)
                           for k in ("merge_s", "wall_s")}
        if "mergekit" in per_round[0]:
            for k in ("merge_s", "wall_s"):
                ratios = [r["adamerge"][k] / r["mergekit"][k] for r in per_round]
                entry[f"adamerge_over_mergekit_{k}"] = {"median": statistics.median(ratios),
                                                        "min": min(ratios), "max": max(ratios)}
        result[method] = entry
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/hf_merge_memory"), help="models (reused), outputs")
    p.add_argument("--small", action="store_true", help="a tiny Qwen2: a smoke run")
    p.add_argument("--experts", type=int, default=4, help="number of experts K")
    p.add_argument("--rounds", type=int, default=5, help="rounds (each runs every tool once per method)")
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=sorted(mem.MERGEKIT_METHODS))
    p.add_argument("--lam", type=float, default=0.3, help="λ of both tools")
    p.add_argument("--keep", type=float, default=0.2, help="TIES keep ratio (mergekit's density)")
    p.add_argument("--mergekit_venv", type=Path, default=Path("/tmp/mkvenv"), help="venv with mergekit-yaml")
    p.add_argument("--out", type=Path, default=None, help="JSON record (default: results/; --small: --work)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.shard_size = "100KB" if args.small else "500MB"
    out = args.out or (args.work / "hf_merge_speed_small.json" if args.small
                       else Path(__file__).resolve().parent / "results" / "hf_merge_speed_qwen2_0.5b.json")
    start, load0, git0 = time.perf_counter(), os.getloadavg(), mem._git()
    shape = mem.SMALL if args.small else mem.QWEN2_05B
    built = mem.build(args.work, shape, args.experts, 1e-3, mem.parse_size(args.shard_size))
    mk_python, mergekit = mem._mergekit(args.mergekit_venv)
    if mk_python is None:
        print(mergekit["note"])
    plan = [r for r in mem.make_plan(args, built["paths"], mk_python) if r["mode"] != "in_memory"]
    rounds = rounds_of(plan, built["paths"], args.rounds)
    result = summary(rounds, args.methods)
    for method, entry in result.items():
        for key, value in entry.items():
            print(f"{method:16} {key:34} {json.dumps(value)}")
    record = {"benchmark": "hf_merge_speed", "small": args.small, "machine": mem._machine(), "mergekit": mergekit,
              "git_before": git0, "git_after": mem._git(), "load_average_before": load0,
              "load_average_after": os.getloadavg(), "seconds": time.perf_counter() - start,
              "config": {"shape": shape, "experts": args.experts, "rounds": args.rounds, "methods": args.methods,
                         "lam": args.lam, "keep": args.keep, "shard_size": args.shard_size},
              "commands": {r["label"]: r["shell"] for r in plan}, "summary": result, "rounds": rounds}
    return mem.write_record(out, record)


if __name__ == "__main__":
    main()
