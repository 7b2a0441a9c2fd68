"""open_clip models by Hub id (``hf-hub:org/name``), through huggingface_hub and its cache.

An ``hf-hub:`` repository holds an open_clip model whole: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg``) and its weights (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
Files are fetched with :func:`huggingface_hub.hf_hub_download`, so its cache and environment behave as
users expect: ``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1`` (the cache only), ``HF_TOKEN``
(private and gated repos), progress bars while downloading. A failure is one :class:`HubError` that
names the id, the file and what to do (offline and not cached, no such repository, gated, missing file)
instead of open_clip's "unknown model" or a traceback from deep inside the download.

Checkpoints are named by repo id too (:func:`resolve_checkpoint`): ``org/name`` or ``org/name@rev`` (a
branch, tag or commit) is an HF model repository (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``, sharded or not: FusionBench's ``openai/clip-vit-base-patch32`` and
``tanganke/clip-vit-base-patch32_<task>``), an open_clip one (``open_clip_config.json`` + weights) or one
holding a single ``*.safetensors`` file (an adamerge export). Only the files a loader reads are fetched,
and the local snapshot folder (or file) is what the checkpoint readers get, so every local format works
by id unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from adamerge.errors import AdaMergeError
from adamerge.models.hf_clip import HF_WEIGHT_FILES

__all__ = ["HF_HUB", "HF_WEIGHTS", "OPEN_CLIP_WEIGHTS", "HubError", "hub_errors", "hub_file", "hub_open_clip_config",
           "hub_open_clip_dir", "hub_snapshot", "hub_tag_weights", "hub_weights", "is_hub_id", "is_repo_id", "parse_ref",
           "resolve_checkpoint", "resolve_pretrained"]

HF_HUB = "hf-hub:"
_LOCAL_DIR = "local-dir:"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = HF_WEIGHT_FILES  # (adamerge.models.hf_clip: the order an HF folder's weights are looked for)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# the Hub's rule for <org> and <name>: letters, digits, '-', '_', '.'; not starting or ending with '-' or '.'
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REF = re.compile(rf"^({_NAME})/({_NAME})(?:@([A-Za-z0-9_.][A-Za-z0-9_./-]*))?$")


class HubError(AdaMergeError):
    """A Hub id that can't be served: the message names the id, the file and what to do.

    ``missing`` is True when the file is absent (from the repository, or from the cache when offline),
    so a caller can try another file name; ``no_repo`` is True when the repository itself is unknown (not
    on the Hub, or offline not in the cache), so a caller that took a mistyped local path for an id can
    say that no such file exists either."""

    def __init__(self, message: str, missing: bool = False, no_repo: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.no_repo = no_repo


def is_hub_id(name: object) -> bool:
    """Whether ``name`` is an open_clip ``hf-hub:org/name`` id."""
    return isinstance(name, str) and name.startswith(HF_HUB)


def parse_ref(spec: str) -> tuple[str, str | None]:
    """(repo, revision) of ``org/name`` or ``org/name@rev`` (a branch, tag or commit; None: main), with or
    without the ``hf-hub:`` prefix. A malformed spec is refused here, naming it, rather than by
    huggingface_hub's validator deep inside a download."""
    bare = spec[len(HF_HUB):] if is_hub_id(spec) else spec
    m = _REF.match(bare) if isinstance(bare, str) else None
    if m is None or any(bad in m.group(1) + "/" + m.group(2) for bad in ("--", "..")):
        prefix = HF_HUB if is_hub_id(spec) else ""
        form = f"{prefix}<org>/<name>"
        if not prefix or "@" in bare:
            form += f" or {prefix}<org>/<name>@<revision> (a branch, tag or commit)"
        raise HubError(f"{spec!r}: a Hub id is {form}")
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def is_repo_id(value: object) -> bool:
    """Whether ``value`` names a Hub repository (``org/name``, ``org/name@rev``, ``hf-hub:`` ones too)
    rather than a local checkpoint: a string that is no existing path, has one ``/`` before any ``@``,
    no checkpoint suffix (``ckpts/mnist.safetensors`` stays a path, found or not) and only the
    characters the Hub allows. A missing folder such as ``ckpts/mnist`` does look like one: the Hub's
    error then says there is no such local file either."""
    if not isinstance(value, str) or value.startswith((".", "/", "~")) or os.path.exists(value):
        return False
    repo = (value[len(HF_HUB):] if is_hub_id(value) else value).partition("@")[0]
    if repo.count("/") != 1 or repo.lower().endswith(_CHECKPOINT_SUFFIXES):
        return False
    try:
        parse_ref(value)
    except HubError:
        return False
    return True


