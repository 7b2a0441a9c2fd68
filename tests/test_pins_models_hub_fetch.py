"""Pins of adamerge.models.hub, in process (issue #17), second half: checkpoints by repo id (shards, indexes,
the first weights found), file listings, and ``_fetch`` / ``_resolve`` / ``resolve_checkpoint`` /
``resolve_pretrained`` with the labels their errors carry. The cache and the Hub are stood in for as in
tests/test_pins_models_hub.py (helpers in tests/hub_pins.py, fixtures in tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from hub_pins import HF_NONE, OC_CONFIG, V1, V2, _offline_tail, _raises, _response, _snap, _two_revisions
from hubcache import cache_repo
from huggingface_hub import errors as hf_errors

from adamerge.models import hub as hub_module
from adamerge.models.hub import (
    HubError,
    _fetch,
    _fetch_hf_weights,
    _holds,
    _optional,
    _repo_files,
    _resolve,
    _shards,
    _single_safetensors,
    resolve_checkpoint,
    resolve_pretrained,
)


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


def test_shards_reads_the_index_as_utf8_whatever_the_locale(tmp_path, c_locale):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"é": "s-1.st"}}, ensure_ascii=False), encoding="utf-8")
    assert _shards(str(index), "LBL") == ["s-1.st"]


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


_NO_CHECKPOINT = ("LBL: no checkpoint: the Hugging Face cache ({hub}) holds no config.json (HF model), no "
                  "open_clip_config.json (open_clip model) and {found} (HF_HUB_OFFLINE=1: if the repository has "
                  "more, fetch it where there is network: `hf download org/exp --revision {rev}`); {then}")


@pytest.mark.parametrize(("rev", "found", "then"), [
    ("v1", "2 .safetensors files (a.safetensors, b.safetensors)",
     "download the one you mean (`hf download org/exp --revision v1 FILE`) and pass its path"),
    ("v2", "no .safetensors file", "name a repository holding an HF, open_clip or adamerge checkpoint"),
], ids=["several", "none"])
def test_single_safetensors_several_or_none(hub, rev, found, then):
    _export_repo(hub)
    e = _raises(_single_safetensors, "org/exp", rev, "LBL")
    assert str(e) == _NO_CHECKPOINT.format(hub=hub, found=found, rev=rev, then=then)


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
