"""A Hugging Face Hub cache laid out on disk in huggingface_hub's real format, for offline tests.

Layout (what ``hf_hub_download`` / ``snapshot_download`` write and read)::

    <HF_HOME>/hub/models--org--name/
        refs/main                     the commit hash of the branch
        refs/<tag>                    (optional) another ref
        blobs/<sha256 of the file>    the bytes
        snapshots/<commit>/<file>     relative symlinks to the blobs
    <HF_HOME>/hub/datasets--org--name/   the same for dataset repositories

Builders for the tiny repos the tests serve from it:

* :func:`hf_clip_files`: an HF ``CLIPModel`` repo (``config.json`` + ``model.safetensors`` in
  transformers' key layout), made from an open_clip CLIP by the inverse of adamerge's conversion,
  written independently here (q/k/v split, projections transposed);
* :func:`hf_vision_files`: an HF ``CLIPVisionModel`` repo (FusionBench's experts: ``vision_model.*``
  only, no projection);
* :func:`parquet_split`: one parquet shard in the ``datasets`` library's form (an ``image`` struct of
  PNG bytes and path, an integer ``label``, the ``huggingface`` schema metadata with the features).

huggingface_hub reads ``HF_HOME`` / ``HF_HUB_OFFLINE`` at import, so code that reads such a cache runs in
a fresh interpreter (:func:`run_offline`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# A tiny open_clip architecture (register it with open_clip.add_model_config(path_of_a_json_of_it)).
TINY_CFG = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def cache_repo(hub: str | os.PathLike, repo: str, files: Mapping[str, bytes], repo_type: str = "model",
               commit: str = COMMIT, refs: Sequence[str] = ("main",)) -> Path:
    """Put ``files`` (path in the repo → bytes) in the cache at ``hub`` as commit ``commit`` of ``repo``,
    pointed to by ``refs``; returns the snapshot folder. Called again with another commit, it adds it."""
    base = Path(hub) / f"{repo_type}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


# ---- HF CLIP repos ------------------------------------------------------------------------------------
def _tower_to_hf(state: Mapping[str, torch.Tensor], prefix: str, hf: str) -> dict[str, torch.Tensor]:
    """open_clip ``transformer.resblocks.*`` of one tower → HF ``<hf>encoder.layers.*``."""
    out = {}
    names = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, t in state.items():
        if not key.startswith(prefix + "transformer.resblocks."):
            continue
        i, rest = key[len(prefix + "transformer.resblocks."):].split(".", 1)
        layer = f"{hf}encoder.layers.{i}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            for part, chunk in zip("qkv", t.chunk(3), strict=True):
                out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.clone()
            continue
        module, leaf = rest.rsplit(".", 1)
        out[layer + names[module] + "." + leaf] = t.clone()
    return out


def _vision_to_hf(visual: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    v = "vision_model."
    out = {v + "embeddings.class_embedding": visual["class_embedding"],
           v + "embeddings.patch_embedding.weight": visual["conv1.weight"],
           v + "embeddings.position_embedding.weight": visual["positional_embedding"],
           v + "pre_layrnorm.weight": visual["ln_pre.weight"], v + "pre_layrnorm.bias": visual["ln_pre.bias"],
           v + "post_layernorm.weight": visual["ln_post.weight"], v + "post_layernorm.bias": visual["ln_post.bias"]}
    out.update(_tower_to_hf(visual, "", v))
    return {k: t.clone().contiguous() for k, t in out.items()}


def _vision_config(cfg: Mapping) -> dict:
    vc = cfg["vision_cfg"]
    return {"model_type": "clip_vision_model", "hidden_size": vc["width"], "image_size": vc["image_size"],
            "patch_size": vc["patch_size"], "num_hidden_layers": vc["layers"],
            "num_attention_heads": vc["width"] // vc["head_width"], "intermediate_size": 4 * vc["width"],
            "projection_dim": cfg["embed_dim"], "hidden_act": "quick_gelu" if cfg.get("quick_gelu") else "gelu"}


def hf_clip_files(clip: torch.nn.Module, cfg: Mapping = TINY_CFG) -> dict[str, bytes]:
    """An HF ``CLIPModel`` repository (config.json + model.safetensors) holding open_clip's ``clip``."""
    s = {k: t.detach() for k, t in clip.state_dict().items()}
    state = _vision_to_hf({k[len("visual."):]: t for k, t in s.items() if k.startswith("visual.")})
    state["visual_projection.weight"] = s["visual.proj"].t().contiguous()
    tm = "text_model."
    state.update({tm + "embeddings.token_embedding.weight": s["token_embedding.weight"].clone(),
                  tm + "embeddings.position_embedding.weight": s["positional_embedding"].clone(),
                  tm + "final_layer_norm.weight": s["ln_final.weight"].clone(),
                  tm + "final_layer_norm.bias": s["ln_final.bias"].clone(),
                  "text_projection.weight": s["text_projection"].t().contiguous(),
                  "logit_scale": s["logit_scale"].clone()})
    state.update(_tower_to_hf({k: t for k, t in s.items() if k.startswith("transformer.")}, "", tm))
    tc = cfg["text_cfg"]
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg["embed_dim"],
              "vision_config": _vision_config(cfg),
              "text_config": {"model_type": "clip_text_model", "hidden_size": tc["width"],
                              "num_hidden_layers": tc["layers"], "num_attention_heads": tc["heads"],
                              "vocab_size": tc["vocab_size"], "max_position_embeddings": tc["context_length"],
                              "hidden_act": "quick_gelu" if cfg.get("quick_gelu") else "gelu"}}
    return {"config.json": json.dumps(config).encode(),
            "model.safetensors": save_bytes({k: t.contiguous() for k, t in state.items()}, {"format": "pt"})}


