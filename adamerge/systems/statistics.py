"""The shared loop of merges computed in closed form from statistics of unlabeled test inputs.

RegMean (Gram matrices of each linear layer's inputs) and Fisher merging (diagonal Fisher
information) read one pass over the unlabeled test stream — the datamodule's training stream,
``{task: images}`` per step — and then merge without any optimizer:

    statistics S = Σ_steps Σ_k accumulate(k, x_k)        (one epoch of the stream: N batches per task)
    θ = merge(S)                                          (closed form, computed when needed)

:class:`StatisticsMerge` is that loop on :class:`~adamerge.systems.base.TestTimeSystem`: manual
optimization with no optimizer (``configure_optimizers`` returns None; Lightning's one warning about
it is filtered by its message); ``training_step`` hands each task's images to ``accumulate(task,
images)`` and counts the step in ``batches_seen``. Without an optimizer Lightning's ``global_step``
stays 0, so ``max_steps`` cannot end the pass: the first training epoch ends it
(``trainer.should_stop``), so a pass is ``data.steps_per_epoch`` batches per task. The merged
encoder is computed from the statistics when validation, test or export first needs it, and again
only after the statistics changed; ``task_logits`` run it. ``export`` writes ``merged.safetensors``
(via the pool) and ``statistics.json``; there is no ``learned.safetensors``, as nothing learns.

Experts: held as frozen encoders (non-persistent buffers, :func:`~adamerge.components.frozen.freeze_as_buffers`)
for the whole pass, K copies of the encoder on the device (ViT-B/32: 0.35 GB each). Every step needs
every expert; loading them per use would read and check K experts from their files at each step.
Statistics live in plain attributes, never in a checkpoint: a checkpoint holds what learns, here
nothing, so resuming from one (or loading one) is refused; a pass is short, run it again.
Single device only (statistics are not reduced across DDP ranks).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.components.frozen import freeze_as_buffers
from adamerge.files import write_text
from adamerge.models.pool import ModelPool
from adamerge.systems.base import TestTimeSystem
from adamerge.systems.runs import CheckpointMismatchError

__all__ = ["StatisticsMerge"]


def _quiet_no_optimizer_notice() -> None:
    """No optimizer on purpose: silence exactly Lightning's warning about it."""
    warnings.filterwarnings(
        "ignore", message=r"`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer",
        category=UserWarning,
    )


