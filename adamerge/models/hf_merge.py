"""Merge Hugging Face models into a folder ``AutoModel*.from_pretrained`` loads, out of core.

    merge_hf(HFPool(base, experts), "ties", "out/", keep=0.2, lam=0.3)

Methods whose merge of a tensor reads that tensor alone run one tensor at a time; TIES runs in exact
passes (:mod:`adamerge.merging.ties_stream`); :func:`adamerge.merging.dispatch.out_of_core` says which
is which. Any other method needs the whole model in memory and runs only with ``in_memory=True``.
The output — sharded safetensors with an index, the config (``vocab_size`` and ``dtype`` updated),
the tokenizer / processor files and a model card naming the method and its arguments — is built in
a temporary folder next to ``out`` and installed as one set (:func:`adamerge.files.atomic_dir`); an
existing ``out`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adamerge.errors import AdaMergeError
from adamerge.files import atomic_dir, sweep_temporaries
from adamerge.merging.dispatch import METHODS, merge_pool, merge_stream, out_of_core
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_pool import HFPool
from adamerge.models.safetensors_folder import ShardedWriter, parse_size

__all__ = ["DTYPES", "OutputExistsError", "check_target", "merge_hf", "model_card", "write_folder"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OutputExistsError(AdaMergeError):
    """The output of a merge exists and overwriting it was not asked for."""


def _merged(pool: HFPool, method: str, tasks: Sequence[str] | None, preset: str | None, in_memory: bool,
            kwargs: dict[str, Any]) -> Iterator[tuple[str, Tensor]]:
    if not in_memory:
        yield from merge_stream(pool, method, tasks, preset, **kwargs)
        return
    merged = merge_pool(pool, method, tasks, preset, **kwargs)
    for key in pool.merge_keys():
        yield key, merged.pop(key)


def _config(pool: HFPool, dtype: torch.dtype | None) -> dict | None:
    config = pool.base.config()
    if config is None:
        return None
    rows = pool.vocab_rows()
    if rows:
        n = max(rows.values())
        old = config.get("vocab_size")
        config["vocab_size"] = n
        text = config.get("text_config")
        if isinstance(text, dict) and "vocab_size" in text and (old is None or text["vocab_size"] == old):
            text["vocab_size"] = n
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return config


def model_card(pool: HFPool, method: str, tasks: list[str], preset: str | None, kwargs: dict[str, Any],
               mode: str) -> str:
    """The output's README.md: what was merged, how, with which arguments."""
    args = json.dumps({**({"preset": preset} if preset else {}), **kwargs}, sort_keys=True, default=str)
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- adamerge", f"- {method}",
             f"base_model: {pool.base.source}", "---", "",
             f"# Merged with adamerge: `{method}`", "",
             f"- base model: `{pool.base.source}`",
             f"- method: `{method}` ({mode}), arguments: `{args}`",
             f"- merged tensors: {len(pool.merge_keys())} of {len(pool.keys())}; the others are the base's", ""]
    if pool.vocab_source is not None and pool.rows:
        lines += [f"- vocabulary: shared rows merged, the rest and the tokenizer from `{pool.vocab_source}`", ""]
    lines += ["| task | expert | kind |", "|---|---|---|"]
    for t in tasks:
        e = pool.experts[t]
        kind = "LoRA adapter" if hasattr(e, "adapter") else "full fine-tune"
        lines.append(f"| {t} | `{getattr(e, 'adapter', e).source}` | {kind} |")
    return "\n".join(lines) + "\n"


