"""Pins of adamerge.models.hub, in process (issue #17): every function is called directly against a Hugging
Face cache laid out on disk in huggingface_hub's real format (:func:`hubcache.cache_repo`) under ``tmp_path``.

huggingface_hub reads ``HF_HOME`` / ``HF_HUB_OFFLINE`` when imported, so the fixture ``hub`` points what it
read (``huggingface_hub.constants.HF_HUB_CACHE`` / ``HF_HUB_OFFLINE``, which both huggingface_hub and
adamerge.models.hub read at call time) at the test's cache, offline. ``HF_HUB_OFFLINE`` stays on in every test,
so nothing can reach the network; the Hub's own answers (gated, no such repository or revision, a file it
lacks, a file listing) are stood in for by fakes of the one huggingface_hub call, and the code's online
branches by patching ``hub._offline`` only (huggingface_hub itself still refuses any request).

Each repository holds different commits at ``main`` and at its tags, with different files, so a revision
that is dropped or swapped picks another file, another folder or another kind, and errors are compared whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import huggingface_hub
import open_clip
import pytest
from hubcache import COMMIT, cache_repo
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from adamerge.models import hub as hub_module
from adamerge.models.hub import (
    HubError,
    _cache_folder,
    _check_cached_revision,
    _download_hint,
    _fetch,
    _fetch_hf_weights,
    _holds,
    _offline,
    _optional,
    _repo_files,
    _resolve,
    _shards,
    _single_safetensors,
    hub_file,
    hub_open_clip_config,
    hub_open_clip_dir,
    hub_snapshot,
    hub_tag_weights,
    hub_weights,
    is_repo_id,
    parse_ref,
    resolve_checkpoint,
    resolve_pretrained,
)

V1 = "1111111111111111111111111111111111111111"  # the commit of tag v1
V2 = "2222222222222222222222222222222222222222"  # the commit of tag v2
HF_NONE = ("model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin")
OC_CONFIG = {"model_cfg": {"embed_dim": 16}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, read offline; the cwd is tmp_path (no stray local paths)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # (belt and braces: a closed local port)
    monkeypatch.chdir(tmp_path)
    return cache


def _snap(cache: Path, repo: str, commit: str = COMMIT, repo_type: str = "model") -> str:
    return str(cache / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots" / commit)


def _offline_tail(cache: Path, hint: str) -> str:
    return (f"is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading it: fetch it "
            f"where there is network (`{hint}`) or unset HF_HUB_OFFLINE")


def _raises(fn, *args, **kwargs) -> HubError:
    with pytest.raises(HubError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.fixture
def spy(monkeypatch):
    """Records every huggingface_hub.hf_hub_download call (repo_id, filename, revision, repo_type) and serves it
    from the cache as usual."""
    real = huggingface_hub.hf_hub_download
    calls: list[tuple] = []

    def download(**kw):
        calls.append((kw["repo_id"], kw["filename"], kw["revision"], kw["repo_type"]))
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "http://127.0.0.1:9/x"))


# ---- HubError, parse_ref, is_repo_id, _download_hint, _cache_folder, _offline --------------------------
def test_hub_error_flags_default_false_and_keep_given_values():
    """Callers branch on .missing / .no_repo: both default to False and keep what they are given."""
    e = HubError("msg")
    assert (str(e), e.missing, e.no_repo) == ("msg", False, False)
    e = HubError("msg", missing=True, no_repo=True)
    assert (e.missing, e.no_repo) == (True, True)
    e = HubError("msg", no_repo=True)
    assert (e.missing, e.no_repo) == (False, True)


@pytest.mark.parametrize(("spec", "expected"), [
    ("org/name", ("org/name", None)),
    ("hf-hub:org/name@v2", ("org/name", "v2")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("a-b.c/x_y", ("a-b.c/x_y", None)),
])
def test_parse_ref_splits_repo_and_revision(spec, expected):
    assert parse_ref(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    # not a string: refused as a HubError naming it (not a TypeError from the regex)
    (None, "None: a Hub id is <org>/<name> or <org>/<name>@<revision> (a branch, tag or commit)"),
    # '--' in the org only (a check of the name twice would pass it); '..' in the name
    ("ab--c/name", "'ab--c/name': a Hub id is <org>/<name> or <org>/<name>@<revision> (a branch, tag or commit)"),
    ("org/a..b", "'org/a..b': a Hub id is <org>/<name> or <org>/<name>@<revision> (a branch, tag or commit)"),
    ("hf-hub:a..b/c", "'hf-hub:a..b/c': a Hub id is hf-hub:<org>/<name>"),
    ("hf-hub:a/b/c@v", ("'hf-hub:a/b/c@v': a Hub id is hf-hub:<org>/<name> or hf-hub:<org>/<name>@<revision> "
                       "(a branch, tag or commit)")),
])
def test_parse_ref_refuses_malformed_ids_naming_them(spec, message):
    assert str(_raises(parse_ref, spec)) == message


@pytest.mark.parametrize(("value", "expected"), [
    ("XX.XX/name", True),        # starts with 'XX.XX', not with '.': an id
    ("XX/XX", True),             # starts with 'XX/XX', not with '/'
    ("org/name@refs/pr/1", True),  # the '/' of a revision do not count (only the part before '@')
    ("org/name@v1.bin", True),   # nor does the revision's suffix
    ("hf-hub:org/name", True),
    ("~user/name", False),
    ("/abs/name", False),
    ("./rel/name", False),
    ("org/name.safetensors", False),
    ("org/sub/name", False),
    ("org/a..b", False),
    (3, False),
])
def test_is_repo_id(hub, value, expected):
    assert is_repo_id(value) is expected


def test_download_hint_names_type_and_revision_only_when_not_default():
    assert _download_hint("o/n", "model") == "hf download o/n"
    assert _download_hint("o/n", "model", "v2") == "hf download o/n --revision v2"
    assert _download_hint("o/n", "dataset", None) == "hf download o/n --repo-type dataset"


def test_cache_folder_and_offline_read_huggingface_hub_constants(hub):
    assert _cache_folder("org/name", "dataset") == (hub, hub / "datasets--org--name")
    assert _cache_folder("org/name", "model") == (hub, hub / "models--org--name")
    assert _offline() is True


# ---- _check_cached_revision ---------------------------------------------------------------------------
def _two_revisions(hub: Path, repo: str = "org/name", repo_type: str = "model") -> None:
    """main → COMMIT (a.txt = b'main'), v1 → V1 (a.txt = b'v1'); refs also pr/1 (written last, sorted first
    after main)."""
    cache_repo(hub, repo, {"a.txt": b"main"}, repo_type=repo_type, refs=("main",))
    cache_repo(hub, repo, {"a.txt": b"v1", "b.txt": b"b"}, repo_type=repo_type, commit=V1, refs=("v1",))
    pr = hub / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / "pr"
    pr.mkdir()
    (pr / "1").write_text(V1)


@pytest.mark.parametrize("revision", [None, "main", "v1", "pr/1", V1])
def test_check_cached_revision_accepts_cached_refs_and_commits(hub, revision):
    """None is main; a tag is a file in refs/ (no snapshot folder of that name); a commit is a snapshot folder
    (no ref of that name)."""
    _two_revisions(hub)
    assert _check_cached_revision("org/name", revision, "model", "L") is None


def test_check_cached_revision_skips_a_repository_not_in_the_cache(hub):
    assert _check_cached_revision("org/absent", "v9", "model", "L") is None


def test_check_cached_revision_names_the_revision_and_the_cached_refs(hub):
    _two_revisions(hub, "org/data", "dataset")
    e = _raises(_check_cached_revision, "org/data", "v9", "dataset", "LBL")
    assert str(e) == (f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/data (cached: main, pr/1, "
                      "v1) and HF_HUB_OFFLINE=1 forbids looking it up: check the revision, or fetch it where there "
                      "is network (`hf download org/data --repo-type dataset --revision v9`)")
    assert (e.missing, e.no_repo) == (False, False)


def test_check_cached_revision_main_missing_and_no_refs(hub):
    """A repository cached at a tag only lacks main (revision None); with no refs at all it says so."""
    cache_repo(hub, "org/tagged", {"a.txt": b"x"}, refs=("v1",))
    e = _raises(_check_cached_revision, "org/tagged", None, "model", "LBL")
    assert str(e) == (f"LBL: the Hugging Face cache ({hub}) has no revision 'main' of org/tagged (cached: v1) and "
                      "HF_HUB_OFFLINE=1 forbids looking it up: check the revision, or fetch it where there is "
                      "network (`hf download org/tagged`)")
    cache_repo(hub, "org/norefs", {"a.txt": b"x"}, refs=())
    e = _raises(_check_cached_revision, "org/norefs", "v2", "model", "LBL")
    assert str(e) == (f"LBL: the Hugging Face cache ({hub}) has no revision 'v2' of org/norefs (cached: no refs) "
                      "and HF_HUB_OFFLINE=1 forbids looking it up: check the revision, or fetch it where there is "
                      "network (`hf download org/norefs --revision v2`)")


# ---- hub_file, hub_snapshot ---------------------------------------------------------------------------
def test_hub_file_revision_from_id_argument_or_main(hub, spy):
    """The id's @rev is used when no revision is given; an explicit revision wins over it; else main."""
    _two_revisions(hub)
    assert hub_file("org/name", "a.txt") == _snap(hub, "org/name") + "/a.txt"
    assert hub_file("hf-hub:org/name@v1", "a.txt") == _snap(hub, "org/name", V1) + "/a.txt"
    assert hub_file("org/name@v1", "a.txt", revision="main") == _snap(hub, "org/name") + "/a.txt"
    assert Path(hub_file("org/name", "b.txt", revision="v1")).read_bytes() == b"b"
    assert spy == [("org/name", "a.txt", None, "model"), ("org/name", "a.txt", "v1", "model"),
                   ("org/name", "a.txt", "main", "model"), ("org/name", "b.txt", "v1", "model")]


