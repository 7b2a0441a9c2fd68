"""OptMerge: data-free merging of 2-D weights by optimising against low-rank task vectors.

For every optimised 2-D weight with N non-zero task vectors τ_i ∈ R^{m×n} (mean τ̄), rank K:

    L_i = S_K V_Kᵀ                        top-K SVD factor of τ_i        (K × n)
    τ*  = argmin_τ Σ_i ‖(τ − T_i) L_iᵀ‖²_F / ‖τ_i‖²_F                   (T_i: the variant's target)
    θ   = θ_0 + λ τ*                      (λ = 1 as the authors' CLIP runs)

"Unifying Multimodal Large Language Model Capabilities and Modalities via Model Merging" (OptMerge,
ICLR 2026), arXiv 2505.19892. The authors' code (WalkerWorldPeace/MLLMerging, where it is called
``wudi2``) comes in two variants, chosen by ``variant``:

                ``"clip"`` (default)                        ``"llamafactory"``
    K           max(1, ⌊min(m, n)/N⌋)                       int(min(m, n)/N)  (0: no loss term)
    target T_i  rank-K SVD of (τ_i − τ̄), plus τ̄              rank-K SVD of τ_i
    start       Σ_i τ_i                                     τ̄
    optimiser   Adam, lr 1e-5, 300 steps                    SGD, lr 1e-4, momentum 0.9, 300 steps
    optimised   every 2-D tensor: q, k, v, out_proj, MLP,   the same, minus the kept keys
                positional embedding, proj
    kept at θ_0 nothing                                     biases, norms, embeddings
    averaged    every other tensor (biases, norms,          every other tensor
                class and patch embedding)

* ``"clip"``: the authors' CLIP-ViT port, ``fusion_bench/fusion_bench/method/yongxianwei_merging/
  functional.py::wudi_merge_v2`` with ``fusion_bench/config/method/yongxianwei_merging/wudi2.yaml``
  (``exclude_param_names_regex: []``, ``scaling_coefficient: 1.0``, ``iter_num: 300``,
  ``learning_rate: 1e-5``), itself a port of ``InternVL/internvl_chat/model_merging.py::
  wudi_merging2`` (which used int(min/N) for K). Every 2-D parameter but an LLM's ``lm_head`` is
  optimised, so the position embedding is too.
* ``"llamafactory"``: ``LLaMA-Factory/model_merging.py::wudi_merging2`` (Qwen2-VL, first commit
  92e738e), whose ``exclude_param_names_regex`` ``['visual..*', '.*embed_tokens.*', '.*lm_head.*',
  '.*norm.*', '.*bias.*']`` keeps those parameters at θ_0. On a CLIP tower that is read as
  :func:`llamafactory_keeps`: biases, norms (``ln_*``) and embeddings (class, positional, patch)
  stay at θ_0 (the vision-tower exclusion itself would leave nothing to merge).

q, k, v are three matrices here as in HF CLIP: open_clip's fused ``in_proj_weight`` is split first
(:func:`~adamerge.merging.fused.splits_fused_qkv`). A task vector that is zero for a weight has no
term in that weight's loss (the authors' code would divide by its zero norm). Each step costs
O(m·n·min(m, n)), so on a CPU a ViT-B/32 takes minutes: pass ``device="cuda"`` to run the
optimisation on a GPU (results come back on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_taus, float_keys
from adamerge.merging.fused import splits_fused_qkv, svd
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector

__all__ = ["VARIANTS", "llamafactory_keeps", "optmerge", "optmerge_rank", "optmerge_weight"]


def llamafactory_keeps(key: str, tensor: Tensor) -> bool:
    """The LLaMA-Factory exclude list on CLIP keys: biases, norms and embeddings stay at θ_0."""
    parts = key.split(".")
    return (
        "bias" in key
        or "norm" in key  # HF layer_norm1, pre_layrnorm, post_layernorm
        or "embed" in key  # class / positional embedding; HF embeddings.*
        or any(p.startswith("ln_") for p in parts)  # open_clip ln_pre, ln_1, ln_2, ln_post
        or parts[0] == "conv1"  # open_clip's patch embedding
    )


def _is_2d(key: str, tensor: Tensor) -> bool:
    return tensor.dim() == 2 and "lm_head" not in key


@dataclass(frozen=True)
class _Variant:
    centred: bool  # target: rank-K of (τ_i − τ̄) + τ̄ instead of rank-K of τ_i
    start_sum: bool  # start from Σ τ_i instead of the mean
    adam: bool  # Adam instead of SGD
    lr: float
    momentum: float | None
    min_rank_one: bool  # K = max(1, ⌊min/N⌋) instead of int(min/N)
    keeps: Callable[[str, Tensor], bool] | None


VARIANTS = {
    "clip": _Variant(
        centred=True, start_sum=True, adam=True, lr=1e-5, momentum=None, min_rank_one=True, keeps=None
    ),
    "llamafactory": _Variant(
        centred=False, start_sum=False, adam=False, lr=1e-4, momentum=0.9, min_rank_one=False,
        keeps=llamafactory_keeps,
    ),
}


def optmerge_rank(m: int, n: int, num_tasks: int, variant: str = "clip") -> int:
    """K for an [m, n] weight: max(1, ⌊min(m, n)/N⌋) (``"clip"``) or int(min(m, n)/N) (``"llamafactory"``)."""
    k = min(m, n) // num_tasks
    return max(1, k) if _variant(variant).min_rank_one else k


def _variant(name: str) -> _Variant:
    if name not in VARIANTS:
        raise MergeError(f"optmerge variant must be one of {', '.join(map(repr, VARIANTS))}, got {name!r}")
    return VARIANTS[name]


def _rank_k(t: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(rank-K truncation U_K S_K V_Kᵀ of t, S_K V_Kᵀ)."""
    u, s, vh = svd(t)
    lk = s[:rank, None] * vh[:rank]
    return u[:, :rank] @ lk, lk


