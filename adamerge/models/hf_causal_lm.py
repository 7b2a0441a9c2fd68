"""A causal language model's :class:`~adamerge.models.hf_pool.HFPool` as the test-time systems' pool.

What :class:`~adamerge.systems.adamerging_lm.AdaMergingLM` reads: θ_0 and the task vectors over the
merged tensors (float32), the vocabulary size as every task's class count, the LM itself
(``AutoModelForCausalLM`` of the base folder, loaded on demand: ``transformers`` is imported only
then), and the export as a model folder ``from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.files import file_fingerprint
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_pool import HFPool
from adamerge.models.pool import ModelPool

__all__ = ["CausalLMPool"]


def _vocab_size(config: Mapping[str, Any] | None, source: str) -> int:
    config = config or {}
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int) or size < 2:
        raise MergeError(f"base model {source}: config.json gives no vocab_size (needed for a causal LM)")
    return size


class CausalLMPool(ModelPool):
    """An :class:`HFPool` of a causal LM as the test-time systems' :class:`~adamerge.models.pool.ModelPool`.

    A language model's classes are its vocabulary: ``head(task)`` is an empty ``[V, 0]`` tensor that
    only gives the class count V (the logits come from the LM's own output layer), ``num_classes`` is
    V for every task. ``ModelPool.__init__`` is not run: that pool holds an encoder and experts in
    memory, this one reads the folders on demand and builds the LM only for the component that owns it
    (:meth:`load_model`). Vocabulary mismatches between experts are refused.

    Args:
        hf: the base model and the experts (HF folders or LoRA adapters), with the tensors to merge.
        name: a short identifier recorded in checkpoints (default: the base folder's name).
    """

    def __init__(self, hf: HFPool, name: str | None = None) -> None:
        if not isinstance(hf, HFPool):
            raise TypeError(f"hf must be an HFPool, got {type(hf).__name__}")
        if hf.rows:
            key = next(iter(hf.rows))
            raise MergeError(f"tensor {key!r}: the experts' vocabularies differ; test-time merging of a causal LM "
                             "needs every expert to have the base's vocabulary")
        self.hf = hf
        self.name = name or Path(hf.base.source.rstrip("/")).name
        self.benchmark_id = self.name
        self.logit_scale = 1.0
        self.vocab_size = _vocab_size(hf.base.config(), hf.base.source)
        self.heads = {t: torch.empty(self.vocab_size, 0) for t in hf.tasks}
        self._fingerprints: dict | None = None

    @property
    def tasks(self) -> list[str]:
        return self.hf.tasks

    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        return self.hf.check_tasks(tasks)

    def head(self, task: str) -> Tensor:
        self.check_tasks([task])
        return self.heads[task]

    def merge_keys(self) -> list[str]:
        """The merged tensors, in the base's file order."""
        return self.hf.merge_keys()

    def pretrained_state(self) -> dict[str, Tensor]:
        """θ_0 over :meth:`merge_keys` (float32)."""
        return self.hf.pretrained_state()

    def expert_state(self, task: str) -> dict[str, Tensor]:
        """θ_task over :meth:`merge_keys` (float32)."""
        self.check_tasks([task])
        return {k: self.hf.expert_tensor(task, k) for k in self.merge_keys()}

    def task_vector(self, task: str) -> dict[str, Tensor]:
        return dict(next(self.hf.task_vectors([task]))[1])

    def task_vectors(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        return self.hf.task_vectors(tasks)

    def fingerprints(self) -> dict:
        """Content hashes of the base folder and each expert's folder (about half a megabyte read per file)."""
        if self._fingerprints is None:
            self._fingerprints = {"pretrained": file_fingerprint(self.hf.base.path),
                                  "experts": {t: file_fingerprint(e.path) for t, e in self.hf.experts.items()}}
        return self._fingerprints

    def load_model(self) -> nn.Module:
        """A new ``AutoModelForCausalLM`` of the base folder, float32 weights θ_0, eval mode, frozen."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.hf.base.path), dtype=torch.float32)
        return model.eval().requires_grad_(False)

    def build_encoder(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        """The LM with ``state`` (merged tensors by name, a subset of :meth:`merge_keys`) loaded."""
        model = self.load_model()
        if state:
            unknown = [k for k in state if k not in self.merge_keys()]
            if unknown:
                raise MergeError(f"merged state dict has tensor {unknown[0]!r} that is not merged in this pool")
            model.load_state_dict(dict(state), strict=False)
        return model

    def export(self, visual_state: Mapping[str, Tensor], path: str | Path) -> Path:
        """Write the merged tensors (every one of :meth:`merge_keys`) as a model folder at ``path``."""
        from adamerge.models.hf_merge import model_card, write_folder

        missing = [k for k in self.merge_keys() if k not in visual_state]
        if missing:
            raise MergeError(f"merged state dict is missing tensor {missing[0]!r}")
        card = model_card(self.hf, "adamerging", self.tasks, None, {}, "test-time")
        merged = ((k, visual_state[k]) for k in self.merge_keys())
        return write_folder(self.hf, merged, path, card, {"method": "adamerging"}, progress=False)
