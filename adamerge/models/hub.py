"""open_clip models by Hub id (``hf-hub:org/name``), through huggingface_hub and its cache.

An ``hf-hub:`` repository holds an open_clip model whole: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg``) and its weights (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
Files are fetched with :func:`huggingface_hub.hf_hub_download`, so its cache and environment behave as
users expect: ``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1`` (the cache only), ``HF_TOKEN``
(private and gated repos), progress bars while downloading. A failure is one :class:`HubError` that
names the id, the file and what to do (offline and not cached, no such repository, gated, missing file)
instead of open_clip's "unknown model" or a traceback from deep inside the download.
"""

from __future__ import annotations

import contextlib
import json

from adamerge.errors import AdaMergeError

__all__ = ["HF_HUB", "HubError", "hub_errors", "hub_file", "hub_open_clip_config", "hub_snapshot", "hub_weights",
           "is_hub_id"]

HF_HUB = "hf-hub:"
_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class HubError(AdaMergeError):
    """A Hub id that can't be served: the message names the id, the file and what to do.

    ``missing`` is True when the file is absent (from the repository, or from the cache when offline),
    so a caller can try another file name."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def is_hub_id(name: object) -> bool:
    """Whether ``name`` is an open_clip ``hf-hub:org/name`` id."""
    return isinstance(name, str) and name.startswith(HF_HUB)


def _repo(model_id: str) -> str:
    repo = model_id[len(HF_HUB):] if is_hub_id(model_id) else model_id
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{model_id!r}: a Hub id is hf-hub:<org>/<name>")
    return repo


def _download_hint(repo: str, repo_type: str) -> str:
    return f"hf download {repo}" + ("" if repo_type == "model" else f" --repo-type {repo_type}")


@contextlib.contextmanager
def hub_errors(label: str, repo: str, what: str, revision: str | None = None, repo_type: str = "model"):
    """Turn huggingface_hub's errors raised inside the block into one :class:`HubError` that starts with
    ``label`` (how the user named the thing), names ``what`` was wanted (a file, "the snapshot") and says
    what to do: offline and not cached, no such repository, gated, no such revision, missing file."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "" if repo_type == "model" else f"{repo_type} "
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{label}: the {kind}repository is gated: accept its terms at "
                       f"https://huggingface.co/{'' if repo_type == 'model' else repo_type + 's/'}{repo} and set "
                       "HF_TOKEN (or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{label}: no such {kind}repository on the Hub, or it is private (set HF_TOKEN or "
                       "`hf auth login` if it is yours)") from None
    except RevisionNotFoundError:
        raise HubError(f"{label}: the {kind}repository has no revision {revision or 'main'!r}") from None
    except LocalEntryNotFoundError:  # (an EntryNotFoundError too: caught first)
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{label}: {what} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it: fetch it where there is network (`{_download_hint(repo, repo_type)}`) "
                           "or unset HF_HUB_OFFLINE", missing=True) from None
        raise HubError(f"{label}: {what} is not in the Hugging Face cache ({where}) and the Hub could not be "
                       "reached: check the network, or fetch it elsewhere and copy the cache") from None
    except EntryNotFoundError:
        raise HubError(f"{label}: the {kind}repository has no {what}", missing=True) from None


def hub_file(model_id: str, filename: str, revision: str | None = None, repo_type: str = "model",
             label: str | None = None) -> str:
    """The local path of ``filename`` of the repo ``model_id`` (``hf-hub:org/name`` or ``org/name``) at
    ``revision`` (a branch, tag or commit; None: main), from the cache or downloaded into it (with
    huggingface_hub's progress bar)."""
    from huggingface_hub import hf_hub_download

    repo = _repo(model_id)
    with hub_errors(label or model_id, repo, filename, revision, repo_type):
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision, repo_type=repo_type)


def hub_snapshot(repo: str, allow_patterns: list[str] | None = None, revision: str | None = None,
                 repo_type: str = "model", label: str | None = None) -> str:
    """The local snapshot folder of ``repo`` at ``revision`` holding (at least) the files matching
    ``allow_patterns``, downloaded into the cache where missing. Offline, the cached snapshot is
    returned as it is: the caller checks the files it needs are there."""
    from huggingface_hub import snapshot_download

    repo = _repo(repo)
    with hub_errors(label or repo, repo, "the snapshot", revision, repo_type):
        return snapshot_download(repo_id=repo, revision=revision, repo_type=repo_type,
                                 allow_patterns=allow_patterns)


def hub_open_clip_config(model_id: str) -> dict:
    """The repo's ``open_clip_config.json`` (``model_cfg`` is required)."""
    path = hub_file(model_id, "open_clip_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{model_id}: open_clip_config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise HubError(f"{model_id}: open_clip_config.json has no 'model_cfg': not an open_clip model repository")
    return config


def hub_weights(model_id: str) -> str:
    """The local path of the repo's open_clip weights (safetensors first, as open_clip looks for them)."""
    last: HubError | None = None
    for name in _WEIGHTS:
        try:
            return hub_file(model_id, name)
        except HubError as e:
            if not e.missing:
                raise
            last = e
    assert last is not None
    raise HubError(f"{model_id}: no open_clip weights ({' or '.join(_WEIGHTS)}): {last}") from None
