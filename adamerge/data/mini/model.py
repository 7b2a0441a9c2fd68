"""Presets of the mini benchmark and its small open_clip CLIP (a custom model config).

The model is a real ``open_clip.CLIP`` built from a config dict; the config is saved as JSON next to
the weights, so ``open_clip.add_model_config(json_path)`` then
``open_clip.create_model(name, pretrained=weights)`` loads it back anywhere (see
:meth:`MiniBenchmark.clip_model`).

How the ``default`` preset was chosen (seed 0, ``benchmarks/mini_regime.py``; the papers' regime is
zero-shot ≥ 20 below the experts, task arithmetic ≥ zero-shot + 5 and ≥ 8 below the experts,
layer-wise AdaMerging above task arithmetic). Model and schedule are the second prototype's (28 px,
ViT width 192 × 4 layers, 1000 × 256 pretraining, experts 250 × 64 at lr 3e-4 with the embeddings
frozen). The lever is how much of each coloured domain the pretraining sees:

=========================================  =========  =======  ==========  ============
domain slices in pretraining               zero-shot  experts  TA (val λ)  AdaMerging
=========================================  =========  =======  ==========  ============
300 images each, 20 % of every batch       87.1       89.9     87.7        87.6
100 images each, 10 %                      78.3       88.4     81.7        82.0
40 images each, 5 %                        67.5       87.3     78.3        79.6
40 images each, 5 %, 400 grey MNIST        66.3       87.4     76.5        77.6
**25 images each, 4 % (default)**          64.0       88.2     76.7        77.3
=========================================  =========  =======  ==========  ============

Seeing a domain a lot in pretraining makes zero-shot as good as the experts (nothing left to merge);
seeing it a little leaves a gap that task vectors close by half, as in the papers. The earlier
smaller model (21 px, width 144, 500 × 128 pretraining, 60 images at 10 %) had a gap too, but its
task vectors interfered so much that task arithmetic only tied zero-shot: model scale is what makes
the task vectors add up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import open_clip
import torch
import torch.nn.functional as F

__all__ = ["MiniConfig", "PRESETS", "get_preset", "model_config", "create_clip", "zero_shot_head",
           "config_hash"]


@dataclass(frozen=True)
class MiniConfig:
    """Everything that determines a mini-benchmark build (hashed into the cache key).

    Args:
        image_size: side of the rendered images (sources are 28x28 / 8x8).
        vision: open_clip ``vision_cfg`` (width, layers, patch_size, head_width, mlp_ratio).
        text: open_clip ``text_cfg`` (context_length, width, heads, layers; the vocabulary is CLIP's).
        embed_dim: joint embedding size.
        init_logit_scale: log of the initial logit scale (log 100: findings of the prototypes).
        n_train / n_val / n_test: images per task and split (disjoint).
        n_slice: images per non-grey domain in the pretraining mix (captioned with the task's names).
        n_pre_fashion / n_pre_mnist: upright grey pretraining images with rich captions.
        slice_frac: share of every pretraining batch drawn from the domain slices.
        pre_steps / pre_batch / pre_lr / pre_wd / pre_warmup: CLIP pretraining (AdamW, cosine).
        ft_steps / ft_batch / ft_lr / ft_wd / ft_warmup: expert fine-tuning (AdamW, cosine).
        ft_freeze: vision parameters kept frozen while fine-tuning (prefixes of state-dict keys).
        split_seed: seed of the data splits (fixed across model seeds so test sets are comparable).
    """

    image_size: int = 28
    vision: dict = field(default_factory=lambda: dict(width=192, layers=4, patch_size=7, head_width=32,
                                                      mlp_ratio=2.0))
    text: dict = field(default_factory=lambda: dict(context_length=16, width=96, heads=4, layers=2))
    embed_dim: int = 128
    init_logit_scale: float = math.log(100.0)
    n_train: int = 500
    n_val: int = 100
    n_test: int = 500
    n_slice: int = 25
    n_pre_fashion: int = 12000
    n_pre_mnist: int = 1000
    slice_frac: float = 0.04
    pre_steps: int = 1000
    pre_batch: int = 256
    pre_lr: float = 1e-3
    pre_wd: float = 0.1
    pre_warmup: int = 50
    ft_steps: int = 250
    ft_batch: int = 64
    ft_lr: float = 3e-4
    ft_wd: float = 0.1
    ft_warmup: int = 10
    ft_freeze: tuple[str, ...] = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
    split_seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, MiniConfig] = {
    "default": MiniConfig(),
    # Same code, seconds to build: the tests use it (tiny model, few samples, a handful of steps).
    "tiny": MiniConfig(
        image_size=14,
        vision=dict(width=32, layers=1, patch_size=7, head_width=16, mlp_ratio=2.0),
        text=dict(context_length=16, width=32, heads=2, layers=1),
        embed_dim=16, n_train=24, n_val=8, n_test=16, n_slice=8, n_pre_fashion=64, n_pre_mnist=16,
        pre_steps=4, pre_batch=32, pre_warmup=1, ft_steps=3, ft_batch=8, ft_warmup=1,
    ),
}


def get_preset(name: str) -> MiniConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown mini-benchmark preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def config_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_config(cfg: MiniConfig) -> dict:
    """The open_clip model config (what ``open_clip.add_model_config`` reads)."""
    return {
        "embed_dim": cfg.embed_dim,
        "init_logit_scale": cfg.init_logit_scale,
        "vision_cfg": dict(image_size=cfg.image_size, **cfg.vision),
        "text_cfg": dict(vocab_size=49408, **cfg.text),
    }


def create_clip(cfg: MiniConfig, seed: int) -> open_clip.CLIP:
    """A freshly initialised CLIP of ``cfg`` (seeded)."""
    torch.manual_seed(seed)
    mc = model_config(cfg)
    return open_clip.CLIP(embed_dim=mc["embed_dim"], vision_cfg=mc["vision_cfg"], text_cfg=mc["text_cfg"],
                          init_logit_scale=mc["init_logit_scale"])


def tokenizer(cfg: MiniConfig):
    return open_clip.SimpleTokenizer(context_length=cfg.text["context_length"])


@torch.no_grad()
def zero_shot_head(clip: open_clip.CLIP, tok, classnames, templates) -> torch.Tensor:
    """[C, D] head: per class, mean of the normalised template embeddings, normalised again."""
    was_training = clip.training
    clip.eval()
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(clip.encode_text(tok(texts)), dim=-1).view(len(classnames), len(templates), -1)
    clip.train(was_training)
    return F.normalize(emb.mean(1), dim=-1)
