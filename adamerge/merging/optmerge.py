"""OptMerge: data-free merging of 2-D weights by optimising against low-rank task vectors.

For every 2-D linear weight, with N task vectors τ_i ∈ R^{m×n}:

    K   = max(1, ⌊min(m, n) / N⌋)
    τ̂_i = U_K S_K V_Kᵀ                   rank-K SVD truncation of τ_i
    L_i = S_K V_Kᵀ                        (K × n)
    τ*  = argmin_τ Σ_i ‖(τ − τ̂_i) L_iᵀ‖²_F / ‖τ_i‖²_F     by SGD from τ = mean_i τ_i
          (lr 1e-4, momentum 0.9, 300 iterations)
    θ   = θ_0 + λ τ*                      (λ = 1 reproduces the paper; other parameters — biases,
                                           norms, embeddings — get the mean task vector)

"Unifying Multimodal Large Language Model Capabilities and Modalities via Model Merging"
(the MLLM merging benchmark), arXiv 2505.19892.

A task vector that is zero for a weight has no term in that weight's loss (its norm would divide by
zero). The loss is quadratic; each SGD step costs O(m·n·min(m, n)), so on a CPU a ViT-B/32 takes
minutes: pass ``device="cuda"`` to run the optimisation on a GPU (results come back on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import (
    check_against_pretrained,
    check_lam,
    check_taus,
    float_keys,
    is_linear_weight,
)
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector

__all__ = ["optmerge", "optmerge_weight"]


def _low_rank_targets(taus: Sequence[Tensor], rank: int) -> list[tuple[Tensor, Tensor, float]]:
    out = []
    for t in taus:
        norm_sq = float(t.square().sum())
        if norm_sq == 0.0:
            continue
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        lk = s[:rank, None] * vh[:rank]  # L = S_K V_Kᵀ
        out.append((u[:, :rank] @ lk, lk, norm_sq))
    return out


def optmerge_weight(
    taus: Sequence[Tensor], lr: float = 1e-4, momentum: float = 0.9, iters: int = 300
) -> Tensor:
    """The optimised merged task vector τ* of one 2-D weight (float32, on the inputs' device).

    Args:
        taus: the N task vectors of this weight, each [m, n].
        lr: SGD learning rate.
        momentum: SGD momentum.
        iters: number of SGD steps.
    """
    taus = [t.float() for t in taus]
    m, n = taus[0].shape
    rank = max(1, min(m, n) // len(taus))
    targets = _low_rank_targets(taus, rank)
    tau = torch.stack(taus).mean(0)
    if not targets or iters == 0:
        return tau
    tau.requires_grad_(True)
    opt = torch.optim.SGD([tau], lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = sum(((tau - th) @ lk.T).square().sum() / ns for th, lk, ns in targets)
            loss.backward()
            opt.step()
    return tau.detach()


@register_method("optmerge", label="OptMerge")
def optmerge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    lr: float = 1e-4,
    momentum: float = 0.9,
    iters: int = 300,
    lam: float = 1.0,
    is_optimized: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """OptMerge: optimised 2-D weights, mean task vector elsewhere; θ_0 + λ τ.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_N.
        lr: SGD learning rate (paper: 1e-4), > 0.
        momentum: SGD momentum in [0, 1) (paper: 0.9).
        iters: SGD steps per weight (paper: 300), >= 0.
        lam: scale λ >= 0 of the merged task vector (1.0 as in the paper).
        is_optimized: ``(key, tensor) -> bool`` choosing the optimised weights; default 2-D float
            tensors whose key ends in ``weight`` and is not an embedding.
        device: where to run the per-weight optimisation (default: the CPU).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    if not (lr > 0 and lr < float("inf")):
        raise MergeError(f"optmerge lr must be a finite number > 0, got {lr!r}")
    if not (0 <= momentum < 1):
        raise MergeError(f"optmerge momentum must lie in [0, 1), got {momentum!r}")
    if int(iters) != iters or iters < 0:
        raise MergeError(f"optmerge iters must be an integer >= 0, got {iters!r}")
    test = is_optimized or is_linear_weight
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if ts[0].dim() == 2 and test(key, ts[0]):
            ts = [t.to(device=device, dtype=torch.float32) for t in ts]
            merged[key] = optmerge_weight(ts, lr=lr, momentum=momentum, iters=int(iters)).cpu()
        else:
            merged[key] = torch.stack([t.float() for t in ts]).mean(0)
    return add_task_vector(pretrained, merged, lam)
