"""Training of the mini benchmark: CLIP pretraining from scratch, then one expert per task.

Pretraining: open_clip's contrastive ``ClipLoss`` between images of the pretraining mix and a caption
drawn per image and step from its caption group (rich captions for the upright grey images; each
task's own names and templates for its domain slice, ``cfg.slice_frac`` of every batch). Text
features are computed once per distinct caption in the batch and gathered, which is exact and saves
most of the text tower's work. AdamW with linear warm-up and cosine decay; the logit scale starts at
100 and is clamped there.

Experts (task_vectors recipe, Ilharco et al. 2023, arXiv 2212.04089): the vision tower fine-tuned
with cross-entropy against the task's frozen zero-shot head, AdamW + cosine schedule; the patch /
class / positional embeddings and the first LayerNorm stay frozen (``cfg.ft_freeze``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from adamerge.data.mini.data import MiniData
from adamerge.data.mini.model import MiniConfig, tokenizer

__all__ = ["pretrain_clip", "finetune_expert", "accuracy", "TRAINING_RUNS"]

# Number of training loops run in this process (tests check a cache hit trains nothing).
TRAINING_RUNS = {"pretrain": 0, "finetune": 0}


def _param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    """open_clip_train's convention: no weight decay on gains, biases, embeddings and the logit scale."""
    def no_decay(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n
    decay = [p for n, p in params if not no_decay(n, p)]
    rest = [p for n, p in params if no_decay(n, p)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _cosine(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _caption_table(groups: list[list[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(g) for g in groups)
    table = torch.tensor([g + [g[0]] * (width - len(g)) for g in groups], dtype=torch.long)
    return table, torch.tensor([len(g) for g in groups], dtype=torch.long)


def pretrain_clip(clip: open_clip.CLIP, data: MiniData, cfg: MiniConfig, seed: int, progress: bool = True) -> dict:
    """Train ``clip`` in place with ClipLoss on ``data``'s pretraining mix; returns loss statistics."""
    TRAINING_RUNS["pretrain"] += 1
    g = torch.Generator().manual_seed(seed)
    tokens = tokenizer(cfg)(data.captions)
    table, counts = _caption_table(data.caption_groups)
    grey = (~data.pre_is_slice).nonzero().squeeze(1)
    sliced = data.pre_is_slice.nonzero().squeeze(1)
    n_sl = round(cfg.pre_batch * cfg.slice_frac) if len(sliced) else 0
    opt = torch.optim.AdamW(_param_groups(list(clip.named_parameters()), cfg.pre_wd), lr=cfg.pre_lr,
                            betas=(0.9, 0.98), eps=1e-6)
    sched = _cosine(opt, cfg.pre_warmup, cfg.pre_steps)
    loss_fn = open_clip.ClipLoss()
    max_scale = math.log(100.0)
    clip.train()
    losses = []
    for _ in tqdm(range(cfg.pre_steps), desc="mini: pretraining CLIP", disable=not progress, leave=False):
        idx = torch.cat([grey[torch.randint(len(grey), (cfg.pre_batch - n_sl,), generator=g)],
                         sliced[torch.randint(max(1, len(sliced)), (n_sl,), generator=g)]])
        grp = data.pre_group[idx]
        pick = (torch.rand(len(idx), generator=g) * counts[grp]).long()
        cap = table[grp, pick]
        uniq, inv = torch.unique(cap, return_inverse=True)
        img = F.normalize(clip.encode_image(data.pre_images[idx]), dim=-1)
        txt = F.normalize(clip.encode_text(tokens[uniq]), dim=-1)[inv]
        loss = loss_fn(img, txt, clip.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, max_scale)
        losses.append(loss.item())
    clip.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def finetune_expert(visual: nn.Module, head: Tensor, logit_scale: float, x: Tensor, y: Tensor,
                    cfg: MiniConfig, seed: int, desc: str = "", progress: bool = True) -> dict[str, Tensor]:
    """Fine-tune a copy of ``visual`` on (x, y) with the frozen ``head``; returns its state dict."""
    TRAINING_RUNS["finetune"] += 1
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(visual).train()
    named = []
    for n, p in enc.named_parameters():
        p.requires_grad_(not n.startswith(cfg.ft_freeze))
        if p.requires_grad:
            named.append((n, p))
    opt = torch.optim.AdamW(_param_groups(named, cfg.ft_wd), lr=cfg.ft_lr)
    sched = _cosine(opt, cfg.ft_warmup, cfg.ft_steps)
    head = head.detach()
    for _ in tqdm(range(cfg.ft_steps), desc=f"mini: expert {desc}", disable=not progress, leave=False):
        idx = torch.randint(len(x), (cfg.ft_batch,), generator=g)
        logits = logit_scale * F.normalize(enc(x[idx]), dim=-1) @ head.t()
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}


@torch.no_grad()
def accuracy(encoder: nn.Module, head: Tensor, logit_scale: float, x: Tensor, y: Tensor,
             state: Mapping[str, Tensor] | None = None, batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``encoder`` (optionally with ``state`` loaded into a copy) with ``head``."""
    if state is not None:
        encoder = copy.deepcopy(encoder)
        encoder.load_state_dict(state, strict=True)
    encoder.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = F.normalize(encoder(x[i:i + batch]), dim=-1) @ head.t()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / max(1, len(x))
