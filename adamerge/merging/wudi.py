"""WUDI-Merging: for each linear weight, the merged task vector that the task vectors themselves say
interferes least with every task's inputs.

For an optimised [m, n] weight with task vectors τ_1..τ_K (rows span each task's input subspace):

    τ*  = argmin_τ  Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F           Adam (lr 1e-5), 300 steps, from Σ_i τ_i
    θ   = θ_0 + α τ*                                              α = 1

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors" (WUDI-Merging, ICML 2025), arXiv 2503.08099.

The loss is quadratic in τ: with G = Σ_i τ_iᵀτ_i / ‖τ_i‖² ([n, n]) and B = Σ_i τ_i τ_iᵀτ_i / ‖τ_i‖²
([m, n]) its gradient is 2 (τ G − B), the gradient the authors' autograd loop computes. G and B are
accumulated one task vector at a time, so a weight's working set is G, B, τ and Adam's two moments
(never the K stacked task vectors), and a step costs O(m·n²) instead of O(K·m²·n); the Adam steps
themselves are ``torch.optim.Adam``'s, as in the authors' code.

Two variants, chosen by ``variant``:

                ``"official"`` (default)                   ``"fusionbench"``
    optimised   attention in / out and MLP weights of the  every 2-D tensor (also positional
                transformer blocks                         embedding and ``proj``)
    the rest    stays at θ_0                               mean of the task vectors

* ``"official"``: nathanielyvo/WUDI-Merging ``vit/wudi_main.py`` (``decompose_task_vectors`` keeps keys
  holding ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``;
  ``TaskVector.apply_to`` leaves every other key at θ_0; ``scaling_coef=1``; ``--iter`` 300; Adam
  lr 1e-5, weight decay 0; the squared norm). HF CLIP's names (``q_proj``, ``fc1`` …) are read alike.
* ``"fusionbench"``: tanganke/fusion_bench ``fusion_bench/method/wudi/wudi.py`` (every 2-D key,
  others ``sum / K``; ``config/method/wudi/wudi.yaml`` runs 400 steps).

q, k, v: the authors' ViT run optimises open_clip's fused ``in_proj_weight`` ([3d, d], one loss with
one norm per task for the three). By default they are split and optimised as three matrices, as in
HF CLIP / FusionBench and the house rule for per-matrix methods
(:func:`~adamerge.merging.fused.splits_fused_qkv`); ``split_qkv=False`` (the ``"official"`` preset)
runs on the fused matrix as the published run did. A task vector that is zero for a weight has no
term in its loss (the authors' code would divide by its zero norm).

Runs on the device of the task vectors (a GPU when the pool is there) unless ``device`` says
otherwise; each merged weight is returned on θ_0's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_against_pretrained, check_lam, check_taus, float_keys
from adamerge.merging.fused import check_split_qkv, splits_fused_qkv
from adamerge.merging.registry import register_method
from adamerge.merging.task_vectors import MergeError, StateDict, add_task_vector

__all__ = ["VARIANTS", "wudi_block_linear", "wudi_merge", "wudi_weight"]

# the transformer-block linear weights of the authors' ViT code, in open_clip's names (fused and split)
# and HF CLIP's (self_attn.{q,k,v,out}_proj, mlp.fc1 / fc2)
_BLOCK_LINEAR = (
    "attn.in_proj_weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
    "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
)


def wudi_block_linear(key: str, tensor: Tensor) -> bool:
    """The authors' keys: 2-D attention in / out and MLP weights of the transformer blocks."""
    return tensor.dim() == 2 and key.endswith(_BLOCK_LINEAR)


def _every_2d(key: str, tensor: Tensor) -> bool:
    return tensor.dim() == 2


# variant → (which 2-D keys are optimised, whether the other float keys get the mean task vector)
VARIANTS: dict[str, tuple[Callable[[str, Tensor], bool], bool]] = {
    "official": (wudi_block_linear, False),
    "fusionbench": (_every_2d, True),
}


