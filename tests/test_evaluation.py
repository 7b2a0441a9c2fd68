"""Evaluation numbers against hand counts, on features whose predictions are known by construction."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from torch import nn
from torch.utils.data import TensorDataset

from adamerge.evaluation import evaluate_encoder, evaluate_experts, log_dict, normalized_accuracy
from adamerge.models.pool import ModelPool

D = 4
HEAD_A = torch.eye(3, D)  # class c ↔ feature axis c
HEAD_B = torch.eye(2, D)
# task a: features pointing at classes 0,1,2,0,1 ; labels 0,1,1,0,2 → right, right, wrong, right, wrong = 3/5
FEAT_A = torch.tensor([[5.0, 0, 0, 0], [0, 4, 1, 0], [0, 0, 3, 1], [2, 1, 0, 0], [0, 2, 1, 0]])
LAB_A = torch.tensor([0, 1, 1, 0, 2])
# task b: predictions 1,1,0,0 ; labels 1,0,0,0 → 3/4
FEAT_B = torch.tensor([[0.0, 1, 0, 0], [0.2, 1, 0, 0], [3, 1, 0, 0], [1, 0, 0, 9]])
LAB_B = torch.tensor([1, 0, 0, 0])


class Source:
    tasks = ("a", "b")

    def dataset(self, task, split):
        feats, labels = (FEAT_A, LAB_A) if task == "a" else (FEAT_B, LAB_B)
        if split == "val":
            return TensorDataset(feats[:2], labels[:2])
        return TensorDataset(feats, labels)


def _linear(weight):
    enc = nn.Linear(D, D, bias=False)
    with torch.no_grad():
        enc.weight.copy_(weight)
    return enc


@pytest.fixture
def pool():
    swap01 = torch.eye(D)[[1, 0, 2, 3]]  # expert b swaps features 0 and 1
    experts = {"a": _linear(torch.eye(D)).state_dict(), "b": _linear(swap01).state_dict()}
    return ModelPool(_linear(torch.eye(D)), experts, {"a": HEAD_A, "b": HEAD_B}, logit_scale=100.0)


def test_per_task_and_average_accuracy_match_hand_count(pool):
    res = evaluate_encoder(pool.encoder, pool, Source(), ["a", "b"], batch_size=2)
    assert res["accuracy"] == pytest.approx({"a": 3 / 5, "b": 3 / 4})
    assert res["average_accuracy"] == pytest.approx((3 / 5 + 3 / 4) / 2)
    assert res["num_samples"] == {"a": 5, "b": 4} and res["split"] == "test"
    assert json.loads(json.dumps(res)) == res


def test_val_split_and_default_tasks(pool):
    res = evaluate_encoder(pool.encoder, pool, Source(), split="val", batch_size=7)
    # a: first two rows right (2/2); b: predictions 1,1 vs labels 1,0 → 1/2
    assert res["accuracy"] == pytest.approx({"a": 1.0, "b": 0.5}) and res["split"] == "val"


def test_experts_each_on_their_task_and_normalized_accuracy(pool):
    experts = evaluate_experts(pool, Source(), batch_size=3)
    # expert b swaps axes 0/1: predictions become 0,0,1,1 vs labels 1,0,0,0 → 1/4
    assert experts["accuracy"] == pytest.approx({"a": 3 / 5, "b": 1 / 4})
    merged = evaluate_encoder(pool.encoder, pool, Source())
    norm = normalized_accuracy(merged["accuracy"], experts["accuracy"])
    assert norm["normalized_accuracy"] == pytest.approx({"a": 1.0, "b": (3 / 4) / (1 / 4)})
    assert norm["average_normalized_accuracy"] == pytest.approx((1.0 + 3.0) / 2)


def test_log_names_follow_split_metric_task(pool):
    res = evaluate_encoder(pool.encoder, pool, Source(), ["b"])
    assert log_dict(res) == pytest.approx({"test/acc/b": 0.75, "test/acc/avg": 0.75})


def test_encoder_mode_is_restored(pool):
    enc = pool.build_encoder().train()
    evaluate_encoder(enc, pool, Source(), ["a"])
    assert enc.training


def test_matches_zero_shot_pool_on_tiny_clip():
    """On a real tiny CLIP: the accuracy equals the hand-computed argmax over pool logits."""
    tiny = make_tiny_pool(num_tasks=2)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = F.normalize(tiny.encoder(images), dim=-1)
    preds = {t: (feats @ tiny.head(t).t()).argmax(-1) for t in tiny.tasks}
    labels = {t: torch.tensor([0, 1, 2, 0, 1, 2]) for t in tiny.tasks}

    class ImageSource:
        tasks = tiny.tasks

        def dataset(self, task, split):
            return TensorDataset(images, labels[task])

    res = evaluate_encoder(tiny.encoder, tiny, ImageSource(), batch_size=4)
    for t in tiny.tasks:
        assert res["accuracy"][t] == pytest.approx(float((preds[t] == labels[t]).float().mean()))


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_inputs(pool):
    with pytest.raises(ValueError, match="'c' has no expert"):
        evaluate_encoder(pool.encoder, pool, Source(), ["a", "c"])
    with pytest.raises(ValueError, match="empty task list"):
        evaluate_encoder(pool.encoder, pool, Source(), [])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        evaluate_encoder(pool.encoder, pool, Source(), ["a"], split="dev")

    class Partial(Source):
        tasks = ("a",)

    with pytest.raises(ValueError, match="no task 'b'"):
        evaluate_encoder(pool.encoder, pool, Partial(), ["a", "b"])

    class Empty(Source):
        def dataset(self, task, split):
            return TensorDataset(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))

    with pytest.raises(ValueError, match="empty dataset"):
        evaluate_encoder(pool.encoder, pool, Empty(), ["a"])


def test_normalized_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="no expert accuracy for task 'b'"):
        normalized_accuracy({"a": 0.5, "b": 0.4}, {"a": 0.9})
    with pytest.raises(ValueError, match="task 'a' is 0"):
        normalized_accuracy({"a": 0.5}, {"a": 0.0})
    with pytest.raises(ValueError, match="no tasks"):
        normalized_accuracy({}, {})
