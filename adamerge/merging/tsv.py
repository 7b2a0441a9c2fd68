"""TSV-M: Task Singular Vectors Merging.

For every merged 2-D weight with K task vectors τ_i ∈ R^{m×n}, rank k = ⌊min(m, n)/K⌋:

    τ_i ≈ U_i Σ_i V_iᵀ                     top-k SVD of each task vector
    U = [U_1 … U_K],  Σ = diag(Σ_1 … Σ_K),  V = [V_1 … V_K]      stacked (m × Kk, Kk, n × Kk)
    U⊥ = P Qᵀ  for U = P S Qᵀ,   V⊥ likewise                     nearest orthogonal matrices
    τ  = U⊥ Σ V⊥ᵀ                                                (2-D keys; the rest: mean of τ_i)
    θ  = θ_0 + α τ,                α = 1

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
arXiv 2412.00081. The authors' code is AntoAndGar/task_singular_vectors,
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`` (method ``TSVM``); FusionBench's
``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py`` is the same function on HF CLIP.
What is taken from it:

* Which keys: every 2-D float tensor whose key does not contain ``text_projection`` gets the SVD
  merge. On an open_clip visual tower that is q, k, v, ``out_proj``, ``c_fc``, ``c_proj``, the
  ``positional_embedding`` and ``proj``; everything else (biases, norms, ``class_embedding``, the 4-D
  ``conv1`` patch embedding) is the plain mean of the task vectors. Nothing stays at θ_0.
* The rank: ``int(min(m, n) * (1 / K))``, equal to ⌊min(m, n)/K⌋ (checked for min(m, n) ≤ 4096,
  K ≤ 30). When K > min(m, n) the rank is 0 and the authors' code returns a zero update for that
  weight (its Σ is all zeros); so does this one.
* The stack: the authors place task i's k components in columns ik…(i+1)k−1 of zero-padded
  [m, min(m, n)] / [min(m, n), n] matrices; the polar factor of the padded stack agrees with that of
  the unpadded one on every column whose Σ entry is non-zero, so the result is the same.
* α: the authors' ``main.py`` picks α on validation from ``linspace(0, 3, 31)[1:]``; FusionBench's
  config uses 1, as here.

Where this differs from the authors' code:

* Components whose singular value is numerically zero (≤ σ_1 · max(m, n) · ε_float32, i.e. a
  rank-deficient τ_i, or an all-zero one) are left out of the stack. They add nothing to Σ, but in the
  authors' code their singular vectors (an arbitrary basis LAPACK picks for the null space) enter the
  orthogonalisation and change the other tasks' directions. With them left out, K mutually orthogonal
  rank-1 task vectors merge to exactly their sum for any k; on full-rank task vectors (real models)
  nothing is left out and the result is the authors'.
* q, k, v: open_clip's fused ``in_proj_weight`` [3d, d] is split into three [d, d] matrices first
  (``split_qkv=True``, the house rule of :mod:`adamerge.merging.fused`; FusionBench's HF CLIP layout).
  The authors ran on open_clip and took one SVD of the fused [3d, d] tensor, with rank ⌊d/K⌋ for all
  three together: ``split_qkv=False`` (the ``official`` preset) reproduces that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_taus, float_keys
from adamerge.merging.fused import QKVLayout, check_split_qkv, svd
from adamerge.merging.registry import register_directions, register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector

__all__ = ["is_tsv_matrix", "orthogonalised_stack", "task_components", "tsv_directions", "tsv_merge", "tsv_merge_weight",
           "tsv_rank", "tsv_weight_parts"]


def is_tsv_matrix(key: str, tensor: Tensor) -> bool:
    """The authors' test for an SVD-merged key: 2-D and not a ``text_projection``."""
    return tensor.dim() == 2 and "text_projection" not in key


