"""Fisher merging: a per-entry average of the experts weighted by their diagonal Fisher information.

    θ = Σᵢ cᵢ F̂ᵢ ⊙ θᵢ / Σᵢ cᵢ F̂ᵢ                                  (per entry)
    Fᵢ = E_x Σ_y p_θᵢ(y | x) (∂ log p_θᵢ(y | x) / ∂θ)²             (diagonal Fisher; no labels)
    F̂ᵢ = max(Fᵢ, floor)  ("floor", the official code)  or  Fᵢ + floor  ("add", FusionBench)
    cᵢ = wᵢ / ‖Fᵢ‖₂  (normalize; ‖·‖₂ over every entry of the merged keys)  or  wᵢ,   wᵢ = 1/K

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv 2111.09832
(mmatena/model_merging ``merging.py``: floor 1e-6 as a maximum, Fishers normalised by their global L2
norm; FusionBench ``fisher_merging.py``: floor 1e-6 added, the same normalisation). The official code
floors only the first ("target") model's Fisher (``favor_target_model``); merging K tasks there is no
target, so every Fisher is floored. No statistics come from here: :mod:`adamerge.systems.fisher`
estimates each expert's Fisher on unlabeled test inputs with labels from the expert's own predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_same_keys, check_taus
from adamerge.merging.task_vectors import MergeError, StateDict, check_finite, linear_combination

__all__ = ["SMOOTHINGS", "fisher_merge", "fisher_norm"]

SMOOTHINGS = ("floor", "add")


def fisher_norm(fisher: Mapping[str, Tensor]) -> float:
    """‖F‖₂ over every entry of every key (float64 sum of squares)."""
    return math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))


def _smooth(f: Tensor, floor: float, smoothing: str) -> Tensor:
    return f.clamp_min(floor) if smoothing == "floor" else f + floor


def fisher_merge(states: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]],
                 coefficients: Sequence[float] | None = None, normalize: bool = True, floor: float = 1e-6,
                 smoothing: str = "floor", names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The Fisher-weighted average of K experts (see the module docstring).

    Args:
        states: the experts' state dicts θᵢ (same keys and shapes, finite); never modified.
        fishers: per expert, key → diagonal Fisher (the key's shape, ≥ 0); every expert names the same
            float keys. Float keys without a Fisher get the plain mean; other keys are copied from the
            first expert.
        coefficients: the weights wᵢ of the experts; default 1/K each (FusionBench's; the official
            code searches them on validation data for two models).
        normalize: divide each expert's weight by the global L2 norm of its (unsmoothed) Fisher, as
            both official codes do.
        floor: the smoothing constant (1e-6 in both official codes).
        smoothing: ``"floor"`` F̂ = max(F, floor) (mmatena/model_merging) or ``"add"`` F̂ = F + floor
            (FusionBench).
        names: the experts' names (tasks), for error messages; default their indices.
    """
    states = check_taus(states, what="expert state dict")
    fishers = list(fishers)
    names = [str(n) for n in (names if names is not None else range(len(states)))]
    k = len(states)
    if len(fishers) != k or len(names) != k:
        raise MergeError(f"got {k} experts, {len(fishers)} Fishers and {len(names)} names")
    if smoothing not in SMOOTHINGS:
        raise MergeError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
    if not (math.isfinite(float(floor)) and float(floor) >= 0):
        raise MergeError(f"floor must be a finite number >= 0, got {floor!r}")
    weights = [1.0 / k] * k if coefficients is None else [float(c) for c in coefficients]
    if len(weights) != k or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"coefficients must be {k} finite numbers >= 0, not all 0, got {coefficients!r}")
    keys = check_same_keys(fishers, names, "the Fisher")
    for name, fisher in zip(names, fishers):
        check_finite(fisher, name=f"Fisher of expert {name!r}")
        for key, f in fisher.items():
            if key not in states[0] or not states[0][key].is_floating_point():
                raise MergeError(f"Fisher of expert {name!r}: key {key!r} is not a float key of the experts")
            if tuple(f.shape) != tuple(states[0][key].shape):
                raise MergeError(f"Fisher of expert {name!r}: key {key!r} has shape {tuple(f.shape)}, the weight "
                                 f"{tuple(states[0][key].shape)}")
            if bool((f < 0).any()):
                raise MergeError(f"Fisher of expert {name!r}: key {key!r} has negative entries")
    if normalize:
        norms = [fisher_norm(f) for f in fishers]
        zero = [n for n, v in zip(names, norms) if v == 0.0]
        if zero:
            raise MergeError(f"the Fisher of expert {zero[0]!r} is zero everywhere: it cannot be normalised "
                             "(normalize=False merges it at the floor)")
        weights = [w / v for w, v in zip(weights, norms)]
    merged = linear_combination(states, [1.0 / k] * k)
    for key in keys:
        num = den = None
        for w, state, fisher in zip(weights, states, fishers):
            f = _smooth(fisher[key].to(device=state[key].device, dtype=torch.float64), floor, smoothing) * w
            fx = f * state[key].double()
            num, den = (fx, f) if num is None else (num + fx, den + f)
        if bool((den <= 0).any()):
            raise MergeError(f"{key}: every expert's Fisher is 0 at some entry (floor=0 and weights 0); "
                             "use floor > 0")
        merged[key] = (num / den).to(states[0][key].dtype)
    return merged
