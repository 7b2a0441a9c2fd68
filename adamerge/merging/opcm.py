"""OPCM: continual model merging by orthogonal projection and adaptive scaling.

Experts arrive one at a time. With S_t = λ_t τ_merged,t the running (unscaled) merged task vector:

    S_1 = τ_1,  λ_1 = 1
    for a 2-D linear weight:  S_{t−1} = U Σ Vᵀ (full SVD),  r = first index with cumsum(σ)/Σσ > α
                              P = Uᵀ τ_t V;  P_ii = 0;  P[:r, :r] = 0;  τ̃_t = U P Vᵀ
    for every other merged float parameter:  τ̃_t = τ_t
    S_t = S_{t−1} + τ̃_t,     λ_t = ‖S_t‖ / mean_{k≤t} ‖τ_k‖,     θ_t = θ_0 + S_t / λ_t
    for a parameter that is not merged (``class_embedding``):  S_t = S_{t−1} / λ_{t−1}

so the merged task vector always has the mean norm of the task vectors seen so far (√t is the naive
reference for λ_t). Norms are over all float entries of the model. α = 0.5.

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging", arXiv 2501.09522 (FusionBench ``opcm``).

Parity with the authors' code (tanganke/fusion_bench ``fusion_bench/method/opcm/opcm.py``,
``OPCMForCLIP`` on HF ``CLIPVisionModel``):

* q, k, v are projected as three matrices: open_clip's fused ``in_proj_weight`` [3d, d] is split
  before the SVDs (:mod:`adamerge.merging.fused`), as HF's ``q_proj`` / ``k_proj`` / ``v_proj`` are.
* Only parameters of leaf modules are merged there: ``nn.Linear`` weights projected, every other
  leaf parameter (biases, norms, patch and position embeddings) added. The one parameter of a CLIP
  vision tower held by a non-leaf module, ``embeddings.class_embedding`` (open_clip
  ``class_embedding``), is never merged: it keeps the first expert's value (FusionBench starts from
  the first expert's model) and is only rescaled with everything else, which is the recursion above
  (its merged task vector is τ_1 / λ_2 ⋯ λ_t). ``is_merged`` changes the set.
* P_ii = 0 as FusionBench does since commit 2c3df13 (2025-03-18, ``.diagonal().fill_(0)``). The
  paper-era code (tanganke/opcm, same file) wrote ``.diag().fill_(0)``, which fills a copy: a no-op,
  so only the [:r, :r] block was zeroed there.
* open_clip's ``proj`` (no ``weight`` suffix) is added unprojected; FusionBench's
  ``CLIPVisionModel`` has no projection at all (its experts share the pretrained one, τ = 0).
* FusionBench shuffles the experts (``shuffle_order: true``) and the paper averages 10 orders; here
  the order is the caller's (``tasks``).

Memory: the merger holds θ_0 (by reference), S (float32, one model) and three scalars, whatever the
number of experts; the added expert is dropped when :meth:`OPCMerger.add` returns. Inputs are
validated (keys, shapes, finite) before S is touched, then S is updated key by key in place. The projection is
computed as τ̃ = τ − U_k M V_kᵀ with the thin SVD (k = min(m, n)) and M the zeroed entries of P, which
equals U P Vᵀ with the full SVD exactly (entries of P outside [:k, :k] are never zeroed). Where
S_{t−1} of a weight is all zeros there is nothing to be orthogonal to and τ_t is added unprojected.
Results depend on the order experts arrive in (the paper averages 10 random orders).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from adamerge.merging._common import check_ratio, float_keys, is_linear_weight
from adamerge.merging.fused import QKVLayout, svd
from adamerge.merging.registry import TaskVectorSource, register_method
from adamerge.merging.task_vectors import (
    MergeError,
    StateDict,
    add_task_vector,
    check_compatible,
    check_finite,
    is_mergeable,
)

__all__ = ["OPCMerger", "fusionbench_merges", "opcm_pool", "opcm_project", "split_rank"]


def split_rank(s: Tensor, alpha: float) -> int:
    """r = first index where cumsum(σ)/sum(σ) > α (0 when σ is all zero)."""
    total = float(s.sum())
    if total <= 0:
        return 0
    return int(torch.argmax((s.cumsum(0) / total > alpha).to(torch.int8)))


def opcm_project(merged_tau: Tensor, tau: Tensor, alpha: float = 0.5) -> Tensor:
    """Project a 2-D task vector τ away from the dominant subspace of the merged task vector.

    Args:
        merged_tau: the current merged task vector of this weight (any positive scale of it).
        tau: the new expert's task vector of this weight, same shape.
        alpha: energy fraction α in (0, 1] defining the protected rank r.
    """
    m = merged_tau.float()
    if not bool(m.any()):
        return tau.float().clone()
    u, s, vh = svd(m)
    r = split_rank(s, alpha)
    t = tau.float()
    p = u.T @ t @ vh.T  # [k, k] block of Uᵀ τ V
    removed = torch.zeros_like(p)
    removed[:r, :r] = p[:r, :r]
    idx = torch.arange(p.shape[0])
    removed[idx, idx] = p[idx, idx]
    return t - u @ removed @ vh


def fusionbench_merges(key: str, tensor: Tensor) -> bool:
    """Default ``is_merged``: every parameter but ``class_embedding``, the one a CLIP vision tower
    holds in a non-leaf module (FusionBench merges leaf modules only)."""
    return key.rsplit(".", 1)[-1] != "class_embedding"


class OPCMerger:
    """Continual merger: call :meth:`add` once per expert (any order), read :meth:`merged_state`.

    Args:
        pretrained: θ_0's state dict (kept by reference, never modified).
        alpha: energy fraction α in (0, 1] that defines the protected rank r of each 2-D weight.
        is_projected: ``(key, tensor) -> bool`` choosing the weights that get projected; default
            2-D float tensors whose key ends in ``weight`` and is not an embedding. Keys are seen with
            q, k, v split (``…attn.q_proj.weight``, :mod:`adamerge.merging.fused`).
        is_merged: ``(key, tensor) -> bool``; a key for which it is False keeps the first expert's task
            vector, only rescaled (FusionBench); default :func:`fusionbench_merges` (all but
            ``class_embedding``). ``lambda k, t: True`` merges every parameter.
    """

    def __init__(
        self,
        pretrained: StateDict,
        alpha: float = 0.5,
        is_projected: Callable[[str, Tensor], bool] | None = None,
        is_merged: Callable[[str, Tensor], bool] | None = None,
    ) -> None:
        check_finite(pretrained, name="pretrained state dict")
        self.alpha = check_ratio(alpha, "opcm alpha")
        self._layout = QKVLayout.of(pretrained)  # q, k, v projected apart, as in HF CLIP
        self.pretrained = self._layout.split({k: v.detach() for k, v in pretrained.items()})
        self._keys = float_keys(self.pretrained)
        if not self._keys:
            raise MergeError("pretrained state dict has no floating-point tensors to merge")
        test = is_projected or is_linear_weight
        self._projected = frozenset(
            k for k in self._keys if test(k, self.pretrained[k]) and self.pretrained[k].dim() == 2
        )
        merged = is_merged or fusionbench_merges
        self._carried = frozenset(k for k in self._keys if not merged(k, self.pretrained[k]))
        self._sum: dict[str, Tensor] | None = None  # S_t
        self.count = 0
        self.lambda_t = 1.0
        self.mean_norm = 0.0

    def add(self, state_dict: StateDict, name: str = "expert") -> None:
        """Merge one expert θ_k (its task vector τ_k = θ_k − θ_0 is formed key by key).

        Args:
            state_dict: the expert's state dict, same keys and shapes as θ_0, finite.
            name: how the expert is called in error messages.
        """
        state_dict = self._layout.split(state_dict, name=name)
        check_compatible(self.pretrained, state_dict, name=name)
        check_finite(state_dict, name=name)
        self._update(lambda k: state_dict[k].float() - self.pretrained[k].float())

    def add_task_vector(self, tau: StateDict, name: str = "task vector") -> None:
        """Merge one expert given as its task vector τ_k (float keys of θ_0, e.g. from a ModelPool).

        Args:
            tau: the task vector τ_k over θ_0's float keys, finite.
            name: how it is called in error messages.
        """
        tau = self._layout.split(tau, name=name)
        ref = {k: self.pretrained[k] for k in self._keys}
        check_compatible(ref, {k: v for k, v in tau.items() if is_mergeable(v)}, name=name)
        check_finite(tau, name=name)
        self._update(lambda k: tau[k].float())

    def _update(self, get_tau: Callable[[str], Tensor]) -> None:
        first = self._sum is None
        new_sum: dict[str, Tensor] = {} if first else self._sum  # updated key by key, in place
        tau_sq, sum_sq = 0.0, 0.0
        for key in self._keys:
            t = get_tau(key)
            tau_sq += float(t.square().sum())
            if first:
                s = t.clone()
            elif key in self._carried:  # not merged: keeps its current merged value S_{t−1}/λ_{t−1}
                s = self._sum[key] / self.lambda_t
            else:
                prev = self._sum[key]
                s = prev + (opcm_project(prev, t, self.alpha) if key in self._projected else t)
            sum_sq += float(s.square().sum())
            new_sum[key] = s
        self._sum = new_sum
        self.count += 1
        self.mean_norm += (math.sqrt(tau_sq) - self.mean_norm) / self.count
        self.lambda_t = math.sqrt(sum_sq) / self.mean_norm if self.mean_norm > 0 and sum_sq > 0 else 1.0

    def _merged_split(self) -> dict[str, Tensor]:
        if self._sum is None:
            raise MergeError("no expert added yet: call add() first")
        return {k: v / self.lambda_t for k, v in self._sum.items()}

    def merged_task_vector(self) -> dict[str, Tensor]:
        """τ_merged,t = S_t / λ_t (float32), over θ_0's float keys (open_clip layout)."""
        return self._layout.fuse(self._merged_split())

    def merged_state(self) -> dict[str, Tensor]:
        """θ_t = θ_0 + S_t / λ_t, a new state dict in θ_0's dtypes (non-float keys copied)."""
        return self._layout.fuse(add_task_vector(self.pretrained, self._merged_split()))


@register_method("opcm", pool_level=True, label="OPCM")
def opcm_pool(pool: TaskVectorSource, tasks=None, alpha: float = 0.5, **kwargs) -> dict[str, Tensor]:
    """OPCM: orthogonal projection continual merging, one expert in memory at a time.

    Experts are added in ``tasks`` order; ``kwargs`` are :class:`OPCMerger`'s other arguments."""
    merger = OPCMerger(pool.pretrained_state(), alpha=alpha, **kwargs)
    for task, tau in pool.task_vectors(tasks):
        merger.add_task_vector(tau, name=f"task vector {task!r}")
    return merger.merged_state()