def _accumulate(taus: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(Σ τ_i, G, B, any non-zero τ_i) in float32 on ``device``, one task vector there at a time."""
    t0 = taus[0]
    m, n = t0.shape
    total = torch.zeros(m, n, device=device)
    gram = torch.zeros(n, n, device=device)
    target = torch.zeros(m, n, device=device)
    active = False
    for t in taus:
        t = t.to(device=device, dtype=torch.float32)
        total += t
        norm_sq = t.square().sum()
        if float(norm_sq) == 0.0:
            continue
        g = (t.T @ t) / norm_sq
        gram += g
        target += t @ g
        active = True
    return total, gram, target, active


def wudi_weight(
    taus: Sequence[Tensor], lr: float = 1e-5, iters: int = 300, device: str | torch.device | None = None
) -> Tensor:
    """τ* of one 2-D weight: Adam on Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F from Σ_i τ_i (float32).

    Args:
        taus: the K task vectors of this weight, each [m, n] (any float dtype and device).
        lr: Adam's learning rate (the authors': 1e-5).
        iters: number of Adam steps (the authors': 300).
        device: where to optimise (default: the first task vector's device); the result stays there.
    """
    device = torch.device(device) if device is not None else taus[0].device
    tau, gram, target, active = _accumulate(taus, device)
    if not active or iters == 0:
        return tau
    opt = torch.optim.Adam([tau], lr=lr, weight_decay=0.0)
    for _ in range(iters):
        # the gradient of the loss: 2 Σ_i (τ − τ_i) τ_iᵀτ_i / ‖τ_i‖² = 2 (τ G − B)
        tau.grad = torch.addmm(target, tau, gram, alpha=2.0, beta=-2.0)
        opt.step()
    tau.grad = None
    return tau


def _check_args(variant: str, lr: float, iters: int, split_qkv: bool) -> None:
    if variant not in VARIANTS:
        raise MergeError(f"wudi variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < float("inf")):
        raise MergeError(f"wudi lr must be a finite number > 0, got {lr!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, float)) or int(iters) != iters or iters < 0:
        raise MergeError(f"wudi iters must be an integer >= 0, got {iters!r}")
    check_split_qkv(split_qkv, "wudi")


def _wudi(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    variant: str,
    lr: float,
    iters: int,
    lam: float,
    is_optimized: Callable[[str, Tensor], bool] | None,
    device: str | torch.device | None,
) -> dict[str, Tensor]:
    """The merge on whatever layout it is given (split or fused q;k;v)."""
    default_optimized, average_rest = VARIANTS[variant]
    optimized = is_optimized or default_optimized
    merged: dict[str, Tensor] = {}
    for key in float_keys(taus[0]):
        ts = [t[key] for t in taus]
        if ts[0].dim() == 2 and optimized(key, ts[0]):
            merged[key] = wudi_weight(ts, lr=lr, iters=int(iters), device=device).to(pretrained[key].device)
        elif average_rest:
            acc = torch.zeros(ts[0].shape, device=ts[0].device)
            for t in ts:
                acc += t.float()
            merged[key] = (acc / len(ts)).to(pretrained[key].device)
    return add_task_vector(pretrained, merged, lam)


_wudi_split = splits_fused_qkv(_wudi)


@register_method("wudi", per_tensor=True, label="WUDI", presets={
    # nathanielyvo/WUDI-Merging vit/wudi_main.py: open_clip's fused in_proj_weight, block linears only,
    # Adam lr 1e-5, --iter 300, scaling_coef 1 (published ViT-B/32 85.2, ViT-L/14 92.6)
    "official": {"variant": "official", "split_qkv": False, "lr": 1e-5, "iters": 300, "lam": 1.0},
    # tanganke/fusion_bench method/wudi/wudi.py with config/method/wudi/wudi.yaml (HF CLIP: q, k, v apart)
    "fusionbench": {"variant": "fusionbench", "split_qkv": True, "lr": 1e-5, "iters": 400, "lam": 1.0},
})
def wudi_merge(
    pretrained: StateDict,
    taus: Sequence[StateDict],
    variant: str = "official",
    lr: float = 1e-5,
    iters: int = 300,
    lam: float = 1.0,
    split_qkv: bool = True,
    is_optimized: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """WUDI-Merging: optimised linear weights (others θ_0 or mean, by variant); θ_0 + α τ.

    Presets (``merge_pool(pool, "wudi", preset=...)``): ``"official"`` (the authors' ViT run: fused
    q;k;v) and ``"fusionbench"``; the defaults are ``"official"`` with q, k, v split.

    Args:
        pretrained: θ_0.
        taus: the task vectors τ_1..τ_K.
        variant: ``"official"`` (block linear weights optimised, the rest at θ_0) or
            ``"fusionbench"`` (every 2-D tensor optimised, the rest averaged); see the module docstring.
        lr: Adam's learning rate > 0 (the authors': 1e-5).
        iters: Adam steps per weight, >= 0 (the authors': 300; FusionBench's config: 400).
        lam: the scale α >= 0 of the merged task vector (the authors': 1.0).
        split_qkv: optimise open_clip's fused ``in_proj_weight`` as three matrices q, k, v (default, as
            HF CLIP / FusionBench); False: as one [3d, d] matrix, as the authors' ViT code does.
        is_optimized: ``(key, tensor) -> bool`` choosing the optimised 2-D float tensors (default:
            the variant's); keys are seen with q, k, v split (``…attn.q_proj.weight``) unless
            ``split_qkv=False``. Under ``"official"`` the others stay at θ_0, under ``"fusionbench"`` they
            get the mean task vector.
        device: where to optimise (default: each task vector's own device).
    """
    _check_args(variant, lr, iters, split_qkv)
    taus = check_taus(taus)
    check_against_pretrained(pretrained, taus)
    lam = check_lam(lam)
    return _wudi_split(pretrained, taus, variant, lr, iters, lam, is_optimized, device, split_qkv=split_qkv)
