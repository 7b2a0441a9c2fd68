"""Step time and peak memory of Surgery v1 and SurgeryV2 against AdaMerging, same model and batches.

One run builds the same random pool (open_clip ``ViT-B-32`` or the mini benchmark's model, random
weights, experts θ0 + seeded noise) and the same unlabeled batches (``--batch-size`` images per task)
for every method, then times full adaptation steps — ``adaptation_losses`` of the system over all
tasks, sum, backward, Adam step — exactly what ``training_step`` runs, without the Trainer around it:

* ``adamerging``: layer-wise AdaMerging (merge θ0 + Σ λ τ, one forward + backward through the encoder),
* ``surgery_v1``: the frozen task-arithmetic encoder (no grad) + final-embedding aligners + K frozen
  expert forwards (no grad),
* ``surgery_v2``: per-block aligners (backward through the encoder's activations) + K expert forwards
  recording per-block token means.

Each method runs in its own fresh process (spawn), so memory figures do not leak between methods:
on CUDA the peak allocated memory during the steps; on CPU the peak resident set during the
steps (``VmHWM`` reset through ``/proc/self/clear_refs``); both measured from the moment the system is
built (pool, merged encoder, task vectors in memory), so ``adaptation_extra_mb`` = peak − built model
counts what adaptation adds: the experts' cache, activations, gradients, optimizer state. The first
(untimed) step builds the experts' cache. Prints ratios to AdaMerging and
writes everything as JSON to ``--out``.

    nice -n 10 python benchmarks/surgery_step.py --model mini --steps 5 --out surgery_step_mini.json
    nice -n 10 python benchmarks/surgery_step.py --model ViT-B-32 --tasks 8 --steps 2 --out surgery_step_b32.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

METHODS = ("adamerging", "surgery_v1", "surgery_v2")


def build_system(method: str, pool, expert_dtype: str):
    from functools import partial

    if method == "adamerging":
        from adamerge.components.adamerging import AdaMergingModel
        from adamerge.systems.adamerging import AdaMerging

        return AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"))
    from adamerge.components.surgery import SurgeryModel
    from adamerge.systems.surgery import Surgery

    version = method.split("_")[1]
    return Surgery(pool, base_merge={"method": "task_arithmetic", "lam": 0.3},
                   model=partial(SurgeryModel, version=version, rank=16), expert_dtype=expert_dtype,
                   export_merged=False)


def run_method(method: str, args: dict) -> dict:
    """Build pool + system in this (fresh) process and time ``args['steps']`` adaptation steps."""
    import torch
    from common import build_visual, peak_memory_mib, random_pool, reset_peak_memory, status_kib

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    device = torch.device(args["device"])
    pool = random_pool(build_visual(args["model"]), args["tasks"], name=args["model"])
    system = build_system(method, pool, args["expert_dtype"]).to(device)
    system.train()
    params = system.learnable_parameters()
    opt = torch.optim.Adam(params, lr=1e-3)
    size = tuple(pool.encoder.image_size)
    g = torch.Generator().manual_seed(0)
    batches = [{t: torch.randn(args["batch_size"], 3, *size, generator=g).to(device) for t in pool.tasks}
               for _ in range(args["steps"] + 1)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch):
        loss = torch.stack(list(system.adaptation_losses(batch).values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().item()

    out = {"method": method, "trainable_parameters": sum(p.numel() for p in params)}
    if device.type == "cuda":
        sync()
        out["model_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        out["model_mb"] = (status_kib("VmRSS") or 0) / 1024
        out["peak_reset"] = reset_peak_memory(device)
    step(batches[0])  # warm-up (untimed, but in the peak): experts built and cached, optimizer state
    sync()
    start = time.perf_counter()
    losses = [step(b) for b in batches[1:]]
    sync()
    out["step_s"] = (time.perf_counter() - start) / args["steps"]
    out["losses"] = losses
    out["peak_mb"] = peak_memory_mib(device)
    out["adaptation_extra_mb"] = out["peak_mb"] - out["model_mb"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini", help="'mini' (the mini benchmark's ViT) or an open_clip name")
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="images per task per step (papers: 16)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up step)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--expert-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = {"model": a.model, "tasks": a.tasks, "batch_size": a.batch_size, "steps": a.steps, "device": device,
            "threads": a.threads, "expert_dtype": a.expert_dtype}
    ctx = mp.get_context("spawn")
    results = {}
    for method in a.methods:
        with ctx.Pool(1) as workers:
            results[method] = workers.apply(run_method, (method, args))
        r = results[method]
        print(f"{method:11s} step {r['step_s'] * 1000:9.1f} ms   peak {r['peak_mb']:9.1f} MB   "
              f"over the built model {r['adaptation_extra_mb']:8.1f} MB   trainable {r['trainable_parameters']:,}")
    ratios = {}
    if "adamerging" in results:
        ref = results["adamerging"]
        for m in results:
            if m != "adamerging":
                ratios[f"{m}/adamerging"] = {
                    "step_time": results[m]["step_s"] / ref["step_s"],
                    "peak_memory": results[m]["peak_mb"] / ref["peak_mb"],
                    "adaptation_extra_memory": results[m]["adaptation_extra_mb"] / max(ref["adaptation_extra_mb"], 1e-9),
                }
                r = ratios[f"{m}/adamerging"]
                print(f"{m}/adamerging: time {r['step_time']:.2f}x   peak memory {r['peak_memory']:.2f}x   "
                      f"memory over the built model {r['adaptation_extra_memory']:.2f}x")
    report = {**args, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads_effective": a.threads or torch.get_num_threads(), "results": results, "ratios": ratios}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
