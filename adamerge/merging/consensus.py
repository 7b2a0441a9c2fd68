"""Consensus merging with TALL masks (TAsk LocaLization masks).

    τ_MTL = Σ_t τ_t                              the multi-task vector (task arithmetic's sum)
    m_t   = |τ_t| > λ_t |τ_MTL − τ_t|            TALL mask of task t, entry by entry
    m     = [Σ_t m_t ≥ k]                        consensus mask: entries claimed by at least k tasks
    θ     = θ_0 + α (m ⊙ τ_MTL)                  Consensus TA, k = 2

Consensus TIES is the same with τ_MTL = TIES(τ_1..τ_K; keep 20 %, disjoint "sum"), the vector both the
masks and the merge are built from. k = 2 drops "selfish" weights (claimed by one task) and
"catastrophic" ones (claimed by none); k = 0 is task arithmetic / TIES, k > K is θ_0.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024, arXiv 2405.07813; code nik-dim/tall_masks
(``src/utils/tallmask_utils.py``: ``generate_task_masks``, ``construct_consensus_mask``;
``src/eval/aggregation.py``; ``config/method/consensus.yaml``: ``prun_thre_k: 2``).

As the authors' code: every float tensor takes part; the comparison is strict (``>``, the paper writes
≥; with λ_t = 0 a task claims exactly the entries where its τ_t ≠ 0); the masks use the unscaled
τ_MTL, α only scales the result; for TIES the trim keeps the top 20 % over the whole model and the
agreeing entries are summed (``ties_merging(..., reset_thresh=20, merge_func="dis-sum")``). They
compare |θ_0 − θ_t| with λ_t |θ_0 + τ_MTL − θ_t| on the weights; we compare the same quantities on the
task vectors (equal up to float rounding).

Hyper-parameters the authors choose on validation data, for which this module has defaults instead:
λ_t per task from {0.2, 0.3, 0.4, 0.5, 0.6} (``construct_tall_mask`` / ``find_optimal_mask``); here one
λ = 0.6 for all tasks (FusionBench's ``config/method/tall_mask/task_arithmetic.yaml``), or a list of
one λ_t per task. α from {0.1, …, 1.0} (``eval.py``: ``linspace(0, 1, 11)[1:]``); here 0.3, task
arithmetic's λ in this repo, so that the consensus mask is the only change from that baseline.

:func:`tall_masks` returns the per-task masks, also the compressed form of the experts:
θ_t ≈ θ_0 + m_t ⊙ τ_MTL (no α there; the authors pick λ_t per task the same way).
:func:`tall_mask_merge` returns that form as a
:class:`~adamerge.merging.conditioned.TaskConditionedMerge` (vector τ_MTL, masks m_t, scales 1, as the
authors' ``src/eval/eval.py`` evaluates it: ``apply_to(..., scaling_coef=1.0)`` of τ_MTL ⊙ m_t),
registered as the conditioned merge ``"tall_masks"``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_ratio, check_taus, float_keys
from adamerge.merging.conditioned import TaskConditionedMerge, register_conditioned
from adamerge.merging.registry import TaskVectorSource, register_directions, register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector, check_finite, running_sum
from adamerge.merging.ties import MERGE_FUNCS, ties_merge

__all__ = ["consensus_mask", "consensus_ta", "consensus_ta_directions", "consensus_ta_pool", "consensus_ties",
           "tall_mask_merge", "tall_masks"]

Stream = Callable[[], Iterable[StateDict]]  # a fresh pass over the task vectors each call


def _tall(tau: Tensor, merged: Tensor, lam: float) -> Tensor:
    """m_t = |τ_t| > λ_t |τ_MTL − τ_t| for one tensor (bool, on τ's device)."""
    t = tau.float()
    return t.abs() > lam * (merged - t).abs()


def _lams(lam: float | Sequence[float], count: int) -> list[float]:
    lams = check_lam(lam, name="lam", count=count)
    return lams if isinstance(lams, list) else [lams] * count


def _check_k(k: int) -> int:
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise MergeError(f"consensus k must be a whole number of tasks >= 0, got {k!r}") from None
    if k < 0:
        raise MergeError(f"consensus k must be a whole number of tasks >= 0, got {k!r}")
    return k


def _checked(taus: Iterable[StateDict], pretrained: StateDict) -> Iterator[StateDict]:
    for i, tau in enumerate(taus):
        if i == 0:
            check_against_pretrained(pretrained, [tau])
        check_finite(tau, name=f"task vector {i}")
        yield tau


def _claims(stream: Stream, merged: dict[str, Tensor], lams: list[float]) -> dict[str, Tensor]:
    """Σ_t m_t per entry: how many tasks claim it, reading the task vectors once, one at a time."""
    counts = {key: torch.zeros(s.shape, dtype=torch.int16, device=s.device) for key, s in merged.items()}
    for tau, lam in zip(stream(), lams, strict=True):
        for key, c in counts.items():
            c += _tall(tau[key], merged[key], lam)
    return counts


def _consensus(
    pretrained: StateDict, stream: Stream, merged: dict[str, Tensor], k: int, lams: list[float], alpha: float
) -> dict[str, Tensor]:
    """θ_0 + α ([Σ_t m_t ≥ k] ⊙ τ_MTL); ``merged`` (float32, owned by the caller) is masked in place."""
    counts = _claims(stream, merged, lams)
    for key, s in merged.items():
        s.mul_(counts.pop(key) >= k)
    return add_task_vector(pretrained, merged, alpha)


def tall_masks(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    lam: float | Sequence[float] = 0.6,
    merged: StateDict | None = None,
) -> list[dict[str, Tensor]]:
    """The TALL mask of every task: m_t = |τ_t| > λ_t |τ_MTL − τ_t| (bool, float keys only).

    Args:
        pretrained: θ_0 (checked against the task vectors' keys and shapes).
        task_vectors: the task vectors τ_1..τ_K.
        lam: λ >= 0 for every task, or one λ_t per task (authors: per task from 0.2..0.6).
        merged: the multi-task vector τ_MTL; default Σ_t τ_t (task arithmetic, unscaled). Pass a TIES
            merge for the masks of Consensus TIES.
    """
    taus = check_taus(task_vectors)
    check_against_pretrained(pretrained, taus)
    lams = _lams(lam, len(taus))
    if merged is None:
        merged, _ = running_sum(taus)
    keys = float_keys(taus[0])
    missing = [key for key in keys if key not in merged]
    if missing:
        raise MergeError(f"merged multi-task vector is missing key {missing[0]!r}")
    for key in keys:
        if tuple(merged[key].shape) != tuple(taus[0][key].shape):
            raise MergeError(f"merged multi-task vector: shape mismatch at key {key!r}: expected "
                             f"{tuple(taus[0][key].shape)}, got {tuple(merged[key].shape)}")
    return [{key: _tall(tau[key], merged[key].float(), lam) for key in keys} for tau, lam in zip(taus, lams)]


@register_conditioned("tall_masks", label="TALL masks")
def tall_mask_merge(
    pretrained: StateDict, taus: Sequence[StateDict], lam: float | Sequence[float] = 0.6
) -> TaskConditionedMerge:
    """TALL masks' compressed experts: θ_t = θ_0 + m_t ⊙ τ_MTL, τ_MTL = Σ_t τ_t (float32), scales 1.

    Args:
        pretrained: θ_0 (held by the result).
        taus: the task vectors τ_1..τ_K (order = the result's task order).
        lam: TALL-mask λ >= 0 for all tasks, or one λ_t per task (authors: per task from 0.2..0.6 on
            validation; 0.6 in FusionBench's config).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    merged, count = running_sum(taus)
    masks = tall_masks(pretrained, taus, lam=lam, merged=merged)
    return TaskConditionedMerge(pretrained, merged, masks, [1.0] * count, method="TALL masks")


def consensus_mask(masks: Sequence[StateDict], k: int = 2) -> dict[str, Tensor]:
    """[Σ_t m_t ≥ k]: the entries at least ``k`` of the task masks claim (bool).

    Args:
        masks: one bool mask state dict per task (:func:`tall_masks`).
        k: the number of tasks an entry needs, >= 0 (authors: 2).
    """
    masks = check_taus(masks, what="task mask")
    k = _check_k(k)
    return {key: sum(m[key].to(torch.int16) for m in masks) >= k for key in masks[0]}


def consensus_ta(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    k: int = 2,
    lam: float | Sequence[float] = 0.6,
    alpha: float = 0.3,
) -> dict[str, Tensor]:
    """Consensus TA: θ_0 + α ([Σ_t m_t ≥ k] ⊙ Σ_t τ_t), computed in float32, returned in θ_0's dtypes.

    Args:
        pretrained: θ_0 (non-float keys are copied).
        taus: the task vectors τ_1..τ_K.
        k: keep entries claimed by at least k tasks' TALL masks, >= 0 (authors: 2).
        lam: TALL-mask λ >= 0 for all tasks, or one λ_t per task (authors: per task on validation).
        alpha: scaling α >= 0 of the masked multi-task vector (authors: on validation).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    k, alpha, lams = _check_k(k), check_lam(alpha, name="alpha"), _lams(lam, len(taus))
    merged, _ = running_sum(taus)
    return _consensus(pretrained, lambda: taus, merged, k, lams, alpha)


@register_directions("consensus_ta", presets={"official": {"k": 2}})
def consensus_ta_directions(
    pretrained: StateDict, taus: Sequence[StateDict], k: int = 2, lam: float | Sequence[float] = 0.6,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(θ_0, [m ⊙ τ_1 .. m ⊙ τ_K]) with m the consensus mask: Consensus TA = θ_0 + α Σ_t m ⊙ τ_t.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        k: keep entries claimed by at least k tasks' TALL masks, >= 0 (authors: 2).
        lam: TALL-mask λ >= 0 for all tasks, or one λ_t per task.
    """
    taus = check_taus(taus)
    mask = consensus_mask(tall_masks(pretrained, taus, lam=lam), k=k)
    return dict(pretrained), [{key: t[key] * mask[key] if key in mask else t[key].clone() for key in t} for t in taus]


@register_method("consensus_ta", per_tensor=True, pool_level=True, label="Consensus TA", presets={
    # nik-dim/tall_masks config/method/consensus.yaml (prun_thre_k: 2, use_ties: false); λ_t and α
    # are chosen on validation there, so the defaults (lam 0.6, alpha 0.3) fill them in
    "official": {"k": 2},
})
def consensus_ta_pool(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None, k: int = 2,
    lam: float | Sequence[float] = 0.6, alpha: float = 0.3,
) -> dict[str, Tensor]:
    """Consensus TA (:func:`consensus_ta`) on a pool in two streamed passes: Σ_t τ_t, then the claims
    of each task; one expert in memory at a time.

    Args:
        pool: the model pool.
        tasks: the tasks merged (default all).
        k: keep entries claimed by at least k tasks, >= 0 (authors: 2).
        lam: TALL-mask λ >= 0 for all tasks, or one λ_t per task in ``tasks`` order.
        alpha: scaling α >= 0 of the masked multi-task vector.
    """
    k, alpha = _check_k(k), check_lam(alpha, name="alpha")
    pretrained = pool.pretrained_state()

    def stream() -> Iterable[StateDict]:
        return _checked((tau for _, tau in pool.task_vectors(tasks)), pretrained)

    merged, count = running_sum(stream())
    return _consensus(pretrained, stream, merged, k, _lams(lam, count), alpha)


@register_method("consensus_ties", label="Consensus TIES", presets={
    # nik-dim/tall_masks: method=consensus use_ties=True -> ties_merging(reset_thresh=20, "dis-sum")
    "official": {"k": 2, "keep": 0.2, "merge": "sum"},
})
def consensus_ties(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    k: int = 2,
    lam: float | Sequence[float] = 0.6,
    alpha: float = 0.3,
    keep: float = 0.2,
    merge: str = "sum",
) -> dict[str, Tensor]:
    """Consensus TIES: θ_0 + α ([Σ_t m_t ≥ k] ⊙ τ_TIES), the TALL masks taken against τ_TIES.

    τ_TIES is the unscaled TIES merge of the task vectors (:func:`~adamerge.merging.ties.ties_merge`
    with λ = 1).

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        k: keep entries claimed by at least k tasks' TALL masks, >= 0 (authors: 2).
        lam: TALL-mask λ >= 0 for all tasks, or one λ_t per task.
        alpha: scaling α >= 0 of the masked TIES vector (authors: on validation).
        keep: fraction of each task vector TIES keeps, in (0, 1] (authors: 0.2).
        merge: TIES disjoint merge, "sum" (authors' consensus code) or "mean".
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    k, alpha, lams = _check_k(k), check_lam(alpha, name="alpha"), _lams(lam, len(taus))
    check_ratio(keep, "ties keep ratio")
    if merge not in MERGE_FUNCS:
        raise MergeError(f"unknown TIES merge function {merge!r}: use one of {MERGE_FUNCS}")
    # θ_0 = 0 (expanded zeros: no memory) makes ties_merge return the float32 TIES vector itself
    zeros = {key: torch.zeros((), device=taus[0][key].device).expand(taus[0][key].shape)
             for key in float_keys(taus[0])}
    merged = ties_merge(zeros, taus, keep=keep, merge=merge, lam=1.0)
    return _consensus(pretrained, lambda: taus, merged, k, lams, alpha)