def test_hub_file_dataset_repository(hub, spy):
    _two_revisions(hub, "org/data", "dataset")
    assert hub_file("org/data@v1", "b.txt", repo_type="dataset") == _snap(hub, "org/data", V1, "dataset") + "/b.txt"
    assert spy == [("org/data", "b.txt", "v1", "dataset")]
    e = _raises(hub_file, "org/data@v9", "a.txt", repo_type="dataset", label="LBL")
    assert str(e) == (f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/data (cached: main, pr/1, "
                      "v1) and HF_HUB_OFFLINE=1 forbids looking it up: check the revision, or fetch it where there "
                      "is network (`hf download org/data --repo-type dataset --revision v9`)")
    e = _raises(hub_file, "org/data", "zz.txt", "v1", "dataset")
    assert str(e) == "org/data: zz.txt " + _offline_tail(hub, "hf download org/data --repo-type dataset --revision v1")
    assert (e.missing, e.no_repo) == (True, False)


def test_hub_file_errors_start_with_the_label_or_the_id(hub):
    _two_revisions(hub)
    e = _raises(hub_file, "org/name@v1", "zz.txt", label="LBL")
    assert str(e) == "LBL: zz.txt " + _offline_tail(hub, "hf download org/name --revision v1")
    assert e.missing is True
    e = _raises(hub_file, "org/name@v9", "a.txt")
    assert str(e).startswith("org/name@v9: the Hugging Face cache (")
    e = _raises(hub_file, "org/name@v9", "a.txt", label="LBL")
    assert str(e).startswith(f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/name (")


@pytest.mark.parametrize(("error", "message", "missing", "no_repo"), [
    (lambda: hf_errors.GatedRepoError("x", response=_response(403)),
     ("LBL: the dataset repository is gated: accept its terms at https://huggingface.co/datasets/org/d and set "
     "HF_TOKEN (or `hf auth login`)"), False, False),
    (lambda: hf_errors.RepositoryNotFoundError("x", response=_response(401)),
     ("LBL: no such dataset repository on the Hub, or it is private (set HF_TOKEN or `hf auth login` if it is "
     "yours)"), False, True),
    (lambda: hf_errors.RevisionNotFoundError("x", response=_response(404)),
     "LBL: the dataset repository has no revision 'v3': name one of its branches, tags or commits", False, False),
    (lambda: hf_errors.RemoteEntryNotFoundError("x", response=_response(404)),
     "LBL: the dataset repository has no f.json", True, False),
])
def test_hub_file_turns_the_hubs_answers_into_one_error(hub, monkeypatch, error, message, missing, no_repo):
    """The Hub's answers (stood in for by a fake download; HF_HUB_OFFLINE stays on) become one HubError."""
    def download(**kw):
        raise error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub_module, "_offline", lambda: False)
    e = _raises(hub_file, "org/d@v3", "f.json", repo_type="dataset", label="LBL")
    assert (str(e), e.missing, e.no_repo) == (message, missing, no_repo)


def test_hub_snapshot_revision_type_and_patterns(hub, monkeypatch):
    """The snapshot folder of the id's revision (or the argument's, or main); allow_patterns are passed on."""
    _two_revisions(hub)
    _two_revisions(hub, "org/data", "dataset")
    real = huggingface_hub.snapshot_download
    calls = []

    def snapshot(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert hub_snapshot("org/name") == _snap(hub, "org/name")
    assert hub_snapshot("hf-hub:org/name@v1", ["*.txt"]) == _snap(hub, "org/name", V1)
    assert hub_snapshot("org/name@v1", revision="main") == _snap(hub, "org/name")
    assert hub_snapshot("org/data", revision="v1", repo_type="dataset") == _snap(hub, "org/data", V1, "dataset")
    assert calls == [{"repo_id": "org/name", "revision": None, "repo_type": "model", "allow_patterns": None},
                     {"repo_id": "org/name", "revision": "v1", "repo_type": "model", "allow_patterns": ["*.txt"]},
                     {"repo_id": "org/name", "revision": "main", "repo_type": "model", "allow_patterns": None},
                     {"repo_id": "org/data", "revision": "v1", "repo_type": "dataset", "allow_patterns": None}]


def test_hub_snapshot_not_cached(hub):
    e = _raises(hub_snapshot, "org/missing", label="LBL")
    assert str(e) == "LBL: the snapshot " + _offline_tail(hub, "hf download org/missing")
    assert e.missing is True
    # the default label is the repository as parsed (without its @rev)
    e = _raises(hub_snapshot, "org/gone@v3", repo_type="dataset")
    assert str(e) == "org/gone: the snapshot " + _offline_tail(
        hub, "hf download org/gone --repo-type dataset --revision v3")


# ---- open_clip repositories ---------------------------------------------------------------------------
def _open_clip_repo(hub: Path, repo: str = "org/oc") -> None:
    """main: a README only; v2 (V2): open_clip_config.json + both weights; v1 (V1): config + the .bin only."""
    cache_repo(hub, repo, {"README.md": b"main"})
    cache_repo(hub, repo, {"open_clip_config.json": json.dumps(OC_CONFIG).encode(),
                           "open_clip_model.safetensors": b"st", "open_clip_pytorch_model.bin": b"pt"},
               commit=V2, refs=("v2",))
    cache_repo(hub, repo, {"open_clip_config.json": json.dumps(OC_CONFIG).encode(),
                           "open_clip_pytorch_model.bin": b"pt"}, commit=V1, refs=("v1",))


def test_hub_open_clip_config_reads_the_config(hub):
    _open_clip_repo(hub)
    assert hub_open_clip_config("hf-hub:org/oc@v2") == OC_CONFIG
    assert hub_open_clip_config("org/oc@v1", label="LBL") == OC_CONFIG


def test_hub_open_clip_config_offline_missing_is_passed_on(hub):
    """Offline, a config the cache lacks is said as such (not "not an open_clip repository")."""
    _open_clip_repo(hub)
    e = _raises(hub_open_clip_config, "hf-hub:org/oc", label="LBL")
    assert str(e) == "LBL: open_clip_config.json " + _offline_tail(hub, "hf download org/oc")
    assert e.missing is True
    e = _raises(hub_open_clip_config, "hf-hub:org/oc")
    assert str(e).startswith("hf-hub:org/oc: open_clip_config.json is not in")
    e = _raises(hub_open_clip_config, "hf-hub:org/oc@v9", label="LBL")  # not missing: passed on as it is
    assert str(e).startswith(f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/oc (cached: ")
    assert e.missing is False


def test_hub_open_clip_config_absent_from_the_repository(hub, monkeypatch):
    """The Hub says the file is not there (a fake; offline stays on): not an open_clip repository."""
    calls = []

    def download(**kw):
        calls.append(kw["filename"])
        raise hf_errors.RemoteEntryNotFoundError("x", response=_response(404))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub_module, "_offline", lambda: False)
    e = _raises(hub_open_clip_config, "hf-hub:org/hf", label="LBL")
    assert str(e) == ("LBL: the repository has no open_clip_config.json: not an open_clip repository (an HF "
                      "CLIPModel repository such as openai/clip-vit-base-patch32 goes by its id alone, without "
                      "hf-hub:, as pretrained)")
    assert (e.missing, e.no_repo, calls) == (True, False, ["open_clip_config.json"])


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", ("LBL: open_clip_config.json is not readable JSON (Expecting property name enclosed in double "
                   "quotes: line 1 column 2 (char 1))")),
    (b"[1]", "LBL: open_clip_config.json has no 'model_cfg': not an open_clip model repository"),
    (b'{"model_cfg": 3}', "LBL: open_clip_config.json has no 'model_cfg': not an open_clip model repository"),
    (b'{"preprocess_cfg": {}}', "LBL: open_clip_config.json has no 'model_cfg': not an open_clip model repository"),
])
def test_hub_open_clip_config_bad_config(hub, data, message):
    cache_repo(hub, "org/bad", {"open_clip_config.json": data})
    e = _raises(hub_open_clip_config, "hf-hub:org/bad", label="LBL")
    assert (str(e), e.missing) == (message, False)


def test_hub_weights_safetensors_first_then_the_pickle(hub):
    _open_clip_repo(hub)
    assert hub_weights("hf-hub:org/oc@v2") == _snap(hub, "org/oc", V2) + "/open_clip_model.safetensors"
    assert hub_weights("hf-hub:org/oc@v1", label="LBL") == _snap(hub, "org/oc", V1) + "/open_clip_pytorch_model.bin"


def test_hub_weights_none(hub):
    _open_clip_repo(hub)
    e = _raises(hub_weights, "hf-hub:org/oc", label="LBL")
    assert str(e) == ("LBL: no open_clip weights (open_clip_model.safetensors or open_clip_pytorch_model.bin): "
                      "LBL: open_clip_pytorch_model.bin " + _offline_tail(hub, "hf download org/oc"))
    assert e.missing is False
    e = _raises(hub_weights, "hf-hub:org/oc")
    assert str(e).startswith("hf-hub:org/oc: no open_clip weights (open_clip_model.safetensors or ")
    e = _raises(hub_weights, "hf-hub:org/oc@v9", label="LBL")  # not missing: passed on at the first file
    assert str(e).startswith(f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/oc (cached: ")


def test_hub_open_clip_dir(hub):
    _open_clip_repo(hub)
    assert hub_open_clip_dir("hf-hub:org/oc@v2", "LBL") == _snap(hub, "org/oc", V2)
    assert hub_open_clip_dir("org/oc@v1") == _snap(hub, "org/oc", V1)
    e = _raises(hub_open_clip_dir, "hf-hub:org/oc", "LBL")  # no config at main: the label, not the id
    assert str(e) == "LBL: open_clip_config.json " + _offline_tail(hub, "hf download org/oc")
    cache_repo(hub, "org/noweights", {"open_clip_config.json": json.dumps(OC_CONFIG).encode()})
    e = _raises(hub_open_clip_dir, "hf-hub:org/noweights", "LBL")
    assert str(e).startswith("LBL: no open_clip weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)"
                             ": LBL: open_clip_pytorch_model.bin is not in")


# ---- hub_tag_weights ----------------------------------------------------------------------------------
TAGS = {("M", "file-tag"): {"hf_hub": "org/tagrepo/pytorch_model.bin"},
        ("M", "dir-tag"): {"hf_hub": "org/tagdir/"},
        ("M", "local-tag"): {"hf_hub": "org/tagdir/", "file": "weights.pt"},
        ("M", "url-tag"): {"url": "https://example.invalid/w.pt", "hf_hub": ""}}


@pytest.fixture
def tags(hub, monkeypatch):
    """open_clip's pretrained table, standing in: only (M, tag) pairs are known (None otherwise, as open_clip)."""
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: TAGS.get((model, tag)))
    return hub


def test_hub_tag_weights_not_on_the_hub(tags):
    """Unknown tags, tags kept at a URL and tags with a local file name are left to open_clip."""
    for tag in ("unknown", "url-tag", "local-tag"):
        assert hub_tag_weights("M", tag) is None
    assert hub_tag_weights("N", "file-tag") is None  # the model name matters too


def test_hub_tag_weights_a_named_file_prefers_its_safetensors_alternative(tags):
    cache_repo(tags, "org/tagrepo", {"pytorch_model.safetensors": b"st", "pytorch_model.bin": b"pt"})
    assert hub_tag_weights("M", "file-tag") == _snap(tags, "org/tagrepo") + "/pytorch_model.safetensors"


def test_hub_tag_weights_a_named_file_alone(tags):
    cache_repo(tags, "org/tagrepo", {"pytorch_model.bin": b"pt", "open_clip_model.safetensors": b"x"})
    assert hub_tag_weights("M", "file-tag") == _snap(tags, "org/tagrepo") + "/pytorch_model.bin"


def test_hub_tag_weights_a_folder_uses_open_clips_file_names(tags):
    cache_repo(tags, "org/tagdir", {"open_clip_model.safetensors": b"st", "open_clip_pytorch_model.bin": b"pt"})
    assert hub_tag_weights("M", "dir-tag") == _snap(tags, "org/tagdir") + "/open_clip_model.safetensors"


def test_hub_tag_weights_missing_names_the_tag_and_the_repository(tags):
    cache_repo(tags, "org/tagrepo", {"README.md": b"x"})
    e = _raises(hub_tag_weights, "M", "file-tag")
    assert str(e) == ("M pretrained='file-tag' (open_clip keeps it at hf-hub:org/tagrepo): pytorch_model.bin "
                      + _offline_tail(tags, "hf download org/tagrepo"))
    assert e.missing is True
    cache_repo(tags, "org/tagdir", {"open_clip_model.safetensors": b"st"}, refs=("v1",))  # cached, but no main
    e = _raises(hub_tag_weights, "M", "dir-tag")
    assert str(e).startswith("M pretrained='dir-tag' (open_clip keeps it at hf-hub:org/tagdir): the Hugging Face "
                             f"cache ({tags}) has no revision 'main' of org/tagdir (cached: v1)")


# ---- checkpoints by repo id: _optional, _shards, _holds, _fetch_hf_weights -----------------------------
def test_optional(hub):
    _two_revisions(hub)
    assert _optional("org/name", "b.txt", "v1", "LBL") == _snap(hub, "org/name", V1) + "/b.txt"
    assert _optional("org/name", "b.txt", None, "LBL") is None  # main lacks it
    e = _raises(_optional, "org/name", "a.txt", "v9", "LBL")  # not a missing file: raised
    assert str(e).startswith(f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/name (")


def test_shards_sorted_unique(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "s-2.st", "b": "s-1.st", "c": "s-2.st"}}))
    assert _shards(str(index), "LBL") == ["s-1.st", "s-2.st"]


@pytest.mark.parametrize(("data", "why"), [
    (b"{", "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b'{"metadata": {}}', "KeyError: 'weight_map'"),
    (b'{"weight_map": ["a"]}', "AttributeError: 'list' object has no attribute 'values'"),
    (b'{"weight_map": {"a": ["x"]}}', "TypeError: unhashable type: 'list'"),
    (None, "FileNotFoundError: [Errno 2] No such file or directory: '{path}'"),
])
def test_shards_unreadable_index(tmp_path, data, why):
    index = tmp_path / "w.index.json"
    if data is not None:
        index.write_bytes(data)
    e = _raises(_shards, str(index), "LBL")
    assert str(e) == (f"LBL: w.index.json is no readable weight index ({why.format(path=index)}); the repository's "
                      "sharded weights cannot be found")


def test_holds_says_where_it_looked(hub, monkeypatch):
    assert _holds("org/x", "v1", "W") == (f"the Hugging Face cache ({hub}) holds W (HF_HUB_OFFLINE=1: if the "
                                          "repository has more, fetch it where there is network: `hf download org/x "
                                          "--revision v1`)")
    monkeypatch.setattr(hub_module, "_offline", lambda: False)
    assert _holds("org/x", "v1", "W") == "the repository has W"


def _hf_repo(hub: Path) -> None:
    """org/hf: main → config.json + model.safetensors + pytorch_model.bin; v1 → config + sharded safetensors
    (index + 2 shards) + pytorch_model.bin; v2 → config + pytorch_model.bin.index.json + its shard, and a
    config-only commit at tag bare."""
    cfg = b'{"model_type": "clip"}'
    cache_repo(hub, "org/hf", {"config.json": cfg, "model.safetensors": b"m", "pytorch_model.bin": b"p"})
    index = {"weight_map": {"b": "model-2.safetensors", "a": "model-1.safetensors", "c": "model-2.safetensors"}}
    cache_repo(hub, "org/hf", {"config.json": cfg, "model.safetensors.index.json": json.dumps(index).encode(),
                               "model-1.safetensors": b"1", "model-2.safetensors": b"2", "pytorch_model.bin": b"p"},
               commit=V1, refs=("v1",))
    cache_repo(hub, "org/hf", {"config.json": cfg, "pytorch_model.bin.index.json":
                               json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}).encode(),
                               "pytorch_model-1.bin": b"p1"}, commit=V2, refs=("v2",))
    cache_repo(hub, "org/hf", {"config.json": cfg}, commit="3" * 40, refs=("bare",))


