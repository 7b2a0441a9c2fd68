"""CART: centred, low-rank task vectors added to the weight average.

For K task vectors τ_1..τ_K and every low-rank weight W (attention / MLP matrices) of size m × n:

    τ̄    = (1/K) Σ_i τ_i                                  θ_avg = θ_0 + τ̄, the weight average
    c_i  = τ_i − τ̄ = θ_i − θ_avg                          task vectors centred on the average
    r    = max(1, ⌊ρ · min(m, n)⌋)                         (ρ = 1: min(m, n); ρ = 0: nothing kept)
    θ    = θ_avg + λ Σ_i SVD_r(c_i)                         SVD_r: top-r singular components
    θ    = θ_avg                                           every other float tensor

Choi et al., "Revisiting Weight Averaging for Model Merging" (CART), arXiv 2412.12153. Defaults are the
authors' ViT-B/32 8-task run (``configs/CART/ViT-b-32_8_CART.yaml``: ``prior`` λ = 2.0,
``initial_rank_ratio`` ρ = 0.12); presets ``official_14`` (1.5, 0.16) and ``official_20`` (1.9, 0.32)
are their 14- and 20-task runs. What follows their code (JH-GEECS/CART ``src/merging.py``,
``StaticMergeModule._merge_weights`` / ``_get_truncated_task_vectors``):

* low-rank keys: names holding ``attn`` or ``mlp`` but neither ``ln`` nor ``bias``
  (:func:`cart_lowrank_key`); positional embedding, ``proj``, ``conv1``, norms and biases stay at
  θ_avg (their code adds λ Σ_i c_i there, which is zero: we write θ_avg directly);
* r = ``max(1, int(ρ · min(m, n)))``, all of min(m, n) for ρ = 1 and none for ρ = 0.

Since Σ_i c_i = 0, a full rank (ρ = 1) gives θ_avg for every λ, as does λ = 0: CART differs from the
weight average only through the truncation (it is *not* task arithmetic at full rank).

One choice differs from the authors' code: their open_clip ``ImageEncoder`` takes one SVD of the fused
``attn.in_proj_weight`` [3d, d] (q;k;v together, r = ⌊ρ d⌋ for the three). Here q, k, v are three
[d, d] matrices with r each, as the house's SVD methods (:mod:`adamerge.merging.fused`);
``split_qkv=False`` gives their fused SVD.

:func:`cart_directions` returns θ_avg and the per-task directions SVD_r(c_i) (c_i on the other keys, as
AdaRank's adaptive CART, david3684/AdaRank ``vision/src/models/merge_vit/adaptive.py``), for methods
that learn a coefficient per task and layer on them (AdaMerging + CART).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_ratio, check_taus, float_keys
from adamerge.merging.fused import QKVLayout, svd
from adamerge.merging.registry import register_directions, register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector

__all__ = ["cart", "cart_directions", "cart_lowrank_key", "cart_rank"]

KeyTest = Callable[[str, Tensor], bool]


def cart_lowrank_key(key: str, tensor: Tensor) -> bool:
    """The authors' choice of low-rank weights: 2-D, ``attn`` or ``mlp`` in the name, no ``ln`` / ``bias``."""
    return tensor.dim() == 2 and ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def cart_rank(m: int, n: int, rank_ratio: float) -> int:
    """Components kept of an [m, n] centred task vector: max(1, int(ρ·min(m, n))); all at ρ = 1, none at 0."""
    dim = min(m, n)
    if rank_ratio == 0.0:
        return 0
    if rank_ratio == 1.0:
        return dim
    return max(1, int(rank_ratio * dim))


def _lowrank(centred: Tensor, rank: int) -> Tensor:
    """Top-``rank`` SVD reconstruction of every matrix of a [K, m, n] stack."""
    if rank == 0:
        return torch.zeros_like(centred)
    u, s, vh = svd(centred)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def _key_parts(ts: Sequence[Tensor], lowrank: bool, rank_ratio: float) -> tuple[Tensor, Tensor]:
    """(τ̄, directions [K, …]) of one key in float32: SVD_r(τ_i − τ̄) on low-rank keys, τ_i − τ̄ elsewhere."""
    stack = torch.stack([t.float() for t in ts])
    mean = stack.mean(0)
    centred = stack - mean
    if lowrank:
        centred = _lowrank(centred, cart_rank(*stack.shape[1:], rank_ratio))
    return mean, centred


def _prepare(
    pretrained: StateDict, task_vectors: Sequence[StateDict], rank_ratio: float, split_qkv: bool,
    is_lowrank: KeyTest | None,
) -> tuple[QKVLayout, StateDict, list[StateDict], float, KeyTest]:
    """Validate the inputs and split q;k;v (when asked): (layout, θ_0, τ's, ρ, low-rank test)."""
    taus = check_taus(task_vectors)
    if not isinstance(pretrained, Mapping):
        raise MergeError(f"pretrained must be a state dict, got {type(pretrained).__name__}")
    check_against_pretrained(pretrained, taus)
    rank_ratio = check_ratio(rank_ratio, "cart rank_ratio", allow_zero=True)
    layout = QKVLayout.of(pretrained) if split_qkv else QKVLayout()
    pre = layout.split(pretrained, name="pretrained state dict")
    taus = [layout.split(t, name=f"task vector {i}") for i, t in enumerate(taus)]
    test = is_lowrank or cart_lowrank_key
    for key in float_keys(taus[0]):
        if test(key, taus[0][key]) and taus[0][key].dim() != 2:
            raise MergeError(
                f"cart is_lowrank chose key {key!r} of shape {tuple(taus[0][key].shape)}: only 2-D weights "
                "have a low-rank part"
            )
    return layout, pre, taus, rank_ratio, test