def tsv_rank(m: int, n: int, num_tasks: int) -> int:
    """Components k kept per task for an [m, n] weight: ⌊min(m, n)/K⌋ (the authors' int(min · 1/K))."""
    if num_tasks < 1:
        raise MergeError(f"tsv needs at least one task vector, got {num_tasks}")
    return min(m, n) // num_tasks


def _polar(a: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows) to ``a``: P Qᵀ from a = P S Qᵀ."""
    p, _, qh = svd(a)
    return p @ qh


def _top_components(t: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k, σ_k, V_kᵀ) of ``t`` without the components whose singular value is numerically zero."""
    u, s, vh = svd(t)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    tol = float(s[0]) * max(t.shape) * torch.finfo(torch.float32).eps
    keep = s > tol
    return u[:, keep], s[keep], vh[keep]


def _orthogonalised(taus: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]] | None:
    """(U⊥, Σ, V⊥ᵀ, [k_1..k_K]) of one 2-D weight, k_i the components task i put in the stack; None
    when nothing is kept (rank 0, or all-zero task vectors)."""
    m, n = taus[0].shape
    if not tsv_rank(m, n, len(taus)):
        return None
    return orthogonalised_stack([task_components(t.float(), len(taus)) for t in taus])


def task_components(tau: Tensor, num_tasks: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k, σ_k, V_kᵀ): the top k = ⌊min(m, n)/K⌋ ≥ 1 singular triplets of one task's [m, n] τ
    (float32) that TSV-M stacks, numerically zero ones left out; fresh tensors (a boolean selection),
    so ``tau`` and its full SVD can be freed (:mod:`adamerge.merging.tsv_stream` reads one τ at a time)."""
    return _top_components(tau, tsv_rank(*tau.shape, num_tasks))


def orthogonalised_stack(
    parts: list[tuple[Tensor, Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor, list[int]] | None:
    """(U⊥, Σ, V⊥ᵀ, [k_1..k_K]) from each task's :func:`task_components`; None when none is kept.
    ``parts`` is emptied once stacked, so that the components are freed before the SVDs of the stacks."""
    sigma = torch.cat([s for _, s, _ in parts]) if parts else None
    if sigma is None or sigma.numel() == 0:
        return None
    sizes = [s.numel() for _, s, _ in parts]
    u_stack, vh_stack = torch.cat([u for u, _, _ in parts], dim=1), torch.cat([vh for _, _, vh in parts], dim=0)
    parts.clear()
    u_orth = _polar(u_stack)
    del u_stack
    return u_orth, sigma, _polar(vh_stack), sizes


def tsv_merge_weight(taus: Sequence[Tensor]) -> Tensor:
    """The TSV-M merged task vector U⊥ Σ V⊥ᵀ of one 2-D weight (float32, on the inputs' device).

    Args:
        taus: the K task vectors of this weight, each [m, n].
    """
    found = _orthogonalised(taus)
    if found is None:
        return torch.zeros(*taus[0].shape, dtype=torch.float32, device=taus[0].device)
    u_orth, sigma, vh_orth, _ = found
    return (u_orth * sigma) @ vh_orth


def tsv_weight_parts(taus: Sequence[Tensor]) -> list[Tensor]:
    """Task i's part U⊥_i Σ_i V⊥_iᵀ of the TSV-M merge of one 2-D weight (its block of columns of the
    orthogonalised stack); the parts sum to :func:`tsv_merge_weight`.

    Args:
        taus: the K task vectors of this weight, each [m, n].
    """
    found = _orthogonalised(taus)
    if found is None:
        return [torch.zeros(*t.shape, dtype=torch.float32, device=t.device) for t in taus]
    u_orth, sigma, vh_orth, sizes = found
    blocks = torch.split(torch.arange(sigma.numel(), device=sigma.device), sizes)
    return [(u_orth[:, b] * sigma[b]) @ vh_orth[b] for b in blocks]


@register_method("tsv_m", per_tensor=True, label="TSV-M", presets={
    # the authors' runs (AntoAndGar/task_singular_vectors, open_clip): one SVD of the fused q;k;v; α = 1
    # is FusionBench's value (the authors pick α on validation from 0.1..3.0)
    "official": {"lam": 1.0, "split_qkv": False},
    # FusionBench (HF CLIP, q, k, v apart), config/method/task_singular_vector/TaskSingularVectorMerging.yaml
    "fusion_bench": {"lam": 1.0, "split_qkv": True},
})
def tsv_merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    lam: float = 1.0,
    split_qkv: bool = True,
    is_svd_merged: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """TSV-M: orthogonalised top-k singular vectors for 2-D weights, mean task vector elsewhere; θ_0 + λ τ.

    Presets (``merge_pool(pool, "tsv_m", preset=...)``): ``"official"`` (the authors' open_clip run,
    fused q;k;v) and ``"fusion_bench"`` (q, k, v apart, the defaults).

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K (K sets the rank ⌊min(m, n)/K⌋ of every weight).
        lam: scale α >= 0 of the merged task vector (1.0 as FusionBench; the authors pick it on
            validation).
        split_qkv: merge open_clip's fused ``in_proj_weight`` as three matrices q, k, v (the house
            rule, HF layout); ``False`` takes one SVD of the fused [3d, d] tensor as the authors' code.
        is_svd_merged: ``(key, tensor) -> bool`` choosing the SVD-merged keys among the 2-D float
            tensors; default :func:`is_tsv_matrix` (all but ``text_projection``). Keys are seen with
            q, k, v split (``…attn.q_proj.weight``) unless ``split_qkv=False``. The rest is averaged.
        device: where to run the SVDs (default: where the task vectors are); results come back there.
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    check_split_qkv(split_qkv, "tsv")
    layout = QKVLayout.of(pretrained) if split_qkv else QKVLayout()
    pre = layout.split(pretrained, name="pretrained state dict")
    taus = [layout.split(t, name=f"task vector {i}") for i, t in enumerate(taus)]
    chosen = is_svd_merged or is_tsv_matrix
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if ts[0].dim() == 2 and chosen(key, ts[0]):
            home = ts[0].device
            merged[key] = tsv_merge_weight([t.to(device or home) for t in ts]).to(home)
        else:
            merged[key] = torch.stack([t.float() for t in ts]).mean(0)
    return layout.fuse(add_task_vector(pre, merged, lam))


