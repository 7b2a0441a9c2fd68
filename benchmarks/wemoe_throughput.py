"""WEMoE inference throughput: batched per-sample merging vs the plain merged model vs a per-sample loop.

All models are built in one run from the same ViT-sized random weights (open_clip ``ViT-B-32``,
``pretrained=None``, K random task vectors), timed side by side on the same batches, and compared:

* ``plain``: the task-arithmetic merged encoder (one set of weights for every sample; the lower bound),
* ``wemoe[weights]`` / ``wemoe[experts]``: adamerge's batched per-sample merging (the two evaluations
  of :func:`adamerge.components.wemoe.ensemble_linear`),
* ``wemoe[batch_reduce]``: one routing vector per batch (what adaptation uses),
* ``loop``: the public implementations' scheme — for every sample, merge each MLP's weights
  ``W0 + Σ_k r_k τ_k`` with a loop over the task vectors and run that sample alone.

Also prints the trainable parameter counts of WEMoE (per-block routers) and E-WEMoE (one shared
router, 10% of τ kept), computed by the code. Writes everything as JSON to ``--out``.

    nice -n 10 python benchmarks/wemoe_throughput.py --batches 2 --out wemoe_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import types

import torch
import torch.nn.functional as F
from common import build_visual, random_pool

from adamerge.components.wemoe import WeightEnsemblingMLP, WEMoEModel


def loop_forward(self: WeightEnsemblingMLP, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loop (as in public WEMoE code): merge each sample's weights, then run that sample."""
    if not self.batch_first:
        x = x.transpose(0, 1)
    r = self.routing_weights(x)
    outs = []
    for b in range(x.shape[0]):
        merged = {}
        for key in ("fc", "proj"):
            w, bias = getattr(self, f"w0_{key}").clone(), getattr(self, f"b0_{key}").clone()
            for k in range(r.shape[1]):
                w += r[b, k] * getattr(self, f"tau_w_{key}")[k]
                bias += r[b, k] * getattr(self, f"tau_b_{key}")[k]
            merged[key] = (w, bias)
        h = self.middle(F.linear(x[b : b + 1], *merged["fc"]))
        outs.append(F.linear(h, *merged["proj"]))
    y = torch.cat(outs)
    return y if self.batch_first else y.transpose(0, 1)


def timed(fn, batches, device) -> float:
    """Images per second of ``fn`` over ``batches`` (after an untimed two-image warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(batches[0][:2])
        sync()
        start = time.perf_counter()
        for x in batches:
            fn(x)
        sync()
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=2, help="timed batches per model (the loop times one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--loop-samples",
        type=int,
        default=16,
        help="time the loop on this many samples of the batch (it runs one sample at a time, so its "
        "images/s does not depend on the batch size); 0 skips it",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)

    pool = random_pool(build_visual(args.model), args.tasks, name=args.model)
    model = WEMoEModel(pool).to(device)
    counts = {"wemoe": model.trainable_parameter_count()}
    plain = pool.build_encoder().to(device)  # same cost as any merged encoder
    g = torch.Generator().manual_seed(0)
    size = pool.encoder.image_size
    batches = [torch.randn(args.batch_size, 3, *size, generator=g).to(device) for _ in range(args.batches)]

    results = {"plain": timed(plain, batches, device)}
    for impl in ("weights", "experts"):
        model.set_impl(impl)
        results[f"wemoe[{impl}]"] = timed(model, batches, device)
    model.set_impl("weights")
    model.set_batch_reduce(True)
    results["wemoe[batch_reduce]"] = timed(model, batches, device)
    model.set_batch_reduce(False)
    if args.loop_samples > 0:
        for m in model.mlps:
            m.forward = types.MethodType(loop_forward, m)
        results["loop"] = timed(model, [batches[0][: args.loop_samples]], device)
    del model, plain

    e_wemoe = WEMoEModel(pool, shared_router=True, keep=0.1)
    counts["e_wemoe"] = e_wemoe.trainable_parameter_count()
    del e_wemoe

    best = max(results["wemoe[weights]"], results["wemoe[experts]"])
    ratios = {"batched/plain": best / results["plain"]}
    if "loop" in results:
        ratios["batched/loop"] = best / results["loop"]
    for name, ips in results.items():
        print(f"{name:22s} {ips:9.2f} images/s")
    for name, value in ratios.items():
        print(f"{name:22s} {value:9.2f}x")
    print(f"trainable parameters: WEMoE {counts['wemoe']:,}  E-WEMoE {counts['e_wemoe']:,}")
    report = {
        "model": args.model,
        "tasks": args.tasks,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "loop_samples": args.loop_samples,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "images_per_s": results,
        "ratios": ratios,
        "trainable_parameters": counts,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
