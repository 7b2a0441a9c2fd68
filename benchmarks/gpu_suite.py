"""The GPU suite (issue #12): one prepared run on one H100/H200, under 8 minutes, one JSON record.

Measured in one process, one after the other, each under its own time budget, on random weights
(open_clip ``pretrained=None``; K experts θ_0 + noise, built in memory; nothing is downloaded):

* ``adamerging``: layer-wise AdaMerging, ViT-B/32 (QuickGELU) × 8 tasks, 32 images per task per step
  in two micro-batches of 16 (the official config: batch 16, ``accumulate_grad_batches`` 2), in
  three precisions: ``fp32``; ``bf16_autocast`` (float32 task vectors);
  ``bf16_autocast_bf16_tv`` (bfloat16 task vectors too). For each: the median step time of steps
  interleaved with a plain forward+backward of the same encoder on the same batches
  (``adamerging_step.make_steps``) and their ratio, the peak GPU memory of both, and the wall time
  of 500 consecutive steps (steps/s; target < 60 s);
* ``wemoe``, ``surgery_v2``: their training steps (fp32) on the same model and tasks, 16 images per
  task (their papers' batch);
* ``large``: AdaMerging's peak memory on ViT-L/14 (QuickGELU) × 20 tasks (bf16 autocast, bf16 task
  vectors; target < 24 GiB) at one and two images per task per forward, the memory before the
  first step, the cost of one more image, and what that predicts for larger (micro-)batches;
* ``tests``: the ``gpu``-marked tests (pytest's JUnit report, counted).

A measurement that fails (an out-of-memory error, say) is recorded with its error and the suite goes
on; the JSON is rewritten (atomically) after every measurement, so a run stopped early still leaves
what it measured. ``--tiny`` swaps in the tests' 2-block ViT and a few steps: the CPU check of CI.

    bash benchmarks/gpu_suite.sh                  # GPU machine; JSON in $OUT or benchmarks/results/
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from adamerging_step import make_steps
from common import build_visual, peak_memory_mib, random_pool, reset_peak_memory, sync, timed
from surgery_step import build_system

from adamerge.components.adamerging import AdaMergingModel
from adamerge.files import write_text
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.wemoe import WEMoE

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (task-vector storage, autocast dtype)
    "fp32": ("float32", None),
    "bf16_autocast": ("float32", torch.bfloat16),
    "bf16_autocast_bf16_tv": ("bfloat16", torch.bfloat16),
}
TARGETS = {"adamerging_steps": 500, "adamerging_seconds": 60.0, "large_peak_gib": 24.0}


@dataclass(frozen=True)
class Plan:
    model: str
    tasks: int
    batch: int  # images per task per AdaMerging step
    accumulate: int  # ... in this many micro-batches, gradients averaged (official: 2 × 16)
    method_batch: int  # images per task per WEMoE / SurgeryV2 step (their papers': 16)
    steps: int  # consecutive AdaMerging steps timed as one run (the 500-step target)
    pairs: int  # interleaved plain/AdaMerging steps for the medians and their ratio
    warmup: int
    method_steps: int  # timed WEMoE / SurgeryV2 steps
    large_model: str
    large_tasks: int
    large_batches: tuple[int, ...]
    budget_s: float  # per measurement (each AdaMerging precision, each method, the large model, the tests)


FULL = Plan("ViT-B-32-quickgelu", 8, 32, 2, 16, 500, 20, 3, 20, "ViT-L-14-quickgelu", 20, (1, 2), 65.0)
TINY = Plan("tiny", 2, 2, 2, 2, 3, 3, 1, 2, "tiny", 3, (1, 2), 30.0)


def under(dtype: torch.dtype | None, device: torch.device, fn):
    """``fn`` run under autocast to ``dtype`` (None: as it is)."""

    def run(arg):
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            return fn(arg)

    return run


def make_batches(pool, batch: int, device: torch.device, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch`` random images per task, already on the device (cycled by the steps)."""
    size = tuple(pool.encoder.image_size)
    g = torch.Generator().manual_seed(0)
    return [{t: torch.randn(batch, 3, *size, generator=g).to(device) for t in pool.tasks} for _ in range(n)]