class StatisticsMerge(TestTimeSystem):
    """One pass over the unlabeled stream gathering statistics, then a closed-form merge.

    A base for such methods (RegMean, Fisher merging), not one itself: ``adamerge methods`` lists its
    subclasses.

    Subclasses implement :meth:`accumulate`, :meth:`merge_statistics` and :meth:`reset_statistics`
    (and may extend :meth:`statistics_summary`).

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge, in order; default all of the pool's tasks.
        export_dir: if set, ``merged.safetensors``, ``statistics.json`` and ``metrics.json`` are
            written here at the end of ``fit``, as one set.

    Attributes:
        batches_seen: training steps of the current pass (each one batch of every task).
    """

    abstract = True  # skipped by `adamerge methods`; subclasses are methods

    def __init__(self, pool: ModelPool, tasks: list[str] | None = None, export_dir: str | None = None) -> None:
        super().__init__(pool, tasks, export_dir=export_dir)
        self.automatic_optimization = False
        self.experts = nn.ModuleList(freeze_as_buffers(pool.build_encoder(pool.expert_state(t))) for t in self.tasks)
        self.merged_encoder = freeze_as_buffers(pool.build_encoder())  # evaluation: merged weights copied in
        self.batches_seen = 0
        self.images_seen = {t: 0 for t in self.tasks}
        self._state_keys = list(pool.encoder.state_dict())
        self._version = 0  # bumped by every step; the merge is recomputed when it differs
        self._merged_version = -1

    # ---- experts -----------------------------------------------------------------------------
    def expert(self, task: str) -> nn.Module:
        """The frozen encoder of ``task``'s expert (its weights are buffers)."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not one of this system's tasks {self.tasks}")
        return self.experts[self.tasks.index(task)]

    def expert_weights(self, task: str) -> dict[str, Tensor]:
        """θ of ``task``'s expert, ``{state-dict key: tensor}`` (the frozen module's buffers, not copies)."""
        return self._state(self.expert(task))

    def _state(self, encoder: nn.Module) -> dict[str, Tensor]:
        """The encoder's state-dict entries (now buffers), in θ_0's key order."""
        buffers = dict(encoder.named_buffers())
        return {k: buffers[k] for k in self._state_keys}

    def train(self, mode: bool = True) -> StatisticsMerge:
        """Switch the metrics' mode; the experts and the merged encoder stay in eval mode."""
        super().train(mode)
        self.experts.eval()
        self.merged_encoder.eval()
        return self

    # ---- hooks for subclasses --------------------------------------------------------------
    def accumulate(self, task: str, images: Tensor) -> None:
        """Add one unlabeled batch of ``task`` to the statistics."""
        raise NotImplementedError(f"{type(self).__name__} must implement accumulate(task, images)")

    def merge_statistics(self) -> dict[str, Tensor]:
        """The merged encoder's state dict, in closed form from the statistics gathered so far."""
        raise NotImplementedError(f"{type(self).__name__} must implement merge_statistics()")

    def reset_statistics(self) -> None:
        """Forget the statistics (a new pass starts); subclasses clear theirs and call ``super()``."""
        self.batches_seen = 0
        self.images_seen = {t: 0 for t in self.tasks}
        self._version += 1

    @property
    def progress_step(self) -> int:
        """The batches of every task this pass has read (Lightning's ``global_step`` stays 0 here)."""
        return self.batches_seen

    def statistics_summary(self) -> dict:
        """What the statistics were gathered from (written to ``statistics.json``)."""
        return {"batches_seen": self.batches_seen, "images_seen": dict(self.images_seen)}

    # ---- the merged model ------------------------------------------------------------------
    def merged_state_dict(self) -> dict[str, Tensor]:
        """A copy of the merged encoder's state dict, merged from the statistics when they changed."""
        if self.batches_seen == 0:
            raise RuntimeError(f"{type(self).__name__} has no statistics yet: run fit (one pass over the "
                               "unlabeled stream) before validate, test or export")
        own = self._state(self.merged_encoder)
        if self._merged_version != self._version:
            with torch.no_grad():
                merged = self.merge_statistics()
                for key, value in own.items():
                    value.copy_(merged.pop(key))
            self._merged_version = self._version
        return {k: v.detach().clone() for k, v in own.items()}

    def encode(self, images: Tensor) -> Tensor:
        """Features of the merged encoder."""
        self.merged_state_dict()
        return self.merged_encoder(images)

    def task_logits(self, task: str, images: Tensor) -> Tensor:
        return self.logits(task, self.encode(images))

    def expert_logits(self, task: str, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of ``task``'s expert (``params``: weights to use instead of its own, for gradients)."""
        expert = self.expert(task)
        feats = expert(images) if params is None else functional_call(expert, dict(params), (images,))
        return self.logits(task, feats)

    # ---- the pass --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        _quiet_no_optimizer_notice()
        if self._trainer is not None and self.trainer.world_size > 1:
            raise RuntimeError(f"{type(self).__name__} runs on one device: its statistics are not reduced "
                               f"across {self.trainer.world_size} processes (set trainer.devices=1)")

    def configure_optimizers(self):
        return None  # nothing learns

    def on_train_start(self) -> None:
        self.reset_statistics()  # every fit is one fresh pass

    def training_step(self, batch: Mapping, batch_idx: int) -> None:
        images = {t: (x[0] if isinstance(x, (tuple, list)) else x) for t, x in batch.items() if x is not None}
        if not images:
            raise ValueError("empty training batch: expected one batch per task")
        unknown = [t for t in images if t not in self.tasks]
        if unknown:
            raise ValueError(f"training batch has task {unknown[0]!r} that the model does not")
        for task, x in images.items():
            self.accumulate(task, x)
            self.images_seen[task] += int(x.shape[0])
        self.batches_seen += 1
        self._version += 1

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # the pass is one epoch of the stream (global_step stays 0)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.trainer.sanity_checking and self.batches_seen == 0:
            return  # no statistics yet: nothing to evaluate before the pass
        super().validation_step(batch, batch_idx, dataloader_idx)

    # ---- export and checkpoints --------------------------------------------------------------
    def export(self, directory: Path) -> None:
        """Write ``merged.safetensors`` (via the pool) and ``statistics.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.pool.export(self.merged_state_dict(), directory / "merged.safetensors")
        summary = {"system": type(self).__name__, "tasks": list(self.tasks), **self.statistics_summary()}
        write_text(directory / "statistics.json", json.dumps(summary, indent=1))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        raise CheckpointMismatchError(
            f"{type(self).__name__} keeps its statistics out of checkpoints (nothing learns, and they are as large "
            "as the experts): a checkpoint cannot resume or restore it; run the pass again without ckpt_path"
        )
