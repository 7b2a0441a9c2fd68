"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces.

For every merged 2-D weight with task vectors τ_1..τ_T ∈ R^{m×n}, r = min(m, n):

    Iso-C     Δ = Σ_t τ_t = U Σ Vᵀ                       thin SVD, r components
              τ = σ̄ U Vᵀ,  σ̄ = (1/r) Σ_i σ_i             every singular value replaced by their mean
    Iso-CTS   s = round((r − ⌊f·r⌋) / T),  k = r − T·s   (f = common_space_fraction = 0.8)
              U_k, Σ_k, V_k                               top-k singular triplets of Δ (common subspace)
              τ_t − U_k U_kᵀ τ_t = P_t S_t Q_tᵀ           each task outside the common subspace;
                                                          its top-s triplets are its own directions
              Ũ = [U_k, P_1,s … P_T,s],  Ṽ = [V_k, Q_1,s … Q_T,s]       r columns each
              Ũ ← polar(Ũ),  Ṽ ← polar(Ṽ)                 nearest orthonormal: A = L D Rᵀ ↦ L Rᵀ
              τ = σ̄ Ũ Ṽᵀ,  σ̄ = mean of the r kept singular values (Σ_k and every S_t,s)
    other     τ = (1/T) Σ_t τ_t                           biases, norms, class embedding, conv1 (4-D)
    θ = θ_0 + α τ

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, arXiv 2502.04959. Facts taken from the authors' code (danielm1405/iso-merging,
``src/utils/iso.py``, ``config/method/iso_cts.yaml``; FusionBench's copy
``fusion_bench/method/isotropic_merging/iso_utils.py`` is the same math):

* Merged are the float tensors with two dimensions whose key does not contain ``text_projection``:
  on a CLIP visual tower the attention and MLP weights, ``positional_embedding`` and ``proj``. Every
  other float tensor is the mean of the task vectors.
