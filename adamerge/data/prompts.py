"""Unlabeled prompts per task, tokenized, for test-time merging of a causal language model.

Each task names one local file or folder of prompts:

* ``*.txt``: one prompt per line (lines blank after stripping are skipped);
* ``*.jsonl``: one JSON value per line, a string or an object whose ``field`` holds the prompt
  (default: ``"prompt"``, else ``"text"``);
* ``*.json``: a list of such values;
* a folder written by ``datasets``' ``save_to_disk`` (needs the ``datasets`` package): a ``Dataset``
  serves every split, a ``DatasetDict`` the split asked for (``"val"`` also finds ``"validation"``)
  or, when it has a single split, that one.

Prompts are tokenized with the tokenizer of the base model's folder (``AutoTokenizer``; the LM system
hands its base folder to the source at set-up when ``tokenizer`` is unset), truncated to
``max_length`` tokens (the first ones are kept) and right-padded to the task's longest prompt. With
right padding a prompt's tokens keep the positions they have alone, and a causal model's predictions
at them do not depend on the padding. An item is one ``LongTensor [2, T]``: row 0 the token ids, row 1
the attention mask (:func:`pack_prompts` / :func:`unpack_prompts`), so a batch is one tensor
``[B, 2, T]`` and the test-time loop, its streams and resumes take it as they take images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from adamerge.data.datamodule import TestTimeDataModule
from adamerge.data.source import check_split
from adamerge.errors import AdaMergeError

__all__ = ["PromptDataModule", "PromptDataset", "PromptError", "PromptSource", "pack_prompts", "read_prompts",
           "unpack_prompts"]

FIELDS = ("prompt", "text")  # what a JSON record's prompt is looked up as, in order, when no field is named


class PromptError(AdaMergeError):
    """Prompts that can't be read or tokenized: the message names the task, file and line."""


def pack_prompts(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[..., T]`` ids and mask → one ``LongTensor [..., 2, T]`` (row 0 ids, row 1 mask)."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    return torch.stack([input_ids.long(), attention_mask.long()], dim=-2)


def unpack_prompts(batch: Tensor) -> tuple[Tensor, Tensor]:
    """A packed batch ``[B, 2, T]`` → (input_ids ``[B, T]``, attention_mask ``[B, T]``)."""
    if not isinstance(batch, Tensor) or batch.dim() != 3 or batch.shape[1] != 2:
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"a prompt batch is a LongTensor [B, 2, T] (ids, mask), got {shape}")
    return batch[:, 0], batch[:, 1]


