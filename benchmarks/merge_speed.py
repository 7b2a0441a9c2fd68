"""Merge time and peak memory of the static merges on ViT-sized random weights, side by side with TIES.

    nice -n 10 python3 benchmarks/merge_speed.py --out results/merge_speed.json
    python3 benchmarks/merge_speed.py --methods ties tsv_m iso_c iso_cts cart wudi dare_ties consensus_ta

Every method registered in :mod:`adamerge.merging` can be named (at its defaults; ``opcm`` adds one
expert at a time, the others get all K task vectors at once, as ``merge_pool`` gives them).

θ0 is open_clip's image tower (``--model ViT-B-32``, ``pretrained=None``: random init, no download);
the K experts are θ0 + Gaussian noise (``--noise``). Each method runs in a fresh subprocess so that
its peak memory is its own: the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once θ0 is built) minus the resident set at that moment, i.e. what the
merge needs on top of θ0 — for TIES the K task vectors it must hold plus its working memory, for OPCM
one expert at a time plus its running sum. The experts are drawn and written to safetensors files
before the clock starts; the pool reads τ_k from its file when the stream reaches it (from the page
cache, as a pool of local checkpoints would), so streaming methods hold only what they keep, and
reading is in the time. Times cover the merging calls only (not building θ0 or drawing the experts). ``--threads`` sets torch's CPU threads (on a busy shared machine
multi-threaded LAPACK can be 20x slower than one thread).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import reset_peak_memory, status_kib
from safetensors.torch import load_file, save_file

from adamerge.merging.registry import METHODS as REGISTERED

METHODS = tuple(REGISTERED)


def _pretrained(model: str) -> dict[str, torch.Tensor]:
    import open_clip

    clip = open_clip.create_model(model, pretrained=None)
    state = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
    del clip
    gc.collect()
    return state


def _noise(pre: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in pre.items() if v.is_floating_point()}


def _run_opcm(pre, args) -> dict:
    from adamerge.merging import OPCMerger

    merger = OPCMerger(pre, alpha=0.5)
    seconds, rss_after_add = 0.0, []
    for k in range(args.experts):
        expert = {n: v + t for (n, v), t in zip(pre.items(), _noise(pre, seed=k, scale=args.noise).values())}
        start = time.perf_counter()
        merger.add(expert, name=f"expert {k}")
        seconds += time.perf_counter() - start
        del expert
        gc.collect()
        rss_after_add.append(round(status_kib("VmRSS") / 2**20, 3))
    start = time.perf_counter()
    merged = merger.merged_state()
    seconds += time.perf_counter() - start
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    return {"merge_s": seconds, "rss_after_each_add_gb": rss_after_add, "lambda_t": merger.lambda_t}


class _DiskTaus:
    """A pool as merge_pool's pools are: θ0 in memory, each τ_k read from its own safetensors file when
    the stream reaches it (the files are written before the clock starts and stay in the page cache),
    so a method that streams (task arithmetic, DARE-TA, DARE-TIES, OPCM) holds only what it keeps, and
    one that reads the stream twice (Consensus) reads it twice."""

    def __init__(self, pre, paths):
        self.pre, self.paths = pre, paths

    def pretrained_state(self):
        return self.pre

    def task_vectors(self, tasks=None):
        for k, path in enumerate(self.paths):
            yield f"task{k}", load_file(path)


def _run_registered(pre, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="merge_speed_") as tmp:
        paths = []
        for k in range(args.experts):
            paths.append(os.path.join(tmp, f"task{k}.safetensors"))
            save_file(_noise(pre, seed=k, scale=args.noise), paths[-1])
        gc.collect()
        reset_peak_memory(torch.device("cpu"))  # the peak the worker reports starts here
        start = time.perf_counter()
        merged = REGISTERED[args.worker](_DiskTaus(pre, paths))
        seconds = time.perf_counter() - start
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    return {"merge_s": seconds}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    pre = _pretrained(args.model)
    assert all(v.is_floating_point() for v in pre.values())  # open_clip's visual tower: float only
    params = sum(v.numel() for v in pre.values())
    gc.collect()
    base_kb = status_kib("VmRSS")
    reset = reset_peak_memory(torch.device("cpu"))
    result = {"opcm": _run_opcm}.get(args.worker, _run_registered)(pre, args)
    peak_kb = status_kib("VmHWM")
    result.update(
        method=args.worker,
        params=params,
        model_gb=round(params * 4 / 2**30, 3),
        base_rss_gb=round(base_kb / 2**20, 3),
        peak_rss_gb=round(peak_kb / 2**20, 3),
        peak_over_theta0_gb=round((peak_kb - base_kb) / 2**20, 3) if reset else None,
        peak_reset=reset,
    )
    print("RESULT " + json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=False, help="write the results as JSON here")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (pretrained=None)")
    parser.add_argument("--experts", type=int, default=8, help="number of random experts K")
    parser.add_argument("--noise", type=float, default=1e-3, help="std of the experts' noise around θ0")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--methods", nargs="+", default=["ties", "opcm"], choices=METHODS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = []
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--model",
            args.model,
            "--experts",
            str(args.experts),
            "--noise",
            str(args.noise),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    _report(rows, args)


def _report(rows: list[dict], args) -> None:
    print(
        f"{args.model} image tower, {rows[0]['params'] / 1e6:.1f}M params ({rows[0]['model_gb']} GB fp32), "
        f"{args.experts} experts, {args.threads} thread(s)"
    )
    print(f"{'method':14} {'merge s':>9} {'÷ TIES':>7} {'peak RSS GB':>12} {'peak over θ0 GB':>16} {'÷ model size':>13}")
    ties_s = next((r["merge_s"] for r in rows if r["method"] == "ties"), None)
    for r in rows:
        over = r["peak_over_theta0_gb"]
        ratio = f"{over / r['model_gb']:.1f}x" if over is not None else "n/a"
        vs = f"{r['merge_s'] / ties_s:.1f}x" if ties_s else "n/a"
        print(f"{r['method']:14} {r['merge_s']:9.1f} {vs:>7} {r['peak_rss_gb']:12.2f} "
              f"{over if over is not None else 'n/a':>16} {ratio:>13}")
    by = {r["method"]: r for r in rows}
    summary = {f"time_{m}_over_ties": round(r["merge_s"] / by["ties"]["merge_s"], 2)
               for m, r in by.items() if m != "ties" and "ties" in by}
    if "ties" in by and "opcm" in by:
        summary |= {
            "time_opcm_over_ties": round(by["opcm"]["merge_s"] / by["ties"]["merge_s"], 2),
            "peak_over_theta0_opcm_over_ties": (
                round(by["opcm"]["peak_over_theta0_gb"] / by["ties"]["peak_over_theta0_gb"], 2)
                if by["ties"]["peak_over_theta0_gb"]
                else None
            ),
        }
        print(
            f"OPCM / TIES: time {summary['time_opcm_over_ties']}x, "
            f"peak memory over θ0 {summary['peak_over_theta0_opcm_over_ties']}x"
        )
    if "opcm" in by:
        print("OPCM resident set after each add (GB):", by["opcm"]["rss_after_each_add_gb"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
        args.out.write_text(json.dumps({"config": config, "results": rows, "summary": summary}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