def memory_now_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure_adamerging(plan: Plan, pool, device: torch.device, variant: str) -> dict:
    """Peaks, interleaved plain/AdaMerging step medians and their ratio, then ``plan.steps`` steps in a row.

    Both steps live in one process, so on CUDA each peak has the other's resident memory taken off
    (exact: it is allocated throughout): the plain encoder's weights (and the heads) from AdaMerging's
    peak (measured first, before the plain step has made gradients), AdaMerging's θ_0 and task
    vectors from the plain step's. On the CPU the peaks are the process's resident high-water mark, as measured."""
    tv_dtype, dtype = VARIANTS[variant]
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer", tv_dtype=tv_dtype))
    system = system.to(device).train()
    static = memory_now_mib(device)
    adapt, plain = (under(dtype, device, fn) for fn in make_steps(system, pool, device, plan.accumulate))
    out = {"tv_dtype": tv_dtype, "autocast": str(dtype).removeprefix("torch.") if dtype else None,
           "static_mib": static}
    if device.type == "cuda":  # the plain encoder's weights (and the heads, on the device)
        out["plain_weights_mib"] = memory_now_mib(device) - static
    batches = make_batches(pool, plan.batch, device)
    others = {"adamerging": out.get("plain_weights_mib"), "plain": static}
    for name, fn in (("adamerging", adapt), ("plain", plain)):
        reset_peak_memory(device)
        for i in range(plan.warmup):
            timed(fn, batches[i % len(batches)], device)
        peak = peak_memory_mib(device)
        out[f"{name}_peak_mib"] = peak - others[name] if device.type == "cuda" else peak
    times = {"plain": [], "adamerging": []}
    for i in range(plan.pairs):
        times["plain"].append(timed(plain, batches[i % len(batches)], device))
        times["adamerging"].append(timed(adapt, batches[i % len(batches)], device))
    out["plain_ms_median"] = statistics.median(times["plain"]) * 1e3
    out["step_ms_median"] = statistics.median(times["adamerging"]) * 1e3
    out["ratio"] = out["step_ms_median"] / out["plain_ms_median"]
    out["run"] = run_steps(adapt, batches, device, plan.steps, plan.budget_s)
    out["steps_per_s"] = out["run"]["steps_per_s"]
    return out


def run_steps(step, batches, device: torch.device, steps: int, budget_s: float) -> dict:
    """``steps`` steps in a row, timed as a whole; stops early past ``budget_s``. The time of the
    target's 500 steps is extrapolated from the steps done when they are not 500 (``--tiny``, budget)."""
    sync(device)
    start = time.perf_counter()
    done = 0
    while done < steps:
        step(batches[done % len(batches)])
        done += 1
        if done % 10 == 0 or done == steps:
            sync(device)
            if time.perf_counter() - start > budget_s:
                break
    sync(device)
    seconds = time.perf_counter() - start
    target = TARGETS["adamerging_steps"]
    return {"steps": steps, "steps_done": done, "seconds": seconds, "steps_per_s": done / seconds,
            f"seconds_per_{target}_steps": seconds / done * target, "extrapolated": done != target}


def training_step(system, optimizer):
    """What Lightning's automatic optimisation runs per batch: the system's ``training_step``,
    backward, optimizer step (no trainer here, so nothing is logged)."""
    system.log = lambda *args, **kwargs: None

    def step(images):
        optimizer.zero_grad(set_to_none=True)
        system.training_step(images, 0).backward()
        optimizer.step()

    return step


def measure_method(plan: Plan, pool, device: torch.device, method: str) -> dict:
    """Step time (median) and peak memory of WEMoE's or SurgeryV2's training step, fp32."""
    system = WEMoE(pool) if method == "wemoe" else build_system(method, pool, "float32")
    system = system.to(device).train()
    step = training_step(system, system.configure_optimizers())
    batches = make_batches(pool, plan.method_batch, device)
    out = {"trainable_parameters": sum(p.numel() for p in system.learnable_parameters()),
           "static_mib": memory_now_mib(device)}
    reset_peak_memory(device)
    timed(step, batches[0], device)  # warm-up: Surgery's expert cache, optimizer state
    times, start = [], time.perf_counter()
    for i in range(plan.method_steps):
        times.append(timed(step, batches[i % len(batches)], device))
        if time.perf_counter() - start > plan.budget_s:
            break
    out.update(peak_mib=peak_memory_mib(device), steps_done=len(times),
               step_ms_median=statistics.median(times) * 1e3)
    out["steps_per_s"] = 1e3 / out["step_ms_median"]
    return out


