"""Presets of the mini benchmark and its small open_clip CLIP (a custom model config).

The model is a real ``open_clip.CLIP`` built from a config dict; the config is saved as JSON next to
the weights, so ``open_clip.add_model_config(json_path)`` then
``open_clip.create_model(name, pretrained=weights)`` loads it back anywhere (see
:meth:`MiniBenchmark.clip_model`).
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

    image_size: int = 21
    vision: dict = field(default_factory=lambda: dict(width=144, layers=4, patch_size=7, head_width=24,
                                                      mlp_ratio=2.0))
    text: dict = field(default_factory=lambda: dict(context_length=16, width=96, heads=4, layers=2))
    embed_dim: int = 128
    init_logit_scale: float = math.log(100.0)
    n_train: int = 600
    n_val: int = 100
    n_test: int = 500
    n_slice: int = 60
    n_pre_fashion: int = 12000
    n_pre_mnist: int = 600
    slice_frac: float = 0.1
    pre_steps: int = 500
    pre_batch: int = 128
    pre_lr: float = 1e-3
    pre_wd: float = 0.1
    pre_warmup: int = 25
    ft_steps: int = 300
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