def _download_hint(repo: str, repo_type: str, revision: str | None = None) -> str:
    return (f"hf download {repo}" + ("" if repo_type == "model" else f" --repo-type {repo_type}")
            + (f" --revision {revision}" if revision else ""))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_folder(repo: str, repo_type: str) -> tuple[Path, Path]:
    """(the cache root, the repository's folder in it) in huggingface_hub's layout."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)
    return cache, cache / repo_folder_name(repo_id=repo, repo_type=repo_type)


def _check_cached_revision(repo: str, revision: str | None, repo_type: str, label: str) -> None:
    """Offline, a revision the cache lacks of a repository it has: name the revision and the cached refs
    (huggingface_hub only says it "cannot find the requested files")."""
    cache, base = _cache_folder(repo, repo_type)
    rev = revision or "main"
    if not base.is_dir() or (base / "refs" / rev).is_file() or (base / "snapshots" / rev).is_dir():
        return
    refs = sorted(str(p.relative_to(base / "refs")) for p in (base / "refs").rglob("*") if p.is_file())
    raise HubError(f"{label}: the Hugging Face cache ({cache}) has no revision {rev!r} of {repo} (cached: "
                   f"{', '.join(refs) or 'no refs'}) and HF_HUB_OFFLINE=1 forbids looking it up: check the "
                   f"revision, or fetch it where there is network (`{_download_hint(repo, repo_type, revision)}`)")


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
                       "`hf auth login` if it is yours)", no_repo=True) from None
    except RevisionNotFoundError:
        raise HubError(f"{label}: the {kind}repository has no revision {revision or 'main'!r}: name one of its "
                       "branches, tags or commits") from None
    except LocalEntryNotFoundError:  # (an EntryNotFoundError too: caught first)
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{label}: {what} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it: fetch it where there is network "
                           f"(`{_download_hint(repo, repo_type, revision)}`) "
                           "or unset HF_HUB_OFFLINE", missing=True) from None
        raise HubError(f"{label}: {what} is not in the Hugging Face cache ({where}) and the Hub could not be "
                       "reached: check the network, or fetch it elsewhere and copy the cache") from None
    except EntryNotFoundError:
        raise HubError(f"{label}: the {kind}repository has no {what}", missing=True) from None


def hub_file(model_id: str, filename: str, revision: str | None = None, repo_type: str = "model",
             label: str | None = None) -> str:
    """The local path of ``filename`` of the repo ``model_id`` (``hf-hub:org/name`` or ``org/name``, either
    may end in ``@rev``) at ``revision`` (a branch, tag or commit; None: the id's, else main), from the
    cache or downloaded into it (with huggingface_hub's progress bar)."""
    from huggingface_hub import hf_hub_download

    repo, at = parse_ref(model_id)
    revision = at if revision is None else revision
    if _offline():
        _check_cached_revision(repo, revision, repo_type, label or model_id)
    with hub_errors(label or model_id, repo, filename, revision, repo_type):
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision, repo_type=repo_type)


def hub_snapshot(repo: str, allow_patterns: list[str] | None = None, revision: str | None = None,
                 repo_type: str = "model", label: str | None = None) -> str:
    """The local snapshot folder of ``repo`` at ``revision`` holding (at least) the files matching
    ``allow_patterns``, downloaded into the cache where missing. Offline, the cached snapshot is
    returned as it is: the caller checks the files it needs are there."""
    from huggingface_hub import snapshot_download

    repo, at = parse_ref(repo)
    revision = at if revision is None else revision
    with hub_errors(label or repo, repo, "the snapshot", revision, repo_type):
        return snapshot_download(repo_id=repo, revision=revision, repo_type=repo_type,
                                 allow_patterns=allow_patterns)


def hub_open_clip_config(model_id: str, label: str | None = None) -> dict:
    """The repo's ``open_clip_config.json`` (``model_cfg`` is required); errors start with ``label``
    (default: the id)."""
    label = label or model_id
    try:
        path = hub_file(model_id, "open_clip_config.json", label=label)
    except HubError as e:
        if not e.missing or "HF_HUB_OFFLINE" in str(e):
            raise
        raise HubError(f"{e}: not an open_clip repository (an HF CLIPModel repository such as "
                       "openai/clip-vit-base-patch32 goes by its id alone, without hf-hub:, as pretrained)",
                       missing=True) from None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{label}: open_clip_config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise HubError(f"{label}: open_clip_config.json has no 'model_cfg': not an open_clip model repository")
    return config


def hub_weights(model_id: str, label: str | None = None) -> str:
    """The local path of the repo's open_clip weights (safetensors first, as open_clip looks for them)."""
    label = label or model_id
    last: HubError | None = None
    for name in OPEN_CLIP_WEIGHTS:
        try:
            return hub_file(model_id, name, label=label)
        except HubError as e:
            if not e.missing:
                raise
            last = e
    assert last is not None
    raise HubError(f"{label}: no open_clip weights ({' or '.join(OPEN_CLIP_WEIGHTS)}): {last}") from None


def hub_tag_weights(model_name: str, tag: str) -> str | None:
    """The local path of the weights of open_clip's pretrained ``tag`` for ``model_name``, fetched here
    through the Hugging Face cache when open_clip keeps them on the Hub (its ``hf_hub`` entry), in the
    order open_clip looks for them (a safetensors file before the pickle), so open_clip then finds them
    cached and a failure is one :class:`HubError` naming the tag and the repository. None when open_clip
    does not know the tag or keeps it elsewhere (a URL): open_clip then reports or downloads it itself."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if not cfg.get("hf_hub") or cfg.get("file"):
        return None
    repo, filename = os.path.split(cfg["hf_hub"])  # open_clip's rule: 'org/name/' → its default file names
    alternatives = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda name: [])
    names = [*alternatives(filename), filename] if filename else list(OPEN_CLIP_WEIGHTS)
    label = f"{model_name} pretrained={tag!r} (open_clip keeps it at hf-hub:{repo})"
    last: HubError | None = None
    for name in names:
        try:
            return hub_file(HF_HUB + repo, name, label=label)
        except HubError as e:
            if not e.missing:
                raise
            last = e
    assert last is not None
    raise last


def hub_open_clip_dir(model_id: str, label: str | None = None) -> str:
    """The local snapshot folder of an open_clip repository (``hf-hub:org/name@rev`` too) holding its
    ``open_clip_config.json`` and weights, for open_clip's ``local-dir:`` (open_clip's own ``hf-hub:``
    loader knows no revision)."""
    hub_open_clip_config(model_id, label)
    return str(Path(hub_weights(model_id, label)).parent)


# ---- checkpoints by repo id ---------------------------------------------------------------------------
def _optional(repo: str, filename: str, revision: str | None, label: str) -> str | None:
    """``filename``'s local path, or None when the repository (or offline, the cache) lacks it."""
    try:
        return hub_file(repo, filename, revision, label=label)
    except HubError as e:
        if e.missing:
            return None
        raise


