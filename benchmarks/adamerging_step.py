"""Cost of one AdaMerging adaptation step against a plain forward+backward of the same encoder.

    adapt: merge θ = θ_0 + Σ_k λ_k τ_k (layer-wise, fused) → one forward over the K per-task batches
           → entropy per task (frozen zero-shot heads) → backward to λ → Adam step on λ
    plain: the same encoder with fixed weights (an ordinary module) → same forward, heads and loss →
           backward to its weights (the gradient a merge must also compute, before contracting with τ)

Both run in one process on the same batches, interleaved (plain, adapt, plain, adapt, ...) after a
warm-up; the medians and their ratio are printed (target ≤ 1.15×). Peak memory: CUDA peak
allocations per phase; on CPU the task-vector/θ_0 buffer sizes and the process's peak RSS after
each phase's warm-up (plain first). Weights are random (``pretrained=None``); only sizes matter.

    nice -n 10 python3 benchmarks/adamerging_step.py --model mini --out mini.json
    nice -n 10 python3 benchmarks/adamerging_step.py --model vit-b-32 --steps 3 --warmup 1 --out b32.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from common import build_visual, random_pool, timed
from torch import nn

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.losses import entropy
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging

MODELS = {"mini": 6, "vit-b-32": 8, "tiny": 3}  # default number of tasks K per model


def build_encoder(model: str) -> tuple[nn.Module, int, int]:
    """(visual encoder, image size, embedding dim) with random weights."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    encoder = build_visual({"vit-b-32": "ViT-B-32"}.get(model, model))
    return encoder, encoder.image_size[0], encoder.output_dim


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_steps(system: AdaMerging, pool: ModelPool, device: torch.device, accumulate: int = 1):
    """(adapt, plain): one AdaMerging step, and a plain forward+backward of the same encoder with fixed
    weights, each over a dict of per-task batches. ``accumulate`` > 1 splits every task's batch into
    that many micro-batches whose mean-loss gradients are averaged before the one optimizer step
    (Lightning's ``accumulate_grad_batches``, as the official AdaMerging config runs: 2 × 16)."""
    optimizer = system.configure_optimizers()
    plain_encoder = pool.build_encoder().to(device)
    for p in plain_encoder.parameters():
        p.requires_grad_(True)  # the gradient the merge also needs; never stepped
    heads = {t: pool.heads[t].to(device) for t in pool.tasks}

    def micro_batches(images: dict[str, torch.Tensor]):
        chunks = {t: x.chunk(accumulate) for t, x in images.items()}
        return [{t: c[i] for t, c in chunks.items()} for i in range(accumulate)]

    def adapt(images: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches(images):
            loss = torch.stack(list(system.adaptation_losses(micro).values())).sum()
            (loss / accumulate).backward()
        optimizer.step()

    def plain(images: dict[str, torch.Tensor]) -> None:
        plain_encoder.zero_grad(set_to_none=True)
        for micro in micro_batches(images):
            tasks = list(micro)
            feats = torch.split(
                plain_encoder(torch.cat([micro[t] for t in tasks])), [len(micro[t]) for t in tasks]
            )
            loss = sum(
                entropy(pool.logit_scale * F.normalize(f, dim=-1) @ heads[t].t()).mean()
                for t, f in zip(tasks, feats)
            )
            (loss / accumulate).backward()

    return adapt, plain


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.tasks or MODELS[args.model]
    encoder, size, _ = build_encoder(args.model)
    pool = random_pool(encoder, k)
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity=args.granularity, tv_dtype=args.tv_dtype)).to(device)
    adapt, plain = make_steps(system, pool, device)
    g = torch.Generator().manual_seed(0)
    images = {t: torch.randn(args.batch, 3, size, size, generator=g).to(device) for t in pool.tasks}

    memory = {
        "task_vectors_mib": system.model.task_vectors.numel()
        * system.model.task_vectors.element_size()
        / 2**20,
        "theta0_mib": sum(b.numel() * b.element_size() for b in system.model.encoder.buffers()) / 2**20,
    }
    for name, fn in (("plain", plain), ("adapt", adapt)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            timed(fn, images, device)
        if device.type == "cuda":
            memory[f"{name}_peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            memory[f"{name}_peak_rss_mib_after"] = rss_mib()
    times = {"plain": [], "adapt": []}
    for _ in range(args.steps):
        times["plain"].append(timed(plain, images, device))
        times["adapt"].append(timed(adapt, images, device))
    with torch.no_grad():
        merge_ms = (
            statistics.median(
                timed(lambda _: system.model.merged_parameters(), None, device)
                for _ in range(max(3, args.steps))
            )
            * 1e3
        )
    plain_ms = statistics.median(times["plain"]) * 1e3
    adapt_ms = statistics.median(times["adapt"]) * 1e3
    return {
        "model": args.model,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tasks": k,
        "batch_per_task": args.batch,
        "image_size": size,
        "granularity": args.granularity,
        "tv_dtype": args.tv_dtype,
        "layers": len(system.model.layer_names),
        "encoder_params": sum(v.numel() for v in system.model.encoder.buffers()),
        "coefficients": system.model.lambdas.numel(),
        "warmup": args.warmup,
        "steps": args.steps,
        "plain_ms_median": plain_ms,
        "adapt_ms_median": adapt_ms,
        "ratio": adapt_ms / plain_ms,
        "merge_only_ms_median": merge_ms,
        "plain_ms_all": [t * 1e3 for t in times["plain"]],
        "adapt_ms_all": [t * 1e3 for t in times["adapt"]],
        "memory": memory,
        "target_ratio": 1.15,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="mini")
    p.add_argument(
        "--tasks", type=int, default=None, help="number of experts K (default: 6 mini, 8 ViT-B/32)"
    )
    p.add_argument("--batch", type=int, default=16, help="images per task per step")
    p.add_argument("--granularity", choices=["task", "layer"], default="layer")
    p.add_argument("--tv-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    r = result
    where = f"{r['device']} ({r['gpu'] or r['cpu']}, {r['threads']} threads)"
    print(
        f"{r['model']} on {where}: K={r['tasks']}, batch {r['batch_per_task']}/task, {r['layers']} tensors, "
        f"{r['granularity']}-wise, task vectors {r['tv_dtype']}"
    )
    print(f"  plain forward+backward  {r['plain_ms_median']:9.1f} ms (median of {r['steps']})")
    print(
        f"  AdaMerging step         {r['adapt_ms_median']:9.1f} ms"
        f"  (merge alone {r['merge_only_ms_median']:.1f} ms)"
    )
    print(f"  ratio                   {r['ratio']:9.3f}x  (target <= {r['target_ratio']})")
    print("  memory (MiB) " + ", ".join(f"{k} {v:.1f}" for k, v in r["memory"].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
