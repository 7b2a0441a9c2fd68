"""Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832) from one pass over unlabeled test batches.

    θ = Σᵢ cᵢ F̂ᵢ ⊙ θᵢ / Σᵢ cᵢ F̂ᵢ,    Fᵢ = (1/n) Σ_x Σ_y p_θᵢ(y | x) (∂ log p_θᵢ(y | x) / ∂θ)²

Fᵢ is the diagonal Fisher of expert i on unlabeled test images of task i, the labels drawn from the
expert's own predictive distribution through its zero-shot head (no true labels); the merge with its
smoothing and normalisation is :func:`adamerge.merging.fisher.fisher_merge`. Estimators of Fᵢ:

* ``"exact"`` (default; mmatena/model_merging ``fisher.py``): per example, the expectation over every
  class y weighted by p(y | x), from per-example gradients (``torch.func``: one forward and one
  vector-Jacobian product per class, ``chunk`` gradient vectors held at a time);
* ``"sampled"``: per example, one label y ~ p(· | x) (the paper's Monte-Carlo alternative);
* ``"batch"`` (FusionBench ``fisher_merging.py``): the square of one batch-level gradient of
  Σ_b Σ_y √p_by · log p_by, divided by the examples — not a sum of per-example squares (cross terms
  between examples stay in), but one backward per batch.

Per-example gradients run attention through PyTorch's math kernel (``vmap`` has no batching rule
for the fused ones on every device). Fisher sums are float32 (as the official TensorFlow code), on the
inputs' device, one per expert (as large as the expert).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from adamerge.merging.fisher import SMOOTHINGS, fisher_merge
from adamerge.models.pool import ModelPool
from adamerge.systems.statistics import StatisticsMerge

__all__ = ["ESTIMATORS", "FisherMerging"]

ESTIMATORS = ("exact", "sampled", "batch")
CHUNK_BYTES = 4 * 2**30  # default memory for per-example gradients


class FisherMerging(StatisticsMerge):
    """Fisher-weighted averaging of the experts, Fishers estimated on unlabeled test inputs.

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge, in order; default all of the pool's tasks.
        estimator: how each expert's diagonal Fisher is estimated: ``"exact"`` (expectation over the
            expert's predicted label distribution per example, the official code), ``"sampled"`` (one
            label drawn from it per example) or ``"batch"`` (FusionBench's squared batch gradient).
        normalize: divide each expert's weight by the global L2 norm of its Fisher (both official codes).
        floor: the Fisher smoothing constant (1e-6 in both official codes).
        smoothing: ``"floor"`` F̂ = max(F, floor) (official code) or ``"add"`` F̂ = F + floor (FusionBench).
        chunk: per-example gradient vectors held at once (``exact``: examples × classes), each the
            size of the encoder; default as many as fit in 4 GiB (ViT-B/32: 12, ViT-L/14: 3, the mini
            benchmark's model: hundreds). Larger is faster (fewer, wider ``vmap`` calls).
        export_dir: if set, ``merged.safetensors``, ``statistics.json`` and ``metrics.json`` are
            written here at the end of ``fit``.
    """

    identity = ("estimator", "normalize", "floor", "smoothing")

    def __init__(self, pool: ModelPool, tasks: list[str] | None = None, estimator: str = "exact",
                 normalize: bool = True, floor: float = 1e-6, smoothing: str = "floor", chunk: int | None = None,
                 export_dir: str | None = None) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
        if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk!r}")
        super().__init__(pool, tasks, export_dir=export_dir)
        self.estimator, self.normalize, self.floor = estimator, bool(normalize), float(floor)
        self.smoothing, self.chunk = smoothing, None if chunk is None else int(chunk)
        self.reset_statistics()

    @property
    def method_label(self) -> str:
        return "Fisher merging" if self.estimator == "exact" else f"Fisher merging ({self.estimator})"

    # ---- statistics ------------------------------------------------------------------------
    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._sums: dict[str, dict[str, Tensor]] = {t: {} for t in self.tasks}
        self._examples = {t: 0 for t in self.tasks}

    def accumulate(self, task: str, images: Tensor) -> None:
        """Add the squared gradients of ``task``'s expert on one unlabeled batch to its Fisher sum."""
        params = {k: v for k, v in self.expert_weights(task).items() if v.is_floating_point()}
        if self.estimator == "batch":
            squares = self._batch_squares(task, params, images)
        else:
            with sdpa_kernel(SDPBackend.MATH):  # vmap batches the math kernel's ops on every device
                squares = self._example_squares(task, params, images)
        sums = self._sums[task]
        for key, value in squares.items():
            if key in sums:
                sums[key].add_(value)
            else:
                sums[key] = value.float()
        self._examples[task] += int(images.shape[0])

    def _log_probs(self, task: str, params: dict[str, Tensor], images: Tensor) -> Tensor:
        return torch.log_softmax(self.expert_logits(task, images, params), dim=-1)

    def _example_squares(self, task: str, params: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        """Σ over the batch of Σ_y w_y (∂ log p_y / ∂θ)², per example: w = p (exact) or one sampled y."""
        classes = self.num_classes[task]
        if self.estimator == "sampled":
            with torch.no_grad():
                probs = self._log_probs(task, params, images).exp()
            labels = torch.multinomial(probs, 1).squeeze(1)
        else:
            labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)  # unused
        chunk = self.chunk or max(1, CHUNK_BYTES // sum(v.numel() * v.element_size() for v in params.values()))
        per_class = min(classes if self.estimator == "exact" else 1, chunk)
        per_example = max(1, chunk // (per_class + 1))  # + 1: each example's running sum

        def one(x: Tensor, y: Tensor) -> dict[str, Tensor]:
            log_p, pullback = vjp(lambda p: self._log_probs(task, p, x[None])[0], params)
            if self.estimator == "exact":
                cotangents = torch.diag(log_p.detach().exp().sqrt())  # row y: √p_y e_y
            else:
                cotangents = (torch.arange(classes, device=y.device) == y).to(log_p.dtype)[None]
            total: dict[str, Tensor] = {}
            for part in cotangents.split(per_class):
                (grads,) = vmap(pullback)(part)
                for key, g in grads.items():
                    sq = g.square().sum(0)
                    total[key] = total[key] + sq if key in total else sq
            return total

        out: dict[str, Tensor] = {}
        for xs, ys in zip(images.split(per_example), labels.split(per_example)):
            for key, value in vmap(one)(xs, ys).items():
                s = value.sum(0)
                out[key] = out[key] + s if key in out else s
        return out

    def _batch_squares(self, task: str, params: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        """FusionBench: (∂/∂θ Σ_b Σ_y √p_by · log p_by)², p detached inside the square root."""
        def objective(p: dict[str, Tensor]) -> Tensor:
            log_p = self._log_probs(task, p, images)
            return (log_p.detach().exp().sqrt() * log_p).sum()

        return {k: g.square() for k, g in grad(objective)(params).items()}

    def fishers(self) -> dict[str, dict[str, Tensor]]:
        """Task → key → the mean diagonal Fisher (sum / examples) gathered so far."""
        return {t: {k: v / self._examples[t] for k, v in self._sums[t].items()} for t in self.tasks}

    def statistics_summary(self) -> dict:
        return {**super().statistics_summary(), "estimator": self.estimator, "normalize": self.normalize,
                "floor": self.floor, "smoothing": self.smoothing}

    # ---- merge -----------------------------------------------------------------------------
    def merge_statistics(self) -> dict[str, Tensor]:
        fishers = self.fishers()
        return fisher_merge([self.expert_weights(t) for t in self.tasks], [fishers[t] for t in self.tasks],
                            normalize=self.normalize, floor=self.floor, smoothing=self.smoothing, names=self.tasks)
