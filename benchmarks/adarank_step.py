"""Cost of one AdaRank step against one layer-wise AdaMerging step: same model, same batches, one run.

    adamerging: θ = o + Σ_k λ_k^l d_k^l (fused) → one forward over the K per-task batches → entropy per
                task → backward to λ → Adam step
    adarank:    θ^l = o^l + Σ_k λ_k^l U diag(σ ⊙ m) Vᵀ on the attention / MLP matrices (one batched
                product per shape group over all K·r components), λ d elsewhere → the same forward, loss
                and backward, to λ and the mask logits → Adam step

Both systems are built on the same random-weight pool and directions (``--directions``), then timed
interleaved (adamerging, adarank, adamerging, ...) after a warm-up; medians and the ratio are printed
and written as JSON with ``--out``. Memory: what each keeps (AdaMerging's stacked directions; AdaRank's
singular factors plus the directions of the other tensors) and each step's working memory on top of
what was resident when its phase began (CUDA: peak allocated; CPU: the resident set's high-water mark,
reset through ``/proc/self/clear_refs``). Building AdaRank (its SVDs) is timed on its own.

    nice -n 10 python3 benchmarks/adarank_step.py --model mini --out mini.json
    nice -n 10 python3 benchmarks/adarank_step.py --model vit-b-32 --steps 2 --warmup 1 --out b32.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from common import build_visual, peak_memory_mib, random_pool, reset_peak_memory, status_kib, timed

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.adarank import AdaRankModel
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.adarank import AdaRank

MODELS = {"tiny": 3, "mini": 6, "vit-b-32": 8}  # default number of tasks K per model


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that a phase's resident set
    starts without what the previous phase freed and its high-water mark counts its own allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    kib = status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def make_step(system: AdaMerging):
    """One optimizer step of ``system`` on a dict of per-task batches (the training step's work)."""
    optimizer = system.configure_optimizers()

    def step(images: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(system.adaptation_losses(images).values())).sum().backward()
        optimizer.step()

    return step


def buffer_mib(module: torch.nn.Module, prefixes: tuple[str, ...]) -> float:
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n.startswith(prefixes)) / 2**20


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.tasks or MODELS[args.model]
    encoder = build_visual({"vit-b-32": "ViT-B-32-quickgelu"}.get(args.model, args.model))
    size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
    pool = random_pool(encoder, k)
    directions = json.loads(args.directions) if args.directions.startswith("{") else args.directions
    ada = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer", clamp=False,
                                         directions=directions)).to(device)
    start = time.perf_counter()
    rank = AdaRank(pool, model=partial(AdaRankModel, directions=directions, split_qkv=not args.fused_qkv,
                                       max_rank_ratio=args.max_rank_ratio, svd_dtype=args.svd_dtype,
                                       initial_rank_ratio=args.initial_rank_ratio))
    build_s = time.perf_counter() - start
    rank = rank.to(device)
    steps = {"adamerging": make_step(ada), "adarank": make_step(rank)}
    g = torch.Generator().manual_seed(0)
    images = {t: torch.randn(args.batch, 3, size, size, generator=g).to(device) for t in pool.tasks}
    memory = {
        "adamerging_directions_mib": buffer_mib(ada.model, ("task_vectors",)),
        "adarank_svd_factors_mib": rank.model.svd_bytes() / 2**20,
        "adarank_other_directions_mib": buffer_mib(rank.model, ("dense_directions",)),
        "origin_mib": buffer_mib(rank.model, ("encoder.",)),
    }
    order = list(steps)[::-1] if args.adarank_first else list(steps)
    for name in order:
        fn = steps[name]
        release_freed_memory()
        before = resident_mib(device)
        reset_peak_memory(device)
        for _ in range(args.warmup):
            timed(fn, images, device)
        memory[f"{name}_step_working_mib"] = peak_memory_mib(device) - before
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            times[name].append(timed(fn, images, device))
    merge_ms = {}
    with torch.no_grad():
        for name, system in (("adamerging", ada), ("adarank", rank)):
            merge_ms[name] = statistics.median(
                timed(lambda s: s.model.merged_parameters(), system, device) for _ in range(max(2, args.steps))
            ) * 1e3
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tasks": k, "batch_per_task": args.batch, "image_size": size, "directions": directions,
        "split_qkv": not args.fused_qkv, "max_rank_ratio": args.max_rank_ratio, "svd_dtype": args.svd_dtype,
        "initial_rank_ratio": args.initial_rank_ratio,
        "tensors": len(rank.model.layer_names), "masked_matrices": len(rank.model.matrices),
        "mask_logits": rank.model.mask_logits.numel(), "coefficients": rank.model.lambdas.numel(),
        "warmup": args.warmup, "steps": args.steps,
        "adarank_build_s": build_s,
        "adamerging_step_ms_median": ms["adamerging"], "adarank_step_ms_median": ms["adarank"],
        "ratio": ms["adarank"] / ms["adamerging"],
        "adamerging_merge_only_ms_median": merge_ms["adamerging"], "adarank_merge_only_ms_median": merge_ms["adarank"],
        "adamerging_step_ms_all": [t * 1e3 for t in times["adamerging"]],
        "adarank_step_ms_all": [t * 1e3 for t in times["adarank"]],
        "memory": memory,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="mini")
    p.add_argument("--tasks", type=int, default=None, help="number of experts K (default: 3 tiny, 6 mini, 8 ViT-B/32)")
    p.add_argument("--batch", type=int, default=16, help="images per task per step")
    p.add_argument("--directions", default="task_arithmetic",
                   help='the base, a name or JSON: task_arithmetic, \'{"method": "cart", "rank_ratio": 1.0}\'')
    p.add_argument("--fused-qkv", action="store_true", help="one SVD of the fused in_proj_weight (the authors')")
    p.add_argument("--max-rank-ratio", type=float, default=1.0)
    p.add_argument("--initial-rank-ratio", type=float, default=1.0)
    p.add_argument("--svd-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--adarank-first", action="store_true", help="measure AdaRank's memory first (order check)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per system (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    r = run(args)
    where = f"{r['device']} ({r['gpu'] or r['cpu']}, {r['threads']} threads)"
    print(f"{r['model']} on {where}: K={r['tasks']}, batch {r['batch_per_task']}/task, {r['tensors']} tensors, "
          f"{r['masked_matrices']} masked matrices ({'q, k, v split' if r['split_qkv'] else 'fused q;k;v'}), "
          f"max_rank_ratio {r['max_rank_ratio']}, factors {r['svd_dtype']}; AdaRank built in {r['adarank_build_s']:.1f} s")
    print(f"  layer-wise AdaMerging step {r['adamerging_step_ms_median']:9.1f} ms"
          f"  (merge alone {r['adamerging_merge_only_ms_median']:.1f} ms)")
    print(f"  AdaRank step               {r['adarank_step_ms_median']:9.1f} ms"
          f"  (merge alone {r['adarank_merge_only_ms_median']:.1f} ms)")
    print(f"  ratio                      {r['ratio']:9.2f}x")
    print("  memory (MiB) " + ", ".join(f"{k} {v:.1f}" for k, v in r["memory"].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
