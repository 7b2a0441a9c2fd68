"""Accuracy of an image encoder on each task through the pool's zero-shot heads, without Lightning.

    acc_k       = (1/N_k) Σ_i [argmax_c logits_k(x_i) = y_i]        (torchmetrics MulticlassAccuracy, micro)
    avg acc     = (1/K) Σ_k acc_k
    normalized  = acc_k(merged) / acc_k(expert k)   (Ortiz-Jimenez et al., "Task Arithmetic in the
                                                     Tangent Space", arXiv 2305.12827)

with ``logits_k = logit_scale · normalize(encoder(x)) @ head_kᵀ``. Results are plain dicts of floats
(fractions in [0, 1]) that ``json.dumps`` accepts; :func:`log_dict` flattens them to the project's
``split/metric/task`` names (``test/acc/mnist``, ``test/acc/avg``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from adamerge.data.source import TaskSource, check_split
from adamerge.models.pool import ModelPool, zero_shot_logits

__all__ = ["evaluate_encoder", "evaluate_experts", "log_dict", "normalized_accuracy", "task_accuracy"]


@torch.no_grad()
def task_accuracy(
    encoder: nn.Module,
    head: torch.Tensor,
    logit_scale: float,
    loader: DataLoader,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """(micro accuracy, number of samples) of ``encoder`` + ``head`` over ``loader``.

    Args:
        encoder: images ``[B, 3, H, W]`` → features ``[B, D]``.
        head: zero-shot head ``[C, D]`` (rows normalised).
        logit_scale: multiplier of the cosine similarities.
        loader: yields ``(images, labels)``.
        device: where to run the encoder.
    """
    metric = MulticlassAccuracy(num_classes=head.shape[0], average="micro").to(device)
    head = head.to(device)
    n = 0
    for images, labels in loader:
        feats = encoder(images.to(device))
        logits = zero_shot_logits(feats.float(), head.float(), logit_scale)
        labels = torch.as_tensor(labels, device=device)
        metric.update(logits, labels)
        n += int(labels.numel())
    if n == 0:
        raise ValueError("empty dataset: accuracy is undefined")
    return float(metric.compute()), n


def _model_device(encoder: nn.Module) -> torch.device:
    p = next(encoder.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate_encoder(
    encoder: nn.Module,
    pool: ModelPool,
    source: TaskSource,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Per-task and average accuracy of ``encoder`` with the pool's heads on ``source``'s ``split``.

    Args:
        encoder: the (merged) image encoder; its train/eval mode is restored afterwards.
        pool: supplies the zero-shot heads and logit scale.
        source: supplies ``dataset(task, split)``.
        tasks: tasks to evaluate (default: the pool's tasks).
        split: ``train``, ``val`` or ``test``.
        batch_size: evaluation batch size.
        num_workers: DataLoader workers.
        device: where to run (default: the encoder's device).

    Returns:
        ``{"split", "accuracy": {task: acc}, "average_accuracy", "num_samples": {task: n}}``.
    """
    check_split(split)
    tasks = pool.check_tasks(pool.tasks if tasks is None else tasks)
    missing = [t for t in tasks if t not in source.tasks]
    if missing:
        raise ValueError(f"data source has no task {missing[0]!r} (it serves {list(source.tasks)})")
    device = torch.device(device) if device is not None else _model_device(encoder)
    was_training = encoder.training
    encoder.eval()
    acc, counts = {}, {}
    try:
        for t in tasks:
            loader = DataLoader(source.dataset(t, split), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers)
            acc[t], counts[t] = task_accuracy(encoder, pool.head(t), pool.logit_scale, loader, device)
    finally:
        encoder.train(was_training)
    return {
        "split": split,
        "accuracy": acc,
        "average_accuracy": sum(acc.values()) / len(acc),
        "num_samples": counts,
    }


def evaluate_experts(
    pool: ModelPool, source: TaskSource, tasks: Sequence[str] | None = None, split: str = "test", **kwargs
) -> dict:
    """Each expert's accuracy on its own task (one expert in memory at a time).

    Args:
        pool: the model pool.
        source: the data source.
        tasks: which experts (default: all of the pool's).
        split: the split to evaluate.
        kwargs: passed to :func:`evaluate_encoder` (batch_size, num_workers, device).
    """
    acc, counts = {}, {}
    for t in pool.check_tasks(pool.tasks if tasks is None else tasks):
        r = evaluate_encoder(pool.build_encoder(pool.expert_state(t)), pool, source, [t], split, **kwargs)
        acc[t], counts[t] = r["accuracy"][t], r["num_samples"][t]
    return {"split": split, "accuracy": acc, "average_accuracy": sum(acc.values()) / len(acc),
            "num_samples": counts}


def normalized_accuracy(merged: Mapping[str, float], expert: Mapping[str, float]) -> dict:
    """``merged[k] / expert[k]`` per task and its average.

    Args:
        merged: task → accuracy of the merged model.
        expert: task → accuracy of task k's expert (must be > 0 for every task in ``merged``).
    """
    if not merged:
        raise ValueError("no tasks to normalise")
    out = {}
    for t, a in merged.items():
        if t not in expert:
            raise ValueError(f"no expert accuracy for task {t!r}")
        if expert[t] <= 0:
            raise ValueError(f"expert accuracy of task {t!r} is {expert[t]}: cannot normalise by it")
        out[t] = float(a) / float(expert[t])
    return {"normalized_accuracy": out, "average_normalized_accuracy": sum(out.values()) / len(out)}


def log_dict(results: Mapping) -> dict[str, float]:
    """Flatten :func:`evaluate_encoder` results to ``split/acc/task`` and ``split/acc/avg`` names."""
    split = results["split"]
    out = {f"{split}/acc/{t}": float(a) for t, a in results["accuracy"].items()}
    out[f"{split}/acc/avg"] = float(results["average_accuracy"])
    return out
