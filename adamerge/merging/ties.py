"""TIES-Merging: trim, elect sign, disjoint merge.

    τ̂_k = trim_k(τ_k)              keep the top-k% |entries| of τ_k over the whole flattened model
    γ   = sign(Σ_k τ̂_k)            elected sign ("mass"); entries where the sum is 0 take the
                                    majority sign sign(Σ_entries γ)
    τ_m = agg_{k : sign(τ̂_k) = γ} τ̂_k     disjoint "mean" (paper) or "sum" (AdaMerging++, FusionBench)
    θ   = θ_0 + λ τ_m,             k = 20 %, λ = 0.3

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv 2306.01708.

Trim keeps the n = ⌊d·k⌋ largest magnitudes of each task vector (d = its number of float entries,
at least one entry kept); entries tied with the n-th largest are all kept. The reference code keeps
⌊d·k⌋ + 1 entries (``kthvalue(d − ⌊d·k⌋)`` then ``>=``); on real models the difference is one entry.
If the elected signs themselves sum to zero the majority sign is taken as +1.

:func:`ties_preprocess` returns, per task, the trimmed task vector with the entries that disagree
with γ zeroed, so that their plain sum is the TIES "sum" merge (what AdaMerging++ learns λ on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from adamerge.merging._common import (
    check_against_pretrained,
    check_lam,
    check_ratio,
    check_taus,
    float_keys,
    kth_largest_,
)
from adamerge.merging.dare import dare_all
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector, check_finite, flatten

__all__ = ["ties_elect_sign", "ties_merge", "ties_preprocess", "ties_threshold", "ties_trim"]

MERGE_FUNCS = ("mean", "sum")


def ties_threshold(tau: StateDict, keep: float = 0.2) -> float:
    """The magnitude |τ| must reach to survive trimming: the ⌊d·keep⌋-th largest over all float keys.

    Args:
        tau: a task vector.
        keep: fraction of entries kept, in (0, 1].
    """
    keep = check_ratio(keep, "ties keep ratio")
    flat = flatten(tau).abs_()
    if flat.numel() == 0:
        raise MergeError("task vector has no floating-point entries to trim")
    n_keep = max(1, math.floor(flat.numel() * keep + 1e-6))
    return kth_largest_(flat, n_keep)


def ties_trim(tau: StateDict, keep: float = 0.2) -> dict[str, Tensor]:
    """τ with every entry below the top-``keep`` magnitude threshold set to 0 (one threshold per τ).

    Args:
        tau: a task vector (non-float keys are copied untouched).
        keep: fraction of entries kept, in (0, 1] (paper: 0.2).
    """
    check_finite(tau, name="task vector")
    thr = ties_threshold(tau, keep)
    return {k: _trim(v, thr) if v.is_floating_point() else v.clone() for k, v in tau.items()}


def _trim(t: Tensor, thr: float) -> Tensor:
    return torch.where(t.abs() >= thr, t, torch.zeros_like(t))


def _majority(total: float) -> float:
    return 1.0 if total >= 0 else -1.0


def ties_elect_sign(trimmed: Sequence[StateDict]) -> dict[str, Tensor]:
    """γ = sign(Σ_k τ̂_k) per entry (float32 ±1); zero sums take the majority sign over all entries.

    Args:
        trimmed: the trimmed task vectors τ̂_1..τ̂_K.
    """
    trimmed = check_taus(trimmed, what="trimmed task vector")
    signs, total = {}, 0.0
    for key in float_keys(trimmed[0]):
        s = torch.sign(sum(t[key].float() for t in trimmed))
        total += float(s.sum())
        signs[key] = s
    majority = _majority(total)
    return {k: torch.where(s == 0, torch.full_like(s, majority), s) for k, s in signs.items()}


def _agree(stack: Tensor, gamma: Tensor) -> Tensor:
    """Entries of ``stack`` [K, ...] whose sign equals γ (others 0)."""
    keep = torch.where(gamma > 0, stack > 0, stack < 0)
    return stack * keep


def _disjoint(stack: Tensor, gamma: Tensor, merge: str) -> Tensor:
    selected = _agree(stack, gamma)
    total = selected.sum(0)
    if merge == "sum":
        return total
    count = (selected != 0).sum(0).clamp_(min=1)
    return total / count


def ties_preprocess(taus: Sequence[StateDict], keep: float = 0.2) -> list[dict[str, Tensor]]:
    """Per task: trimmed τ̂_k with entries disagreeing with γ zeroed; Σ_k of them = TIES "sum".

    Args:
        taus: the task vectors τ_1..τ_K.
        keep: fraction of each task vector's entries kept by trimming, in (0, 1].
    """
    taus = check_taus(taus)
    trimmed = [ties_trim(t, keep) for t in taus]
    gamma = ties_elect_sign(trimmed)
    out: list[dict[str, Tensor]] = [{} for _ in taus]
    for key in taus[0]:
        if key not in gamma:
            for o, t in zip(out, taus):
                o[key] = t[key].clone()
            continue
        stack = torch.stack([t[key].float() for t in trimmed])
        selected = _agree(stack, gamma[key])
        for o, sel, t in zip(out, selected, taus):
            o[key] = sel.to(t[key].dtype)
    return out


def _stack_trimmed(taus: Sequence[StateDict], key: str, thresholds: Sequence[float]) -> Tensor:
    return torch.stack([_trim(t[key].float(), thr) for t, thr in zip(taus, thresholds)])


@register_method("ties", label="TIES", presets={
    # the TIES baseline of the AdaMerging / Surgery papers and FusionBench (published B/32: 72.4): the default
    "adamerging": {"keep": 0.2, "merge": "sum", "lam": 0.3},
    # the TIES paper: disjoint mean; λ chosen on validation, 1.0 without it
    "paper": {"keep": 0.2, "merge": "mean", "lam": 1.0},
})
def ties_merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    keep: float = 0.2,
    merge: str = "sum",
    lam: float = 0.3,
    dare: float | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """TIES-Merging: θ_0 + λ·disjoint_merge(trimmed, sign-elected task vectors).

    Works key by key (no trimmed copy of every task vector is held), so peak memory is the task
    vectors plus one flattened task vector for the thresholds.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        keep: fraction of each task vector's entries kept, in (0, 1] (paper: 0.2).
        merge: "sum" (the AdaMerging papers' TIES baseline, AdaMerging++, FusionBench) or "mean"
            (the TIES paper) over the agreeing entries.
        lam: the scaling coefficient λ >= 0 (0.3 with "sum"; the TIES paper's "mean" wants ~1.0:
            ``preset="paper"``).
        dare: if set, DARE drop rate p in [0, 1) applied to each τ_k before TIES.
        seed: seed of the DARE masks.
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    if merge not in MERGE_FUNCS:
        raise MergeError(f"unknown TIES merge function {merge!r}: use one of {MERGE_FUNCS}")
    if dare is not None:
        taus = dare_all(taus, drop=dare, seed=seed)
    thresholds = [ties_threshold(t, keep) for t in taus]
    keys = float_keys(taus[0])
    total = 0.0
    for key in keys:  # pass 1: the majority sign over the whole model
        total += float(torch.sign(_stack_trimmed(taus, key, thresholds).sum(0)).sum())
    majority = _majority(total)
    merged: dict[str, Tensor] = {}
    for key in keys:  # pass 2: elect, select, aggregate
        stack = _stack_trimmed(taus, key, thresholds)
        gamma = torch.sign(stack.sum(0))
        gamma[gamma == 0] = majority
        merged[key] = _disjoint(stack, gamma, merge)
    return add_task_vector(pretrained, merged, lam)
