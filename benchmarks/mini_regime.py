"""Is the mini benchmark in the papers' regime? Builds (or loads) it per seed and evaluates every method.

    nice -n 5 python benchmarks/mini_regime.py --seeds 0 1 2 --out runs/mini_regime

Methods on the test split of each task: zero-shot θ0, each expert on its own task, weight averaging,
task arithmetic (λ = 0.3, and λ chosen on the labeled val split), TIES (keep 20 %, "sum", λ on val;
and keep ∈ {20, 50, 80} % chosen on val), PCB and OPCM (adamerge.merging defaults), and a minimal
layer-wise AdaMerging written out here (Yang et al., ICLR 2024, arXiv 2310.02575):

    θ^l = θ0^l + Σ_k λ_k^l τ_k^l,   λ init 0.3, clamped to [0, 1],
    min_λ Σ_k H(softmax(logits_k(x_k)))   on unlabeled test batches (16 per task), Adam lr 1e-3.

One ``metrics.json`` per method and seed (``OUT/<method>/seed<k>/``, adamerge.results format, accuracy
as fractions); the end prints mean ± sd over the seeds found in OUT and checks the regime:
zero-shot ≥ 20 points below the experts; task arithmetic (val λ) ≥ zero-shot + 5 and ≥ 8 below the
experts; layer-wise AdaMerging above task arithmetic.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from adamerge.data.mini import MiniBenchmark
from adamerge.evaluation import evaluate_encoder, evaluate_experts
from adamerge.merging import merge_pool
from adamerge.results import collect, write_metrics

LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]
ORDER = ["zero_shot", "experts", "weight_average", "task_arithmetic_0.3", "task_arithmetic_val",
         "ties", "ties_val_keep", "pcb", "opcm", "adamerging_layerwise"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def choose_on_val(bench, pool, candidates: dict) -> tuple[str, dict, dict]:
    """Evaluate each {name: state} on val; return the best name, its state and all val averages."""
    scores = {}
    for name, state in candidates.items():
        scores[name] = evaluate_encoder(pool.build_encoder(state), pool, bench, split="val")["average_accuracy"]
    best = max(scores, key=scores.get)
    return best, candidates[best], scores


def adamerging_layerwise(bench, pool, steps: int, batch: int = 16, lr: float = 1e-3, init: float = 0.3,
                         seed: int = 0) -> tuple[dict, dict]:
    """Minimal layer-wise AdaMerging; returns the merged state dict and λ statistics."""
    tasks = pool.tasks
    theta0 = pool.pretrained_state()
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    taus = [pool.task_vector(t) for t in tasks]
    stacked = {k: torch.stack([tau[k] for tau in taus]) for k in keys}  # [K, ...]
    lam = torch.full((len(keys), len(tasks)), init, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    base = pool.build_encoder()
    g = torch.Generator().manual_seed(seed)
    data = {t: bench.dataset(t, "test").tensors[0] for t in tasks}

    def merged(lam_c):
        return {k: theta0[k] + torch.tensordot(lam_c[i], stacked[k], dims=1) for i, k in enumerate(keys)}

    for _ in tqdm(range(steps), desc="AdaMerging (layer-wise)", leave=False):
        xs = [data[t][torch.randint(len(data[t]), (batch,), generator=g)] for t in tasks]
        feats = functional_call(base, merged(lam.clamp(0, 1)), (torch.cat(xs),))
        feats = F.normalize(feats, dim=-1).split(batch)
        loss = sum(entropy(pool.logit_scale * f @ pool.head(t).t()) for f, t in zip(feats, tasks))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        lc = lam.clamp(0, 1)
        state = {**theta0, **merged(lc)}
    stats = {"lambda_mean": lc.mean().item(), "lambda_per_task_mean": dict(zip(tasks, lc.mean(0).tolist())),
             "steps": steps, "batch_per_task": batch, "lr": lr, "init": init}
    return state, stats


def run_seed(args, seed: int) -> None:
    t0, c0 = time.time(), cpu_seconds()
    bench = MiniBenchmark(args.preset, seed, args.cache_dir).build()
    build = {"build_seconds": time.time() - t0, "build_cpu_seconds": cpu_seconds() - c0,
             "manifest_build_seconds": bench.manifest["build_seconds"],
             "manifest_build_cpu_seconds": bench.manifest["build_cpu_seconds"]}
    print(f"seed {seed}: benchmark at {bench.entry} ({build})")
    pool = bench.pool()
    out = Path(args.out)

    def record(method: str, state=None, result=None, **extra):
        if result is None:
            result = evaluate_encoder(pool.build_encoder(state), pool, bench, split="test")
        write_metrics(out / method / f"seed{seed}", method, result["accuracy"], seed=seed,
                      benchmark=f"mini-{args.preset}", **extra)
        print(f"  {method:24s} avg {100 * result['average_accuracy']:.1f}  " +
              " ".join(f"{t.removeprefix('mini_')}={100 * a:.1f}" for t, a in result["accuracy"].items()))

    record("zero_shot", pool.pretrained_state(), **build)
    record("experts", result=evaluate_experts(pool, bench, split="test"))
    record("weight_average", merge_pool(pool, "weight_average"))
    record("task_arithmetic_0.3", merge_pool(pool, "task_arithmetic", lam=0.3), lam=0.3)
    cands = {lam: merge_pool(pool, "task_arithmetic", lam=lam) for lam in LAMBDAS}
    lam, state, val = choose_on_val(bench, pool, cands)
    record("task_arithmetic_val", state, lam=lam, val_avg={str(k): v for k, v in val.items()})
    cands = {(0.2, lam): merge_pool(pool, "ties", keep=0.2, merge="sum", lam=lam) for lam in LAMBDAS}
    (keep, lam), state, val = choose_on_val(bench, pool, cands)
    record("ties", state, keep=keep, merge="sum", lam=lam)
    for k in (0.5, 0.8):
        cands.update({(k, lam): merge_pool(pool, "ties", keep=k, merge="sum", lam=lam) for lam in LAMBDAS})
    (keep, lam), state, val = choose_on_val(bench, pool, cands)
    record("ties_val_keep", state, keep=keep, merge="sum", lam=lam, val_avg={str(k): v for k, v in val.items()})
    record("pcb", merge_pool(pool, "pcb"))
    record("opcm", merge_pool(pool, "opcm"))
    c1 = cpu_seconds()
    state, stats = adamerging_layerwise(bench, pool, args.ada_steps, seed=seed)
    record("adamerging_layerwise", state, cpu_seconds=cpu_seconds() - c1, **stats)


def summarize(args) -> None:
    rows: dict[str, list[float]] = {}
    for r in collect(args.out, benchmark=f"mini-{args.preset}"):
        rows.setdefault(r["method"], []).append(100 * r["avg"])
    print(f"\nmean ± sd over seeds (test accuracy %, {args.out}):")
    mean = {}
    for m in ORDER + sorted(set(rows) - set(ORDER)):
        if m in rows:
            v = rows[m]
            mean[m] = statistics.fmean(v)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            print(f"  {m:24s} {mean[m]:5.1f} ± {sd:4.1f}  (n={len(v)})")
    if {"zero_shot", "experts", "task_arithmetic_val"} <= set(mean):
        zs, ex, ta = mean["zero_shot"], mean["experts"], mean["task_arithmetic_val"]
        checks = {"zero-shot ≥ 20 below experts": ex - zs >= 20, "TA(val λ) ≥ zero-shot + 5": ta >= zs + 5,
                  "TA(val λ) ≥ 8 below experts": ex - ta >= 8}
        if "adamerging_layerwise" in mean:
            checks["layer-wise AdaMerging > TA(val λ)"] = mean["adamerging_layerwise"] > ta
            checks_gap = (mean["adamerging_layerwise"] - zs) / max(1e-9, ex - zs)
            print(f"  AdaMerging recovers {100 * checks_gap:.0f} % of the zero-shot → expert gap")
        print(f"  TA(val λ) recovers {100 * (ta - zs) / max(1e-9, ex - zs):.0f} % of the gap")
        for k, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAIL'}] {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="runs/mini_regime")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--ada-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summary-only", action="store_true", help="only print the table of what OUT holds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.summary_only:
        for seed in args.seeds:
            run_seed(args, seed)
    summarize(args)


if __name__ == "__main__":
    main()