def _shards(index: str, label: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"{label}: {Path(index).name} is no readable weight index ({type(e).__name__}: {e}); "
                       "the repository's sharded weights cannot be found") from None


def _holds(repo: str, revision: str | None, what: str) -> str:
    """``what`` the repository has, said of where it was looked for: the Hub, or offline the cache only
    (whose snapshot may lack files the repository has: then say how to fetch them)."""
    if not _offline():
        return f"the repository has {what}"
    cache, _ = _cache_folder(repo, "model")
    return (f"the Hugging Face cache ({cache}) holds {what} (HF_HUB_OFFLINE=1: if the repository has more, fetch "
            f"it where there is network: `{_download_hint(repo, 'model', revision)}`)")


def _fetch_hf_weights(repo: str, revision: str | None, label: str) -> None:
    """Fetch the first weights in transformers' order (and every shard an index lists), only those."""
    for name in HF_WEIGHTS:
        path = _optional(repo, name, revision, label)
        if path is None:
            continue
        if name.endswith(".index.json"):
            for shard in _shards(path, label):
                hub_file(repo, shard, revision, label=label)
        return
    found = f"config.json but none of {', '.join(HF_WEIGHTS)}"
    raise HubError(f"{label}: no weights: {_holds(repo, revision, found)}; name a repository or file with the weights")


