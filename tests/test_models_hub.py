"""Models by Hub id, read from a Hugging Face cache laid out on disk in huggingface_hub's real format
(:mod:`hubcache`) with ``HF_HUB_OFFLINE=1``: open_clip repositories (``hf-hub:org/name[@rev]`` or a plain
``org/name``), HF ``CLIPModel`` / ``CLIPVisionModel`` repositories by ``org/name[@rev]`` (FusionBench's
``openai/clip-vit-base-patch32`` and ``tanganke/clip-vit-base-patch32_<task>``), and every way one fails.

huggingface_hub reads ``HF_HOME`` / ``HF_HUB_OFFLINE`` when it is imported, so the loading runs in two
fresh interpreters with that environment (module-scoped fixtures, each doing many checks), as a user's
run would; nothing of the loading is mocked. The weights they load are written to files and compared
here, exactly, with tensors computed from the open_clip models the repositories were made from.
"""

from __future__ import annotations

import io
import json

import open_clip
import pytest
import torch
from hubcache import COMMIT, TINY_CFG, cache_repo, hf_clip_files, hf_vision_files, run_offline
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from adamerge.models.hub import HubError, is_repo_id, parse_ref

V2 = "fedcba9876543210fedcba9876543210fedcba98"  # the commit of every repo's tag v2
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
# task → how the pool names its expert (one of each kind of repository)
EXPERTS = {
    "digits": "tanganke-test/tiny_digits",          # CLIPVisionModel: config.json + model.safetensors
    "rev_main": "tanganke-test/tiny_rev",           # the same repo at main ...
    "rev_v2": "tanganke-test/tiny_rev@v2",          # ... at the tag v2
    "rev_commit": f"tanganke-test/tiny_rev@{V2}",   # ... at v2's commit hash
    "bin": "tanganke-test/tiny_bin",                # pytorch_model.bin only
    "both": "tanganke-test/tiny_both",              # model.safetensors and a different pytorch_model.bin
    "shards": "tanganke-test/tiny_shards",          # model.safetensors.index.json + two shards
    "export": "adamerge-test/export",               # one adamerge export .safetensors and a README
    "open_clip": "adamerge-test/tiny-clip@v2",      # an open_clip repository at a tag
}