@register_directions("tsv_m", presets={"official": {"split_qkv": False}, "fusion_bench": {"split_qkv": True}})
def tsv_directions(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    split_qkv: bool = True,
    is_svd_merged: Callable[[str, Tensor], bool] | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(θ_0, [d_1..d_K]): TSV-M split by task, so that θ_0 + Σ_i d_i = ``tsv_merge(..., lam=1)``.

    On the SVD-merged keys d_i is task i's block of the orthogonalised subspace (:func:`tsv_weight_parts`);
    on every other float key d_i = τ_i / K (the mean's share). AdaMerging learns a coefficient per
    task (and layer) on them; the fused q;k;v hold the three matrices' parts.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        split_qkv: as in :func:`tsv_merge`.
        is_svd_merged: as in :func:`tsv_merge`.
    """
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    check_split_qkv(split_qkv, "tsv")
    layout = QKVLayout.of(pretrained) if split_qkv else QKVLayout()
    split = [layout.split(t, name=f"task vector {i}") for i, t in enumerate(taus)]
    chosen = is_svd_merged or is_tsv_matrix
    dirs: list[dict[str, Tensor]] = [{} for _ in split]
    for key in float_keys(split[0]):
        ts = [t[key] for t in split]
        if ts[0].dim() == 2 and chosen(key, ts[0]):
            parts = tsv_weight_parts(ts)
        else:
            parts = [t.float() / len(ts) for t in ts]
        for d, t, part in zip(dirs, ts, parts):
            d[key] = part.to(t.dtype)
    return dict(pretrained), [layout.fuse(d, name=f"direction {i}") for i, d in enumerate(dirs)]