def test_fetch_hf_weights_fetches_the_first_weights_only(hub, spy):
    _hf_repo(hub)
    assert _fetch_hf_weights("org/hf", None, "LBL") is None
    assert [c[1:3] for c in spy] == [("model.safetensors.index.json", None), ("model.safetensors", None)]


def test_fetch_hf_weights_fetches_every_shard_of_an_index(hub, spy):
    _hf_repo(hub)
    _fetch_hf_weights("org/hf", "v1", "LBL")
    assert [c[1:3] for c in spy] == [("model.safetensors.index.json", "v1"), ("model-1.safetensors", "v1"),
                                     ("model-2.safetensors", "v1")]
    spy.clear()
    _fetch_hf_weights("org/hf", "v2", "LBL")
    assert [c[1] for c in spy] == ["model.safetensors.index.json", "model.safetensors",
                                   "pytorch_model.bin.index.json", "pytorch_model-1.bin"]


def test_fetch_hf_weights_missing_shard_is_an_error(hub):
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    cache_repo(hub, "org/torn", {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
                                 "model-1.safetensors": b"1"}, commit=V1, refs=("v1",))
    e = _raises(_fetch_hf_weights, "org/torn", "v1", "LBL")
    assert str(e) == "LBL: model-2.safetensors " + _offline_tail(hub, "hf download org/torn --revision v1")


