"""The test-time loop shared by every adaptive merging method (AdaMerging, WEMoE, Surgery).

Unsupervised test-time adaptation (AdaMerging, arXiv 2310.02575; WEMoE, arXiv 2402.00433;
Surgery, arXiv 2402.02705): each step takes one *unlabeled* batch of every task's test split and
minimises a sum of per-task losses,

    L = Σ_k  loss_k(x_k),     default loss_k = mean_b H(softmax(logits_k(x_k,b)))   (entropy)

Contract for subclasses (WEMoE and Surgery are built on it; keep it stable):

* ``__init__(pool, tasks=None, optimizer=<Adam lr 1e-3>, export_dir=None, model=None)``: a learnable
  component given as ``model`` (a ``class_path``, built as ``cls(pool, tasks, **init_args)``) is all
  a new method needs; systems that build theirs (WEMoE and Surgery pass a merged base) call
  ``super().__init__(pool, tasks, optimizer, export_dir)`` first and then :meth:`use_component`.
  ``self.pool`` (a plain attribute, never saved), ``self.tasks`` (validated against the pool),
  ``self.logit_scale`` and the frozen zero-shot heads are ready after it. A component may give
  ``label`` (results row), ``identity()`` (what a resume must match) and ``merged_state_dict()``
  (exported as ``merged.safetensors``).
* ``task_logits(task, images) -> [B, C_task]`` — logits of ``task`` on ``images``; default the
  component's features through the task's frozen head (:meth:`TestTimeSystem.logits`).
* ``adaptation_loss(task, images) -> scalar`` — default entropy of ``task_logits``, batch mean.
* ``adaptation_losses(images: dict[task, Tensor]) -> dict[task, scalar]`` — default calls
  ``adaptation_loss`` per task; override to share work across tasks in one step (AdaMerging
  merges once and runs one concatenated forward).
* ``learnable_parameters()`` — what the optimizer trains and the checkpoint holds; default every
  parameter with ``requires_grad``. Frozen weights must be buffers (non-persistent) or frozen.
* ``export(directory)`` — write the merged model and learned parameters; the base writes
  ``learned.safetensors`` (the learnable parameters by name); subclasses extend it.
* Overriding ``setup``/``on_save_checkpoint``/``on_load_checkpoint``: call ``super()``.

* ``identity`` — for systems without a component: ``hparams`` names a resume must match.

Behaviour: ``training_step`` accepts ``{task: images}`` or ``{task: (images, labels)}`` and never
reads labels; logs ``train/loss/<task>`` and ``train/loss``. ``validation_step``/``test_step``
take one labeled batch of task ``tasks[dataloader_idx]`` (the datamodule's order) and update one
torchmetrics ``MulticlassAccuracy`` (plain, micro-averaged) per task, logged at epoch end as
``val/acc/<task>`` and ``val/acc/avg`` (``test/…`` likewise). Checkpoints hold only
``learnable_state_dict()`` plus what made them (system, tasks, class counts, ``identity`` values,
fingerprints of θ_0 and every expert, the run id); a resume that differs in any of them fails before
the first step, naming the field, and a checkpoint never changes a configuration value
(:mod:`adamerge.systems.runs`). At the start of ``fit`` an ``export_dir`` holding another run's files is
refused (unless ``overwrite``); at the end rank 0 writes ``export(dir)`` and ``metrics.json`` into a
temporary folder swapped in as one set with a ``manifest.json`` of sha256 hashes; every callback with
an ``on_export(trainer, module, directory)`` method adds its files to the set (:class:`RunRecord`,
added by ``configure_callbacks``, writes the results record ``metrics.json``).
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from safetensors.torch import save_file
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from adamerge.components.losses import entropy
from adamerge.files import atomic_dir, atomic_path, sweep_temporaries
from adamerge.models.pool import ModelPool, zero_shot_logits
from adamerge.systems.record import RunRecord
from adamerge.systems.runs import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    check_data,
    check_export_dir,
    check_learnable_state,
    check_learning_rates,
    compare_identity,
)

__all__ = ["CheckpointMismatchError", "TestTimeSystem", "default_optimizer"]

_META_KEY = "adamerge"


def _quiet_frozen_eval_notice() -> None:
    """Frozen encoders stay in eval mode on purpose: silence exactly Lightning's notice about it."""
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
    )


