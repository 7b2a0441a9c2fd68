"""PCB-Merging: Parameter Competition Balancing (vision variant).

For task vectors τ_1..τ_K (each flattened over the whole model, d entries):

    c_k    = clamp(|τ_k|, q_k(1 %), q_k(99 %))                  magnitudes clamped to their quantiles
    n_k    = (c_k − min c_k) / (max c_k − min c_k)              min-max over the task vector
    intra_k = exp(η · n_k²)                                     intra-balancing, η = K
    inter_k = tanh(τ_k ⊙ Σ_j sign(τ_j) ⊙ n_j)                   inter-balancing
    β_k    = intra_k ⊙ inter_k
    s_k    = minmax(clamp(β_k, q_k(1 − r), max β_k))            keep the top fraction r, scale to [0, 1]
    θ      = θ_0 + Σ_k λ_k sign(τ_k) c_k s_k / max(Σ_k s_k, 1e-12),    r = 0.05, λ_k = 1.2

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024, arXiv 2410.02396.

Variant: this is the paper's *vision* code (``vision_source_code/pcb.py``): clamp ratio 1 %, inter-
balancing against Σ_j sign(τ_j)·n_j (the NLP code uses Σ_j τ_j and clamps at 0.01 %), fixed λ
(the paper can also search λ_k with an evolutionary optimizer on validation data: pass a list).
Quantiles are taken as in that code: q(a) = sorted(x)[int(d·a)] for the lower clamp and the keep
threshold, sorted(x)[int(d·(1 − a)) − 1] for the upper clamp. Where a min-max range is empty (all
values equal) the normalised values are 0 instead of the reference code's NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adamerge.merging._common import (
    check_against_pretrained,
    check_lam,
    check_ratio,
    check_taus,
    float_keys,
    kth_smallest_,
)
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector, flatten

__all__ = ["pcb_merge"]


def _minmax(x: Tensor, lo: float, hi: float) -> Tensor:
    """(clamp(x, lo, hi) − lo) / (hi − lo); zeros when hi == lo."""
    if hi <= lo:
        return torch.zeros_like(x)
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def _clamp_bounds(tau: StateDict, keys: list[str], clamp: float) -> tuple[float, float]:
    flat = flatten(tau, keys).abs_()
    d = flat.numel()
    return kth_smallest_(flat, int(d * clamp)), kth_smallest_(flat, int(d * (1 - clamp) - 1))


def _scores(balancing: list[Tensor], keep: float) -> list[Tensor]:
    """Keep the top ``keep`` of one task's balancing values (whole model), min-max scaled."""
    flat = torch.cat([b.reshape(-1) for b in balancing])
    d = flat.numel()
    lo, hi = kth_smallest_(flat, int(d * (1 - keep))), float(flat.max())
    del flat
    return [_minmax(b, lo, hi) for b in balancing]


@register_method("pcb", label="PCB")
def pcb_merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    keep: float = 0.05,
    lam: float | Sequence[float] = 1.2,
    clamp: float = 0.01,
    eta: float | None = None,
) -> dict[str, Tensor]:
    """PCB-Merging (vision variant), computed key by key in float32.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        keep: fraction r of each task's balancing scores kept, in (0, 1] (vision code: 0.05).
        lam: λ >= 0, one for all tasks or one per task (vision code: 1.2).
        clamp: quantile q clamping |τ_k| to [q, 1 − q], in [0, 0.5) (vision code: 0.01).
        eta: temperature η of intra-balancing; default K, the number of task vectors (as the code).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    keep = check_ratio(keep, "pcb keep")
    clamp = check_ratio(clamp, "pcb clamp quantile", allow_zero=True)
    if clamp >= 0.5:
        raise MergeError(f"pcb clamp quantile must lie in [0, 0.5), got {clamp!r}")
    lams = check_lam(lam, count=len(taus))
    lams = lams if isinstance(lams, list) else [lams] * len(taus)
    eta = float(len(taus)) if eta is None else float(check_lam(eta, name="eta"))
    keys = float_keys(taus[0])
    bounds = [_clamp_bounds(t, keys, clamp) for t in taus]

    def norm(k: int, key: str) -> Tensor:
        return _minmax(taus[k][key].float().abs(), *bounds[k])

    signed_norm = {
        key: sum(torch.sign(t[key].float()) * norm(k, key) for k, t in enumerate(taus)) for key in keys
    }
    num = {key: torch.zeros(taus[0][key].shape) for key in keys}
    den = {key: torch.zeros(taus[0][key].shape) for key in keys}
    for k, tau in enumerate(taus):
        balancing = [
            torch.exp(eta * norm(k, key) ** 2) * torch.tanh(tau[key].float() * signed_norm[key])
            for key in keys
        ]
        for key, s in zip(keys, _scores(balancing, keep)):
            t = tau[key].float()
            clamped = torch.sign(t) * t.abs().clamp(*bounds[k])
            num[key].add_(lams[k] * clamped * s)
            den[key].add_(s)
        del balancing
    merged = {key: num[key] / den[key].clamp(min=1e-12) for key in keys}
    return add_task_vector(pretrained, merged, 1.0)