def merge_hf(
    pool: HFPool, method: str, out: str | os.PathLike, tasks: Sequence[str] | None = None,
    preset: str | None = None, dtype: str | None = None, max_shard_size: int | str = "5GB",
    overwrite: bool = False, in_memory: bool = False, progress: bool = True, **kwargs: Any,
) -> Path:
    """Merge ``pool``'s experts with ``method`` and write the model folder ``out``; returns its path.

    Args:
        pool: the base and experts (:class:`~adamerge.models.hf_pool.HFPool`).
        method: a registered merging method (``adamerge methods`` lists them).
        out: the output folder (refused if it exists, unless ``overwrite``).
        tasks: the experts merged, in order (default: all).
        preset: a named official setting of the method.
        dtype: the floating-point dtype of the output (float32, float16, bfloat16; default: the base's).
        max_shard_size: the largest shard (``5GB``, ``500MB``, bytes).
        overwrite: replace an existing ``out`` (as one set, once the new one is complete).
        in_memory: run a method that has no out-of-core version on the whole model in memory.
        progress: a progress bar over the tensors.
        **kwargs: the method's own arguments.
    """
    if method not in METHODS:
        raise MergeError(f"unknown merging method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    if not in_memory and out_of_core(method) is None:
        raise MergeError(f"merging method {method!r} needs the whole model in memory (a whole-model statistic, no "
                         "out-of-core version): pass --in_memory to merge it so")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_target(out, overwrite)
    tasks = pool.check_tasks(tasks)
    mode = "in memory" if in_memory or out_of_core(method) is None else f"out of core, {out_of_core(method)}"
    parse_size(max_shard_size)
    manifest = {"method": method, "preset": preset, "arguments": kwargs, "tasks": tasks, "mode": mode,
                "base": pool.base.source}
    return write_folder(pool, _merged(pool, method, tasks, preset, in_memory, kwargs), out,
                        model_card(pool, method, tasks, preset, kwargs, mode), manifest, dtype=dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                        desc=f"adamerge merge {method}")


def _out_bytes(pool: HFPool, key: str, rows: dict[str, int], dtype: torch.dtype | None) -> int:
    """The size of the output tensor ``key`` (its vocabulary rows, the output dtype if a float)."""
    shape, stored = list(pool.base.shape(key)), pool.base.dtype(key)
    if key in rows:
        shape[0] = rows[key]
    to = dtype if dtype is not None and stored.is_floating_point else stored
    return math.prod(shape) * to.itemsize


def check_target(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a path; an existing one is refused unless ``overwrite``."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists: refusing to overwrite it (pass --overwrite to replace it)")
    return target


def write_folder(
    pool: HFPool, merged: Iterator[tuple[str, Tensor]], out: str | os.PathLike, card: str, manifest: dict,
    dtype: str | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
    desc: str = "adamerge export",
) -> Path:
    """Write a model folder from ``merged`` — ``(key, θ[key])`` for each of ``pool.merge_keys()`` in
    order, consumed one at a time — and the pool's other tensors, config and tokenizer files, as one set.

    Args:
        pool: the pool the merge was made from (unmerged tensors, vocabulary, config, side files).
        merged: the merged tensors, in ``pool.merge_keys()`` order.
        out: the output folder (refused if it exists, unless ``overwrite``).
        card: the README.md model card.
        manifest: what the folder's manifest.json records besides the files' hashes.
        dtype: the floating-point dtype of the output (default: the base's, per tensor).
        max_shard_size: the largest shard.
        overwrite: replace an existing ``out`` once the new one is complete.
        progress: a progress bar over the tensors.
        desc: the progress bar's label.
    """
    target = check_target(out, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out_dtype = DTYPES.get(dtype)
    shard_bytes = parse_size(max_shard_size)
    if target.parent.exists():
        sweep_temporaries(target.parent)
    merged = iter(merged)
    with atomic_dir(target, manifest=json.loads(json.dumps(manifest, default=str))) as tmp:
        writer = ShardedWriter(tmp, shard_bytes, metadata={"adamerge_method": str(manifest.get("method"))})
        merge_keys, rows = set(pool.merge_keys()), pool.vocab_rows()
        bar = tqdm(pool.keys(), desc=desc, unit="tensor", disable=not progress)
        for key in bar:
            writer.make_room(_out_bytes(pool, key, rows, out_dtype))
            if key in merge_keys:
                got, tensor = next(merged)
                if got != key:
                    raise MergeError(f"internal: merge yielded {got!r} where {key!r} was expected")
                tensor = pool.finish(key, tensor)
            else:
                tensor = pool.finish(key, None)
            to = (out_dtype or pool.base.dtype(key)) if tensor.is_floating_point() else tensor.dtype
            writer.add(key, tensor.to(to))
            del tensor
        bar.close()
        writer.close()
        for f in pool.side_files():
            if f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
        config = _config(pool, out_dtype)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return target
