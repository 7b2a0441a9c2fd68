"""RegMean: each linear layer merged by the closed-form solution of a least-squares regression.

For a linear layer y = x Wᵀ (W: ``[out, in]``) of K experts, with Gᵢ = Xᵢᵀ Xᵢ the Gram matrix of the
layer's inputs Xᵢ under expert i on unlabeled inputs of task i,

    W = argmin_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²   ⇒   Wᵀ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ,
    G̃ = α G + (1 − α) diag(G)        (the off-diagonal entries shrunk by α; α = 1: none)

and every other parameter is the plain average of the experts.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv 2212.09849 (bloomberg/dataless-model-merging; FusionBench ``fusion_bench/method/regmean``).

The official code scales each Gram matrix to a mean over its input rows (Xᵀ X / n); a common scale
cancels, so pass sums or means alike when every expert saw as many rows. α: FusionBench's CLIP runs
use 0.95 (the default here); the authors' language-model configs 0.1 or 0.9, or none (α = 1). The
solve is a Cholesky solve in float64 (the official code inverts the sum with ``torch.inverse``: the
same solution with less rounding; a singular sum is refused here, naming the key). No statistics come
from here: :mod:`adamerge.systems.regmean` gathers the Gram matrices in one pass over the unlabeled
test stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_ratio, check_same_keys, check_taus
from adamerge.merging.task_vectors import MergeError, StateDict, linear_combination

__all__ = ["reduce_non_diagonal", "regmean_merge", "regmean_solve"]


def _alpha(alpha: float) -> float:
    return check_ratio(alpha, "alpha", allow_zero=True)


def reduce_non_diagonal(gram: Tensor, alpha: float = 0.95) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): the off-diagonal entries of ``gram`` times α, the diagonal kept.

    Args:
        gram: a square ``[d, d]`` Gram matrix (not modified).
        alpha: the off-diagonal scale, in [0, 1] (1: ``gram`` unchanged; 0: its diagonal only).
    """
    alpha = _alpha(alpha)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise MergeError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.95,
                  key: str = "weight", names: Sequence[str] | None = None) -> Tensor:
    """The RegMean weight ``[out, in]``: ((Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ)ᵀ, by a Cholesky solve in float64.

    Args:
        weights: the experts' weights Wᵢ, each ``[out, in]`` (y = x Wᵀ, as ``nn.Linear``).
        grams: the Gram matrices Gᵢ = Xᵢᵀ Xᵢ ``[in, in]`` of the layer's inputs, one per expert.
        alpha: the off-diagonal scale of :func:`reduce_non_diagonal`.
        key: the weight's name, for error messages.
        names: the experts' names (tasks), for error messages; default their indices.

    Returns the weight in the dtype of ``weights[0]``, on the device of ``grams[0]``.
    """
    alpha = _alpha(alpha)
    names = [str(n) for n in (names if names is not None else range(len(weights)))]
    if len(weights) != len(grams) or len(names) != len(weights) or not weights:
        raise MergeError(f"{key}: need one Gram matrix and one name per weight, got {len(weights)} weights, "
                         f"{len(grams)} Gram matrices, {len(names)} names")
    device = grams[0].device
    lhs = rhs = None
    for name, w, g in zip(names, weights, grams):
        if w.dim() != 2:
            raise MergeError(f"{key}: RegMean merges 2-D weights, expert {name!r} has shape {tuple(w.shape)}")
        if tuple(g.shape) != (w.shape[1], w.shape[1]):
            raise MergeError(f"{key}: the Gram matrix of expert {name!r} has shape {tuple(g.shape)}, the weight "
                             f"{tuple(w.shape)} needs ({w.shape[1]}, {w.shape[1]})")
        if not bool(torch.isfinite(g).all()):
            raise MergeError(f"{key}: the Gram matrix of expert {name!r} holds NaN or Inf")
        g = reduce_non_diagonal(g.to(device=device, dtype=torch.float64), alpha)
        gw = g @ w.to(device=device, dtype=torch.float64).t()
        lhs, rhs = (g, gw) if lhs is None else (lhs + g, rhs + gw)
    chol, info = torch.linalg.cholesky_ex(lhs)  # Σ G̃ is positive semi-definite: definite or singular
    tol = float(lhs.diagonal().max()) * lhs.shape[0] * torch.finfo(lhs.dtype).eps
    if int(info) > 0 or float(chol.diagonal().square().min()) <= tol:
        raise MergeError(f"{key}: the sum of the Gram matrices is singular (fewer input rows than its width "
                         f"{lhs.shape[0]}, or inputs that never vary); gather more batches or lower alpha")
    merged_t = torch.cholesky_solve(rhs, chol)
    return merged_t.t().to(weights[0].dtype).contiguous()


def regmean_merge(states: Sequence[StateDict], grams: Sequence[Mapping[str, Tensor]], alpha: float = 0.95,
                  names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Merge K experts: RegMean for every key the Gram matrices name, the average for the rest.

    Args:
        states: the experts' state dicts θᵢ (same keys and shapes, finite); never modified.
        grams: per expert, weight key → Gram matrix ``[in, in]`` of that layer's inputs under the
            expert; every expert names the same keys, each a 2-D float weight of ``states``.
        alpha: the off-diagonal scale of :func:`reduce_non_diagonal` (0.95: FusionBench's CLIP runs).
        names: the experts' names (tasks), for error messages.

    Float keys without a Gram matrix get the mean of the experts (float32, returned in their dtype);
    other keys are copied from the first expert. Everything is returned on the device of the states.
    """
    alpha = _alpha(alpha)
    states = check_taus(states, what="expert state dict")
    grams = list(grams)
    names = [str(n) for n in (names if names is not None else range(len(states)))]
    if len(grams) != len(states) or len(names) != len(states):
        raise MergeError(f"got {len(states)} experts, {len(grams)} sets of Gram matrices and {len(names)} names")
    keys = check_same_keys(grams, names, "the Gram matrices")
    for key in keys:
        if key not in states[0]:
            raise MergeError(f"Gram matrix for key {key!r}, which the experts' state dicts do not have")
        if not states[0][key].is_floating_point():
            raise MergeError(f"Gram matrix for key {key!r}, which holds {states[0][key].dtype} values")
    merged = linear_combination(states, [1.0 / len(states)] * len(states))
    for key in keys:
        w = regmean_solve([s[key] for s in states], [g[key] for g in grams], alpha, key=key, names=names)
        merged[key] = w.to(states[0][key].device)
    return merged