def test_fetch_hf_weights_none(hub, monkeypatch):
    _hf_repo(hub)
    e = _raises(_fetch_hf_weights, "org/hf", "bare", "LBL")
    assert str(e) == (f"LBL: no weights: the Hugging Face cache ({hub}) holds config.json but none of {HF_NONE} "
                      "(HF_HUB_OFFLINE=1: if the repository has more, fetch it where there is network: "
                      "`hf download org/hf --revision bare`); name a repository or file with the weights")
    monkeypatch.setattr(hub_module, "_offline", lambda: False)  # (the cache still answers: offline stays on)
    e = _raises(_fetch_hf_weights, "org/none", None, "LBL")  # online, the Hub's answer is "the repository has"
    assert str(e) == (f"LBL: no weights: the repository has config.json but none of {HF_NONE}; name a repository "
                      "or file with the weights")


# ---- _repo_files, _single_safetensors ------------------------------------------------------------------
def _export_repo(hub: Path) -> None:
    """org/exp: main → README + sub/w.safetensors; v1 → a.safetensors + b.safetensors; v2 → README only."""
    cache_repo(hub, "org/exp", {"README.md": b"r", "sub/w.safetensors": b"w"})
    cache_repo(hub, "org/exp", {"b.safetensors": b"b", "a.safetensors": b"a"}, commit=V1, refs=("v1",))
    cache_repo(hub, "org/exp", {"README.md": b"r2"}, commit=V2, refs=("v2",))


