"""Unsupervised test-time losses, as small pure functions.

Entropy (AdaMerging, Yang et al., ICLR 2024, arXiv 2310.02575, eq. 5; also WEMoE):

    H(x) = − Σ_c p_c(x) log p_c(x),    p(x) = softmax(logits(x))

computed from ``log_softmax`` so large logits (CLIP scales cosine similarities by 100) neither
overflow nor produce ``0 · log 0 = nan``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy"]


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dim: ``[..., C] -> [...]``.

    Args:
        logits: unnormalised scores, classes in the last dimension (``[B, C]`` → ``[B]``).
    """
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"entropy needs logits with a non-empty class dimension, got shape {tuple(logits.shape)}"
        )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)