def measure_large(plan: Plan, device: torch.device) -> dict:
    """AdaMerging's peak memory on the large model (bf16 autocast, bf16 task vectors) per batch size."""
    pool = random_pool(build_visual(plan.large_model), plan.large_tasks, noise_device=device)
    start = time.perf_counter()
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer", tv_dtype="bfloat16"))
    system = system.to(device).train()
    tv = system.model.task_vectors
    out = {"model": plan.large_model, "tasks": plan.large_tasks, "tv_dtype": "bfloat16", "autocast": "bfloat16",
           "merged_params": tv.shape[1], "task_vectors_mib": tv.numel() * tv.element_size() / 2**20,
           "build_s": time.perf_counter() - start, "static_mib": memory_now_mib(device), "by_batch": {}}
    adapt = under(torch.bfloat16, device, training_step(system, system.configure_optimizers()))
    for batch in plan.large_batches:
        row = out["by_batch"][str(batch)] = {"images_per_step": batch * plan.large_tasks}
        try:
            images = make_batches(pool, batch, device, n=1)[0]
            reset_peak_memory(device)
            timed(adapt, images, device)
            row["step_ms"] = timed(adapt, images, device) * 1e3
            row["peak_mib"] = peak_memory_mib(device)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        images = None
        free_memory()
    return {**out, **memory_fit(out, plan)}


def memory_fit(out: dict, plan: Plan) -> dict:
    """Peak = static + per-image cost · images, fitted through the two smallest measured batches."""
    rows = sorted((r["images_per_step"], r["peak_mib"]) for r in out["by_batch"].values() if "peak_mib" in r)
    if len(rows) < 2:
        return {}
    (n0, p0), (n1, p1) = rows[:2]
    per_image = (p1 - p0) / (n1 - n0)
    limit = TARGETS["large_peak_gib"] * 1024
    fit = {"per_image_mib": per_image, "peak_at_0_images_mib": p0 - per_image * n0}
    if per_image > 0:
        fit["max_images_per_step_under_limit"] = int((limit - fit["peak_at_0_images_mib"]) // per_image)
        fit["predicted_peak_mib_at_batch"] = {
            str(b): fit["peak_at_0_images_mib"] + per_image * b * plan.large_tasks for b in (4, 16, 32)
        }
    return fit


def run_gpu_tests(budget_s: float) -> dict:
    """``pytest -m gpu`` over the test files that carry the marker; counts from its JUnit report."""
    marked = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bmark\.gpu\b)", re.MULTILINE)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if marked.search(p.read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s, check=False)
        except subprocess.TimeoutExpired:
            return {"files": files, "error": f"timed out after {budget_s:.0f} s"}
        out = {"files": files, "returncode": proc.returncode, "seconds": time.perf_counter() - start,
               "summary": (proc.stdout.strip().splitlines() or [""])[-1]}
        if report.is_file():
            out.update(junit_counts(ET.parse(report).getroot()))
        if proc.returncode not in (0, 5):
            out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return out


def junit_counts(root: ET.Element) -> dict:
    """Counts and each test's outcome (passed, failure, error, skipped) from a JUnit XML report."""
    outcomes = {}
    for case in root.iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    count = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failure", "error", "skipped")}
    return {"tests": len(outcomes), "passed": count["passed"], "failed": count["failure"],
            "errors": count["error"], "skipped": count["skipped"], "outcomes": outcomes}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(device: torch.device, tiny: bool) -> Path:
    """``$OUT/`` where set (the device tool brings it back), else ``benchmarks/results/``."""
    name = f"gpu_suite-{'tiny-' if tiny else ''}{slug(machine_name(device))}.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "benchmarks" / "results" / name


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def header(plan: Plan, device: torch.device, tiny: bool) -> dict:
    import open_clip

    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {
        "suite": "benchmarks/gpu_suite.py", "tiny": tiny, "machine": machine_name(device), "device": str(device),
        "gpu_memory_gib": gpu.total_memory / 2**30 if gpu else None,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "open_clip": open_clip.__version__,
        "matmul_precision": torch.get_float32_matmul_precision(), "git_commit": git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "plan": asdict(plan),
    }


def targets(record: dict) -> dict:
    """Pass/fail of the issue's targets: B/32 × 8, 500 steps < 60 s (fp32, the official precision;
    every precision listed); L/14 × 20 peak < 24 GiB (at the smallest measured batch)."""
    limit_s = TARGETS["adamerging_seconds"]
    by_variant = {}
    for variant, result in record.get("adamerging", {}).items():
        run = result.get("run", {})
        seconds = run.get("seconds_per_500_steps")
        by_variant[variant] = {"seconds": seconds, "extrapolated": run.get("extrapolated"),
                               "passed": seconds is not None and seconds < limit_s}
    steps = {"limit_s": limit_s, **by_variant.get("fp32", {"seconds": None, "passed": False}),
             "by_variant": by_variant}
    limit_gib = TARGETS["large_peak_gib"]
    large = record.get("large", {})
    measured = sorted((int(b), r) for b, r in large.get("by_batch", {}).items() if "peak_mib" in r)
    peak = {"limit_gib": limit_gib, "batch_per_task": None, "peak_gib": None, "passed": False}
    if measured:
        batch, row = measured[0]
        peak.update(batch_per_task=batch, peak_gib=row["peak_mib"] / 1024, passed=row["peak_mib"] / 1024 < limit_gib)
    if "max_images_per_step_under_limit" in large:
        peak["max_batch_per_task_under_limit"] = large["max_images_per_step_under_limit"] // large["tasks"]
    return {"adamerging_500_steps": steps, "large_peak_memory": peak}


