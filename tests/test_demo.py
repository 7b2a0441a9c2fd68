"""The main job end to end on the ``tiny`` preset: every run writes a record, the table comes from them."""

from __future__ import annotations

import json

import pytest

from adamerge import demo
from adamerge.data.mini import MiniBenchmark
from adamerge.results import read_metrics

STATIC_RUNS = (["zero_shot", "experts", "task_arithmetic_val"] + [s[0] for s in demo.STATIC]
               + [c[0] for c in demo.CONDITIONED])
ADAPTIVE_RUNS = [a[0] for a in demo.ADAPTIVE]


@pytest.mark.timeout(600)
def test_demo_runs_every_method_and_tabulates_its_records(mini_tiny_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAMERGE_CACHE", str(mini_tiny_cache))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\n<!-- results:end -->\n")
    out = tmp_path / "runs"
    table = demo.main(["--preset", "tiny", "--seeds", "0", "--out", str(out), "--steps", "2",
                       "--readme", str(readme)])
    assert "seeds run now: 0\n" in capsys.readouterr().out  # and none read from earlier records
    bench = MiniBenchmark("tiny", 0, cache_dir=str(mini_tiny_cache))
    records = {}
    for run in STATIC_RUNS + ADAPTIVE_RUNS:
        rec = read_metrics(out / "seed0" / run / "metrics.json")
        assert rec["benchmark"] == bench.benchmark_id, run
        assert rec["seed"] == 0 and set(rec["accuracy"]) == set(bench.tasks), run
        records[rec["method"]] = rec
    assert len(records) == len(STATIC_RUNS) + len(ADAPTIVE_RUNS)  # one row name per run
    for run in ADAPTIVE_RUNS:
        assert read_metrics(out / "seed0" / run / "metrics.json")["steps"] == 2
    val = read_metrics(out / "seed0" / "task_arithmetic_val" / "metrics.json")
    assert val["lam"] == float(max(val["val_avg"], key=val["val_avg"].get))  # the λ best on val
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {r.split("|")[1].strip() for r in rows} == set(records)
    zs = records["Zero-shot"]
    assert "| Zero-shot | " + " | ".join(f"{100 * zs['accuracy'][t]:.1f}" for t in bench.tasks) in table
    assert table in readme.read_text()
    # --skip-done re-runs nothing: the records are left as they are
    before = {p: p.read_text() for p in out.rglob("metrics.json")}
    demo.main(["--preset", "tiny", "--seeds", "0", "--out", str(out), "--steps", "2", "--skip-done"])
    assert {p: p.read_text() for p in out.rglob("metrics.json")} == before
    # a record of another seed already there is tabulated too, and the demo says it did not run it
    rec = json.loads((out / "seed0" / "zero_shot" / "metrics.json").read_text())
    (out / "seed7" / "zero_shot").mkdir(parents=True)
    (out / "seed7" / "zero_shot" / "metrics.json").write_text(json.dumps({**rec, "seed": 7}))
    capsys.readouterr()
    demo.main(["--preset", "tiny", "--seeds", "0", "--out", str(out), "--steps", "2", "--skip-done"])
    assert f"seeds run now: 0; seeds read from records already in {out}: 7" in capsys.readouterr().out
