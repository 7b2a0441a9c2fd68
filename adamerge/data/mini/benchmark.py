"""``MiniBenchmark``: build (or load from the cache) the mini benchmark and hand out data and models."""

from __future__ import annotations

import json
import resource
import time
import warnings
from pathlib import Path
from typing import ClassVar

import open_clip
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, TensorDataset

from adamerge.data.mini import build as _build
from adamerge.data.mini.cache import (
    MANIFEST,
    CheckedSafetensors,
    cache_root,
    check_file,
    entry_lock,
    file_digest,
    verify_entry,
)
from adamerge.data.mini.data import MiniData, assemble
from adamerge.data.mini.model import (
    config_hash,
    create_clip,
    get_preset,
    model_config,
    tokenizer,
    zero_shot_head,
)
from adamerge.data.mini.sources import source_fingerprint
from adamerge.data.mini.tasks import NORM_MEAN, NORM_STD, TASK_NAMES, get_mini_task
from adamerge.data.source import check_split
from adamerge.files import atomic_dir, sweep_temporaries
from adamerge.models.pool import ModelPool

__all__ = ["LabeledTensors", "MiniBenchmark"]

BUILD_FORMAT = 1  # bump when the build code changes what it produces


class LabeledTensors(TensorDataset):
    """(image [3,H,W] float, int label) pairs held in memory."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, int(y)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class MiniBenchmark:
    """Six real-image tasks, a tiny CLIP pretrained offline and one fine-tuned expert per task.

    Args:
        preset: ``"default"`` (the benchmark) or ``"tiny"`` (seconds to build; for tests).
        seed: model seed (pretraining and fine-tuning); the data splits do not depend on it.
        cache_dir: cache root; default ``$ADAMERGE_CACHE``, ``$XDG_CACHE_HOME/adamerge`` or ``~/.cache/adamerge``.
        rebuild: build again even if a valid cache entry exists.
        progress: show tqdm progress bars while building.
    """

    def __init__(self, preset: str = "default", seed: int = 0, cache_dir: str | None = None,
                 rebuild: bool = False, progress: bool = True) -> None:
        self.preset, self.seed, self.rebuild, self.progress = preset, int(seed), bool(rebuild), progress
        self.config = get_preset(preset)
        self.root = cache_root(cache_dir)
        self._data: MiniData | None = None
        self._key: str | None = None
        self._design_payload: dict | None = None
        self.manifest: dict | None = None

    # ---- identity & paths ----------------------------------------------------------------
    @property
    def key(self) -> str:
        if self._key is None:
            self._key = config_hash({**self._design(), "seed": self.seed})
        return self._key

    def _design(self) -> dict:
        """What defines the benchmark apart from the model seed: build format, config and sources.

        Not the preset's name: two presets with one config share their builds.
        """
        if self._design_payload is None:
            self._design_payload = {"format": BUILD_FORMAT, "config": self.config.to_dict(),
                                    "sources": source_fingerprint()}
        return self._design_payload

    @property
    def benchmark_id(self) -> str:
        """``mini-<preset>-<hash>``: names the benchmark's design, the same for every model seed.

        Results records carry it, so a table never mixes numbers from different builds' designs.
        """
        return f"mini-{self.preset}-{config_hash(self._design())[:8]}"

    @property
    def model_name(self) -> str:
        return f"adamerge-mini-{self.key[:8]}"

    @property
    def entry(self) -> Path:
        return self.root / "mini" / f"seed{self.seed}-{self.key[:12]}"

    @property
    def tasks(self) -> list[str]:
        return list(TASK_NAMES)

    def _files(self) -> dict[str, str]:
        return {"model_config": f"{self.model_name}.json", "pretrained": "pretrained.safetensors",
                **{t: f"experts/{t}.safetensors" for t in self.tasks}}

    @property
    def paths(self) -> dict:
        """``{"entry", "manifest", "model_config", "pretrained", "experts": {task: path}}`` (absolute)."""
        f = self._files()
        return {"entry": self.entry, "manifest": self.entry / MANIFEST,
                "model_config": self.entry / f["model_config"], "pretrained": self.entry / f["pretrained"],
                "experts": {t: self.entry / f[t] for t in self.tasks}}

    # ---- build / load --------------------------------------------------------------------
    def build(self) -> MiniBenchmark:
        """Load the cache entry if its manifest and hashes match, else (or with rebuild) build it.

        Checking and building hold the entry's file lock: of several processes asking at once, one
        builds and the others wait, then load what it built.
        """
        if self.manifest is not None and not self.rebuild:
            return self
        with entry_lock(self.entry):
            manifest, why = verify_entry(self.entry, self.key, list(self._files().values()))
            if manifest is None or self.rebuild:
                if self.entry.exists() and manifest is None:
                    warnings.warn(f"mini benchmark cache entry {self.entry} is invalid ({why}); rebuilding it",
                                  stacklevel=2)
                sweep_temporaries(self.entry.parent)
                manifest = self._build_entry()
        self.manifest = manifest
        self.rebuild = False
        return self

    def _build_entry(self) -> dict:
        """Train everything, then write the entry as one set (``atomic_dir``); returns its manifest."""
        t0, c0 = time.time(), _cpu_seconds()
        cfg, data = self.config, self.data
        clip = create_clip(cfg, self.seed)
        pre_stats = _build.pretrain_clip(clip, data, cfg, self.seed, self.progress)
        heads = self._heads(clip)
        scale = float(clip.logit_scale.detach().exp())
        experts, metrics = self._train_experts(clip, heads, scale)
        fields = {
            "key": self.key, "format": BUILD_FORMAT, "preset": self.preset, "seed": self.seed,
            "model_name": self.model_name, "config": cfg.to_dict(), "sources": source_fingerprint(),
            "logit_scale": scale, "pretraining": pre_stats, "metrics": metrics,
            "build_seconds": time.time() - t0, "build_cpu_seconds": _cpu_seconds() - c0,
            "torch": torch.__version__, "open_clip": open_clip.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        files = self._files()
        with atomic_dir(self.entry, manifest=fields) as tmp:
            (tmp / "experts").mkdir()
            (tmp / files["model_config"]).write_text(json.dumps(model_config(cfg), indent=2))
            save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp / files["pretrained"])
            for t, state in experts.items():
                save_file(state, tmp / files[t])
        return json.loads((self.entry / MANIFEST).read_text())

    def _train_experts(self, clip: open_clip.CLIP, heads: dict, scale: float) -> tuple[dict, dict]:
        """One fine-tuned vision state dict per task, and the zero-shot / expert test accuracies."""
        data, experts, metrics = self.data, {}, {"zero_shot": {}, "expert": {}}
        for i, t in enumerate(self.tasks):
            (xtr, ytr), (xte, yte) = data.splits[t]["train"], data.splits[t]["test"]
            metrics["zero_shot"][t] = _build.accuracy(clip.visual, heads[t], scale, xte, yte)
            experts[t] = _build.finetune_expert(clip.visual, heads[t], scale, xtr, ytr, self.config,
                                                seed=self.seed * 1000 + i + 1, desc=t, progress=self.progress)
            metrics["expert"][t] = _build.accuracy(clip.visual, heads[t], scale, xte, yte, state=experts[t])
        for kind in ("zero_shot", "expert"):
            metrics[f"{kind}_avg"] = sum(metrics[kind].values()) / len(self.tasks)
        return experts, metrics

    def _checked(self, name: str) -> Path:
        """The entry's file ``name`` (a key of ``_files()``), checked against the manifest's sha256."""
        rel = self._files()[name]
        return check_file(self.entry / rel, file_digest(self.build().manifest, rel), self.rebuild_hint)

    @property
    def rebuild_hint(self) -> str:
        """What a load error tells the user to run when a file of the entry changed."""
        return (f"rebuild it with `python -m adamerge.data.mini --preset {self.preset} --seed {self.seed} "
                f"--cache-dir {self.root} --rebuild`")

    # ---- data ----------------------------------------------------------------------------
    @property
    def data(self) -> MiniData:
        if self._data is None:
            self._data = assemble(self.config)
        return self._data

    def _check_task(self, task: str) -> str:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown mini-benchmark task {task!r}; tasks: {', '.join(TASK_NAMES)}")
        return task

    def dataset(self, task: str, split: str) -> Dataset:
        """(image [3,H,W] normalised float, int label) pairs of ``task``'s ``split`` (train/val/test)."""
        x, y = self.data.splits[self._check_task(task)][check_split(split)]
        return LabeledTensors(x, y)

    normalization: ClassVar[dict] = {"mean": NORM_MEAN, "std": NORM_STD}

    # ---- models --------------------------------------------------------------------------
    def clip_model(self) -> open_clip.CLIP:
        """The full pretrained CLIP, loaded through open_clip from the saved config and weights."""
        open_clip.add_model_config(self._checked("model_config"))
        return open_clip.create_model(self.model_name, pretrained=str(self._checked("pretrained"))).eval()

    def _heads(self, clip: open_clip.CLIP) -> dict[str, torch.Tensor]:
        tok = tokenizer(self.config)
        return {t: zero_shot_head(clip, tok, get_mini_task(t).classnames, get_mini_task(t).templates)
                for t in self.tasks}

    def pool(self, clip: open_clip.CLIP | None = None) -> ModelPool:
        """ModelPool: θ0 = the pretrained ``visual``, zero-shot heads, and experts loaded lazily from
        safetensors, each checked against the manifest's sha256 on every load (:class:`CheckedSafetensors`).

        Args:
            clip: the pretrained CLIP if already loaded (:meth:`clip_model`); loaded otherwise.
        """
        clip = self.clip_model() if clip is None else clip
        files = self._files()
        experts = {t: CheckedSafetensors(path, file_digest(self.manifest, files[t]), self.rebuild_hint)
                   for t, path in self.paths["experts"].items()}
        return ModelPool(clip.visual, experts, self._heads(clip), logit_scale=float(clip.logit_scale.detach().exp()),
                         name=self.model_name, benchmark=self.benchmark_id)