ComponentFactory = Callable[[ModelPool, list[str]], nn.Module]


def default_optimizer(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """Adam, lr 1e-3, betas (0.9, 0.999): the AdaMerging / Surgery default."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))


def _images(item) -> Tensor:
    """The images of a training batch item, ``images`` or ``(images, labels, ...)``; labels unread."""
    return item[0] if isinstance(item, (tuple, list)) else item


class TestTimeSystem(L.LightningModule):
    """Base LightningModule for test-time adaptive merging (see the module docstring's contract).

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to adapt on, in order; default all of the pool's tasks.
        optimizer: optimizer for the learnable parameters (default Adam, lr 1e-3).
        export_dir: if set, the merged model, learned parameters and ``metrics.json`` are written
            here at the end of ``fit``, as one set (the folder is replaced whole).
        model: the learnable component, given by ``class_path`` (its own ``init_args`` are its
            hyper-parameters, documented once, in the component); it is built as
            ``cls(pool, tasks, **init_args)`` and must map images to features. Systems of one method
            (AdaMerging, WEMoE, Surgery) build theirs and leave this unset.
        lr_scheduler: optional learning-rate schedule of that optimizer, stepped every training step
            (e.g. ``CosineAnnealingLR`` with ``T_max`` = the steps, as WEMoE's original code).

    Attributes:
        overwrite: replace an ``export_dir`` that holds another run's export (the CLI's
            ``--overwrite``); default False, and such a run is refused before training.
        run_id: this run's id, recorded in checkpoints and the export manifest; a resumed run takes
            the id of the checkpoint's run.
    """

    __test__ = False  # not a pytest test class despite the name
    identity: tuple[str, ...] = ()  # hparams that define the learnable state (compared at resume)

    def __init__(
        self,
        pool: ModelPool,
        tasks: list[str] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        export_dir: str | None = None,
        model: ComponentFactory | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pool, ModelPool):
            raise TypeError(f"pool must be a ModelPool, got {type(pool).__name__}")
        self.save_hyperparameters(ignore=["pool", "optimizer", "model", "lr_scheduler"])
        self.pool = pool
        self.tasks = pool.check_tasks(pool.tasks if tasks is None else tasks)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.export_dir = export_dir
        self.overwrite = False
        self.run_id = uuid.uuid4().hex[:12]
        self.logit_scale = pool.logit_scale
        self._heads = nn.Module()
        for i, task in enumerate(self.tasks):
            self._heads.register_buffer(f"h{i}", pool.head(task).detach().clone(), persistent=False)
        self.num_classes = {t: int(pool.head(t).shape[0]) for t in self.tasks}
        self.val_acc = nn.ModuleList(
            MulticlassAccuracy(self.num_classes[t], average="micro") for t in self.tasks
        )
        self.test_acc = nn.ModuleList(
            MulticlassAccuracy(self.num_classes[t], average="micro") for t in self.tasks
        )
        self._eval_tasks = list(self.tasks)
        self.last_metrics: dict[str, float] = {}
        self.last_metrics_step: int | None = None  # global step of the validation behind last_metrics
        self._built_component = model is not None
        if model is not None:
            self.use_component(model(pool, list(self.tasks)))
            if not isinstance(self.model, nn.Module):
                raise TypeError(f"model must build an nn.Module, got {type(self.model).__name__}")

    def use_component(self, module: nn.Module) -> None:
        """Make ``module`` this system's component (``self.model``): its label, identity and
        ``merged_state_dict`` are used (for systems that build their component themselves)."""
        self.model = module
        self._built_component = True

    @property
    def component(self) -> nn.Module | None:
        """The learnable component given as ``model`` (None in systems that build their own)."""
        return self.model if self._built_component else None

    # ---- heads -----------------------------------------------------------------------------
    def head(self, task: str) -> Tensor:
        """The frozen zero-shot head ``[C, D]`` of ``task``."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not one of this system's tasks {self.tasks}")
        return getattr(self._heads, f"h{self.tasks.index(task)}")

    def logits(self, task: str, features: Tensor) -> Tensor:
        """Zero-shot logits of ``task``: ``logit_scale · normalize(features) @ headᵀ``."""
        return zero_shot_logits(features, self.head(task), self.logit_scale)

    # ---- hooks for subclasses --------------------------------------------------------------
    def task_logits(self, task: str, images: Tensor) -> Tensor:
        """Logits ``[B, C_task]`` of ``task`` on ``images``: the component's features through the
        task's head. Systems without a ``model`` component implement it."""
        if self.component is None:
            raise NotImplementedError(f"{type(self).__name__} must implement task_logits(task, images)")
        return self.logits(task, self.component(images))

    def adaptation_loss(self, task: str, images: Tensor) -> Tensor:
        """The unsupervised loss of one task's batch (default: mean Shannon entropy)."""
        return entropy(self.task_logits(task, images)).mean()

    def adaptation_losses(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-task losses of one step; override to share work (e.g. one merge) across tasks."""
        return {task: self.adaptation_loss(task, x) for task, x in images.items()}

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer trains and checkpoints hold."""
        return [p for p in self.parameters() if p.requires_grad]

    def learnable_state_dict(self) -> dict[str, Tensor]:
        """``{name: tensor}`` of :meth:`learnable_parameters` (the whole checkpoint payload)."""
        wanted = {id(p) for p in self.learnable_parameters()}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in wanted}

    def export(self, directory: Path) -> None:
        """Write the learned parameters to ``directory/learned.safetensors``; subclasses add the model.

        ``directory`` is the temporary folder of the export set (see :meth:`on_fit_end`)."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.learnable_state_dict().items()}
        with atomic_path(directory / "learned.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"tasks": json.dumps(self.tasks)})
        if self.component is not None and hasattr(self.component, "merged_state_dict"):
            self.pool.export(self.component.merged_state_dict(), directory / "merged.safetensors")

    # ---- set-up checks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the datamodule's tasks and class counts against the pool; keep DDP off frozen tensors."""
        _quiet_frozen_eval_notice()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "tasks", None) is not None:
            check_data(self.tasks, self.num_classes, list(dm.tasks), getattr(dm, "num_classes", None))
            self._eval_tasks = list(dm.tasks)
        learnable = set(self.learnable_state_dict())
        frozen = [n for n, _ in self.named_parameters() if n not in learnable]
        self._ddp_params_and_buffers_to_ignore = frozen + [n for n, _ in self.named_buffers()]
        if self._trainer is not None and type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self) -> None:
        """Before the first step: refuse an ``export_dir`` this run may not replace; sweep temporaries
        that killed runs left next to it and beside the checkpoints."""
        trainer = self.trainer
        dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if trainer.ckpt_path:
            dirs.append(os.path.dirname(os.path.abspath(trainer.ckpt_path)))
        if trainer.is_global_zero:
            for d in dirs:
                sweep_temporaries(d)
        if self.export_dir is not None:
            paths = {"log dir": trainer.log_dir if trainer.loggers else None}
            paths.update({f"checkpoint dir {i}": d for i, d in enumerate(dirs)})
            check_export_dir(self.export_dir, self.run_id, self.overwrite, paths)

    # ---- training --------------------------------------------------------------------------
    def training_step(self, batch: Mapping, batch_idx: int) -> Tensor:
        images = {task: _images(item) for task, item in batch.items() if item is not None}
        if not images:
            raise ValueError("empty training batch: expected one batch per task")
        unknown = [t for t in images if t not in self.tasks]
        if unknown:
            raise ValueError(f"training batch has task {unknown[0]!r} that the model does not")
        losses = self.adaptation_losses(images)
        for task, loss in losses.items():
            self.log(f"train/loss/{task}", loss, batch_size=images[task].shape[0])
        total = torch.stack(list(losses.values())).sum()
        self.log("train/loss", total, prog_bar=True, batch_size=sum(x.shape[0] for x in images.values()))
        return total

    def configure_optimizers(self):
        params = self.learnable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no learnable parameters")
        optimizer = self.optimizer(params)
        check_learning_rates(optimizer, type(self).__name__)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ---- evaluation ------------------------------------------------------------------------
    def _eval_step(self, metrics: nn.ModuleList, batch, dataloader_idx: int) -> None:
        if dataloader_idx >= len(self._eval_tasks):
            raise IndexError(f"dataloader {dataloader_idx} has no task (tasks: {self._eval_tasks})")
        task = self._eval_tasks[dataloader_idx]
        images, labels = batch[0], batch[1]
        logits = self.task_logits(task, images)
        metrics[self.tasks.index(task)].update(logits, labels)

    def _eval_epoch_end(self, metrics: nn.ModuleList, split: str) -> dict[str, float]:
        values = {}
        for task, metric in zip(self.tasks, metrics):
            if metric.update_count == 0:
                continue
            values[f"{split}/acc/{task}"] = metric.compute()
            metric.reset()
        if values:
            values[f"{split}/acc/avg"] = torch.stack(list(values.values())).mean()
            # torchmetrics' compute() already gathered every rank; sync_dist only averages equal values
            self.log_dict(values, prog_bar=False, sync_dist=True)
        return {k: float(v) for k, v in values.items()}

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_acc, batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_acc, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        values = self._eval_epoch_end(self.val_acc, "val")
        if values and not self.trainer.sanity_checking:
            self.last_metrics.update(values)
            self.last_metrics_step = self.progress_step

    def on_test_epoch_end(self) -> None:
        self.last_metrics.update(self._eval_epoch_end(self.test_acc, "test"))

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict:
        """What a checkpoint must agree on to be loaded into this system (every field is compared)."""
        fingerprints = self.pool.fingerprints()
        return {
            "system": type(self).__name__,
            "pool": self.pool.name,
            "tasks": list(self.tasks),
            "num_classes": dict(self.num_classes),
            "method": self.method_identity(),
            "pretrained": fingerprints["pretrained"],
            "experts": {t: fingerprints["experts"][t] for t in self.tasks},
        }

    def method_identity(self) -> dict:
        """What defines the learnable state: the ``identity`` hparams, or the component's class and
        its ``identity()`` (compared at resume)."""
        if self.component is None:
            return {k: self.hparams.get(k) for k in self.identity}
        cls = type(self.component)
        extra = self.component.identity() if hasattr(self.component, "identity") else {}
        return {"component": f"{cls.__module__}.{cls.__qualname__}", **extra}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v.detach().clone() for k, v in self.learnable_state_dict().items()}
        checkpoint[_META_KEY] = {**self.checkpoint_metadata(), "run_id": self.run_id}
        checkpoint.pop("hyper_parameters", None)  # state, never configuration

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(_META_KEY)
        if not isinstance(meta, dict):
            raise CheckpointMismatchError("not an adamerge checkpoint: it has no 'adamerge' metadata")
        compare_identity(meta, self.checkpoint_metadata())
        check_learnable_state(checkpoint.get("state_dict", {}), self.learnable_state_dict())
        if isinstance(meta.get("run_id"), str):
            self.run_id = meta["run_id"]

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Load a learnable-only state dict; ``strict`` checks exactly the learnable names."""
        if strict:
            expected = set(self.learnable_state_dict())
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            if missing or unexpected:
                raise CheckpointMismatchError(
                    f"checkpoint state does not match the learnable parameters: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---- export ----------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        """A :class:`RunRecord` when this run exports and the trainer has none: ``metrics.json`` is
        written by every run, from the CLI, the demo or a plain ``Trainer``."""
        if self.export_dir is None or any(isinstance(c, RunRecord) for c in self.trainer.callbacks):
            return []
        return [RunRecord()]

    def on_fit_end(self) -> None:
        if self.export_dir is None:
            return
        if self.trainer.is_global_zero:
            manifest = {"run_id": self.run_id, "system": type(self).__name__, "method": self.method_label,
                        "tasks": list(self.tasks), "step": self.progress_step}
            with atomic_dir(self.export_dir, manifest=manifest) as directory:
                self.export(directory)
                for callback in self.trainer.callbacks:  # e.g. RunRecord: metrics.json joins the set
                    if hasattr(callback, "on_export"):
                        callback.on_export(self.trainer, self, directory)
        self.trainer.strategy.barrier("adamerge-export")

    @property
    def progress_step(self) -> int:
        """How far the run got, as records and manifests report it: Lightning's ``global_step`` (optimizer
        steps); systems without an optimizer count what they read instead."""
        return int(self.trainer.global_step)

    @property
    def method_label(self) -> str:
        """The row name of this run in results tables: the component's ``label``, or the class name;
        subclasses name their variant."""
        if self.component is not None:
            return str(getattr(self.component, "label", type(self.component).__name__))
        return type(self).__name__

    def diagnostics(self) -> dict:
        """What this method learned or saw, as plain data (tensors, lists) for reports to draw, e.g.
        AdaMerging's ``{"coefficients": ...}``; the core never draws or logs it. Default: nothing."""
        return {}
