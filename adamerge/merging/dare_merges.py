"""DARE-TA and DARE-TIES: drop-and-rescale every task vector, then task arithmetic or TIES.

    τ̃_k = (m_k ⊙ τ_k) / (1 − p),        m_k ~ Bernoulli(1 − p) per entry (DARE)
    DARE-TA:    θ = θ_0 + λ Σ_k τ̃_k                                   p = 0.5, λ = 0.3
    DARE-TIES:  θ = θ_0 + λ · TIES(τ̃_1..τ̃_K; keep, merge)            p = 0.5, keep = 20 %, "sum", λ = 0.5

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, arXiv 2311.03099; TIES: Yadav et al., NeurIPS 2023, arXiv 2306.01708.

Defaults (``preset="official"``) are FusionBench's CLIP configs ``config/method/dare/task_arithmetic.yaml``
(``sparsity_ratio: 0.5``, ``scaling_factor: 0.3``, ``rescale: true``, ``only_on_linear_weights: false``)
and ``config/method/dare/ties_merging.yaml`` (``sparsity_ratio: 0.5``, ``scaling_factor: 0.5``,
``threshold: 20``, ``merge_func: sum``, ``rescale: true``), the same files the MLLM merging
benchmark (WalkerWorldPeace/MLLMerging) ships for CLIP. As there, DARE touches every float tensor
(not only linear weights), survivors are always rescaled by 1/(1 − p), and TIES' trim runs *after*
the drop: its top-20 % threshold is taken over the dropped vector, zeros included
(``fusion_bench/method/dare/ties_merging.py``).

``preset="mllm"`` holds the MLLM benchmark's LLM runs (``LLaMA-Factory/model_merging.py``: mask rate
0.2, TIES ``param_value_mask_rate`` 0.8 with disjoint mean; λ 0.3 and seed 42 from its
``baseline_merging.py``). Its TIES trims per tensor; ours over the whole model (see :mod:`.ties`).

Seeds follow :mod:`adamerge.merging.dare`: one generator seeded with ``seed``, the task vectors drawn
one after another in order, keys in state-dict order (the reference code draws from torch's global
RNG and keeps U > p where we keep U >= p, so the masks are the same in distribution, not entry for
entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_ratio, check_taus
from adamerge.merging.dare import DaredStream, dare_each
from adamerge.merging.registry import (
    METHODS,
    OneTensor,
    TaskVectorSource,
    TensorStream,
    register_directions,
    register_method,
    register_streaming,
)
from adamerge.merging.task_vectors import StateDict, add_task_vector, running_sum
from adamerge.merging.ties import ties_merge
from adamerge.merging.ties_stream import ties_stream

__all__ = ["dare_ta_directions", "dare_task_arithmetic", "dare_task_arithmetic_pool", "dare_ties_merge", "dare_ties_pool"]


def _dare_sum(taus: Iterable[StateDict], drop: float, seed: int) -> dict[str, Tensor]:
    """Σ_k DARE(τ_k) in float32, the τ_k drawn in turn from one generator (one τ_k held at a time)."""
    total, _ = running_sum(dare_each(taus, drop=drop, seed=seed))
    return total


def dare_task_arithmetic(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    drop: float = 0.5,
    lam: float = 0.3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """DARE-TA: θ_0 + λ Σ_k DARE_p(τ_k), computed in float32, returned in θ_0's dtypes.

    Equal to ``task_arithmetic(pretrained, taus, lam, dare=drop, seed=seed)``; ``drop=0`` is plain
    task arithmetic.

    Args:
        pretrained: θ_0 (non-float keys and keys absent from the task vectors are copied).
        taus: the task vectors τ_1..τ_K.
        drop: DARE drop rate p in [0, 1) (FusionBench CLIP: 0.5).
        lam: the scaling coefficient λ >= 0 (FusionBench CLIP: 0.3).
        seed: seed of the one generator the DARE masks are drawn from (:func:`~.dare.dare_all`).
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    drop = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    return add_task_vector(pretrained, _dare_sum(taus, drop, seed), lam)


_TA_PRESETS = {
    # FusionBench config/method/dare/task_arithmetic.yaml (CLIP; also in MLLMerging's fusion_bench copy)
    "official": {"drop": 0.5, "lam": 0.3},
    # MLLM benchmark (Qwen2-VL): LLaMA-Factory/model_merging.py "dare ta", baseline_merging.py defaults
    "mllm": {"drop": 0.2, "lam": 0.3, "seed": 42},
}


_TA_PRESETS_DROP = {name: {k: v for k, v in p.items() if k != "lam"} for name, p in _TA_PRESETS.items()}


