"""A pool of Hugging Face models (any ``transformers`` architecture) read one tensor at a time.

θ_0 is a model folder or Hub id; each expert is a full fine-tune (a model folder) or a PEFT LoRA
adapter (:class:`~adamerge.models.lora.LoraExpert`), mixed freely. Keys and shapes are checked from
the safetensors headers before anything is read. The pool is both a
:class:`~adamerge.merging.registry.TensorStream` (out-of-core merging, one tensor at a time) and a
:class:`~adamerge.merging.registry.TaskVectorSource` (the whole model in memory, for methods with no
out-of-core version and for test-time training).

Which tensors are merged: the floating-point ones whose name passes ``include`` / ``exclude`` (regular
expressions searched in the name, as the MLLM merging benchmark's ``exclude_param_names_regex``:
``exclude: ['^visual\\.']`` keeps a Qwen2-VL's vision tower at θ_0). The others are copied from θ_0.

Vocabularies: an expert whose embedding / ``lm_head`` has more (or fewer) rows than θ_0's has another
vocabulary. With ``vocab_source=None`` that is refused, naming the tensor and both shapes; with
``vocab_source="base"`` or a task name, the rows all models share are merged and the remaining rows
(and the tokenizer, and ``vocab_size`` in the config) are taken from that model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from adamerge.models.lora import ADAPTER_CONFIG, LoraExpert
from adamerge.models.pool import check_task_list
from adamerge.models.safetensors_folder import FolderError, SafetensorsFolder, resolve_folder

__all__ = ["HFPool"]

_FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compile(patterns: Sequence[str] | None, what: str) -> list[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise FolderError(f"{what} pattern {p!r} is not a regular expression ({e})") from None
    return out


class HFPool:
    """θ_0 and K experts as Hugging Face model folders or LoRA adapters, by task name.

    Args:
        base: the pretrained model: a folder (``config.json`` + safetensors) or a Hub id ``org/name[@rev]``.
        experts: task name → a fine-tuned model folder, a PEFT LoRA adapter folder, or a Hub id of either.
        include: regular expressions; when given, only tensors whose name matches one are merged.
        exclude: regular expressions; tensors whose name matches one are not merged (copied from θ_0).
        vocab_source: on a vocabulary mismatch, ``"base"`` or the task whose vocabulary the merge keeps
            (its extra rows, tokenizer and ``vocab_size``); None refuses a mismatch.
        device: where tensors are put for the merge arithmetic (``"cpu"``, ``"cuda"``).
    """

    def __init__(
        self,
        base: str | os.PathLike,
        experts: Mapping[str, str | os.PathLike],
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        vocab_source: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not experts:
            raise FolderError("no experts: a merge needs at least one expert")
        self.base = SafetensorsFolder(base, "base model")
        self.experts: dict[str, SafetensorsFolder | LoraExpert] = {}
        for task, path in experts.items():
            label = f"expert {task!r}"
            folder = resolve_folder(path, label)
            self.experts[task] = (LoraExpert(folder, self.base, label) if (folder / ADAPTER_CONFIG).is_file()
                                  else SafetensorsFolder(folder, label))
        self.device = torch.device(device)
        self._include, self._exclude = _compile(include, "include"), _compile(exclude, "exclude")
        if vocab_source is not None and vocab_source != "base" and vocab_source not in self.experts:
            raise FolderError(f"vocab_source {vocab_source!r} is neither 'base' nor a task ({', '.join(self.experts)})")
        self.vocab_source = vocab_source
        self.rows: dict[str, int] = {}  # key → the rows every model shares (vocabulary-sized tensors only)
        self._check()
        self._keys = [k for k in self.base.keys() if self._merged(k)]  # noqa: SIM118
        self._cache: tuple[str, Tensor] | None = None

    # ---- checks ---------------------------------------------------------------------------------
    def _check(self) -> None:
        base_keys = set(self.base.keys())
        for task, expert in self.experts.items():
            keys = set(expert.keys())
            missing, extra = sorted(base_keys - keys), sorted(keys - base_keys)
            if missing or extra:
                what = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r} the base lacks"
                raise FolderError(f"expert {task!r} ({expert.path}) {what}: is it a fine-tune of {self.base.source}?")
            for key in self.base.keys():  # noqa: SIM118 (a folder, not a dict)
                b, e = self.base.shape(key), expert.shape(key)
                if b == e:
                    continue
                if len(b) != len(e) or b[1:] != e[1:] or not b:
                    raise FolderError(f"expert {task!r}: tensor {key!r} has shape {e} but the base {b}")
                if self.vocab_source is None:
                    raise FolderError(
                        f"expert {task!r}: tensor {key!r} has shape {e} but the base {b}: the vocabularies differ. "
                        "Pass vocab_source=base (merge the shared rows, keep the base's vocabulary and tokenizer) "
                        "or vocab_source=<task> (the other rows and the tokenizer from that expert)")
                self.rows[key] = min(self.rows.get(key, b[0]), e[0])

    def _merged(self, key: str) -> bool:
        if self.base.dtype(key) not in _FLOAT:
            return False
        if self._include and not any(p.search(key) for p in self._include):
            return False
        return not any(p.search(key) for p in self._exclude)

    # ---- tasks and keys -------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def check_tasks(self, tasks: Sequence[str] | None = None) -> list[str]:
        """``tasks`` validated: non-empty, no duplicates, each with an expert (None: every task)."""
        return check_task_list(self.tasks if tasks is None else tasks, self.tasks)

    def keys(self) -> list[str]:
        """Every tensor of the merged model, in the base's file order."""
        return self.base.keys()

    def merge_keys(self) -> list[str]:
        """The tensors that are merged (floating point, passing ``include`` / ``exclude``)."""
        return list(self._keys)

    # ---- tensors (float32 on ``device``; vocabulary tensors cut to the shared rows) --------------
    def _shared(self, key: str, t: Tensor) -> Tensor:
        return t[: self.rows[key]] if key in self.rows else t

    def row_blocks(self, key: str, max_bytes: int = 32 << 20) -> list[slice] | None:
        """Row ranges of ``key`` (its shared rows) of at most ``max_bytes`` in float32 each, for
        elementwise merges; None where the tensor is read whole (1-D or small)."""
        shape = self.base.shape(key)
        if len(shape) < 2:
            return None
        rows, row_bytes = self.rows.get(key, shape[0]), 4 * math.prod(shape[1:])
        if rows * row_bytes <= max_bytes or row_bytes == 0:
            return None
        step = max(1, max_bytes // row_bytes)
        return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]

    def _read(self, model: SafetensorsFolder | LoraExpert, key: str, rows: slice | None) -> Tensor:
        t = self._shared(key, model.get(key)) if rows is None else model.get(key, rows)
        return t.to(self.device, torch.float32)

    def pretrained_tensor(self, key: str, rows: slice | None = None) -> Tensor:
        """θ_0[key] (its ``rows``; the last one read is kept: an out-of-core pass asks for it once per task)."""
        tag = (key, None if rows is None else (rows.start, rows.stop))
        if self._cache is None or self._cache[0] != tag:
            self._cache = None
            self._cache = (tag, self._read(self.base, key, rows))
        return self._cache[1]

    def expert_tensor(self, task: str, key: str, rows: slice | None = None) -> Tensor:
        """θ_task[key] (its ``rows``)."""
        return self._read(self.experts[task], key, rows)

    def task_vector_tensor(self, task: str, key: str, rows: slice | None = None) -> Tensor:
        """τ_task[key] = θ_task[key] − θ_0[key] (its ``rows``)."""
        return self.expert_tensor(task, key, rows).sub_(self.pretrained_tensor(key, rows))

    def finish(self, key: str, merged: Tensor | None) -> Tensor:
        """The output tensor ``key``: ``merged`` (None: θ_0's, unmerged) with the vocabulary source's
        rows beyond the shared ones appended, on the CPU."""
        source = self._vocab_model()
        if merged is None:
            t = (source if key in self.rows else self.base).get(key)
            return t
        merged = merged.to("cpu")
        if key not in self.rows:
            return merged
        extra = source.get(key)[self.rows[key]:]
        return torch.cat([merged, extra.to(merged.dtype)]) if extra.numel() else merged

    def _vocab_model(self) -> SafetensorsFolder | LoraExpert:
        return self.base if self.vocab_source in (None, "base") else self.experts[self.vocab_source]

    def vocab_rows(self) -> dict[str, int]:
        """key → rows in the output, for the vocabulary-sized tensors (empty when all vocabularies agree)."""
        source = self._vocab_model()
        return {key: source.shape(key)[0] for key in self.rows}

    def side_files(self) -> list[Path]:
        """Config, tokenizer and processor files of the output: the base's, with the tokenizer files of
        the vocabulary source where it has them."""
        files = {p.name: p for p in self.base.side_files()}
        if self.vocab_source not in (None, "base"):
            files.update({p.name: p for p in self.experts[self.vocab_source].side_files() if p.name != "config.json"})
        return list(files.values())

    # ---- the whole model in memory (TaskVectorSource) ------------------------------------------
    def pretrained_state(self) -> dict[str, Tensor]:
        """θ_0 over :meth:`merge_keys`, float32 (every tensor in memory)."""
        return {k: self._shared(k, self.base.get(k)).to(self.device, torch.float32) for k in self._keys}

    def task_vectors(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """(task, τ_task over :meth:`merge_keys`), one expert in memory at a time."""
        for task in self.check_tasks(tasks):
            yield task, {k: self.task_vector_tensor(task, k) for k in self._keys}
