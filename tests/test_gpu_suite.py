"""The GPU suite's CPU run (``bash benchmarks/gpu_suite.sh --tiny``) writes every figure of its JSON record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
VARIANTS = {"fp32": ("float32", None), "bf16_autocast": ("float32", "bfloat16"),
            "bf16_autocast_bf16_tv": ("bfloat16", "bfloat16")}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


def test_the_record_names_the_machine_and_has_no_errors(record):
    assert record["machine"] == "cpu" and record["device"] == "cpu" and record["tiny"] is True
    assert record["torch"] == torch.__version__ and record["open_clip"]
    assert record["errors"] == [] and record["seconds"] > 0
    assert record["plan"]["model"] == "tiny" and record["plan"]["tasks"] == 2


def test_adamerging_figures_in_every_precision(record):
    assert set(record["adamerging"]) == set(VARIANTS)
    for name, r in record["adamerging"].items():
        assert (r["tv_dtype"], r["autocast"]) == VARIANTS[name]
        assert r["step_ms_median"] > 0 and r["plain_ms_median"] > 0
        assert r["ratio"] == pytest.approx(r["step_ms_median"] / r["plain_ms_median"])
        assert r["adamerging_peak_mib"] > 0 and r["plain_peak_mib"] > 0
        run = r["run"]
        assert run["steps_done"] == run["steps"] == record["plan"]["steps"] and run["seconds"] > 0
        assert r["steps_per_s"] == pytest.approx(run["steps_done"] / run["seconds"])
        assert run["seconds_per_500_steps"] == pytest.approx(run["seconds"] / run["steps_done"] * 500)
        assert run["extrapolated"] is True  # 3 steps, not 500


def test_wemoe_surgery_and_large_model_figures(record):
    for method in ("wemoe", "surgery_v2"):
        r = record[method]
        assert r["step_ms_median"] > 0 and r["peak_mib"] > 0 and r["trainable_parameters"] > 0
        assert r["steps_per_s"] == pytest.approx(1e3 / r["step_ms_median"])
    large = record["large"]
    assert large["tasks"] == 3 and large["tv_dtype"] == "bfloat16" and large["task_vectors_mib"] > 0
    assert set(large["by_batch"]) == {"1", "2"}
    for batch, row in large["by_batch"].items():
        assert row["images_per_step"] == int(batch) * 3 and row["peak_mib"] > 0 and row["step_ms"] > 0
    (n0, p0), (n1, p1) = ((r["images_per_step"], r["peak_mib"]) for r in large["by_batch"].values())
    assert large["per_image_mib"] == pytest.approx((p1 - p0) / (n1 - n0))  # the fit of this run's peaks
    assert large["peak_at_0_images_mib"] == pytest.approx(p0 - large["per_image_mib"] * n0)


def test_gpu_tests_ran_and_targets_judged_from_the_same_run(record):
    tests = record["tests"]
    assert "tests/test_gpu.py" in tests["files"] and tests["returncode"] == 0
    assert tests["tests"] >= 4 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] == tests["tests"]  # no CUDA here
    steps = record["targets"]["adamerging_500_steps"]
    assert steps["limit_s"] == 60 and steps["seconds"] == record["adamerging"]["fp32"]["run"]["seconds_per_500_steps"]
    assert steps["passed"] == (steps["seconds"] < 60)
    assert set(steps["by_variant"]) == set(VARIANTS)
    peak = record["targets"]["large_peak_memory"]
    assert peak["limit_gib"] == 24 and peak["batch_per_task"] == 1
    assert peak["peak_gib"] == pytest.approx(record["large"]["by_batch"]["1"]["peak_mib"] / 1024)
    assert peak["passed"] == (peak["peak_gib"] < 24)
