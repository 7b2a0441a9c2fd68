"""Deterministic splits of the sources into per-task train/val/test sets and the pretraining mix.

Each source is permuted once with ``cfg.split_seed`` and sliced in a fixed order, so every image is
used by exactly one consumer: the upright grey pretraining pool, a task's pretraining slice, or a
task's train / val / test split. Hence the splits of a task are disjoint, no test image was seen in
pretraining, and the test sets do not change with the model seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from adamerge.data.mini import sources
from adamerge.data.mini.model import MiniConfig
from adamerge.data.mini.tasks import GREY_FASHION, GREY_MNIST, MINI_TASKS, pretrain_captions, render

__all__ = ["MiniData", "assemble", "load_source"]

_LOADERS = {"mnist": sources.load_mnist5k, "fashion": sources.load_fashion_mnist, "digits": sources.load_digits8}


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, key: tuple) -> tuple[np.ndarray, np.ndarray]:
    return _LOADERS[name]()


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A source's (images uint8 [N,h,w], labels); memoised per source location."""
    key = (str(sources.fashion_mnist_dir()), str(sources.mnist_csv_path()) if name == "mnist" else "")
    return _load_cached(name, key)


@dataclass
class MiniData:
    """Rendered tensors: ``splits[task][split] = (images [N,3,H,W], labels [N])`` and the pretraining mix.

    ``pre_images[i]`` is captioned by one of ``captions[j]`` for ``j`` in ``caption_groups[pre_group[i]]``;
    ``pre_is_slice[i]`` marks images of the non-grey domain slices.
    """

    splits: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    pre_images: torch.Tensor
    pre_group: torch.Tensor
    pre_is_slice: torch.Tensor
    captions: list[str]
    caption_groups: list[list[int]]


class _Allocator:
    def __init__(self, name: str, n: int, seed: int):
        self.name, self.n, self.pos = name, n, 0
        self.perm = np.random.default_rng([seed, sum(map(ord, name))]).permutation(n)

    def take(self, k: int, what: str) -> np.ndarray:
        if self.pos + k > self.n:
            raise ValueError(f"source {self.name!r} has {self.n} images; the preset needs more (ran out at {what})")
        out = self.perm[self.pos : self.pos + k]
        self.pos += k
        return out


class _Captions:
    def __init__(self):
        self.captions: list[str] = []
        self.groups: list[list[int]] = []
        self._ids: dict[str, int] = {}
        self._group_ids: dict[tuple, int] = {}

    def group(self, key: tuple, texts: list[str]) -> int:
        if key not in self._group_ids:
            ids = []
            for t in texts:
                ids.append(self._ids.setdefault(t, len(self.captions)))
                if ids[-1] == len(self.captions):
                    self.captions.append(t)
            self._group_ids[key] = len(self.groups)
            self.groups.append(ids)
        return self._group_ids[key]


def assemble(cfg: MiniConfig) -> MiniData:
    """Split and render every task and the pretraining mix for ``cfg``."""
    raw = {name: load_source(name) for name in ("mnist", "fashion", "digits")}
    alloc = {name: _Allocator(name, len(raw[name][1]), cfg.split_seed) for name in raw}
    caps = _Captions()
    pre_x, pre_g, pre_s = [], [], []

    def add_pretrain(idx, task, captions_of, is_slice):
        x, y = raw[task.source]
        pre_x.append(render(task, x[idx], cfg.image_size))
        pre_g.extend(caps.group((task.name, int(c)), captions_of(int(c))) for c in y[idx])
        pre_s.append(torch.full((len(idx),), is_slice, dtype=torch.bool))

    add_pretrain(alloc["mnist"].take(cfg.n_pre_mnist, "pretraining"), GREY_MNIST,
                 lambda c: pretrain_captions("mnist", c), False)
    add_pretrain(alloc["fashion"].take(cfg.n_pre_fashion, "pretraining"), GREY_FASHION,
                 lambda c: pretrain_captions("fashion", c), False)
    splits = {}
    for task in MINI_TASKS:
        x, y = raw[task.source]
        a = alloc[task.source]
        if task.in_pretraining and cfg.n_slice > 0:
            idx = a.take(cfg.n_slice, f"{task.name} pretraining slice")
            names = task.classnames
            add_pretrain(idx, task, lambda c, t=task, n=names: [tp.format(n[t.labels(np.array([c]))[0]])
                                                                for tp in t.templates], True)
        splits[task.name] = {}
        for split, k in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
            idx = a.take(k, f"{task.name} {split}")
            splits[task.name][split] = (render(task, x[idx], cfg.image_size),
                                        torch.from_numpy(task.labels(y[idx])))
    return MiniData(splits, torch.cat(pre_x), torch.tensor(pre_g, dtype=torch.long), torch.cat(pre_s),
                    caps.captions, caps.groups)