def _torch_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _tiny_clip(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model("tiny").eval()


def _open_clip_files(clip: torch.nn.Module) -> dict[str, bytes]:
    config = json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": PREPROCESS}).encode()
    return {"open_clip_config.json": config,
            "open_clip_model.safetensors": save_bytes({k: v.contiguous() for k, v in clip.state_dict().items()})}


def _sharded(files: dict[str, bytes]) -> dict[str, bytes]:
    """An HF repo's model.safetensors split in two shards with transformers' index."""
    state = load_bytes(files["model.safetensors"])
    keys = sorted(state)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    out = {"config.json": files["config.json"],
           "model.safetensors.index.json": json.dumps(
               {"metadata": {}, "weight_map": {k: n for n, part in zip(names, parts) for k in part}}).encode()}
    out.update({n: save_bytes({k: state[k] for k in part}) for n, part in zip(names, parts)})
    return out


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HOME with a cache of tiny repos; returns (home, θ_0 CLIP, its v2, expected τ per task)."""
    home = tmp_path_factory.mktemp("hf_home")
    (home / "tiny.json").write_text(json.dumps(TINY_CFG))
    (home / "tiny-gelu.json").write_text(json.dumps({**TINY_CFG, "quick_gelu": False}))
    open_clip.add_model_config(home / "tiny.json")
    clip, clip_v2 = _tiny_clip(0), _tiny_clip(1)
    base = {k: v.detach() for k, v in clip.visual.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    # fine-tuned experts: θ_0 + noise everywhere but proj (a CLIPVisionModel repo keeps none: θ_0's is used)
    experts = {t: {k: v if k == "proj" else v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for t in ("digits", "rev_main", "rev_v2", "bin", "both", "shards", "export", "decoy")}
    hub = home / "hub"
    cache_repo(hub, "adamerge-test/tiny-clip", _open_clip_files(clip))
    cache_repo(hub, "adamerge-test/tiny-clip", _open_clip_files(clip_v2), commit=V2, refs=("v2",))
    cache_repo(hub, "adamerge-test/no-weights", {"open_clip_config.json": _open_clip_files(clip)["open_clip_config.json"]})
    cache_repo(hub, "openai-test/clip-vit-tiny", hf_clip_files(clip))
    cache_repo(hub, "tanganke-test/tiny_digits", hf_vision_files(experts["digits"]))
    cache_repo(hub, "tanganke-test/tiny_rev", hf_vision_files(experts["rev_main"]))
    cache_repo(hub, "tanganke-test/tiny_rev", hf_vision_files(experts["rev_v2"]), commit=V2, refs=("v2",))
    as_bin = hf_vision_files(experts["bin"])
    cache_repo(hub, "tanganke-test/tiny_bin", {"config.json": as_bin["config.json"],
                                               "pytorch_model.bin": _torch_bytes(load_bytes(as_bin["model.safetensors"]))})
    decoy = load_bytes(hf_vision_files(experts["decoy"])["model.safetensors"])
    cache_repo(hub, "tanganke-test/tiny_both", {**hf_vision_files(experts["both"]), "pytorch_model.bin": _torch_bytes(decoy)})
    cache_repo(hub, "tanganke-test/tiny_shards", _sharded(hf_vision_files(experts["shards"])))
    full = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    full.update({f"visual.{k}": v.contiguous() for k, v in experts["export"].items()})
    meta = {"format": "open_clip", "producer": "adamerge", "activation": "quick_gelu"}
    cache_repo(hub, "adamerge-test/export", {"merged.safetensors": save_bytes(full, meta), "README.md": b"# merged"})
    cache_repo(hub, "tanganke-test/config-only", {"config.json": as_bin["config.json"]})
    cache_repo(hub, "tanganke-test/readme-only", {"README.md": b"# nothing here"})
    expected = {t: {k: experts[t][k] - base[k] for k in base} for t in experts if t != "decoy"}
    expected["rev_commit"] = expected["rev_v2"]
    expected["open_clip"] = {k: v.detach() - base[k] for k, v in clip_v2.visual.state_dict().items()}
    return home, clip, clip_v2, expected


_PRELUDE = """
import os
from pathlib import Path

import huggingface_hub
import open_clip
from safetensors.torch import save_file

HOME = Path(os.environ["HF_HOME"])
OUT = HOME / "out"
OUT.mkdir(exist_ok=True)
open_clip.add_model_config(HOME / "tiny.json")
open_clip.add_model_config(HOME / "tiny-gelu.json")
requested = []  # (repo, file, revision) of every file asked of huggingface_hub
_download = huggingface_hub.hf_hub_download
def _recording(*args, **kwargs):
    requested.append([kwargs["repo_id"], kwargs["filename"], kwargs.get("revision")])
    return _download(*args, **kwargs)
huggingface_hub.hf_hub_download = _recording

def save(name, state):
    save_file({k: v.detach().contiguous() for k, v in state.items()}, OUT / f"{name}.safetensors")

from adamerge.models.hub import HubError
from adamerge.models.open_clip_pool import OpenCLIPPool, load_clip, model_config_of
INFO = {t: {"classnames": ["zero", "one"], "templates": ["a photo of {}."]} for t in EXPERTS}
"""

_LOADING = """
import PIL.Image
from adamerge.data.imagefolder import open_clip_preprocess

pool = OpenCLIPPool("tiny", "openai-test/clip-vit-tiny", EXPERTS, task_info=INFO)
save("pretrained", pool.clip.state_dict())
for task, tau in pool.task_vectors():
    save(f"tau_{task}", tau)
out["identity"], out["name"] = pool.identity, pool.model_name
out["repr"] = {t: repr(pool._experts[t]) for t in EXPERTS}
out["requested"] = requested

for name, pretrained in {"oc_by_id": ("tiny", "adamerge-test/tiny-clip"),
                         "oc_v2": ("hf-hub:adamerge-test/tiny-clip@v2", None),
                         "oc_hub": ("hf-hub:adamerge-test/tiny-clip", None)}.items():
    clip, _, identity = load_clip(*pretrained)
    save(name, clip.state_dict())
    model, cfg = model_config_of(*pretrained)
    out[name] = {"identity": identity, "model": model, "quick_gelu": cfg.get("quick_gelu")}
image = PIL.Image.new("RGB", (40, 30))
out["size"] = list(open_clip_preprocess("hf-hub:adamerge-test/tiny-clip")(image).shape)
out["size_v2"] = list(open_clip_preprocess("hf-hub:adamerge-test/tiny-clip@v2")(image).shape)
"""

_FAILING = """
from adamerge.models.hub import resolve_checkpoint

def attempt(case, make):
    requested.clear()
    try:
        make()
        out[case] = "loaded"
    except Exception as e:  # what a user would read
        out[case] = f"{type(e).__name__}: {e}"
    out[case + "/requested"] = list(requested)

def pool(expert, model="tiny"):
    return lambda: OpenCLIPPool(model, None, {"digits": expert}, task_info=INFO)

attempt("not_cached", pool("tanganke-test/elsewhere"))
attempt("no_weights", pool("tanganke-test/config-only"))
attempt("no_checkpoint", pool("tanganke-test/readme-only"))
attempt("bad_revision", pool("tanganke-test/tiny_rev@v9"))
attempt("typo_file", pool("ckpts/mnist_typo.safetensors"))
attempt("expert_gelu", pool("tanganke-test/tiny_digits", model="tiny-gelu"))
attempt("pretrained_gelu", lambda: load_clip("tiny-gelu", "openai-test/clip-vit-tiny"))
attempt("pretrained_not_cached", lambda: load_clip("tiny", "openai-test/clip-vit-huge"))
attempt("hub_bad_revision", lambda: load_clip("hf-hub:adamerge-test/tiny-clip@v9", None))
attempt("hub_not_cached", lambda: load_clip("hf-hub:adamerge-test/elsewhere", None))
attempt("hub_no_weights", lambda: load_clip("hf-hub:adamerge-test/no-weights", None))
attempt("hub_bad_id", lambda: load_clip("hf-hub:nope", None))
attempt("hub_both", lambda: load_clip("hf-hub:adamerge-test/tiny-clip", "openai"))
attempt("resolve_path", lambda: out.__setitem__("resolved_path", resolve_checkpoint("ckpts/x.safetensors")))
"""


@pytest.fixture(scope="module")
def loaded(hub_cache):
    home = hub_cache[0]
    return run_offline(home, f"EXPERTS = {EXPERTS!r}\n" + _PRELUDE + _LOADING), home / "out"


@pytest.fixture(scope="module")
def failed(hub_cache):
    return run_offline(hub_cache[0], f"EXPERTS = {EXPERTS!r}\n" + _PRELUDE + _FAILING)


def _assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert torch.equal(got[k], w.to(got[k].dtype)), k


# ---- ids -----------------------------------------------------------------------------------------
def test_parse_ref_splits_repo_and_revision_and_names_a_malformed_spec():
    assert parse_ref("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", None)
    assert parse_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_ref("hf-hub:org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_ref(f"org/my_model.v2@{V2}") == ("org/my_model.v2", V2)
    for bad, form in [("org/name@", "<org>/<name> or <org>/<name>@<revision>"), ("a/b/c", "<org>/<name> or"),
                      ("org/-name", "<org>/<name> or"), ("org/na--me", "<org>/<name> or"),
                      ("hf-hub:x@v1", "hf-hub:<org>/<name> or hf-hub:<org>/<name>@<revision>")]:
        with pytest.raises(HubError) as e:
            parse_ref(bad)
        assert str(e.value).startswith(f"{bad!r}: a Hub id is {form}"), str(e.value)
    with pytest.raises(HubError, match=r"^'hf-hub:nope': a Hub id is hf-hub:<org>/<name>$"):
        parse_ref("hf-hub:nope")


def test_is_repo_id_tells_ids_from_paths_and_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts" / "mnist").mkdir(parents=True)
    for repo_id in ("openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_mnist@v1.0",
                    "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ckpts/eurosat"):  # a missing folder too
        assert is_repo_id(repo_id), repo_id
    for other in ("openai", "laion2b_s34b_b79k", "ckpts/mnist", "ckpts/mnist_typo.safetensors", "org/model.bin",
                  "./org/name", "/org/name", "~/org/name", "a/b/c", "org/na me", tmp_path / "x", None):
        assert not is_repo_id(other), other


# ---- loading by id -------------------------------------------------------------------------------
def test_pretrained_by_hf_clip_model_id_loads_the_open_clip_weights_it_was_made_from(hub_cache, loaded):
    _, clip, _, _ = hub_cache
    out, files = loaded
    _assert_equal_states(load_file(files / "pretrained.safetensors"), clip.state_dict())
    assert out["identity"] == "tiny:openai-test/clip-vit-tiny" and out["name"] == "tiny"


def test_experts_by_id_give_the_task_vectors_of_their_weights(hub_cache, loaded):
    """Every kind of repository (vision-only, .bin only, sharded, both formats, an export, an open_clip
    one) and every revision form gives τ = expert − θ_0 exactly; @v2 and v2's commit pick the tag's weights."""
    expected = hub_cache[3]
    out, files = loaded
    assert set(expected) == set(EXPERTS)
    for task in EXPERTS:
        _assert_equal_states(load_file(files / f"tau_{task}.safetensors"), expected[task])
    assert not torch.equal(expected["rev_main"]["conv1.weight"], expected["rev_v2"]["conv1.weight"])
    assert out["repr"]["rev_v2"] == "ExpertFile('tanganke-test/tiny_rev@v2')"  # the id, not the cache path


def test_only_the_files_a_loader_reads_are_fetched(loaded):
    requested = loaded[0]["requested"]

    def asked(repo, revision=None):
        return [f for r, f, rev in requested if r == repo and rev == revision]

    # safetensors first: the .bin of a repo holding both is never fetched; an index brings its shards
    assert asked("tanganke-test/tiny_both") == ["config.json", "model.safetensors.index.json", "model.safetensors"]
    assert asked("tanganke-test/tiny_bin") == ["config.json", "model.safetensors.index.json", "model.safetensors",
                                               "pytorch_model.bin.index.json", "pytorch_model.bin"]
    assert asked("tanganke-test/tiny_shards") == ["config.json", "model.safetensors.index.json",
                                                  "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert asked("tanganke-test/tiny_rev", "v2") == ["config.json", "model.safetensors.index.json", "model.safetensors"]
    assert asked("adamerge-test/export")[-1] == "merged.safetensors"


def test_open_clip_repositories_by_id_and_revision(hub_cache, loaded):
    _, clip, clip_v2, _ = hub_cache
    out, files = loaded
    for name, want in (("oc_by_id", clip), ("oc_v2", clip_v2), ("oc_hub", clip)):
        _assert_equal_states(load_file(files / f"{name}.safetensors"), want.state_dict())
        assert out[name]["quick_gelu"] is True
    assert out["oc_by_id"] == {"identity": "adamerge-test/tiny-clip", "model": "hf-hub:adamerge-test/tiny-clip",
                               "quick_gelu": True}
    assert out["oc_v2"]["identity"] == out["oc_v2"]["model"] == "hf-hub:adamerge-test/tiny-clip@v2"
    assert out["oc_hub"]["identity"] == out["oc_hub"]["model"] == "hf-hub:adamerge-test/tiny-clip"
    assert out["size"] == out["size_v2"] == [3, 16, 16]  # the repo's image size


# ---- failures ------------------------------------------------------------------------------------
def test_an_id_neither_cached_nor_a_local_file_says_both_and_how_to_fetch_it(hub_cache, failed):
    home = hub_cache[0]
    msg = failed["not_cached"]
    assert msg.startswith("HubError: expert for task 'digits': tanganke-test/elsewhere: not in the Hugging Face "
                          f"cache ({home / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it"), msg
    assert "`hf download tanganke-test/elsewhere`" in msg
    assert "nor is there a local file or folder 'tanganke-test/elsewhere'" in msg
    assert failed["pretrained_not_cached"].startswith("HubError: openai-test/clip-vit-huge: not in the Hugging Face")
    assert "nor is there a local file or folder 'openai-test/clip-vit-huge'" in failed["pretrained_not_cached"]


def test_a_repository_without_weights_or_checkpoint_is_named(hub_cache, failed):
    home = hub_cache[0]
    msg = failed["no_weights"]
    assert msg.startswith(f"HubError: expert for task 'digits': tanganke-test/config-only: no weights: the Hugging "
                          f"Face cache ({home / 'hub'}) holds config.json but none of model.safetensors.index.json, "
                          "model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin (HF_HUB_OFFLINE=1: "), msg
    assert msg.endswith("`hf download tanganke-test/config-only`); name a repository or file with the weights")
    assert "local file" not in msg  # the repository exists
    msg = failed["no_checkpoint"]
    assert msg.startswith(f"HubError: expert for task 'digits': tanganke-test/readme-only: no checkpoint: the Hugging "
                          f"Face cache ({home / 'hub'}) holds no config.json (HF model), no open_clip_config.json "
                          "(open_clip model) and no .safetensors file"), msg


def test_a_revision_the_cache_lacks_is_named_with_the_cached_ones(failed):
    msg = failed["bad_revision"]
    assert msg.startswith("HubError: expert for task 'digits': tanganke-test/tiny_rev@v9: the Hugging Face cache ("), msg
    assert "has no revision 'v9' of tanganke-test/tiny_rev (cached: main, v2)" in msg
    assert "`hf download tanganke-test/tiny_rev --revision v9`" in msg
    assert failed["hub_bad_revision"].startswith("HubError: hf-hub:adamerge-test/tiny-clip@v9: the Hugging Face cache")
    assert "no revision 'v9' of adamerge-test/tiny-clip (cached: main, v2)" in failed["hub_bad_revision"]


def test_a_mistyped_checkpoint_file_is_not_found_without_asking_the_hub(failed):
    assert failed["typo_file"] == ("CheckpointError: expert for task 'digits': checkpoint not found: "
                                   "ckpts/mnist_typo.safetensors")
    assert failed["typo_file/requested"] == []
    assert failed["resolved_path"] == "ckpts/x.safetensors" and failed["resolve_path/requested"] == []


def test_hf_quick_gelu_repositories_refuse_a_gelu_model(failed):
    msg = failed["pretrained_gelu"]
    assert msg.startswith("ActivationMismatchError: pretrained 'openai-test/clip-vit-tiny': "), msg
    assert f"snapshots/{COMMIT}: config.json hidden_act='quick_gelu', so it needs QuickGELU, but open_clip model " \
           "'tiny-gelu' runs GELU" in msg
    msg = failed["expert_gelu"]
    assert msg.startswith("ActivationMismatchError: expert for task 'digits' 'tanganke-test/tiny_digits': "), msg
    assert "hidden_act='quick_gelu', so it needs QuickGELU" in msg


def test_each_way_an_hf_hub_id_can_fail_names_the_id_and_what_to_do(hub_cache, failed):
    home = hub_cache[0]
    msg = failed["hub_not_cached"]
    assert msg.startswith("HubError: hf-hub:adamerge-test/elsewhere: open_clip_config.json is not in the "
                          "Hugging Face cache"), msg
    assert "HF_HUB_OFFLINE=1" in msg and "`hf download adamerge-test/elsewhere`" in msg
    assert msg.count(str(home / "hub")) == 1  # where it looked
    assert failed["hub_no_weights"].startswith("HubError: hf-hub:adamerge-test/no-weights: no open_clip weights "
                                               "(open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    assert failed["hub_bad_id"] == "HubError: 'hf-hub:nope': a Hub id is hf-hub:<org>/<name>"
    assert failed["hub_both"].startswith("ValueError: pretrained='openai' with model_name='hf-hub:adamerge-test/tiny-clip'")