def _targets(
    taus: Sequence[Tensor], mean: Tensor, rank: int, centred: bool
) -> list[tuple[Tensor, Tensor, float]]:
    """(target T_i, L_i, ‖τ_i‖²) for every non-zero τ_i."""
    out = []
    for t in taus:
        norm_sq = float(t.square().sum())
        if norm_sq == 0.0 or rank == 0:
            continue
        low, lk = _rank_k(t, rank)
        target = _rank_k(t - mean, rank)[0] + mean if centred else low
        out.append((target, lk, norm_sq))
    return out


def optmerge_weight(
    taus: Sequence[Tensor],
    variant: str = "clip",
    lr: float | None = None,
    momentum: float | None = None,
    iters: int = 300,
) -> Tensor:
    """The optimised merged task vector τ* of one 2-D weight (float32, on the inputs' device).

    Args:
        taus: the N task vectors of this weight, each [m, n].
        variant: ``"clip"`` or ``"llamafactory"`` (see the module docstring).
        lr: learning rate (default: the variant's, 1e-5 Adam / 1e-4 SGD).
        momentum: SGD momentum (``"llamafactory"`` only; default 0.9).
        iters: number of optimiser steps.
    """
    spec = _variant(variant)
    taus = [t.float() for t in taus]
    stack = torch.stack(taus)
    mean = stack.mean(0)
    rank = optmerge_rank(*taus[0].shape, len(taus), variant)
    targets = _targets(taus, mean, rank, spec.centred)
    tau = stack.sum(0) if spec.start_sum else mean
    if not targets or iters == 0:
        return tau
    tau.requires_grad_(True)
    lr = spec.lr if lr is None else lr
    if spec.adam:
        opt = torch.optim.Adam([tau], lr=lr)
    else:
        opt = torch.optim.SGD([tau], lr=lr, momentum=spec.momentum if momentum is None else momentum)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = sum(((tau - tgt) @ lk.T).square().sum() / ns for tgt, lk, ns in targets)
            loss.backward()
            opt.step()
    return tau.detach()


