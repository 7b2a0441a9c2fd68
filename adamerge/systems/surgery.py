"""Representation Surgery and SurgeryV2 as a LightningModule, on top of any frozen merged model.

    min_{aligners}  Σ_k  L1( A_k(f_merged(x_k)), f_k(x_k) )                                  (v1)
    min_{aligners}  Σ_k [ Σ_ℓ L1( mean_tok A_k^ℓ(h_ℓ^merged), mean_tok h_ℓ^k ) + L1(z'_k, f_k(x_k)) ]  (V2)

x_k an unlabeled test batch of task k, f_k its frozen expert, A_k the task's aligners
(z' = z − up(ReLU(down(z))), :mod:`adamerge.components.surgery`). Yang et al., "Representation
Surgery for Multi-Task Model Merging", ICML 2024, arXiv 2402.02705; "SurgeryV2", arXiv 2410.14389.
Adam lr 1e-3, 500 steps, batch 16 per task (the papers' defaults). The merged model is built once
(a static merge by name, or a merged state-dict file such as an AdaMerging export) and never trained;
only the aligners are optimised and checkpointed. Logits: the task's frozen zero-shot head on the
aligned final embedding.

``export`` writes ``learned.safetensors`` (the aligners), ``surgery.json`` (version, rank, widths,
tasks, base merge) and, unless ``export_merged=False``, ``merged.safetensors`` (the base merged
encoder, through the pool's exporter) so the run can be evaluated without recomputing the merge.
``diagnostics()`` gives the last training step's L1 per task and layer as plain data
(:mod:`adamerge.wandb_story` draws it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.components.surgery import (
    ExpertFeatures,
    SurgeryModel,
    alignment_loss,
    layer_alignment_losses,
)
from adamerge.files import write_text
from adamerge.merging.task_vectors import dtype_named
from adamerge.models.pool import ModelPool
from adamerge.systems.base import CheckpointMismatchError, TestTimeSystem, default_optimizer
from adamerge.systems.base_merge import BaseMerge, base_merge_label, base_merge_state

__all__ = ["Surgery"]

_MODEL_PREFIX = "model."


class Surgery(TestTimeSystem):
    """Per-task aligners pulling a frozen merged model's features toward each expert's (no labels).

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to align, in order; default all of the pool's tasks.
        base_merge: the merged model to operate on: a static method name for
            ``adamerge.merging.merge_pool`` (``task_arithmetic``, ``weight_average``, ``ties``, ``pcb``,
            ...), a mapping ``{method: ties, keep: 0.2, lam: 0.3}``, or the path of a merged image-encoder
            state dict (``.safetensors``, e.g. an AdaMerging run's ``merged.safetensors``).
        model: the aligners, ``class_path: adamerge.components.surgery.SurgeryModel`` with its
            ``init_args`` (``version``: v1 / v2, ``rank``; documented there); default v1, rank 16.
        expert_dtype: dtype the frozen experts run in: ``float32``, ``bfloat16`` or ``float16``
            (half the expert memory; ViT-B/32: 350 MB → 175 MB per expert).
        cache_experts: keep one built expert per task (fast); ``False`` rebuilds each expert from the
            pool for every batch so only one is in memory at a time.
        export_merged: also write the base merged encoder to ``merged.safetensors`` at export.
        optimizer: optimizer for the aligners (default Adam, lr 1e-3).
        export_dir: if set, aligners, metadata, merged model and ``metrics.json`` go here after fit.
        lr_scheduler: an optional schedule of the optimizer's lr, stepped every step (see TestTimeSystem).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: list[str] | None = None,
        base_merge: BaseMerge = "task_arithmetic",
        model: Callable[[nn.Module, list[str]], SurgeryModel] | None = None,
        expert_dtype: str = "float32",
        cache_experts: bool = True,
        export_merged: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        export_dir: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(pool, tasks, optimizer, export_dir, lr_scheduler=lr_scheduler)
        experts_dtype = dtype_named(expert_dtype, "expert_dtype")
        self.base_merge = base_merge
        self.export_merged = export_merged
        encoder = pool.build_encoder(base_merge_state(pool, base_merge, self.tasks))
        self.use_component((model or SurgeryModel)(encoder, list(self.tasks)))
        self.experts = ExpertFeatures(
            pool, self.tasks, with_blocks=self.model.version == "v2", dtype=experts_dtype,
            cache=cache_experts,
        )
        self._layer_losses: dict[str, Tensor] = {}  # task → the last step's L1 per layer (diagnostics)

    def method_identity(self) -> dict:
        return {**super().method_identity(), "base_merge": self.base_merge}

    @property
    def method_label(self) -> str:
        """``Surgery on TA``, ``SurgeryV2 on AdaMerging``, …: the row name in results tables (the base's
        label: :func:`~adamerge.systems.base_merge.base_merge_label`)."""
        return f"{self.model.label} on {base_merge_label(self.base_merge)}"

    # ---- forward and loss -------------------------------------------------------------------
    def task_logits(self, task: str, images: Tensor) -> Tensor:
        return self.logits(task, self.model(task, images).final)

    def adaptation_loss(self, task: str, images: Tensor) -> Tensor:
        """L1 between the aligned merged features and the frozen expert's (V2: summed over layers)."""
        return alignment_loss(self.model(task, images), self.experts(task, images))

    def adaptation_losses(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-task L1 losses with one batched pass of the merged encoder over every task's batch."""
        merged = self.model.forward_many(images)
        losses = {}
        for t, x in images.items():
            expert = self.experts(t, x)
            losses[t] = alignment_loss(merged[t], expert)
            self._layer_losses[t] = layer_alignment_losses(merged[t], expert)
        return losses

    def diagnostics(self) -> dict:
        """``{"layer_loss": {values, tasks, layers}}``: the last training step's L1 per task and layer
        (``[K, L + 1]``, V2: blocks ``b0``… then ``final``; v1: ``final`` only), on CPU; nothing before a step."""
        tasks = [t for t in self.tasks if t in self._layer_losses]
        if not tasks:
            return {}
        layers = [f"b{i}" for i in range(self.model.depth)] + ["final"]
        values = torch.stack([self._layer_losses[t] for t in tasks]).cpu()
        return {"layer_loss": {"values": values, "tasks": tasks, "layers": layers}}

    # ---- checkpoints ------------------------------------------------------------------------
    def surgery_metadata(self) -> dict:
        """Shape-defining settings a checkpoint or export must agree on."""
        m = self.model
        return {
            "version": m.version,
            "rank": m.rank,
            "feature_dim": m.feature_dim,
            "block_width": m.width,
            "depth": m.depth,
        }

    def checkpoint_metadata(self) -> dict:
        meta = super().checkpoint_metadata()
        meta["surgery"] = self.surgery_metadata()
        return meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._check_surgery_meta(checkpoint.get("adamerge", {}).get("surgery"), "checkpoint")

    def _check_surgery_meta(self, theirs: dict | None, what: str) -> None:
        if theirs is None:
            raise CheckpointMismatchError(f"{what} has no surgery metadata (written by another method?)")
        for key, mine in self.surgery_metadata().items():
            if theirs.get(key) != mine:
                raise CheckpointMismatchError(
                    f"{what} has surgery {key} {theirs.get(key)!r}, this model has {mine!r} "
                    "(aligners must match the tasks, version, rank and the backbone's widths)"
                )

    def load_aligners(self, path: str | os.PathLike) -> None:
        """Load aligners from an export's ``learned.safetensors``; tasks, depth and widths must match."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aligner file {path} does not exist")
        state = load_file(str(path))
        bad = [k for k in state if not k.startswith(_MODEL_PREFIX)]
        if bad:
            raise ValueError(f"{path}: key {bad[0]!r} is not a surgery aligner (expected '{_MODEL_PREFIX}...')")
        self.model.load_state_dict({k[len(_MODEL_PREFIX) :]: v for k, v in state.items()})

    # ---- export -----------------------------------------------------------------------------
    def export(self, directory: Path) -> None:
        """Write ``learned.safetensors`` (aligners), ``surgery.json`` and ``merged.safetensors``."""
        directory = Path(directory)
        super().export(directory)
        info = {
            **self.surgery_metadata(),
            "tasks": list(self.tasks),
            "base_merge": self.base_merge if not isinstance(self.base_merge, os.PathLike) else str(self.base_merge),
            "trainable_parameters": self.model.trainable_parameter_count(),
        }
        write_text(directory / "surgery.json", json.dumps(info, indent=1))
        if self.export_merged:
            state = {k: v.cpu() for k, v in self.model.frozen_state_dict().items()}
            target = directory / "merged.safetensors"
            self.pool.export(state, target)  # OpenCLIPPool: a full CLIP open_clip.create_model loads