def hf_vision_files(visual_state: Mapping[str, torch.Tensor], cfg: Mapping = TINY_CFG) -> dict[str, bytes]:
    """An HF ``CLIPVisionModel`` repository (FusionBench's expert form: ``vision_model.*``, no projection)."""
    config = {"architectures": ["CLIPVisionModel"], **_vision_config(cfg)}
    return {"config.json": json.dumps(config).encode(),
            "model.safetensors": save_bytes(_vision_to_hf({k: t.detach() for k, t in visual_state.items()}),
                                            {"format": "pt"})}


# ---- parquet datasets ---------------------------------------------------------------------------------
def png(seed: int, size: int = 20, mode: str = "RGB") -> bytes:
    """A small random PNG (deterministic in ``seed``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def parquet_split(images: Sequence[bytes], labels: Sequence[int], classnames: Sequence[str] | None = None,
                  row_group_size: int = 4, image_column: str = "image", label_column: str = "label") -> bytes:
    """One parquet shard as the ``datasets`` library writes it: ``image`` {bytes, path} structs, an
    int64 ``label``, and the features (``Image``, ``ClassLabel`` with ``classnames`` if given) in the
    ``huggingface`` schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({image_column: pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                                             type=image_type),
                      label_column: pa.array(list(labels), type=pa.int64())})
    label_feature = ({"names": list(classnames), "_type": "ClassLabel"} if classnames is not None
                     else {"dtype": "int64", "_type": "Value"})
    features = {image_column: {"_type": "Image"}, label_column: label_feature}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


# ---- running code against the cache -----------------------------------------------------------------
def offline_env(home: str | os.PathLike) -> dict[str, str]:
    """The environment of a run that reads only the cache at ``home``."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN"):
        env.pop(key, None)
    return env


def run_offline(home: str | os.PathLike, body: str, timeout: int = 300) -> dict:
    """Run ``body`` (Python that fills the dict ``out``) in a fresh interpreter reading the cache at
    ``home`` offline; returns ``out`` (JSON round-tripped). A failing body fails with its stderr."""
    script = "import json\nout = {}\n" + textwrap.dedent(body) + "\nprint('RESULT' + json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", script], env=offline_env(home), cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
