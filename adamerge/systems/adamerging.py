"""AdaMerging as a LightningModule (Yang et al., ICLR 2024, arXiv 2310.02575).

    min_λ  Σ_k  mean_b H( softmax( head_k( f(x_{k,b}; θ_0 + Σ_j λ_j τ_j) ) ) )

task-wise (one λ_j per task) or layer-wise (one λ_j^l per tensor l), init 0.3, Adam lr 1e-3,
λ clamped to [0, 1] in the merge (official code), AdaMerging++ when ``keep`` is set (the τ_j
TIES-trimmed and sign-elected first). Only λ is trained and checkpointed (kilobytes).

Each step merges once and runs one forward over the concatenated per-task batches; evaluation
merges once per epoch. ``export`` writes ``merged.safetensors`` (the merged encoder, via the pool)
and the coefficients as ``coefficients.json`` and ``coefficients.safetensors``. ``diagnostics()``
gives the coefficients as plain data (:mod:`adamerge.wandb_story` draws them as a heatmap).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.func import functional_call

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.losses import entropy
from adamerge.files import write_text
from adamerge.models.checkpoints import save_state_dict
from adamerge.models.pool import ModelPool
from adamerge.systems.base import TestTimeSystem, default_optimizer

__all__ = ["AdaMerging"]


class AdaMerging(TestTimeSystem):
    """Test-time learned merging coefficients by entropy minimisation.

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge and adapt on, in order; default all of the pool's tasks.
        model: the coefficients, ``class_path: adamerge.components.adamerging.AdaMergingModel`` with
            its ``init_args`` (granularity, init, clamp, keep, tv_dtype; documented there);
            default its defaults (layer-wise, init 0.3, clamped to [0, 1]).
        optimizer: optimizer for the coefficients (default Adam, lr 1e-3).
        export_dir: if set, the merged model, coefficients and ``metrics.json`` go here after fit.
        lr_scheduler: an optional schedule of the optimizer's lr, stepped every step (see TestTimeSystem).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: list[str] | None = None,
        model: Callable[[ModelPool, list[str]], AdaMergingModel] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        export_dir: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(pool, tasks, optimizer, export_dir, model=model or AdaMergingModel, lr_scheduler=lr_scheduler)
        self._eval_params: dict[str, Tensor] | None = None

    # ---- forward ---------------------------------------------------------------------------
    def encode(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Features of the merged encoder (``params``: precomputed merged weights, else merge now)."""
        params = self.model.merged_parameters() if params is None else params
        return functional_call(self.model.encoder, dict(params), (images,))

    def task_logits(self, task: str, images: Tensor) -> Tensor:
        return self.logits(task, self.encode(images, self._eval_params))

    def adaptation_losses(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One merge, one forward over all tasks' batches (split back per task), entropy per task."""
        params = self.model.merged_parameters()
        tasks = list(images)
        shapes = {tuple(x.shape[1:]) for x in images.values()}
        if len(shapes) == 1:
            feats = self.encode(torch.cat([images[t] for t in tasks]), params)
            feats = torch.split(feats, [images[t].shape[0] for t in tasks])
        else:
            feats = [self.encode(images[t], params) for t in tasks]
        return {t: entropy(self.logits(t, f)).mean() for t, f in zip(tasks, feats)}

    def _freeze_merge(self) -> None:
        with torch.no_grad():
            self._eval_params = {k: v.detach() for k, v in self.model.merged_parameters().items()}

    def on_validation_epoch_start(self) -> None:
        self._freeze_merge()

    def on_test_epoch_start(self) -> None:
        self._freeze_merge()

    def on_validation_epoch_end(self) -> None:
        self._eval_params = None
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_params = None
        super().on_test_epoch_end()

    # ---- diagnostics and export --------------------------------------------------------------
    def diagnostics(self) -> dict:
        """``{"coefficients": {values, tasks, layers, init_lam, clamp, granularity}}``: the effective λ
        ``[K, L]`` (task-wise ``[K, 1]``, layer ``"all"``), on CPU, and the initial λ."""
        coef = self.model.coefficients().detach().float().cpu()
        layers = list(self.model.layer_names)
        if self.model.granularity == "task":
            coef, layers = coef[:, :1], ["all"]
        return {"coefficients": {"values": coef, "tasks": list(self.tasks), "layers": layers,
                                 "init_lam": self.model.init_lam, "clamp": self.model.clamp,
                                 "granularity": self.model.granularity}}

    def coefficients_dict(self) -> dict:
        """The effective coefficients as plain data: tasks, layer names, ``[K][L]`` values."""
        coef = self.model.coefficients().detach().cpu()
        return {
            "granularity": self.model.granularity,
            "clamp": self.model.clamp,
            "tasks": list(self.tasks),
            "layers": list(self.model.layer_names),
            "coefficients": coef.tolist(),
        }

    def export(self, directory: Path) -> None:
        """Write ``merged.safetensors`` and ``learned.safetensors`` (the base), ``coefficients.json``/``.safetensors``."""
        super().export(directory)
        write_text(directory / "coefficients.json", json.dumps(self.coefficients_dict(), indent=1))
        save_state_dict(
            {"coefficients": self.model.coefficients().detach().cpu()},
            directory / "coefficients.safetensors",
            metadata={"tasks": json.dumps(self.tasks), "layers": json.dumps(self.model.layer_names)},
        )