@register_method("dare_ta", pool_level=True, label="DARE-TA", presets=_TA_PRESETS)
def dare_task_arithmetic_pool(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None, drop: float = 0.5, lam: float = 0.3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """DARE-TA (:func:`dare_task_arithmetic`) on a pool, one expert in memory at a time.

    Args:
        pool: the model pool.
        tasks: the tasks merged, in this order (it fixes which τ_k gets which draw of the generator).
        drop: DARE drop rate p in [0, 1).
        lam: the scaling coefficient λ >= 0.
        seed: seed of the DARE masks.
    """
    lam = check_lam(lam)
    drop = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    pretrained = pool.pretrained_state()
    return add_task_vector(pretrained, _dare_sum(_checked(pool, tasks, pretrained), drop, seed), lam)


def _checked(pool: TaskVectorSource, tasks: Sequence[str] | None, pretrained: StateDict) -> Iterable[StateDict]:
    """The pool's task vectors one at a time, the first checked against θ_0."""
    first = True  # no enumerate(): its reused result tuple would keep the previous τ alive
    for _, tau in pool.task_vectors(tasks):
        if first:
            check_against_pretrained(pretrained, [tau])
            first = False
        yield tau
        del tau


@register_directions("dare_ta", pool_level=True, presets=_TA_PRESETS_DROP)
def dare_ta_directions(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None, drop: float = 0.5, seed: int = 0,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(θ_0, [DARE_p(τ_1) .. DARE_p(τ_K)]): DARE-TA = θ_0 + λ Σ_k DARE_p(τ_k), drawn as :func:`dare_task_arithmetic`.

    Args:
        pool: the model pool.
        tasks: the tasks, in this order (it fixes which τ_k gets which draw of the generator).
        drop: DARE drop rate p in [0, 1).
        seed: seed of the DARE masks.
    """
    drop = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    pretrained = pool.pretrained_state()
    return pretrained, list(dare_each(_checked(pool, tasks, pretrained), drop=drop, seed=seed))


_TIES_PRESETS = {
    # FusionBench config/method/dare/ties_merging.yaml (CLIP): threshold 20 -> keep 0.2, merge_func sum
    "official": {"drop": 0.5, "keep": 0.2, "merge": "sum", "lam": 0.5},
    # MLLM benchmark: mask rate 0.2, TIES param_value_mask_rate 0.8 (keep 0.2), disjoint mean
    "mllm": {"drop": 0.2, "keep": 0.2, "merge": "mean", "lam": 0.3, "seed": 42},
}


def dare_ties_merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    drop: float = 0.5,
    keep: float = 0.2,
    merge: str = "sum",
    lam: float = 0.5,
    seed: int = 0,
) -> dict[str, Tensor]:
    """DARE-TIES: DARE_p on each τ_k, then TIES (trim to ``keep`` after the drop, elect, merge).

    Equal to ``ties_merge(pretrained, taus, keep, merge, lam, dare=drop, seed=seed)``; ``drop=0`` is
    plain TIES.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        drop: DARE drop rate p in [0, 1) (FusionBench CLIP: 0.5).
        keep: fraction of each dropped task vector's entries TIES keeps, in (0, 1] (FusionBench: 0.2).
        merge: TIES disjoint merge, "sum" (FusionBench) or "mean" (TIES paper, MLLM benchmark).
        lam: the scaling coefficient λ >= 0 (FusionBench CLIP: 0.5).
        seed: seed of the one generator the DARE masks are drawn from.
    """
    check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    return ties_merge(pretrained, taus, keep=keep, merge=merge, lam=lam, dare=drop, seed=seed)


@register_method("dare_ties", pool_level=True, label="DARE-TIES", presets=_TIES_PRESETS)
def dare_ties_pool(
    pool: TaskVectorSource, tasks: Sequence[str] | None = None, drop: float = 0.5, keep: float = 0.2,
    merge: str = "sum", lam: float = 0.5, seed: int = 0,
) -> dict[str, Tensor]:
    """DARE-TIES (:func:`dare_ties_merge`) on a pool: each expert dropped as it is read, so only the K
    dropped task vectors are held (not the K originals beside them).

    Args:
        pool: the model pool.
        tasks: the tasks merged, in this order (it fixes which τ_k gets which draw of the generator).
        drop: DARE drop rate p in [0, 1).
        keep: fraction of each dropped task vector's entries TIES keeps, in (0, 1].
        merge: TIES disjoint merge, "sum" or "mean".
        lam: the scaling coefficient λ >= 0.
        seed: seed of the DARE masks.
    """
    drop = check_ratio(drop, "dare drop rate", allow_zero=True, allow_one=False)
    pretrained = pool.pretrained_state()
    dropped = list(dare_each(_checked(pool, tasks, pretrained), drop=drop, seed=seed))
    return ties_merge(pretrained, dropped, keep=keep, merge=merge, lam=lam)


# ---- out of core: the same merges over a DARE'd tensor stream -------------------------------------
@register_streaming("dare_ta")
def dare_ta_stream(stream: TensorStream, tasks: Sequence[str], drop: float = 0.5, lam: float = 0.3, seed: int = 0):
    """:func:`dare_task_arithmetic_pool` out of core, exactly: task arithmetic tensor by tensor over
    a :class:`~adamerge.merging.dare.DaredStream` (one pass to place the draws, one to merge)."""
    lam = check_lam(lam)
    dared = DaredStream(stream, tasks, drop=drop, seed=seed)
    for key in dared.merge_keys():
        one = OneTensor(dared, key)
        yield key, METHODS["task_arithmetic"](one, tasks, lam=lam)[key]


@register_streaming("dare_ties")
def dare_ties_stream(stream: TensorStream, tasks: Sequence[str], drop: float = 0.5, keep: float = 0.2,
                     merge: str = "sum", lam: float = 0.5, seed: int = 0):
    """:func:`dare_ties_pool` out of core, exactly: TIES' passes (:func:`~adamerge.merging.ties_stream.
    ties_stream`) over a :class:`~adamerge.merging.dare.DaredStream`."""
    yield from ties_stream(DaredStream(stream, tasks, drop=drop, seed=seed), tasks, keep=keep, merge=merge,
                                 lam=lam)

