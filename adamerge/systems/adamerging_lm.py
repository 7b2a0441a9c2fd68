"""AdaMerging of a causal language model as a LightningModule (Yang et al., ICLR 2024, arXiv 2310.02575).

    min_λ  Σ_k  mean_b  mean_{t ∈ P_b}  H( softmax( f(x_{k,b}; θ_0 + Σ_j λ_j τ_j)_t ) )

the entropy of next-token predictions on unlabeled prompts of each task (the component's
:func:`~adamerge.components.causal_lm.next_token_entropy`; P_b every non-padding position of prompt
b, or its last one), with :class:`~adamerge.components.causal_lm.CausalLMAdaMerging` as the
learnable merge. It is :class:`~adamerge.systems.adamerging.AdaMerging` with a language model in
place of the image encoder and its heads: the same test-time loop (one merge per step, one forward
over every task's batch), optimizer, checkpoints (λ only), coefficients export and diagnostics.

Data: :class:`~adamerge.data.prompts.PromptDataModule`; a batch of a task is one packed
``LongTensor [B, 2, T]`` (ids, mask), right-padded. Before the forward each task's batch is cut to
its longest prompt and the tasks' batches are right-padded to one length and concatenated (exact:
with causal attention and right padding no prompt position sees a padding one).

Evaluation (``val`` / ``test``, on the merge frozen for the epoch): ``<split>/acc/<task>`` is the
teacher-forced next-token accuracy on the task's prompts (the LM's classes are its vocabulary: the
base class's per-task accuracy and the run record are reused), ``<split>/entropy/<task>`` the loss.

Export: the base class's files (``learned.safetensors``, ``coefficients.json`` / ``.safetensors``,
``metrics.json``) and ``model/``, the merged LM as a Hugging Face folder (sharded safetensors, config,
tokenizer, model card) that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from adamerge.components.causal_lm import (
    CausalLMAdaMerging,
    Positions,
    next_token_entropy,
    next_token_targets,
)
from adamerge.data.prompts import PromptSource, unpack_prompts
from adamerge.models.hf_causal_lm import CausalLMPool
from adamerge.models.hf_merge import DTYPES, model_card, write_folder
from adamerge.models.hf_pool import HFPool
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.base import default_optimizer

__all__ = ["AdaMergingLM"]


class AdaMergingLM(AdaMerging):
    """Test-time learned merging coefficients of a causal LM by next-token entropy minimisation.

    Args:
        pool: the base model and the experts, ``class_path: adamerge.models.hf_pool.HFPool`` (its
            ``include`` / ``exclude`` choose the merged tensors).
        tasks: the tasks to merge and adapt on, in order; default all of the pool's tasks.
        model: the coefficients, ``class_path: adamerge.components.causal_lm.CausalLMAdaMerging`` with
            its ``init_args`` (granularity, init_lam, clamp, directions, tv_dtype; documented there);
            default its defaults (layer-wise, init 0.3, clamped to [0, 1]).
        optimizer: optimizer for the coefficients (default Adam, lr 1e-3).
        export_dir: if set, the merged LM (``model/``), the coefficients and ``metrics.json`` go here
            after fit.
        lr_scheduler: an optional schedule of the optimizer's lr, stepped every step.
        positions: the positions whose next-token entropy is the loss: ``"all"`` non-padding positions
            of each prompt, or only its ``"last"`` one.
        export_dtype: dtype of the exported model's floating-point tensors (``float32``, ``float16``,
            ``bfloat16``); default the base model's, tensor by tensor.
        max_shard_size: the largest safetensors shard of the exported model (``5GB``, ``500MB`` …).
    """

    def __init__(
        self,
        pool: HFPool,
        tasks: list[str] | None = None,
        model: Callable[[CausalLMPool, list[str]], CausalLMAdaMerging] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        export_dir: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        positions: Positions = "all",
        export_dtype: str | None = None,
        max_shard_size: str = "5GB",
    ) -> None:
        if positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
        if export_dtype is not None and export_dtype not in DTYPES:
            raise ValueError(f"export_dtype must be one of {', '.join(DTYPES)} or unset, got {export_dtype!r}")
        lm_pool = pool if isinstance(pool, CausalLMPool) else CausalLMPool(pool)
        super().__init__(lm_pool, tasks, model=model or CausalLMAdaMerging, optimizer=optimizer,
                         export_dir=export_dir, lr_scheduler=lr_scheduler)
        if not isinstance(self.model, CausalLMAdaMerging):
            raise TypeError(f"model must build a CausalLMAdaMerging, got {type(self.model).__name__}")
        self.positions, self.export_dtype, self.max_shard_size = positions, export_dtype, max_shard_size

    def setup(self, stage: str) -> None:
        """The base's checks; prompts without a tokenizer of their own get the base model's."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(getattr(dm, "source", None), PromptSource):
            dm.source.bind_tokenizer(self.pool.hf.base.path)

    def method_identity(self) -> dict:
        """The component's identity and the loss positions (compared at resume)."""
        return {**super().method_identity(), "positions": self.positions}

    # ---- forward ---------------------------------------------------------------------------
    def _tokens(self, task: str, batch: Tensor) -> tuple[Tensor, Tensor]:
        ids, mask = unpack_prompts(batch)
        vocab = self.pool.vocab_size
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise ValueError(f"task {task!r}: token id {bad} is outside the model's vocabulary of {vocab}: were the "
                             "prompts tokenized for another model?")
        length = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        return ids[:, :length], mask[:, :length]  # right padding: columns past the longest prompt are only padding

    def lm_logits(self, task: str, batch: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of the merged LM on ``task``'s packed prompt batch (``params``: a merge made
        beforehand, else merged now), ``T`` cut to the batch's longest prompt."""
        ids, mask = self._tokens(task, batch)
        return self.model(ids, mask, params)

    def task_logits(self, task: str, images: Tensor) -> Tensor:
        """The base's hook, here ``[B, T, V]`` next-token logits of a prompt batch (``images``), on the merge
        frozen for the evaluation epoch when there is one."""
        return self.lm_logits(task, images, self._eval_params)

    def adaptation_losses(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One merge, one forward over every task's prompts (right-padded to one length), entropy per task."""
        params = self.model.merged_parameters()
        tasks = list(images)
        tokens = [self._tokens(t, images[t]) for t in tasks]
        length = max(ids.shape[1] for ids, _ in tokens)
        ids = torch.cat([F.pad(i, (0, length - i.shape[1])) for i, _ in tokens])
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in tokens])
        sizes = [i.shape[0] for i, _ in tokens]
        logits = self.model(ids, mask, params)
        return {t: next_token_entropy(lg, m, self.positions).mean()
                for t, lg, m in zip(tasks, logits.split(sizes), mask.split(sizes))}

    # ---- evaluation -------------------------------------------------------------------------
    def _lm_eval_step(self, split: str, batch: Tensor, dataloader_idx: int) -> None:
        """Next-token accuracy and entropy of one task's prompt batch, on the merge frozen for the epoch."""
        if dataloader_idx >= len(self._eval_tasks):
            raise IndexError(f"dataloader {dataloader_idx} has no task (tasks: {self._eval_tasks})")
        task = self._eval_tasks[dataloader_idx]
        ids, mask = self._tokens(task, batch)
        logits = self.model(ids, mask, self._eval_params)
        self.log(f"{split}/entropy/{task}", next_token_entropy(logits, mask, self.positions).mean(),
                 batch_size=ids.shape[0], add_dataloader_idx=False, sync_dist=True)
        predicted, targets = next_token_targets(logits, ids, mask)
        if targets.numel():
            metrics = self.val_acc if split == "val" else self.test_acc
            metrics[self.tasks.index(task)].update(predicted, targets)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._lm_eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._lm_eval_step("test", batch, dataloader_idx)

    # ---- export ----------------------------------------------------------------------------
    def export(self, directory: Path) -> None:
        """AdaMerging's files, and ``model/``: the merged LM as a model folder."""
        super().export(directory)
        hf = self.pool.hf
        args = {**self.model.identity(), "positions": self.positions, "init_lam": self.model.init_lam,
                "coefficients": "coefficients.json"}
        card = model_card(hf, "adamerging", list(self.tasks), None, args, "test-time, next-token entropy")
        manifest = {"method": self.method_label, "run_id": self.run_id, "tasks": list(self.tasks),
                    "step": self.progress_step}
        write_folder(hf, self.model.merged_tensors(), directory / "model", card, manifest, dtype=self.export_dtype,
                     max_shard_size=self.max_shard_size, progress=False)