def jobs(plan: Plan, device: torch.device, only: set[str]) -> list[tuple[tuple[str, ...], object]]:
    """(where the result goes in the record, measurement) in run order."""
    out = []
    if only & {"adamerging", "wemoe", "surgery_v2"}:
        pool = random_pool(build_visual(plan.model), plan.tasks, noise_device=device)
        if "adamerging" in only:
            out += [(("adamerging", v), partial(measure_adamerging, plan, pool, device, v)) for v in VARIANTS]
        out += [((m,), partial(measure_method, plan, pool, device, m)) for m in ("wemoe", "surgery_v2") if m in only]
    if "large" in only:
        out.append((("large",), partial(measure_large, plan, device)))
    if "tests" in only:
        out.append((("tests",), partial(run_gpu_tests, max(plan.budget_s, 180.0))))
    return out


def run_suite(plan: Plan, device: torch.device, out_path: Path, tiny: bool, only: set[str]) -> dict:
    """Run every measurement; the record is rewritten atomically after each one."""
    record = header(plan, device, tiny)
    record["errors"] = []
    start = time.perf_counter()
    for where, measure in jobs(plan, device, only):
        name = "/".join(where)
        print(f"[gpu_suite] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = measure()
        except Exception as e:  # noqa: BLE001 - recorded; the suite goes on to the next measurement
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            record["errors"].append(name)
        result["seconds_total"] = time.perf_counter() - t0
        free_memory()
        node = record
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = result
        record.pop("targets", None), record.pop("seconds", None)  # kept last in the file
        record["targets"] = targets(record)
        record["seconds"] = time.perf_counter() - start
        write_text(out_path, json.dumps(record, indent=2) + "\n")
        print(f"[gpu_suite] {name}: {summary(where, result)}", flush=True)
    return record


def summary(where: tuple[str, ...], r: dict) -> str:
    if "error" in r:
        return r["error"]
    if where[0] == "adamerging":
        return (f"step {r['step_ms_median']:.1f} ms, plain {r['plain_ms_median']:.1f} ms, ratio {r['ratio']:.2f}x, "
                f"{r['steps_per_s']:.1f} steps/s, {r['run']['steps']} steps {r['run']['seconds']:.1f} s, "
                f"peak {r['adamerging_peak_mib']:.0f} MiB")
    if where[0] in ("wemoe", "surgery_v2"):
        return f"step {r['step_ms_median']:.1f} ms, peak {r['peak_mib']:.0f} MiB"
    if where[0] == "large":
        return ", ".join(f"batch {b}: peak {row.get('peak_mib', float('nan')):.0f} MiB"
                         for b, row in r["by_batch"].items())
    return r.get("summary", "")


def main(argv: list[str] | None = None) -> dict:
    names = ("adamerging", "wemoe", "surgery_v2", "large", "tests")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tests' tiny ViT, 2 tasks, a few steps (CPU, CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON record (default $OUT/gpu_suite-<machine>.json, else benchmarks/results/)")
    p.add_argument("--only", nargs="+", choices=names, default=list(names), help="run only these measurements")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of each measurement, seconds")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default=None,
                   help="torch.set_float32_matmul_precision (default: leave torch's 'highest', as the configs run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    plan = TINY if args.tiny else FULL
    if args.budget_s is not None:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget_s})
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    out = args.out or default_out(device, args.tiny)
    record = run_suite(plan, device, out, args.tiny, set(args.only))
    print(json.dumps(record["targets"], indent=2))
    print(f"[gpu_suite] wrote {out} ({record['seconds']:.0f} s)")
    return record


def failed(record: dict) -> bool:
    """A measurement raised, or a gpu test failed (targets missed are figures, not failures)."""
    tests = record.get("tests", {})
    return bool(record["errors"]) or tests.get("returncode", 0) not in (0, 5) or "error" in tests


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