@register_method("cart", per_tensor=True, label="CART", presets={
    # JH-GEECS/CART configs/CART/ViT-b-32_{8,14,20}_CART.yaml (prior, initial_rank_ratio); published
    # ViT-B/32: 84.7 / 79.5 / 76.3
    # (their open_clip encoder: one SVD of the fused in_proj_weight, hence split_qkv False)
    "official": {"lam": 2.0, "rank_ratio": 0.12, "split_qkv": False},
    "official_14": {"lam": 1.5, "rank_ratio": 0.16, "split_qkv": False},
    "official_20": {"lam": 1.9, "rank_ratio": 0.32, "split_qkv": False},
})
def cart(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    lam: float = 2.0,
    rank_ratio: float = 0.12,
    split_qkv: bool = True,
    is_lowrank: KeyTest | None = None,
) -> dict[str, Tensor]:
    """CART: θ_avg + λ Σ_i SVD_r(τ_i − τ̄) on the attention / MLP weights, θ_avg elsewhere.

    Works key by key: peak memory is the task vectors plus one weight's K centred copies and SVDs,
    on the device of the inputs.

    Args:
        pretrained: θ_0.
        task_vectors: the task vectors τ_1..τ_K.
        lam: scale λ >= 0 of the summed low-rank centred vectors (the authors' ``prior``; 2.0 for
            ViT-B/32 on 8 tasks, 1.5 on 14, 1.9 on 20).
        rank_ratio: ρ in [0, 1], the fraction of min(m, n) singular components kept of each centred
            task vector, r = max(1, int(ρ·min(m, n))) (the authors' ``initial_rank_ratio``; 0.12, 0.16,
            0.32 for 8, 14, 20 tasks). 1 keeps all (the result is θ_avg), 0 none (θ_avg too).
        split_qkv: treat open_clip's fused ``in_proj_weight`` as three [d, d] matrices q, k, v (default,
            as HF CLIP); ``False`` takes one SVD of the fused [3d, d] matrix as the authors' code does.
        is_lowrank: ``(key, tensor) -> bool`` choosing the weights that get the low-rank treatment, which
            must be 2-D; default :func:`cart_lowrank_key`. Keys are seen with q, k, v split
            (``…attn.q_proj.weight``) unless ``split_qkv=False``.
    """
    lam = check_lam(lam)
    layout, pre, taus, rank_ratio, test = _prepare(pretrained, task_vectors, rank_ratio, split_qkv, is_lowrank)
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if test(key, ts[0]):
            mean, dirs = _key_parts(ts, True, rank_ratio)
            merged[key] = mean + lam * dirs.sum(0)
        else:  # the authors add λ Σ_i (τ_i − τ̄) = 0 here
            merged[key] = torch.stack([t.float() for t in ts]).mean(0)
    return layout.fuse(add_task_vector(pre, merged))


@register_directions("cart", presets={
    # AdaMerging + CART: CART's rank for the task count (JH-GEECS/CART configs), the fused q;k;v SVD of the
    # authors' open_clip runs; AdaRank's adaptive CART (david3684/AdaRank) starts from the same split
    "official": {"rank_ratio": 0.12, "split_qkv": False},
    "official_14": {"rank_ratio": 0.16, "split_qkv": False},
    "official_20": {"rank_ratio": 0.32, "split_qkv": False},
})
def cart_directions(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    rank_ratio: float = 0.12,
    split_qkv: bool = True,
    is_lowrank: KeyTest | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """θ_avg and the per-task CART directions, so that ``cart(...) = θ_avg + λ Σ_i d_i``.

    d_i = SVD_r(τ_i − τ̄) on the low-rank keys and τ_i − τ̄ on every other float key (these sum to
    zero over i, so a common λ leaves θ_avg there; learned per-task coefficients move them, as in
    AdaRank's adaptive CART). The result is in the input layout (a fused ``in_proj_weight`` holds
    q;k;v's three low-rank parts).

    Args:
        pretrained: θ_0.
        task_vectors: the task vectors τ_1..τ_K.
        rank_ratio: ρ in [0, 1], as in :func:`cart`.
        split_qkv: as in :func:`cart`.
        is_lowrank: as in :func:`cart`.

    Returns:
        (θ_avg in θ_0's dtypes, non-float tensors from θ_0; [d_1..d_K] over the float keys, each in its
        task vector's dtype).
    """
    layout, pre, taus, rank_ratio, test = _prepare(pretrained, task_vectors, rank_ratio, split_qkv, is_lowrank)
    mean: dict[str, Tensor] = {}
    dirs: list[dict[str, Tensor]] = [{} for _ in taus]
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        mean[key], parts = _key_parts(ts, test(key, ts[0]), rank_ratio)
        for d, t, part in zip(dirs, ts, parts):
            d[key] = part.to(t.dtype)
    base = layout.fuse(add_task_vector(pre, mean), name="weight average")
    return base, [layout.fuse(d, name=f"direction {i}") for i, d in enumerate(dirs)]
