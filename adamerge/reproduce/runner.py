"""Running the methods of a reproduce setup: static merges in-process, test-time methods through
``adamerge fit``; each writes its record, and a rerun skips the methods whose record exists."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from adamerge.reproduce.catalog import CONFIGS, Method, ReproduceError
from adamerge.reproduce.setup import Setup, build, record_path, setup_config, write_setup

__all__ = ["run", "run_fit"]


def _log(msg: str) -> None:
    print(f"[adamerge reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Static:
    """The pool, the data and the evaluation of the methods that run in-process (built once, when needed)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._pool = self._source = None

    def _load(self) -> None:
        import torch

        from adamerge.data.registry import get_task
        from adamerge.models.open_clip_pool import OpenCLIPPool

        s = self.setup
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        config = setup_config(s)
        self._source = build(config["data"]["init_args"]["source"])
        self.batch_size = config["data"]["init_args"].get("eval_batch_size", 128)
        self.workers = config["data"]["init_args"].get("num_workers", 0)
        self._pool = OpenCLIPPool(s.arch, s.pretrained, s.experts, tasks=s.tasks, cache_dir=str(s.out / "heads"),
                                  device=self.device, model_config=s.model_config, task_info=get_task)

    def accuracy(self, state: dict | None, tasks: Sequence[str]) -> dict[str, float]:
        from adamerge.evaluation import evaluate_encoder

        encoder = self._pool.build_encoder(state).to(self.device)
        return evaluate_encoder(encoder, self._pool, self._source, list(tasks), batch_size=self.batch_size,
                                num_workers=self.workers, device=self.device)["accuracy"]

    def run(self, method: Method) -> dict[str, float]:
        from adamerge.merging import merge_pool

        if self._pool is None:
            self._load()
        tasks = self.setup.tasks
        if method.key == "zero_shot":
            return self.accuracy(None, tasks)
        if method.key == "experts":
            return {t: self.accuracy(self._pool.expert_state(t), [t])[t] for t in tasks}
        if method.conditioned:
            from adamerge.merging.conditioned import merge_pool_conditioned

            merged = merge_pool_conditioned(self._pool, method.merge, preset=method.preset)
            return {t: self.accuracy(merged.state_for(t), [t])[t] for t in tasks}
        return self.accuracy(merge_pool(self._pool, method.merge, preset=method.preset), tasks)


def _last_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def run_fit(setup: Setup, method: Method, setup_yaml: Path) -> None:
    """One test-time method through ``adamerge fit`` (resumed from its last checkpoint if it was cut off)."""
    from adamerge.cli import main as cli_main

    folder = setup.out / method.key
    args = ["fit", "--config", str(setup_yaml)]
    for name in method.configs:
        args += ["--config", str(CONFIGS / "method" / name)]
    args += [*method.overrides, f"--trainer.default_root_dir={folder}", f"--seed_everything={0}"]
    if setup.steps is not None:  # validate once, at the end, so the record is the final model's
        args += [f"--trainer.max_steps={setup.steps}", f"--data.init_args.steps_per_epoch={setup.steps}",
                 "--trainer.check_val_every_n_epoch=1"]
    last = _last_checkpoint(folder)
    if last is not None:
        _log(f"{method.label}: resuming from {last}")
        args.append(f"--ckpt_path={last}")
    cli_main(args)


def run(setup: Setup) -> None:
    """Run every method of the setup whose record is not there yet, one progress line each."""
    from adamerge.records import read_metrics, write_metrics

    setup.out.mkdir(parents=True, exist_ok=True)
    setup_yaml = write_setup(setup)
    static = _Static(setup)
    n = len(setup.methods)
    for i, method in enumerate(setup.methods, 1):
        path = record_path(setup, method)
        if path.exists():
            _log(f"{i}/{n} {method.label}: done before, record reused ({path})")
            continue
        _log(f"{i}/{n} {method.label}: running")
        t0 = time.perf_counter()
        if method.trains:
            run_fit(setup, method, setup_yaml)
            if not path.exists():
                raise ReproduceError(f"{method.label}: the run ended without a record at {path}")
        else:
            acc = static.run(method)
            write_metrics(path.parent, method.label, acc, seed=0, benchmark=setup.benchmark,
                          seconds=round(time.perf_counter() - t0, 2))
        avg = 100 * read_metrics(path)["avg"]
        _log(f"{i}/{n} {method.label}: {avg:.1f} in {time.perf_counter() - t0:.0f} s{_versus(setup, method, avg)}")


def _versus(setup: Setup, method: Method, avg: float) -> str:
    from adamerge.reproduce.published import reference

    ref = reference(method.key, setup.arch, len(setup.tasks))
    return "" if ref is None else f" (published {ref[0]:.1f}, {ref[1]}; Δ {avg - ref[0]:+.1f})"
