"""A Hugging Face model folder read and written one tensor at a time: (sharded) safetensors, never whole.

:class:`SafetensorsFolder` reads a local folder or a Hub id (``org/name[@rev]``, through
:func:`adamerge.models.hub.hub_snapshot`, so ``HF_HOME`` / ``HF_HUB_OFFLINE`` / ``HF_TOKEN`` behave as
usual): ``model.safetensors.index.json`` and its shards, or one ``*.safetensors`` file. Shapes and
dtypes come from the headers; :meth:`SafetensorsFolder.get` opens the shard with ``safe_open`` for one
tensor and closes it again, so no mapping of a whole model stays resident in the process.

:class:`ShardedWriter` is the other end: tensors are added one at a time and written in shards of at
most ``max_shard_bytes`` (a shard is held in memory until written), with transformers' file names and
``model.safetensors.index.json``; the folder is a temporary one that the caller installs as a whole
(:func:`adamerge.files.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from adamerge.errors import AdaMergeError

__all__ = ["INDEX", "SIDE_FILES", "FolderError", "SafetensorsFolder", "ShardedWriter", "parse_size", "resolve_folder"]

INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# what a model folder's weights may be besides safetensors: named in the error, never unpickled here
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
# files of a model folder that are not weights and travel with a merge (config, tokenizer, processor)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
              "spiece.model", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json", "video_preprocessor_config.json")


class FolderError(AdaMergeError):
    """A model folder that can't be read: the message names the folder (or id) and the file."""


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``20KB``, ``1GiB`` or an int (transformers' ``max_shard_size``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().upper()
        units = {"GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        unit = next((u for u in units if text.endswith(u)), None)
        try:
            n = int(float(text[: -len(unit)] if unit else text) * (units[unit] if unit else 1))
        except ValueError:
            raise FolderError(f"max shard size {value!r} is not a size (e.g. 5GB, 500MB, 20KB)") from None
    if n <= 0:
        raise FolderError(f"max shard size must be positive, got {value!r}")
    return n


def resolve_folder(value: str | os.PathLike, label: str) -> Path:
    """A local folder for ``value``: the folder itself, or the Hub snapshot of the repo id ``value``
    (its weights, config, tokenizer and processor files are fetched into the cache)."""
    path = Path(value)
    if path.is_dir():
        return path
    if path.exists():
        raise FolderError(f"{label}: {value} is a file; name the model's folder (config.json + safetensors)")
    from adamerge.models.hub import hub_snapshot, is_repo_id

    if not is_repo_id(str(value)):
        raise FolderError(f"{label}: no folder {value} (and it is no Hub id org/name)")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
    return Path(hub_snapshot(str(value), allow_patterns=patterns, label=label))


def _header(path: Path) -> dict:
    """The safetensors header of ``path`` (name → dtype, shape, offsets), read without mapping the file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length beyond 100 MB")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise FolderError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    header.pop("__metadata__", None)
    return header


class SafetensorsFolder:
    """The weights of one model folder, by tensor name, read on demand.

    Args:
        path: a local folder or a Hub repo id (``org/name`` or ``org/name@rev``).
        label: how errors name it (e.g. ``"expert 'math'"``).
        weights: the single weights file to read when the folder has no index (default: the folder's
            only ``*.safetensors`` file, or ``model.safetensors``).
    """

    def __init__(self, path: str | os.PathLike, label: str = "model", weights: str | None = None) -> None:
        self.label = label
        self.source = str(path)
        self.path = resolve_folder(path, label)
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for shard in self._shards(weights):
            for key, entry in _header(shard).items():
                if entry.get("dtype") not in _DTYPES:
                    raise FolderError(f"{label}: {shard.name}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
                self._where[key] = shard
                self._info[key] = (_DTYPES[entry["dtype"]], tuple(entry["shape"]))

    def _shards(self, weights: str | None) -> list[Path]:
        index = self.path / INDEX
        if weights is None and index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise FolderError(f"{self.label}: {index} is no readable weight index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise FolderError(f"{self.label}: shard {missing[0]} listed in {index} is missing")
            return [self.path / s for s in shards]
        if weights is not None:
            if not (self.path / weights).is_file():
                raise FolderError(f"{self.label}: {self.path} has no {weights}")
            return [self.path / weights]
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) == 1:
            return files
        pickles = [p for p in _PICKLES if (self.path / p).is_file()]
        if not files:
            hint = (f" (it has {pickles[0]}: pickled weights are not read; convert them to safetensors with "
                    "transformers' save_pretrained(safe_serialization=True))") if pickles else ""
            raise FolderError(f"{self.label}: {self.path} holds no .safetensors weights{hint}")
        raise FolderError(f"{self.label}: {self.path} holds {len(files)} .safetensors files and no {INDEX}: "
                          "which are the weights is ambiguous")

    # ---- reading --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in file order (shard by shard, each in its header's order)."""
        return list(self._info)

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[self._known(key)][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._info[self._known(key)][0]

    def nbytes(self, key: str) -> int:
        dtype, shape = self._info[self._known(key)]
        return int(torch.Size(shape).numel()) * dtype.itemsize

    def _known(self, key: str) -> str:
        if key not in self._info:
            raise FolderError(f"{self.label}: {self.path} has no tensor {key!r}")
        return key

    def get(self, key: str, rows: slice | None = None) -> Tensor:
        """The tensor ``key`` in its stored dtype (a fresh CPU tensor; the shard is closed again);
        with ``rows``, only those rows are read."""
        with safe_open(self._where[self._known(key)], framework="pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]

    def config(self) -> dict | None:
        """The folder's ``config.json`` (None when it has none)."""
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FolderError(f"{self.label}: {path} is not readable JSON ({e})") from None

    def side_files(self) -> list[Path]:
        """The folder's config, tokenizer and processor files (what a merged folder copies)."""
        return [self.path / name for name in SIDE_FILES if (self.path / name).is_file()]

    def __repr__(self) -> str:
        return f"SafetensorsFolder({self.source!r}, {len(self._info)} tensors)"


class ShardedWriter:
    """Write tensors one at a time into ``folder`` as transformers-style safetensors shards.

    Shards are named ``model-XXXXX-of-YYYYY.safetensors`` once the count is known (:meth:`close`);
    one shard only is ``model.safetensors`` with no index.

    Args:
        folder: an existing (temporary) folder.
        max_shard_bytes: a shard is written when adding a tensor would take it past this size (a
            tensor larger than it gets a shard of its own).
        metadata: safetensors header metadata of every shard; ``"format"`` is always ``"pt"``, whatever
            this says, so that transformers loads the shards as PyTorch weights.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {**(metadata or {}), "format": "pt"}  # transformers loads only "pt" (or tf/flax/mlx)
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def make_room(self, size: int) -> None:
        """Write the pending shard now if a tensor of ``size`` bytes will not fit in it: called before
        that tensor is computed, so the pending tensors are not held while it is (the shards are the
        ones :meth:`add` alone would write)."""
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()

    def add(self, key: str, tensor: Tensor) -> None:
        if key in self._pending or any(key in keys for _, keys in self._written):
            raise FolderError(f"tensor {key!r} written twice")
        size = tensor.numel() * tensor.element_size()
        self.make_room(size)
        self._pending[key] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, name the shards and the index; returns the shard paths."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.folder / "model.safetensors"
            os.replace(self._written[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        paths = []
        for i, (path, keys) in enumerate(self._written):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            paths.append(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return paths