def test_repo_files_offline_lists_the_cached_snapshot(hub):
    _export_repo(hub)
    assert sorted(_repo_files("org/exp", None, "LBL")) == ["README.md", "sub/w.safetensors"]
    assert sorted(_repo_files("org/exp", "v1", "LBL")) == ["a.safetensors", "b.safetensors"]
    e = _raises(_repo_files, "org/missing", "v3", "LBL")
    assert str(e) == "LBL: the snapshot " + _offline_tail(hub, "hf download org/missing --revision v3")


def _fake_listing(monkeypatch, listing):
    """The Hub's file listing stood in for (``_offline`` patched: HF_HUB_OFFLINE stays on)."""
    calls = []

    def list_repo_files(self, repo_id, revision=None):
        calls.append((repo_id, revision))
        result = listing[(repo_id, revision)]
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(hub_module, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    return calls


def test_repo_files_online_asks_the_hub(hub, monkeypatch):
    calls = _fake_listing(monkeypatch, {
        ("org/x", "v1"): ["config.json", "w.safetensors"],
        ("org/x", "v9"): hf_errors.RevisionNotFoundError("x", response=_response(404)),
        ("org/x", "v8"): hf_errors.LocalEntryNotFoundError("x")})
    assert _repo_files("org/x", "v1", "LBL") == ["config.json", "w.safetensors"]
    assert str(_raises(_repo_files, "org/x", "v9", "LBL")) == (
        "LBL: the repository has no revision 'v9': name one of its branches, tags or commits")
    assert str(_raises(_repo_files, "org/x", "v8", "LBL")) == (
        "LBL: the list of files " + _offline_tail(hub, "hf download org/x --revision v8"))
    assert calls == [("org/x", "v1"), ("org/x", "v9"), ("org/x", "v8")]


def test_single_safetensors_the_one_file(hub):
    _export_repo(hub)
    assert _single_safetensors("org/exp", None, "LBL") == _snap(hub, "org/exp") + "/sub/w.safetensors"


def test_single_safetensors_several(hub):
    _export_repo(hub)
    e = _raises(_single_safetensors, "org/exp", "v1", "LBL")
    assert str(e) == (f"LBL: no checkpoint: the Hugging Face cache ({hub}) holds no config.json (HF model), no "
                      "open_clip_config.json (open_clip model) and 2 .safetensors files (a.safetensors, "
                      "b.safetensors) (HF_HUB_OFFLINE=1: if the repository has more, fetch it where there is "
                      "network: `hf download org/exp --revision v1`); download the one you mean (`hf download "
                      "org/exp --revision v1 FILE`) and pass its path")


def test_single_safetensors_none(hub):
    _export_repo(hub)
    e = _raises(_single_safetensors, "org/exp", "v2", "LBL")
    assert str(e) == (f"LBL: no checkpoint: the Hugging Face cache ({hub}) holds no config.json (HF model), no "
                      "open_clip_config.json (open_clip model) and no .safetensors file (HF_HUB_OFFLINE=1: if the "
                      "repository has more, fetch it where there is network: `hf download org/exp --revision v2`); "
                      "name a repository holding an HF, open_clip or adamerge checkpoint")


def test_single_safetensors_online(hub, monkeypatch, spy):
    """Online the Hub's listing decides; the one file is then fetched at that revision (here the cache, still
    offline, lacks it: the error names the label and the revision)."""
    _export_repo(hub)
    _fake_listing(monkeypatch, {("org/exp", "v2"): ["README.md", "x.SAFETENSORS", "w.safetensors"],
                                ("org/exp", "v1"): ["README.md"]})
    e = _raises(_single_safetensors, "org/exp", "v2", "LBL")
    assert str(e) == "LBL: w.safetensors " + _offline_tail(hub, "hf download org/exp --revision v2")
    assert spy == [("org/exp", "w.safetensors", "v2", "model")]
    e = _raises(_single_safetensors, "org/exp", "v1", "LBL")
    assert str(e) == ("LBL: no checkpoint: the repository has no config.json (HF model), no open_clip_config.json "
                      "(open_clip model) and no .safetensors file; name a repository holding an HF, open_clip or "
                      "adamerge checkpoint")


# ---- _fetch, _resolve, resolve_checkpoint, resolve_pretrained -------------------------------------------
def _mixed_repo(hub: Path) -> None:
    """org/mix: a different kind at each revision: main → one .safetensors export; v1 → an HF repo; v2 → an
    open_clip repo; bare → an HF config without weights; oc1 → an open_clip config without weights;
    none → a README."""
    cfg = b'{"model_type": "clip"}'
    cache_repo(hub, "org/mix", {"README.md": b"r", "export.safetensors": b"e"})
    cache_repo(hub, "org/mix", {"config.json": cfg, "model.safetensors": b"m"}, commit=V1, refs=("v1",))
    cache_repo(hub, "org/mix", {"open_clip_config.json": json.dumps(OC_CONFIG).encode(),
                                "open_clip_pytorch_model.bin": b"p"}, commit=V2, refs=("v2",))
    cache_repo(hub, "org/mix", {"config.json": cfg}, commit="3" * 40, refs=("bare",))
    cache_repo(hub, "org/mix", {"open_clip_config.json": json.dumps(OC_CONFIG).encode()}, commit="4" * 40,
               refs=("oc1",))
    cache_repo(hub, "org/mix", {"README.md": b"none"}, commit="5" * 40, refs=("none",))


def test_fetch_each_kind_at_its_revision(hub):
    _mixed_repo(hub)
    assert _fetch("org/mix", None, "LBL") == (_snap(hub, "org/mix") + "/export.safetensors", "file")
    assert _fetch("org/mix", "v1", "LBL") == (_snap(hub, "org/mix", V1), "hf")
    assert _fetch("org/mix", "v2", "LBL") == (_snap(hub, "org/mix", V2), "open_clip")


def test_fetch_not_cached(hub):
    e = _raises(_fetch, "org/none", "v2", "LBL")
    assert str(e) == (f"LBL: not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE=1 forbids downloading it: "
                      "fetch it where there is network (`hf download org/none --revision v2`) or unset "
                      "HF_HUB_OFFLINE")
    assert (e.missing, e.no_repo) == (True, True)


@pytest.mark.parametrize(("revision", "start"), [
    ("v9", ("LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/mix (cached: bare, main, none, oc1, "
           "v1, v2)")),
    ("bare", "LBL: no weights: the Hugging Face cache ({hub}) holds config.json but none of "),
    ("oc1", ("LBL: no open_clip weights (open_clip_model.safetensors or open_clip_pytorch_model.bin): LBL: "
            "open_clip_pytorch_model.bin is not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE=1 forbids "
            "downloading it: fetch it where there is network (`hf download org/mix --revision oc1`)")),
    ("none", ("LBL: no checkpoint: the Hugging Face cache ({hub}) holds no config.json (HF model), no "
             "open_clip_config.json (open_clip model) and no .safetensors file (HF_HUB_OFFLINE=1: if the repository "
             "has more, fetch it where there is network: `hf download org/mix --revision none`); name a repository")),
])
def test_fetch_errors_carry_the_label_and_revision(hub, revision, start):
    _mixed_repo(hub)
    e = _raises(_fetch, "org/mix", revision, "LBL")
    assert str(e).startswith(start.format(hub=hub))
    assert e.no_repo is False


def test_resolve_default_label_and_kinds(hub):
    _mixed_repo(hub)
    assert _resolve("org/mix@v1", None) == (_snap(hub, "org/mix", V1), "hf")
    assert _resolve("hf-hub:org/mix", "LBL") == (_snap(hub, "org/mix") + "/export.safetensors", "file")
    e = _raises(_resolve, "org/mix@v9", None)  # not "no repo": passed on as it is, labelled by the value
    assert str(e).startswith(f"org/mix@v9: the Hugging Face cache ({hub}) has no revision 'v9' of org/mix (")
    assert "nor is there" not in str(e)
    e = _raises(_resolve, "org/mix@v9", "LBL")
    assert str(e).startswith("LBL: the Hugging Face cache (")


def test_resolve_unknown_repository_adds_no_local_path_either(hub, tmp_path):
    e = _raises(_resolve, "org/none@v2", None)
    assert str(e) == (f"org/none@v2: not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE=1 forbids downloading "
                      "it: fetch it where there is network (`hf download org/none --revision v2`) or unset "
                      f"HF_HUB_OFFLINE; nor is there a local file or folder 'org/none@v2' (in {tmp_path}): check the "
                      "path if you meant one")
    assert (e.missing, e.no_repo) == (True, True)
    e = _raises(_resolve, "org/none", "LBL")
    assert str(e).startswith(f"LBL: not in the Hugging Face cache ({hub})")


def test_resolve_no_repo_without_missing_keeps_missing_false(hub, monkeypatch):
    """A HubError with no_repo but not missing (the Hub: no such repository) keeps missing False."""
    def fetch(repo, revision, label):
        raise HubError(f"{label}: gone", no_repo=True)

    monkeypatch.setattr(hub_module, "_fetch", fetch)
    e = _raises(_resolve, "org/gone", None)
    assert str(e).startswith("org/gone: gone; nor is there a local file or folder 'org/gone'")
    assert (e.missing, e.no_repo) == (False, True)


def test_resolve_checkpoint(hub, tmp_path):
    _mixed_repo(hub)
    local = tmp_path / "x.pt"
    assert resolve_checkpoint(local) is local
    assert resolve_checkpoint("ckpts/mnist.safetensors") == "ckpts/mnist.safetensors"
    assert resolve_checkpoint("org/mix") == _snap(hub, "org/mix") + "/export.safetensors"
    assert resolve_checkpoint("org/mix@v2", label="LBL") == _snap(hub, "org/mix", V2)
    e = _raises(resolve_checkpoint, "org/none", label="LBL")
    assert str(e).startswith(f"LBL: not in the Hugging Face cache ({hub})")
    assert str(_raises(resolve_checkpoint, "org/none")).startswith(f"org/none: not in the Hugging Face cache ({hub})")


@pytest.mark.parametrize("value", [None, "openai", "local-dir:/x", "hf-hub:org/mix", "ckpts/a.pt"])
def test_resolve_pretrained_leaves_tags_paths_and_plain_hf_hub_ids(hub, value):
    _mixed_repo(hub)
    assert resolve_pretrained(value) == value


def test_resolve_pretrained_by_repo_id(hub):
    _mixed_repo(hub)
    assert resolve_pretrained("hf-hub:org/mix@v2") == "local-dir:" + _snap(hub, "org/mix", V2)
    assert resolve_pretrained("org/mix@v2") == "local-dir:" + _snap(hub, "org/mix", V2)
    assert resolve_pretrained("org/mix@v1") == _snap(hub, "org/mix", V1)
    assert resolve_pretrained("org/mix") == _snap(hub, "org/mix") + "/export.safetensors"
    e = _raises(resolve_pretrained, "org/none")
    assert str(e).startswith(f"org/none: not in the Hugging Face cache ({hub})")


# ---- the labels of errors raised further in (the Hub's answers stood in for; HF_HUB_OFFLINE stays on) -----
def _fake_download(monkeypatch, answers):
    """hf_hub_download answering ``answers[filename]`` (an exception to raise) or else from the cache."""
    real = huggingface_hub.hf_hub_download

    def download(**kw):
        answer = answers.get(kw["filename"])
        if answer is not None:
            raise answer
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub_module, "_offline", lambda: False)


