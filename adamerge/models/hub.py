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

import json

from adamerge.errors import AdaMergeError

__all__ = ["HF_HUB", "HubError", "hub_file", "hub_open_clip_config", "hub_weights", "is_hub_id"]

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


def hub_file(model_id: str, filename: str) -> str:
    """The local path of ``filename`` of the repo ``model_id``, from the cache or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = _repo(model_id)
    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except GatedRepoError:
        raise HubError(f"{model_id}: the repository is gated: accept its terms at https://huggingface.co/{repo} "
                       "and set HF_TOKEN (or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{model_id}: no such repository on the Hub, or it is private (set HF_TOKEN or "
                       "`hf auth login` if it is yours)") from None
    except RevisionNotFoundError:
        raise HubError(f"{model_id}: the revision asked for does not exist") from None
    except LocalEntryNotFoundError:  # (an EntryNotFoundError too: caught first)
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{model_id}: {filename} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it: fetch it where there is network (`hf download {repo}`) "
                           "or unset HF_HUB_OFFLINE", missing=True) from None
        raise HubError(f"{model_id}: {filename} is not in the Hugging Face cache ({where}) and the Hub could not be "
                       "reached: check the network, or fetch it elsewhere and copy the cache") from None
    except EntryNotFoundError:
        raise HubError(f"{model_id}: the repository has no {filename}", missing=True) from None


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