def _repo_files(repo: str, revision: str | None, label: str) -> list[str]:
    """The files of the repository at ``revision``: the Hub's listing, or offline the cached snapshot's."""
    if _offline():
        folder = Path(hub_snapshot(repo, revision=revision, label=label))
        return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    from huggingface_hub import HfApi

    with hub_errors(label, repo, "the list of files", revision):
        return HfApi().list_repo_files(repo, revision=revision)


def _single_safetensors(repo: str, revision: str | None, label: str) -> str:
    """The repository's one ``.safetensors`` file (an export shared as is); with none or several, which
    one is meant can't be guessed."""
    files = sorted(f for f in _repo_files(repo, revision, label) if f.endswith(".safetensors"))
    if len(files) == 1:
        return hub_file(repo, files[0], revision, label=label)
    held = f"{len(files)} .safetensors files ({', '.join(files)})" if files else "no .safetensors file"
    todo = (f"download the one you mean (`{_download_hint(repo, 'model', revision)} FILE`) and pass its path"
            if files else "name a repository holding an HF, open_clip or adamerge checkpoint")
    found = f"no config.json (HF model), no open_clip_config.json (open_clip model) and {held}"
    raise HubError(f"{label}: no checkpoint: {_holds(repo, revision, found)}; {todo}")


def _fetch(repo: str, revision: str | None, label: str) -> tuple[str, str]:
    """(local path, kind) of the checkpoint in ``repo``: ``"hf"`` (a snapshot folder with config.json and
    its weights), ``"open_clip"`` (a folder with open_clip_config.json and its weights) or ``"file"``
    (the repository's one .safetensors file). Only those files are fetched."""
    cache, folder = _cache_folder(repo, "model")
    if _offline() and not folder.is_dir():
        raise HubError(f"{label}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
                       f"downloading it: fetch it where there is network (`{_download_hint(repo, 'model', revision)}`) "
                       "or unset HF_HUB_OFFLINE", missing=True, no_repo=True)
    config = _optional(repo, "config.json", revision, label)
    if config is not None:
        _fetch_hf_weights(repo, revision, label)
        return str(Path(config).parent), "hf"
    if _optional(repo, "open_clip_config.json", revision, label) is not None:
        return hub_open_clip_dir(f"{repo}@{revision}" if revision else repo, label), "open_clip"
    return _single_safetensors(repo, revision, label), "file"


def _resolve(value: str, label: str | None) -> tuple[str, str]:
    repo, revision = parse_ref(value)
    try:
        return _fetch(repo, revision, label or value)
    except HubError as e:
        if not e.no_repo:
            raise
        raise HubError(f"{e}; nor is there a local file or folder {value!r} (in {os.getcwd()}): check the path if "
                       "you meant one", missing=e.missing, no_repo=True) from None


def resolve_checkpoint(value: str | os.PathLike, label: str | None = None) -> str | os.PathLike:
    """The local path of a checkpoint named by path or by Hub repo id (:func:`is_repo_id`): a path (or
    anything else) comes back unchanged; for an id, only the files a loader reads are fetched into the
    Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``) at its revision, and the snapshot
    folder (HF or open_clip model) or the repository's single ``.safetensors`` file is returned.

    Args:
        value: a local path, ``org/name`` or ``org/name@rev`` (a branch, tag or commit).
        label: how errors name it (default: ``value``), e.g. ``"expert for task 'mnist': org/name"``.

    Raises:
        HubError: naming the id, what is missing and what to do (offline and not cached, no such
            repository or revision, gated, no weights); for an unknown id it adds that no local file of
            that name exists either.
    """
    if not is_repo_id(value):
        return value
    return _resolve(value, label)[0]


def resolve_pretrained(value: str | None) -> str | None:
    """``pretrained`` as :func:`adamerge.models.open_clip_pool.load_clip` reads it: a repo id becomes the
    local path of its HF checkpoint, or ``local-dir:<snapshot>`` for an open_clip repository (and so
    does ``hf-hub:org/name@rev``); a tag, a path, ``local-dir:``, a plain ``hf-hub:`` id or None comes
    back unchanged."""
    if is_hub_id(value) and "@" in value:
        return _LOCAL_DIR + hub_open_clip_dir(value)
    if is_hub_id(value) or not is_repo_id(value):
        return value
    path, kind = _resolve(value, None)
    return _LOCAL_DIR + path if kind == "open_clip" else path