* Every one of the r singular directions is kept, those of zero singular value too, so a rank-deficient
  Δ gets full rank (its extra directions are whatever the SVD returns, as in the authors' code).
* ``s`` and ``k`` are :func:`iso_cts_sizes`: Python's ``round`` (half to even) of the task-specific
  share, so with f = 1, or whenever (r − ⌊f·r⌋)/T ≤ 0.5, s = 0 and Iso-CTS *is* Iso-C. Where
  T·s would exceed r (possible only when ⌊f·r⌋ < T/2, e.g. f = 0) the authors' code fails; here s is
  capped at ⌊r/T⌋ instead. The authors put the task blocks first and the common block last in Ũ, Ṽ; the order
  of columns does not change polar(Ũ) polar(Ṽ)ᵀ.
* α: the authors pick it on validation from 0.1, 0.2 … 3.0 (``src/eval/eval.py``) and publish no
  fixed value; the ``official`` preset holds α = 1.0, the value for ViT-B/32 on 8 tasks listed in
  crisostomi/model-merging ``conf/merger/isotropic.yaml`` and ``iso-cts.yaml`` (ViT-B/16: 1.4,
  ViT-L/14: 1.5; presets ``vit_b16``, ``vit_l14``). FusionBench's config default is 1.0 too.

q, k, v are three matrices here as in HF CLIP and FusionBench: open_clip's fused ``in_proj_weight``
is split first (:func:`~adamerge.merging.fused.splits_fused_qkv`). The authors' own code runs on
open_clip and takes one SVD of the fused [3d, d] matrix; ``iso_c.__wrapped__`` does that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_ratio, check_taus, float_keys
from adamerge.merging.fused import splits_fused_qkv, svd
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import StateDict, add_task_vector

__all__ = ["is_iso_matrix", "iso_c", "iso_c_weight", "iso_cts", "iso_cts_sizes", "iso_cts_weight"]

KeyTest = Callable[[str, Tensor], bool]


def is_iso_matrix(key: str, tensor: Tensor) -> bool:
    """The authors' test for a merged matrix: 2-D and not a ``text_projection``."""
    return tensor.dim() == 2 and "text_projection" not in key


def iso_c_weight(taus: Sequence[Tensor]) -> Tensor:
    """Iso-C's τ for one [m, n] weight: Δ = Σ_t τ_t = U Σ Vᵀ ↦ mean(Σ) U Vᵀ (float32, inputs' device).

    Args:
        taus: the T task vectors of this weight, each [m, n].
    """
    delta = _sum(taus)
    u, s, vh = svd(delta)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, num_tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """(k, s): common directions k and directions per task s for a weight of rank r = min(m, n).

    s = round((r − ⌊f·r⌋) / T) with Python's ``round`` and k = r − T·s (the authors' allocation, so
    that the task-specific space splits evenly); s is capped at ⌊r/T⌋ where the authors' would leave
    k < 0.

    Args:
        rank: r = min(m, n).
        num_tasks: T.
        common_space_fraction: f in [0, 1].
    """
    per_task = round((rank - int(rank * common_space_fraction)) / num_tasks)
    per_task = min(per_task, rank // num_tasks)
    return rank - num_tasks * per_task, per_task


def _polar(a: Tensor) -> Tensor:
    """The matrix with orthonormal columns (rows, when wide) nearest to ``a``: L Rᵀ of a = L D Rᵀ."""
    left, _, right_h = svd(a)
    return left @ right_h


def iso_cts_weight(taus: Sequence[Tensor], common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS's τ for one [m, n] weight (float32, on the inputs' device).

    Args:
        taus: the T task vectors of this weight, each [m, n].
        common_space_fraction: f in [0, 1]: about f·r of the r = min(m, n) directions come from the
            sum, the rest evenly from the tasks (:func:`iso_cts_sizes`).
    """
    taus = [t.float() for t in taus]
    k, s = iso_cts_sizes(min(taus[0].shape), len(taus), common_space_fraction)
    u, sv, vh = svd(_sum(taus))
    u_k = u[:, :k]
    lefts, values, rights = [u_k], [sv[:k]], [vh[:k]]
    if s:
        for t in taus:
            p, d, qh = svd(t - u_k @ (u_k.T @ t))
            lefts.append(p[:, :s])
            values.append(d[:s])
            rights.append(qh[:s])
    sigma = torch.cat(values).mean()
    return sigma * (_polar(torch.cat(lefts, dim=1)) @ _polar(torch.cat(rights, dim=0)))


def _sum(taus: Sequence[Tensor]) -> Tensor:
    total = taus[0].float().clone()
    for t in taus[1:]:
        total.add_(t.float())
    return total


def _merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    lam: float,
    weight: Callable[[Sequence[Tensor]], Tensor],
    is_matrix: KeyTest | None,
    device: str | torch.device | None,
) -> dict[str, Tensor]:
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    pick = is_matrix or is_iso_matrix
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if ts[0].dim() == 2 and ts[0].numel() > 0 and pick(key, ts[0]):
            home = ts[0].device
            merged[key] = weight([t.to(device=device or home, dtype=torch.float32) for t in ts]).to(home)
        else:
            merged[key] = _sum(ts) / len(ts)
    return add_task_vector(pretrained, merged, lam)


@register_method("iso_c", per_tensor=True, label="Iso-C", presets={
    # the authors' open_clip code: one SVD of the fused in_proj_weight (split_qkv False)
    "official": {"lam": 1.0, "split_qkv": False},  # ViT-B/32, 8 tasks
    "vit_b16": {"lam": 1.4, "split_qkv": False},
    "vit_l14": {"lam": 1.5, "split_qkv": False},
})
@splits_fused_qkv
def iso_c(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    lam: float = 1.0,
    is_matrix: KeyTest | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Iso-C: the summed task vector of every matrix with a flat spectrum, the mean elsewhere; θ_0 + α τ.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_T.
        lam: the scale α >= 0 of the merged task vector (the authors pick it on validation; 1.0 is
            the ViT-B/32 value, see the module docstring).
        is_matrix: ``(key, tensor) -> bool`` choosing, among the 2-D float tensors, the ones merged
            isotropically (the rest are averaged); default :func:`is_iso_matrix`, the authors' (every
            one but a ``text_projection``). Keys are seen with q, k, v split (``…attn.q_proj.weight``).
        device: where to run the SVDs (default: where the task vectors are); results come back there.
    """
    return _merge(pretrained, taus, lam, iso_c_weight, is_matrix, device)


@register_method("iso_cts", per_tensor=True, label="Iso-CTS", presets={
    "official": {"common_space_fraction": 0.8, "lam": 1.0, "split_qkv": False},  # ViT-B/32, 8 tasks
    "vit_b16": {"common_space_fraction": 0.8, "lam": 1.4, "split_qkv": False},
    "vit_l14": {"common_space_fraction": 0.8, "lam": 1.5, "split_qkv": False},
})
@splits_fused_qkv
def iso_cts(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    common_space_fraction: float = 0.8,
    lam: float = 1.0,
    is_matrix: KeyTest | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Iso-CTS: common directions of the sum plus each task's own, flat spectrum; the mean elsewhere.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_T.
        common_space_fraction: f in [0, 1], the share of each matrix's r = min(m, n) directions
            taken from the sum of the task vectors (the authors': 0.8); f = 1 is Iso-C.
        lam, is_matrix, device: as in :func:`iso_c`.
    """
    fraction = check_ratio(common_space_fraction, "iso_cts common_space_fraction", allow_zero=True)

    def weight(ts: Sequence[Tensor]) -> Tensor:
        return iso_cts_weight(ts, fraction)

    return _merge(pretrained, taus, lam, weight, is_matrix, device)