def test_fetch_passes_the_label_to_each_file_it_looks_for(hub, monkeypatch):
    """No config.json (the Hub says so), then a gated open_clip_config.json: the error is the label's."""
    _mixed_repo(hub)
    _fake_download(monkeypatch, {
        "config.json": hf_errors.RemoteEntryNotFoundError("x", response=_response(404)),
        "open_clip_config.json": hf_errors.GatedRepoError("x", response=_response(403))})
    e = _raises(_fetch, "org/mix", "v2", "LBL")
    assert str(e) == ("LBL: the repository is gated: accept its terms at https://huggingface.co/org/mix and set "
                      "HF_TOKEN (or `hf auth login`)")


def test_fetch_hf_weights_passes_the_label_and_revision_on(hub, monkeypatch):
    _hf_repo(hub)
    e = _raises(_fetch_hf_weights, "org/hf", "v9", "LBL")
    assert str(e).startswith(f"LBL: the Hugging Face cache ({hub}) has no revision 'v9' of org/hf (cached: ")
    bad = {"config.json": b"{}", "model.safetensors.index.json": b"[]"}
    cache_repo(hub, "org/badindex", bad, commit=V1, refs=("v1",))
    e = _raises(_fetch_hf_weights, "org/badindex", "v1", "LBL")
    assert str(e) == ("LBL: model.safetensors.index.json is no readable weight index (TypeError: list indices must "
                      "be integers or slices, not str); the repository's sharded weights cannot be found")
    _fake_download(monkeypatch, {"model.safetensors.index.json":
                                 hf_errors.RevisionNotFoundError("x", response=_response(404))})
    e = _raises(_fetch_hf_weights, "org/hf", "v7", "LBL")
    assert str(e) == "LBL: the repository has no revision 'v7': name one of its branches, tags or commits"


def test_single_safetensors_passes_the_label_to_the_listing(hub):
    e = _raises(_single_safetensors, "org/missing", "v3", "LBL")
    assert str(e) == "LBL: the snapshot " + _offline_tail(hub, "hf download org/missing --revision v3")


def test_fetch_open_clip_at_main_has_no_revision_in_its_id(hub):
    """At main (revision None) the open_clip folder is looked up as the bare repo, not as 'org/oc2@None'."""
    cache_repo(hub, "org/oc2", {"open_clip_config.json": json.dumps(OC_CONFIG).encode(),
                                "open_clip_model.safetensors": b"st"})
    assert _fetch("org/oc2", None, "LBL") == (_snap(hub, "org/oc2"), "open_clip")
