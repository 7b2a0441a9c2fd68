"""EMR-Merging: Elect, Mask & Rescale; one shared task vector, a bool mask and a scalar per task.

    γ     = sgn(Σ_i τ_i)                      elected sign, entry by entry (a zero sum elects −1)
    ε     = max_{i : τ_i γ > 0} |τ_i|         largest magnitude among the tasks that agree with γ (0 if none)
    τ_uni = γ ⊙ ε
    M_i   = (τ_i ⊙ τ_uni > 0)                 task i's mask: the entries where it agrees with τ_uni
    λ_i   = Σ_keys mean|τ_i| / Σ_keys mean|M_i ⊙ τ_uni|
    θ_i   = θ_0 + λ_i (M_i ⊙ τ_uni)           the model for task i (needs the task id: a
                                               :class:`~adamerge.merging.conditioned.TaskConditionedMerge`)

Huang, Ye, Li, Zhou, Yu, Zhang, Wang, Ouyang, "EMR-Merging: Tuning-Free High-Performance Model
Merging", NeurIPS 2024 (spotlight), arXiv 2405.17461; code harveyhuang18/EMR_Merging
(``merge_vit/src/main_emr_merging.py``: ``emr_merge``; published ViT-B/32 × 8: 88.7).

As the authors' code: every float key takes part (their ``TaskVector`` skips int64 / uint8 only),
element by element; the sign is ``(mean > 0) * 2 − 1``, so an entry whose task vectors sum to 0 elects
−1 and only its negative entries agree; no hyper-parameter. The paper writes the rescaler with sums
over the model, Σ|τ_i| / Σ|M_i ⊙ τ_uni|; their 8-task ViT, language and BEiT-3 code (and FusionBench)
adds each key's *mean* instead, so every key weighs the same whatever its size: ``rescale="key_means"``,
the default. ``rescale="entries"`` takes the sums over all entries, as their 30-ViT script does on the
flattened model (``main_emr_30_vits.py``). The sum of key means depends on how the model is cut into
keys: open_clip's fused ``in_proj_weight`` is one key (the authors' layout), HF CLIP's q, k, v three
(FusionBench's), which changes λ_i slightly; masks and τ_uni are the same in both layouts.

Where M_i ⊙ τ_uni = 0 (τ_i disagrees everywhere, or is 0) the authors' ratio is 0/0 or x/0; model i is
θ_0 for any λ_i, and we set λ_i = 1. Sums are accumulated in float64 (the authors: float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_taus, float_keys
from adamerge.merging.conditioned import TaskConditionedMerge, register_conditioned
from adamerge.merging.task_vectors import MergeError, StateDict

__all__ = ["RESCALES", "emr_elect", "emr_merge"]

RESCALES = ("key_means", "entries")


def emr_elect(stack: Tensor) -> tuple[Tensor, Tensor]:
    """(τ_uni, masks) of one key from its task vectors stacked as ``stack`` [K, ...] (float32).

    Returns τ_uni (float32, the key's shape) and the masks M_i (bool, [K, ...]).
    """
    gamma = torch.where(stack.sum(0) > 0, 1.0, -1.0)
    agree = stack * gamma > 0
    eps = (stack.abs() * agree).amax(0)
    return eps * gamma, agree


def _magnitude(t: Tensor, rescale: str) -> Tensor:
    """Per task of ``t`` [K, ...]: mean |t| (key_means) or Σ |t| (entries), float64 [K]."""
    flat = t.reshape(t.shape[0], -1).abs()
    return (flat.mean(1) if rescale == "key_means" else flat.sum(1)).double()


@register_conditioned("emr", label="EMR-Merging")
@torch.no_grad()
def emr_merge(
    pretrained: StateDict, task_vectors: Sequence[StateDict], rescale: str = "key_means"
) -> TaskConditionedMerge:
    """EMR-Merging: τ_uni, a mask M_i and a rescaler λ_i per task (model i = θ_0 + λ_i M_i ⊙ τ_uni).

    Key by key: one key of every task vector is stacked at a time (float32, on the inputs' device).

    Args:
        pretrained: θ_0 (held by the result; non-float keys and keys without task vectors stay θ_0).
        task_vectors: the task vectors τ_1..τ_K (order = the result's task order).
        rescale: "key_means" (the authors' 8-task ViT code: λ_i = Σ_keys mean|τ_i| /
            Σ_keys mean|M_i ⊙ τ_uni|) or "entries" (sums over all entries, the paper's equation and
            their 30-ViT script).
    """
    if rescale not in RESCALES:
        raise MergeError(f"unknown EMR rescale {rescale!r}: use one of {RESCALES}")
    taus = check_taus(task_vectors)
    check_against_pretrained(pretrained, taus)
    count = len(taus)
    vector: dict[str, Tensor] = {}
    masks: list[dict[str, Tensor]] = [{} for _ in taus]
    num = torch.zeros(count, dtype=torch.float64)
    den = torch.zeros(count, dtype=torch.float64)
    for key in float_keys(taus[0]):
        stack = torch.stack([t[key].float() for t in taus])
        uni, agree = emr_elect(stack)
        vector[key] = uni
        for mask, m in zip(masks, agree):
            mask[key] = m
        num += _magnitude(stack, rescale).cpu()
        den += _magnitude(uni * agree, rescale).cpu()
    scales = [float(n / d) if d > 0 else 1.0 for n, d in zip(num.tolist(), den.tolist())]
    return TaskConditionedMerge(pretrained, vector, masks, scales, method="EMR-Merging")
