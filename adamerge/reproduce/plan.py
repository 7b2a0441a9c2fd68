"""``adamerge reproduce --dry-run``: what a run would download, with sizes, and what it would run.

For each repository (the pretrained model, the experts, the datasets) the files a run reads are picked
the way loading picks them (config and the preferred weights of a model; the test-split shards of a
dataset) from the repository's listing: the Hub's, with file sizes, when it can be reached; the cached
snapshot's when ``HF_HUB_OFFLINE=1``. Each line says whether the files are in the cache already.
Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from adamerge.reproduce.setup import Setup

__all__ = ["plan", "repo_listing"]

def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def repo_listing(repo: str, revision: str | None, repo_type: str) -> tuple[dict[str, int | None], set[str], str]:
    """(file → size, the files already cached, where the listing came from) of a repository."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    from adamerge.models.hub import HubError, hub_errors, hub_snapshot

    if constants.HF_HUB_OFFLINE:
        try:
            folder = Path(hub_snapshot(repo, revision=revision, repo_type=repo_type))
        except HubError:
            return {}, set(), "not in the cache (HF_HUB_OFFLINE=1: the run would stop here)"
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        return files, set(files), "cache"
    with hub_errors(repo, repo, "the file listing", revision, repo_type):
        info = HfApi().repo_info(repo, revision=revision, repo_type=repo_type, files_metadata=True)
    files = {s.rfilename: s.size for s in info.siblings or []}
    cached = {f for f in files
              if isinstance(try_to_load_from_cache(repo, f, revision=revision, repo_type=repo_type), str)}
    return files, cached, "Hub"


def _model_pick(files: dict[str, int | None]) -> list[str]:
    """The files :func:`adamerge.models.hub.resolve_checkpoint` reads of a repository listing ``files``."""
    from adamerge.models.hub import HF_WEIGHTS, OPEN_CLIP_WEIGHTS

    for config, weights in (("config.json", HF_WEIGHTS), ("open_clip_config.json", OPEN_CLIP_WEIGHTS)):
        if config not in files:
            continue
        name = next((w for w in weights if w in files), None)
        if name is None:
            return []
        if name.endswith(".index.json"):  # sharded: the index and every shard
            stem = name.removesuffix(".index.json").rsplit(".", 1)[0]
            return [config, name, *sorted(f for f in files if f.startswith(stem + "-"))]
        return [config, name]
    single = sorted(f for f in files if f.endswith(".safetensors"))
    return single[:1] if len(single) == 1 else []


def _line(label: str, repo: str, revision: str | None, repo_type: str,
          pick: Callable[[dict[str, int | None]], list[str]]) -> tuple[str, int, int]:
    """One plan line and (bytes to download, bytes cached)."""
    from adamerge.models.hub import HubError

    try:
        files, cached, where = repo_listing(repo, revision, repo_type)
    except HubError as e:
        return f"  {label}: {e}", 0, 0
    except Exception as e:  # noqa: BLE001 -- a dry run reports, it does not stop
        return f"  {label}: {repo}: cannot list ({type(e).__name__}: {e})", 0, 0
    if not files:
        return f"  {label}: {repo}: {where}", 0, 0
    chosen = pick(files)
    if not chosen:
        return f"  {label}: {repo}: nothing loadable in it ({where})", 0, 0
    total = sum(files[f] or 0 for f in chosen)
    todo = sum(files[f] or 0 for f in chosen if f not in cached)
    state = "cached" if todo == 0 else f"download {_size(todo)}"
    count = f"{len(chosen)} file" + ("s" if len(chosen) != 1 else "")
    return f"  {label}: {repo} — {count}, {_size(total)} ({state}; listing from the {where})", todo, total - todo


def plan(setup: Setup) -> str:
    """The dry-run report of ``setup``."""
    from huggingface_hub import constants

    from adamerge.data.hub_datasets import HubDatasetSource, split_shards
    from adamerge.models.hub import is_repo_id, parse_ref

    lines = [f"adamerge reproduce --dry-run: {setup.benchmark}, results in {setup.out}",
             f"Hugging Face cache: {constants.HF_HUB_CACHE}" + (" (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""),
             "Would read:"]
    todo = cached = 0
    models = [("pretrained", setup.pretrained)] + [(f"expert {t}", e) for t, e in setup.experts.items()]
    for label, ref in models:
        if not is_repo_id(ref):
            lines.append(f"  {label}: {ref} (local: {'found' if os.path.exists(ref) else 'NOT FOUND'})")
            continue
        repo, revision = parse_ref(ref)
        line, a, b = _line(label, repo, revision, "model", _model_pick)
        lines.append(line)
        todo, cached = todo + a, cached + b
    source = HubDatasetSource(list(setup.datasets), repos=dict(setup.datasets)) if setup.datasets else None
    for task in setup.datasets:
        spec, split = source.specs[task], source.splits[task]["test"]
        line, a, b = _line(f"dataset {task} ({split} split)", spec.repo, spec.revision, "dataset",
                           lambda files, s=split, sub=spec.subset: split_shards(files, s, sub))
        lines.append(line)
        todo, cached = todo + a, cached + b
    for task in setup.folder_tasks:
        lines.append(f"  dataset {task}: image folder {Path(setup.folders) / task / 'test'}")
    lines.append(f"In all: {_size(todo)} to download, {_size(cached)} already cached.")
    steps = f"{setup.steps} steps each (--steps)" if setup.steps else "official steps"
    lines.append("Would run: " + ", ".join(m.key for m in setup.methods) + f" ({steps}; {setup.devices} device(s)).")
    return "\n".join(lines)
