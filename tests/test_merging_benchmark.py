"""The merge speed benchmark runs end to end on a small open_clip tower and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_speed.py"


@pytest.mark.slow
def test_merge_speed_writes_results(tmp_path):
    out = tmp_path / "merge_speed.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        "ViT-S-32",
        "--experts",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"ties", "opcm"}
    for r in rows.values():
        assert r["merge_s"] > 0 and r["peak_rss_gb"] > 0 and r["params"] > 10_000_000
    assert len(rows["opcm"]["rss_after_each_add_gb"]) == 2
    assert data["summary"]["time_opcm_over_ties"] > 0
