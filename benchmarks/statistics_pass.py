"""Pass time and peak memory of RegMean's and Fisher merging's statistics pass, side by side with a plain forward.

    pass:    N steps of the system's ``training_step`` (each: one batch of B images per task, K tasks),
             i.e. what ``fit`` runs, without the Trainer's loop around it
    merge:   the closed form from the statistics (``merged_state_dict()``; RegMean++'s block-by-block
             merge runs here)
    forward: the same N x K batches through each task's expert, no statistics (the floor of any pass)

Every method (and the forward) runs in a fresh subprocess of one run, on the same seeded random batches
and K random experts (θ0 + noise around a random-weight encoder: only the sizes matter), so that its
peak memory is its own; each row gives the pass and merge seconds, the pass ÷ the plain forward, and
the peak memory over what was allocated before the pass (the K frozen experts the system holds are not
counted): CUDA's peak allocations, or on CPU the resident set's high-water mark (reset through
``/proc/self/clear_refs``).

    nice -n 10 python3 benchmarks/statistics_pass.py --model mini --batches 4 --threads 1 --out mini.json
    python3 benchmarks/statistics_pass.py --model vit-b-32 --tasks 8 --batches 16 --device cuda --out b32.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from common import build_visual, peak_memory_mib, random_pool, reset_peak_memory, status_kib, timed

from adamerge.systems.fisher import FisherMerging
from adamerge.systems.regmean import RegMean

MODELS = {"tiny": "tiny", "mini": "mini", "vit-b-32": "ViT-B-32"}
METHODS = {
    "regmean": (RegMean, {}),
    "regmean++": (RegMean, {"plus_plus": True}),
    "fisher": (FisherMerging, {"estimator": "exact"}),
    "fisher-sampled": (FisherMerging, {"estimator": "sampled"}),
    "fisher-batch": (FisherMerging, {"estimator": "batch"}),
}


def _allocated_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return (status_kib("VmRSS") or 0) / 1024


def run_method(name: str, pool, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    cls, kwargs = METHODS[name]
    system = cls(pool, **kwargs).to(device)
    system.reset_statistics()
    gc.collect()
    before = _allocated_mib(device)
    reset = reset_peak_memory(device)

    def one_pass(_):
        for i, batch in enumerate(batches):
            system.training_step(batch, i)

    pass_s = timed(one_pass, None, device)
    merge_s = timed(lambda _: system.merged_state_dict(), None, device)
    peak = peak_memory_mib(device)
    row = {"method": name, "label": system.method_label, "pass_s": pass_s, "merge_s": merge_s,
           "peak_over_experts_mib": round(peak - before, 1) if reset else None, "batches_seen": system.batches_seen}
    return row


def forward_pass(pool, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    experts = {t: pool.build_encoder(pool.expert_state(t)).to(device) for t in pool.tasks}

    def one_pass(_):
        with torch.no_grad():
            for batch in batches:
                for t, x in batch.items():
                    experts[t](x)

    timed(one_pass, None, device)  # warm-up
    return {"method": "forward", "pass_s": timed(one_pass, None, device)}


def worker(args: argparse.Namespace) -> None:
    """Build the pool and batches (seeded) and run one method; print its row."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = build_visual(MODELS[args.model])
    pool = random_pool(encoder, args.tasks, classes=args.classes)
    size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
    g = torch.Generator().manual_seed(0)
    batches = [{t: torch.randn(args.batch, 3, size, size, generator=g).to(device) for t in pool.tasks}
               for _ in range(args.batches)]
    row = forward_pass(pool, batches, device) if args.worker == "forward" else run_method(args.worker, pool, batches, device)
    row.update(image_size=size, encoder_params=sum(v.numel() for v in encoder.state_dict().values()),
               threads=torch.get_num_threads())
    print("RESULT " + json.dumps(row))


def run(args: argparse.Namespace) -> dict:
    rows = []
    for method in ["forward", *args.methods]:
        cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--tasks", str(args.tasks),
               "--classes", str(args.classes), "--batches", str(args.batches), "--batch", str(args.batch),
               "--threads", str(args.threads), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    forward, rows = rows[0], rows[1:]
    for r in rows:
        r["pass_over_forward"] = r["pass_s"] / forward["pass_s"]
    device = torch.device(args.device)
    return {
        "model": args.model, "device": str(device), "torch": torch.__version__, "threads": forward["threads"],
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tasks": args.tasks, "classes": args.classes, "batches": args.batches, "batch_per_task": args.batch,
        "image_size": forward["image_size"], "encoder_params": forward["encoder_params"],
        "forward_s": forward["pass_s"], "results": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="mini")
    p.add_argument("--tasks", type=int, default=4, help="number of random experts K")
    p.add_argument("--classes", type=int, default=10, help="classes of every task's head (exact Fisher: one "
                   "gradient per class per example)")
    p.add_argument("--batches", type=int, default=4, help="N: steps of the pass (one batch per task each)")
    p.add_argument("--batch", type=int, default=16, help="images per task per step")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=["forward", *METHODS], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    result = run(args)
    r = result
    where = f"{r['device']} ({r['gpu'] or r['cpu']}, {r['threads']} threads)"
    print(f"{r['model']} ({r['encoder_params'] / 1e6:.2f}M params) on {where}: K={r['tasks']} tasks x "
          f"{r['batches']} batches of {r['batch_per_task']}, {r['classes']} classes")
    print(f"{'method':15} {'pass s':>9} {'÷ forward':>10} {'merge s':>9} {'peak MiB':>9}")
    print(f"{'forward':15} {r['forward_s']:9.3f} {1.0:10.1f} {'':>9} {'':>9}")
    for row in r["results"]:
        peak = row["peak_over_experts_mib"]
        print(f"{row['method']:15} {row['pass_s']:9.3f} {row['pass_over_forward']:10.1f} {row['merge_s']:9.3f} "
              f"{peak if peak is not None else 'n/a':>9}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
