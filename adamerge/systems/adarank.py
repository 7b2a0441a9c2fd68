"""AdaRank as a LightningModule (Lee et al., arXiv 2503.22178).

    min_{λ, z}  Σ_k  mean_b H( softmax( head_k( f(x_{k,b}; o + Σ_j λ_j U_j diag(σ_j ⊙ m_j(z)) V_jᵀ) ) ) )

AdaMerging's loop (one merge per step, one forward over the concatenated per-task batches, evaluation
on a merge frozen per epoch) on :class:`~adamerge.components.adarank.AdaRankModel`, which learns the
layer-wise λ and a straight-through mask over the singular components of each task's direction.
The authors' run (david3684/AdaRank ``vision/runner.py``): Adam lr 1e-3, betas (0.9, 0.999), weight
decay 0, 16 unlabeled test images per task per step, loss = Σ_k of the batch means, 10 000 steps.

``export`` writes what AdaMerging's does (``merged.safetensors`` with the hard masks,
``learned.safetensors`` with λ and the mask logits, the coefficients) plus ``ranks.json``: the kept
rank of every masked matrix per task. ``diagnostics()`` adds the same ranks as data
(:mod:`adamerge.wandb_story` draws them as a heatmap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from adamerge.components.adarank import AdaRankModel
from adamerge.files import write_text
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.base import default_optimizer

__all__ = ["AdaRank"]


class AdaRank(AdaMerging):
    """Test-time learned coefficients and singular-component masks by entropy minimisation.

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge and adapt on, in order; default all of the pool's tasks.
        model: the learnable merge, ``class_path: adamerge.components.adarank.AdaRankModel`` with its
            ``init_args`` (directions, init_lam, mask_temp, initial_rank_ratio, split_qkv, …; documented
            there); default its defaults (AdaRank on task arithmetic, λ 0.3, all components on).
        optimizer: optimizer for λ and the mask logits (default Adam, lr 1e-3, as the authors').
        export_dir: if set, the merged model, λ, masks, kept ranks and ``metrics.json`` go here after fit.
        lr_scheduler: an optional schedule of the optimizer's lr, stepped every step (see TestTimeSystem).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: list[str] | None = None,
        model: Callable[[ModelPool, list[str]], AdaRankModel] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        export_dir: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(pool, tasks, model or AdaRankModel, optimizer, export_dir, lr_scheduler)

    def ranks_dict(self) -> dict:
        """The kept ranks (hard masks) as plain data: tasks, matrices, their full rank, ``[K][M]`` counts."""
        m = self.model
        return {
            "tasks": list(self.tasks),
            "matrices": m.matrix_names,
            "full_rank": m.full_ranks(),
            "stored_rank": m.stored_ranks(),
            "mask_temp": m.mask_temp,
            "ranks": m.ranks().tolist(),
        }

    def diagnostics(self) -> dict:
        """AdaMerging's ``coefficients`` plus ``{"ranks": {values [K, M], tasks, layers, full}}``: the
        kept components of every masked matrix per task (hard masks), and each matrix's min(m, n)."""
        out = super().diagnostics()
        out["ranks"] = {"values": self.model.ranks(), "tasks": list(self.tasks),
                        "layers": self.model.matrix_names, "full": self.model.full_ranks()}
        return out

    def export(self, directory: Path) -> None:
        """AdaMerging's files (merged model with the hard masks, λ, learned parameters) and ``ranks.json``."""
        super().export(directory)
        write_text(directory / "ranks.json", json.dumps(self.ranks_dict(), indent=1))
