"""The main job: every method of adamerge on the built-in mini benchmark, as data.

    python -m adamerge.demo                       # seed 0: build (or load) the benchmark, run all
    python -m adamerge.demo --seeds 0 1 2 --readme README.md    # the README's results table

Per seed it builds (or loads from the cache) the mini benchmark, evaluates the static baselines
(zero-shot, experts, weight averaging, task arithmetic at λ=0.3 and at λ chosen on the labeled val
split, TIES, PCB, OPCM), then trains the test-time methods through the real LightningCLI entry
(``configs/mini/base.yaml`` + one ``configs/mini/<method>.yaml``) on the unlabeled test stream.
Every run writes ``metrics.json`` in ``OUT/seed<k>/<run>/``; the table printed at the end is
generated from those files
(:mod:`adamerge.results`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401  -- first, see below
import torch

from adamerge.results import publish, write_metrics

# Lightning gives its loggers a handler of their own (and stops them propagating) only when the root
# logger has none at import time. open_clip logs through the root logger, which installs a root handler
# (logging.basicConfig) the first time the benchmark loads a model; Lightning imported after that printed
# every INFO line twice, through its "lightning" handler and through root's. Hence the import above.

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "mini"

# (run folder, table name, static merge method for adamerge.merging.merge_pool, its kwargs)
STATIC: list[tuple[str, str, str, dict[str, Any]]] = [
    ("weight_averaging", "Weight averaging", "weight_average", {}),
    ("task_arithmetic", "Task arithmetic (λ=0.3)", "task_arithmetic", {"lam": 0.3}),
    # The AdaMerging papers' TIES baseline: top-20 %, disjoint *sum*, λ = 0.3.
    ("ties", "TIES-Merging", "ties", {"keep": 0.2, "merge": "sum", "lam": 0.3}),
    ("pcb", "PCB-Merging", "pcb", {}),
    ("opcm", "OPCM (continual)", "opcm", {}),
    # the data-free methods of #14, at their defaults (q, k, v split; α as docs/parity.md says)
    ("dare_ta", "DARE-TA", "dare_ta", {}),
    ("dare_ties", "DARE-TIES", "dare_ties", {}),
    ("consensus_ta", "Consensus TA", "consensus_ta", {}),
    ("tsv_m", "TSV-M", "tsv_m", {}),
    ("iso_c", "Iso-C", "iso_c", {}),
    ("iso_cts", "Iso-CTS", "iso_cts", {}),
    ("cart", "CART", "cart", {}),
    ("wudi", "WUDI", "wudi", {}),
]
# task-conditioned merges (adamerge.merging.conditioned): task k is evaluated with its own model
CONDITIONED: list[tuple[str, str, str]] = [
    ("emr", "EMR-Merging (task id)", "emr"),
    ("tall_masks", "TALL masks (task id)", "tall_masks"),
]
LAMBDA_GRID = [round(0.1 * i, 1) for i in range(1, 11)]

# (run folder, table name, config under configs/mini); Surgery "on AdaMerging" reads the layer-wise
# AdaMerging run's export of the same seed, so it comes after it.
ADAPTIVE: list[tuple[str, str, str]] = [
    ("regmean", "RegMean", "regmean.yaml"),  # one pass of statistics over the unlabeled stream, no steps
    ("fisher", "Fisher merging", "fisher.yaml"),
    ("adamerging_task", "AdaMerging (task-wise)", "adamerging_task.yaml"),
    ("adamerging_layer", "AdaMerging (layer-wise)", "adamerging_layer.yaml"),
    ("adamerging_plusplus", "AdaMerging++ (layer-wise)", "adamerging_plusplus.yaml"),
    ("adamerging_cart", "AdaMerging+CART (layer-wise)", "adamerging_cart.yaml"),
    ("adarank", "AdaRank+CART", "adarank.yaml"),
    ("surgery_ta", "Surgery on TA", "surgery_ta.yaml"),
    ("surgeryv2_ta", "SurgeryV2 on TA", "surgeryv2_ta.yaml"),
    ("surgery_adamerging", "Surgery on AdaMerging", "surgery_adamerging.yaml"),
    ("surgeryv2_adamerging", "SurgeryV2 on AdaMerging", "surgeryv2_adamerging.yaml"),
    ("ewemoe", "E-WEMoE", "ewemoe.yaml"),
    ("wemoe", "WEMoE", "wemoe.yaml"),
]


def _log(msg: str) -> None:
    print(f"[adamerge.demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_static(bench: Any, pool: Any, out: Path, seed: int, skip: Callable[[str], bool]) -> None:
    """Zero-shot, experts and the static merges, each written as a run folder."""
    from adamerge.evaluation import evaluate_encoder
    from adamerge.merging import merge_pool

    tasks = bench.tasks

    def evaluate(state: dict | None, split: str = "test") -> dict[str, float]:
        encoder = pool.build_encoder(state)
        return evaluate_encoder(encoder, pool, bench, tasks, split=split)["accuracy"]

    if not skip("zero_shot"):
        write_metrics(out / "zero_shot", "Zero-shot", evaluate(None), seed=seed, benchmark=bench.benchmark_id)
    if not skip("experts"):
        acc = {t: evaluate_encoder(pool.build_encoder(pool.expert_state(t)), pool, bench, [t])["accuracy"][t]
               for t in tasks}
        write_metrics(out / "experts", "Individual experts", acc, seed=seed, benchmark=bench.benchmark_id)
    for folder, name, method, kwargs in STATIC:
        if skip(folder):
            continue
        t0 = time.perf_counter()
        state = merge_pool(pool, method, **kwargs)
        write_metrics(out / folder, name, evaluate(state), seed=seed, benchmark=bench.benchmark_id,
                      merge_seconds=time.perf_counter() - t0)
    for folder, name, method in CONDITIONED:
        if skip(folder):
            continue
        from adamerge.merging.conditioned import merge_pool_conditioned

        merged = merge_pool_conditioned(pool, method)
        acc = {t: evaluate_encoder(pool.build_encoder(merged.state_for(t)), pool, bench, [t])["accuracy"][t]
               for t in tasks}
        write_metrics(out / folder, name, acc, seed=seed, benchmark=bench.benchmark_id,
                      storage_ratio=merged.storage_bytes()["ratio"])
    if not skip("task_arithmetic_val"):
        val = {}
        for lam in LAMBDA_GRID:
            acc = evaluate(merge_pool(pool, "task_arithmetic", lam=lam), split="val")
            val[lam] = sum(acc.values()) / len(acc)
        best = max(val, key=lambda k: val[k])
        state = merge_pool(pool, "task_arithmetic", lam=best)
        write_metrics(out / "task_arithmetic_val", "Task arithmetic (λ on val)", evaluate(state), seed=seed,
                      benchmark=bench.benchmark_id, lam=best, val_avg=val)


def run_adaptive(preset: str, seed: int, out: Path, steps: int | None, skip: Callable[[str], bool],
                 extra: Sequence[str] = ()) -> None:
    """The test-time methods through the LightningCLI entry and the shipped mini configs."""
    from adamerge.cli import main as cli_main

    for folder, name, config in ADAPTIVE:
        cfg = CONFIGS / config
        if skip(folder) or not cfg.exists():
            if not cfg.exists():
                _log(f"skip {name}: {cfg} not found")
            continue
        _log(f"{name}: training")
        args = ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(cfg), f"--seed_everything={seed}",
                f"--data.init_args.source.init_args.preset={preset}", f"--data.init_args.source.init_args.seed={seed}",
                f"--model.init_args.export_dir={out / folder}",
                f"--trainer.default_root_dir={out / 'trainer' / folder}", "--trainer.logger=false",
                "--overwrite=true", *extra]  # the demo regenerates its own records
        if folder.endswith("_adamerging"):
            merged = out / "adamerging_layer" / "merged.safetensors"
            if not merged.exists():
                _log(f"skip {name}: no layer-wise AdaMerging export at {merged}")
                continue
            args.append(f"--model.init_args.base_merge={merged}")
        if steps is not None:  # and validate once, at the end, so the record is the final model's
            args += [f"--trainer.max_steps={steps}", f"--data.init_args.steps_per_epoch={steps}",
                     "--trainer.check_val_every_n_epoch=1"]
        cli_main(args)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adamerge.demo", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="benchmark seeds (3 for the README)")
    p.add_argument("--preset", default="default", help="mini benchmark preset (default | tiny)")
    p.add_argument("--out", default="runs/mini", help="runs folder; one sub-folder per seed and run")
    p.add_argument("--steps", type=int, default=None, help="override the adaptation steps of every method")
    p.add_argument("--only", nargs="*", default=None, help="run folders to (re)run; default: all")
    p.add_argument("--skip-done", action="store_true", help="skip runs whose metrics.json exists")
    p.add_argument("--readme", default=None, help="also write the table into this README's results block")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    from adamerge.data.mini import MiniBenchmark

    root = Path(args.out)
    torch.set_float32_matmul_precision("high")
    for seed in args.seeds:
        out = root / f"seed{seed}"

        def skip(folder: str, out: Path = out) -> bool:
            if args.only is not None and folder not in args.only:
                return True
            return args.skip_done and (out / folder / "metrics.json").exists()

        _log(f"seed {seed}: building / loading the mini benchmark ({args.preset})")
        bench = MiniBenchmark(preset=args.preset, seed=seed)
        bench.build()
        run_static(bench, bench.pool(), out, seed, skip)
        run_adaptive(args.preset, seed, out, args.steps, skip)
    print(provenance(root, args.seeds))
    return publish(root, args.readme)


def provenance(root: Path, run_now: Sequence[int]) -> str:
    """Which seeds of the table this run produced and which it read from records already in ``root``."""
    from adamerge.results import collect

    found = sorted({r["seed"] for r in collect(root) if r.get("seed") is not None})
    earlier = [s for s in found if s not in run_now]
    line = f"seeds run now: {', '.join(map(str, run_now))}"
    if earlier:
        line += f"; seeds read from records already in {root}: {', '.join(map(str, earlier))}"
    return line


if __name__ == "__main__":
    main()
