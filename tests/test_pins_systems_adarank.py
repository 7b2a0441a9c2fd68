"""Pins of the AdaRank LightningModule (adamerge/systems/adarank.py): the arguments it hands to AdaMerging's
constructor, the keys of its ranks record and the exact text of ``ranks.json``.

Data chosen so that near misses disagree: a task list of the pool's last two tasks only (dropping it would
adapt all three), a schedule callable that is not None (dropping it leaves none), ``mask_temp`` 1.0 against
the default 0.5 (a key that is renamed or lost shows), and ``ranks.json`` compared to ``json.dumps(...,
indent=1)`` byte for byte (another indent is another file)."""

from __future__ import annotations

import json
from functools import partial

import torch
from conftest import make_tiny_pool

from adamerge.components.adarank import AdaRankModel
from adamerge.systems.adarank import AdaRank


def test_tasks_and_schedule_are_handed_on():
    pool = make_tiny_pool(num_tasks=3)
    schedule = partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    system = AdaRank(pool, tasks=pool.tasks[1:], lr_scheduler=schedule)
    assert list(system.tasks) == pool.tasks[1:] and system.lr_scheduler is schedule
    assert AdaRank(pool).lr_scheduler is None and list(AdaRank(pool).tasks) == pool.tasks


def test_ranks_record_and_its_file(tmp_path):
    pool = make_tiny_pool(num_tasks=2)
    system = AdaRank(pool, model=partial(AdaRankModel, mask_temp=1.0))
    ranks = system.ranks_dict()
    assert sorted(ranks) == ["full_rank", "mask_temp", "matrices", "ranks", "stored_rank", "tasks"]
    assert ranks["mask_temp"] == 1.0 and ranks["tasks"] == pool.tasks
    system.export(tmp_path)
    assert (tmp_path / "ranks.json").read_text() == json.dumps(ranks, indent=1)