def _record_text(value, field: str | None, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        names = (field,) if field is not None else FIELDS
        for name in names:
            if isinstance(value.get(name), str):
                return value[name]
        raise PromptError(f"{where}: the record has no text field {' or '.join(repr(n) for n in names)} "
                          f"(its fields: {sorted(value)})")
    raise PromptError(f"{where}: expected a string or an object with the prompt, got {type(value).__name__}")


def _read_dataset_folder(path: Path, split: str, field: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise PromptError(f"{path} is a folder: reading a saved datasets folder needs the `datasets` package "
                          "(pip install datasets), or give a .txt / .jsonl file") from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise PromptError(f"{path} is no folder written by datasets' save_to_disk ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        wanted = [split, "validation"] if split == "val" else [split]
        found = next((n for n in wanted if n in data), names[0] if len(names) == 1 else None)
        if found is None:
            raise PromptError(f"{path}: no split {split!r} (its splits: {names})")
        data = data[found]
    columns = [field] if field is not None else [c for c in FIELDS if c in data.column_names][:1]
    if not columns or columns[0] not in data.column_names:
        raise PromptError(f"{path}: no text column {field or ' or '.join(FIELDS)!r} (its columns: {data.column_names})")
    return [_record_text(v, None, f"{path} row {i}") for i, v in enumerate(data[columns[0]])]


def read_prompts(path: str | os.PathLike, split: str = "test", field: str | None = None) -> list[str]:
    """The prompts of one file or ``datasets`` folder (see the module docstring for the formats).

    Args:
        path: a ``.txt``, ``.jsonl`` or ``.json`` file, or a folder written by ``datasets``' ``save_to_disk``.
        split: the split read from a ``DatasetDict`` folder (files serve every split).
        field: the field of a JSON record / the dataset column holding the prompt (default ``prompt``,
            else ``text``).
    """
    p = Path(path)
    if p.is_dir():
        prompts = _read_dataset_folder(p, check_split(split), field)
    elif not p.is_file():
        raise PromptError(f"no prompt file or folder {p}")
    elif p.suffix == ".txt":
        prompts = [line.rstrip("\r\n") for line in p.read_text(encoding="utf-8").splitlines()]
        prompts = [s for s in prompts if s.strip()]
    elif p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{p} line {i}: not JSON ({e.msg})") from None
            prompts.append(_record_text(value, field, f"{p} line {i}"))
    elif p.suffix == ".json":
        try:
            values = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PromptError(f"{p}: not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(values, list):
            raise PromptError(f"{p}: expected a JSON list of prompts, got {type(values).__name__}")
        prompts = [_record_text(v, field, f"{p} item {i}") for i, v in enumerate(values)]
    else:
        raise PromptError(f"{p}: unknown prompt file type {p.suffix!r} (use .txt, .jsonl, .json or a datasets folder)")
    empty = next((i for i, s in enumerate(prompts) if not s.strip()), None)
    if empty is not None:
        raise PromptError(f"{p}: prompt {empty} is empty")
    if not prompts:
        raise PromptError(f"{p} holds no prompts")
    return prompts


class PromptDataset(Dataset):
    """Tokenized prompts as packed ``[2, T]`` items (``tokens[i]``: ids and mask of prompt i).

    Args:
        tokens: ``LongTensor [N, 2, T]`` (see :func:`pack_prompts`).
        texts: the N prompts the tokens were made from.
    """

    def __init__(self, tokens: Tensor, texts: Sequence[str]) -> None:
        self.tokens, self.texts = tokens, list(texts)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.tokens[i]


def tokenize_prompts(tokenizer, texts: Sequence[str], max_length: int) -> Tensor:
    """``LongTensor [N, 2, T]``: each text's tokens (special tokens added as the tokenizer does),
    truncated to ``max_length``, right-padded to the longest with the pad token (else EOS, else 0)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    empty = next((i for i, ids in enumerate(encoded) if len(ids) == 0), None)
    if empty is not None:
        raise PromptError(f"prompt {empty} ({texts[empty][:40]!r}) has no tokens")
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    length = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), length), int(pad), dtype=torch.long)
    mask = torch.zeros(len(encoded), length, dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return pack_prompts(ids, mask)


class PromptSource:
    """A :class:`~adamerge.data.source.TaskSource` of tokenized prompts, one file or folder per task.

    Args:
        prompts: task name → a ``.txt`` / ``.jsonl`` / ``.json`` file or a ``datasets`` folder of
            prompts (formats in the module docstring); tasks are served in this order.
        tokenizer: a folder with the tokenizer files (``AutoTokenizer.from_pretrained``); default: the
            base model's folder, given by the LM system at set-up (a folder given here is checked to
            have the base model's vocabulary).
        max_length: longest prompt in tokens; longer ones keep their first ``max_length`` tokens.
        field: the JSON field / dataset column holding a prompt (default ``prompt``, else ``text``).
    """

    def __init__(self, prompts: Mapping[str, str], tokenizer: str | None = None, max_length: int = 256,
                 field: str | None = None) -> None:
        if not prompts:
            raise PromptError("no prompts: give a file or folder per task")
        if int(max_length) < 1:
            raise PromptError(f"max_length must be at least 1, got {max_length}")
        self.paths = {str(t): Path(p) for t, p in prompts.items()}
        missing = next((t for t, p in self.paths.items() if not p.exists()), None)
        if missing is not None:
            raise PromptError(f"task {missing!r}: no prompt file or folder {self.paths[missing]}")
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.max_length, self.field = int(max_length), field
        self._tokenizer = None
        self._cache: dict[tuple[str, str], PromptDataset] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.paths)

    def tokenizer(self):
        """The tokenizer (loaded once); an error when no folder was given or bound yet."""
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise PromptError("no tokenizer: give the prompts' tokenizer folder, or run them through the LM "
                                  "system, which gives its base model's")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def bind_tokenizer(self, folder: str | os.PathLike) -> None:
        """Use the tokenizer of ``folder`` (the base model's) when none was given; when one was, check
        that it has the same vocabulary (the error names both folders)."""
        if self.tokenizer_path is None:
            self.tokenizer_path, self._tokenizer = str(folder), None
            return
        if Path(self.tokenizer_path).resolve() == Path(folder).resolve():
            return
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(str(folder)).get_vocab() != self.tokenizer().get_vocab():
            raise PromptError(f"the prompts' tokenizer {self.tokenizer_path} has another vocabulary than the base "
                              f"model's {folder}: leave the data's tokenizer unset to use the base model's")

    def dataset(self, task: str, split: str) -> PromptDataset:
        """The tokenized prompts of ``task`` (files: the same prompts for every split)."""
        if task not in self.paths:
            raise PromptError(f"task {task!r} has no prompts (tasks: {self.tasks})")
        path = self.paths[task]
        key = (task, check_split(split) if path.is_dir() else "*")
        if key not in self._cache:
            texts = read_prompts(path, split, self.field)
            try:
                tokens = tokenize_prompts(self.tokenizer(), texts, self.max_length)
            except PromptError as e:
                raise PromptError(f"task {task!r} ({path}): {e}") from None
            self._cache[key] = PromptDataset(tokens, texts)
        return self._cache[key]


class PromptDataModule(TestTimeDataModule):
    """The test-time DataModule over prompts: per task an endless seeded stream of packed prompt batches
    ``[B, 2, T]`` for adaptation (resumable exactly, split across DDP ranks) and one loader per task for
    evaluation (same batches, in order).

    Args:
        prompts: task name → a ``.txt`` / ``.jsonl`` / ``.json`` file or a ``datasets`` folder of prompts.
        tokenizer: the tokenizer's folder; default the base model's (given by the LM system at set-up).
        max_length: longest prompt in tokens (longer ones are truncated, keeping their start).
        field: the JSON field / dataset column holding a prompt (default ``prompt``, else ``text``).
        tasks: the tasks to serve, in order; default all of ``prompts``.
        batch_size: prompts per task per step (4: FusionBench's entropy AdaMerging of Flan-T5).
        eval_batch_size: prompts per evaluation batch.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffled training streams.
        eval_split: the split evaluated by validate/test (for a ``datasets`` folder with splits).
        steps_per_epoch: training steps per epoch (validation runs at epoch ends).
    """

    def __init__(
        self,
        prompts: dict[str, str],
        tokenizer: str | None = None,
        max_length: int = 256,
        field: str | None = None,
        tasks: list[str] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        eval_split: str = "test",
        steps_per_epoch: int = 100,
    ) -> None:
        source = PromptSource(prompts, tokenizer, max_length, field)
        super().__init__(source, tasks, batch_size, eval_batch_size, num_workers, seed, eval_split, steps_per_epoch)

    @property
    def num_classes(self) -> dict[str, int | None]:
        """None per task: next-token prediction has the model's vocabulary as classes (the system checks
        the token ids against it)."""
        return {t: None for t in self.tasks}