def _check_args(variant: str, lr, momentum, iters) -> _Variant:
    spec = _variant(variant)
    if lr is not None and not (lr > 0 and lr < float("inf")):
        raise MergeError(f"optmerge lr must be a finite number > 0, got {lr!r}")
    if momentum is not None:
        if spec.adam:
            raise MergeError(f"optmerge momentum applies to SGD (variant 'llamafactory'), not {variant!r}")
        if not (0 <= momentum < 1):
            raise MergeError(f"optmerge momentum must lie in [0, 1), got {momentum!r}")
    if int(iters) != iters or iters < 0:
        raise MergeError(f"optmerge iters must be an integer >= 0, got {iters!r}")
    return spec


@register_method("optmerge", per_tensor=True, label="OptMerge", presets={
    # the authors' CLIP-ViT port (fusion_bench/config/method/yongxianwei_merging/wudi2.yaml): the default
    "clip": {"variant": "clip", "lr": 1e-5, "iters": 300, "lam": 1.0},
    # their Qwen2-VL script (LLaMA-Factory/model_merging.py, merge_models defaults)
    "llamafactory": {"variant": "llamafactory", "lr": 1e-4, "momentum": 0.9, "iters": 300, "lam": 1.0},
})
@splits_fused_qkv
def optmerge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    variant: str = "clip",
    lr: float | None = None,
    momentum: float | None = None,
    iters: int = 300,
    lam: float = 1.0,
    is_optimized: Callable[[str, Tensor], bool] | None = None,
    is_kept: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """OptMerge: optimised 2-D weights, mean task vector elsewhere; θ_0 + λ τ.

    Presets (``merge_pool(pool, "optmerge", preset=...)``): ``"clip"`` (the defaults) and
    ``"llamafactory"``, the authors' two runs with every value spelled out.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_N.
        variant: ``"clip"`` (the authors' CLIP-ViT port: centred targets, Adam from Σ τ_i) or
            ``"llamafactory"`` (their Qwen2-VL script: SGD from the mean, biases / norms /
            embeddings kept at θ_0); see the module docstring.
        lr: learning rate > 0 (default: the variant's, 1e-5 for Adam, 1e-4 for SGD).
        momentum: SGD momentum in [0, 1) (``"llamafactory"`` only; default 0.9).
        iters: optimiser steps per weight (the authors': 300), >= 0.
        lam: scale λ >= 0 of the merged task vector (1.0 as the authors' CLIP runs).
        is_optimized: ``(key, tensor) -> bool`` choosing the optimised weights among the 2-D float
            tensors that are not kept; default every one (but an ``lm_head``). Keys are seen with
            q, k, v split (``…attn.q_proj.weight``).
        is_kept: ``(key, tensor) -> bool`` choosing the keys that stay at θ_0; default the variant's
            (``"clip"``: none, ``"llamafactory"``: :func:`llamafactory_keeps`).
        device: where to run the per-weight optimisation (default: the task vectors' device); each
            merged task vector comes back to θ_0's device.
    """
    spec = _check_args(variant, lr, momentum, iters)
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    keeps = is_kept or spec.keeps or (lambda key, t: False)
    optimized = is_optimized or _is_2d
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if keeps(key, ts[0]):
            continue
        if ts[0].dim() == 2 and optimized(key, ts[0]):
            ts = [t.to(device=device, dtype=torch.float32) for t in ts]
            merged[key] = optmerge_weight(ts, variant, lr=lr, momentum=momentum, iters=int(iters))
        else:
            merged[key] = torch.stack([t.float() for t in ts]).mean(0)
        merged[key] = merged[key].to(pretrained[key].device)  # back to θ_0's device, where it is added
    return add_task_vector(pretrained, merged, lam)
