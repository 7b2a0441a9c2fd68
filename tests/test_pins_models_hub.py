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

import huggingface_hub
import open_clip
import pytest
from hub_pins import OC_CONFIG, V1, V2, _offline_tail, _raises, _response, _snap, _two_revisions
from hubcache import cache_repo
from huggingface_hub import errors as hf_errors

from adamerge.models import hub as hub_module
from adamerge.models.hub import (
    HubError,
    _cache_folder,
    _check_cached_revision,
    _download_hint,
    _offline,
    hub_file,
    hub_open_clip_config,
    hub_open_clip_dir,
    hub_snapshot,
    hub_tag_weights,
    hub_weights,
    is_repo_id,
    parse_ref,
)


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


def test_hub_open_clip_config_is_read_as_utf8_whatever_the_locale(hub, c_locale):
    config = {**OC_CONFIG, "note": "café"}
    cache_repo(hub, "org/ocu", {"open_clip_config.json": json.dumps(config, ensure_ascii=False).encode("utf-8")})
    assert hub_open_clip_config("org/ocu") == config


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


def test_hub_tag_weights_without_open_clips_safe_alternatives(tags, monkeypatch):
    """An open_clip without ``pretrained._get_safe_alternatives`` (older releases): the named file alone is
    fetched, though a safetensors alternative is cached too."""
    monkeypatch.delattr(open_clip.pretrained, "_get_safe_alternatives")
    cache_repo(tags, "org/tagrepo", {"pytorch_model.safetensors": b"st", "pytorch_model.bin": b"pt"})
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
