"""Per-task metrics are matched to tasks by name, not by position.

The data lists the tasks in another order than the model. Every task has the same number of classes, so
that a positional match (task i's data scored with the model's i-th head and logged under its name) runs
without an error. Each task's labels are its own head's predictions with the first 2, 5 and 8 of 24 moved
to another class: the right accuracies are 22/24, 19/24 and 16/24, while another task's head agrees with
these labels only by chance (checked in the test before it relies on it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from test_systems_base import ScaledProbe
from torch.utils.data import TensorDataset

from adamerge.data.datamodule import TestTimeDataModule
from adamerge.evaluation import evaluate_encoder
from adamerge.models.pool import ModelPool

CLASSES = 4


def _pool() -> ModelPool:
    """The tiny pool with a 4-class head per task (rows from different seeds)."""
    p = make_tiny_pool(3)
    heads = {t: F.normalize(torch.randn(CLASSES, p.heads[t].shape[1], generator=torch.Generator().manual_seed(10 + k)),
                            dim=-1) for k, t in enumerate(p.tasks)}
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, heads, logit_scale=100.0, name="tiny4")


class LabelledByHeads:
    """A TaskSource whose task k labels random images with task k's head, 3k + 2 labels moved off it."""

    def __init__(self, pool: ModelPool, n: int = 24) -> None:
        g = torch.Generator().manual_seed(5)
        self.data = {}
        for k, t in enumerate(pool.tasks):
            x = torch.randn(n, 3, 16, 16, generator=g)
            with torch.no_grad():
                y = (F.normalize(pool.encoder(x), dim=-1) @ pool.heads[t].t()).argmax(-1)
            y[: 3 * k + 2] = (y[: 3 * k + 2] + 1) % CLASSES
            self.data[t] = TensorDataset(x, y)
        self.tasks = list(self.data)

    def dataset(self, task: str, split: str):
        return self.data[task]

    def num_classes(self, task: str) -> int:
        return CLASSES


def _accuracy(pool: ModelPool, head_task: str, src, data_task: str) -> float:
    x, y = src.dataset(data_task, "test").tensors
    with torch.no_grad():
        pred = (F.normalize(pool.encoder(x), dim=-1) @ pool.heads[head_task].t()).argmax(-1)
    return (pred == y).float().mean().item()


def test_validation_metrics_follow_the_task_names_of_a_reordered_datamodule(tmp_path):
    pool = _pool()
    src = LabelledByHeads(pool)
    data_order = ["task2", "task0", "task1"]
    right = {t: _accuracy(pool, t, src, t) for t in pool.tasks}
    assert right == pytest.approx({"task0": 22 / 24, "task1": 19 / 24, "task2": 16 / 24})
    positional = {m: _accuracy(pool, m, src, d) for m, d in zip(pool.tasks, data_order)}
    assert any(abs(right[t] - positional[t]) > 0.05 for t in pool.tasks)  # the data can tell them apart
    dm = TestTimeDataModule(src, tasks=data_order, batch_size=4, eval_batch_size=7)
    system = ScaledProbe(pool)
    metrics = trainer(tmp_path).validate(system, dm, verbose=False)[0]
    for t in pool.tasks:
        assert metrics[f"val/acc/{t}"] == pytest.approx(right[t], abs=1e-6), t
    assert metrics["val/acc/avg"] == pytest.approx(sum(right.values()) / 3, abs=1e-6)


def test_evaluate_encoder_matches_heads_by_name_when_tasks_are_reordered():
    pool = _pool()
    src = LabelledByHeads(pool)
    order = ["task1", "task2", "task0"]
    res = evaluate_encoder(pool.encoder, pool, src, order, batch_size=5)
    right = {t: _accuracy(pool, t, src, t) for t in pool.tasks}
    positional = {t: _accuracy(pool, p, src, t) for t, p in zip(order, pool.tasks)}
    assert any(abs(right[t] - positional[t]) > 0.05 for t in order)
    assert res["accuracy"] == pytest.approx(right)
    assert list(res["accuracy"]) == order  # reported in the order asked for
