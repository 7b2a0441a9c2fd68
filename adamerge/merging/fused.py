"""Split open_clip's fused attention q;k;v before a per-matrix merge, fuse it back after.

open_clip's ``nn.MultiheadAttention`` keeps the three input projections as one parameter,
``<p>in_proj_weight`` ``[3d, d]`` (rows: q, then k, then v) and ``<p>in_proj_bias`` ``[3d]``. HF CLIP,
FusionBench and every reference implementation of an SVD / low-rank / subspace merge (OPCM, OptMerge,
TSV-M, Iso-C/CTS, CART, WUDI, AdaRank …) see three ``[d, d]`` matrices ``q_proj``, ``k_proj``,
``v_proj``. On the fused tensor such a method takes one SVD and one rank budget for three matrices
and gets a different answer; element-wise methods (task arithmetic, TIES, EMR …) are unaffected.

Rule: a method that does anything per matrix (SVD, projection, low-rank target, per-matrix loss)
runs in the split layout, with one line::

    @register_method("my_svd_merge")
    @splits_fused_qkv                       # list methods: fn(pretrained, task_vectors, ...)
    def my_svd_merge(pretrained, task_vectors, ...): ...

    layout = QKVLayout.of(pretrained)       # stateful mergers (OPCMerger): split every input,
    theta0 = layout.split(pretrained)       # fuse every output
    ...
    return layout.fuse(merged)

``tests/test_merging_fused.py`` fails for any module of :mod:`adamerge.merging` that calls an SVD
(``linalg.svd``, ``svd_lowrank``, ``linalg.eigh`` …) without using this module.

Which keys are fused: a float 2-D tensor whose key ends in ``in_proj_weight`` and whose shape is
``[3d, d]`` (open_clip's ``nn.MultiheadAttention`` with ``kdim = vdim = d``; with other ``kdim`` /
``vdim`` torch stores ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` already apart), plus
its sibling ``in_proj_bias`` when that is a float ``[3d]`` tensor. Both towers of a CLIP are covered.
They are split into ``<p>q_proj.weight``, ``<p>k_proj.weight``, ``<p>v_proj.weight`` (and ``….bias``),
the names HF CLIP uses, so the usual key tests (``is_linear_weight``: 2-D, ends in ``weight``) see
them as linear weights. Splitting makes views (no copy); fusing concatenates q;k;v back at the fused
key's place, so key order is kept. A state dict that is already split (HF layout) has no fused keys
and passes through untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.merging.task_vectors import MergeError, StateDict, is_mergeable

__all__ = ["PARTS", "QKVLayout", "check_split_qkv", "split_qkv", "splits_fused_qkv", "svd"]

PARTS = ("q", "k", "v")
_FUSED = {"weight": "in_proj_weight", "bias": "in_proj_bias"}


def _is_fused_weight(key: str, t: Tensor) -> bool:
    return (
        key.rsplit(".", 1)[-1] == _FUSED["weight"]
        and is_mergeable(t)
        and t.dim() == 2
        and t.shape[1] > 0
        and t.shape[0] == 3 * t.shape[1]
    )


@dataclass(frozen=True)
class QKVLayout:
    """The fused attention keys of a model and how to split / fuse them.

    Args:
        fused: ``(fused key, d, kind)`` for every fused tensor, ``kind`` ``"weight"`` or ``"bias"``.
    """

    fused: tuple[tuple[str, int, str], ...] = ()

    @classmethod
    def of(cls, state: StateDict) -> QKVLayout:
        """Find the fused q;k;v tensors of ``state`` (usually θ_0); empty for an HF-layout model."""
        found = []
        for key, t in state.items():
            if not _is_fused_weight(key, t):
                continue
            d = int(t.shape[1])
            found.append((key, d, "weight"))
            bias = key[: -len(_FUSED["weight"])] + _FUSED["bias"]
            b = state.get(bias)
            if b is not None and is_mergeable(b) and tuple(b.shape) == (3 * d,):
                found.append((bias, d, "bias"))
        return cls(tuple(found))

    def __bool__(self) -> bool:
        return bool(self.fused)

    @staticmethod
    def split_names(key: str, kind: str) -> tuple[str, str, str]:
        """``<p>in_proj_weight`` → (``<p>q_proj.weight``, ``<p>k_proj.weight``, ``<p>v_proj.weight``)."""
        prefix = key[: -len(_FUSED[kind])]
        return tuple(f"{prefix}{p}_proj.{kind}" for p in PARTS)  # type: ignore[return-value]

    def split(self, state: StateDict, name: str = "state dict") -> dict[str, Tensor]:
        """A new dict with every fused tensor replaced, in place, by its q, k, v views.

        Keys of the layout that ``state`` lacks are skipped (the method's own checks report them).

        Args:
            state: θ_0, an expert or a task vector in open_clip's layout.
            name: how ``state`` is called in error messages.
        """
        plan = {key: (d, kind) for key, d, kind in self.fused}
        out: dict[str, Tensor] = {}
        for key, t in state.items():
            if key not in plan:
                out[key] = t
                continue
            d, kind = plan[key]
            want = (3 * d, d) if kind == "weight" else (3 * d,)
            if tuple(t.shape) != want:
                raise MergeError(
                    f"{name}: shape mismatch at key {key!r}: expected {want}, got {tuple(t.shape)}"
                )
            for part_key, part in zip(self.split_names(key, kind), t.chunk(3, dim=0)):
                if part_key in state:
                    raise MergeError(f"{name} has both {key!r} and {part_key!r}: cannot split q;k;v")
                out[part_key] = part
        return out

    def fuse(self, state: StateDict, name: str = "merged state dict") -> dict[str, Tensor]:
        """Inverse of :meth:`split`: a new dict with every q, k, v triple concatenated back.

        Args:
            state: a state dict in the split layout (e.g. a method's output).
            name: how ``state`` is called in error messages.
        """
        first: dict[str, tuple[str, tuple[str, str, str]]] = {}
        members: set[str] = set()
        for key, _, kind in self.fused:
            parts = self.split_names(key, kind)
            present = [p for p in parts if p in state]
            if not present:
                continue
            if len(present) != 3:
                missing = next(p for p in parts if p not in state)
                raise MergeError(f"{name} has {present[0]!r} but not {missing!r}: cannot fuse {key!r}")
            first[parts[0]] = (key, parts)
            members.update(parts)
        out: dict[str, Tensor] = {}
        for key, t in state.items():
            if key in first:
                fused_key, parts = first[key]
                out[fused_key] = torch.cat([state[p] for p in parts], dim=0)
            elif key not in members:
                out[key] = t
        return out


def split_qkv(state: StateDict) -> dict[str, Tensor]:
    """``state`` with its fused q;k;v split into HF-named views (:meth:`QKVLayout.split`)."""
    return QKVLayout.of(state).split(state)


def splits_fused_qkv(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    """Decorate a list method ``fn(pretrained, task_vectors, *args, **kwargs)`` so it runs on split q, k, v.

    θ_0 and every task vector are split (views) before ``fn`` runs and its result is fused back, so
    callers keep open_clip's layout. The wrapper keeps ``fn``'s name and docstring (registration and
    CLI help are unchanged), exposes the plain function as ``__wrapped__`` (fused behaviour, for
    comparisons) and is marked ``splits_fused_qkv = True``.

    The wrapper takes one keyword of its own, ``split_qkv`` (default True): False runs ``fn`` on the
    fused ``in_proj_weight`` as one ``[3d, d]`` matrix, as the authors' open_clip code of TSV-M,
    Iso-C/CTS, CART and WUDI does (their ``official`` presets; docs/parity.md).
    """

    @functools.wraps(fn)
    def run(pretrained: StateDict, task_vectors, *args, split_qkv: bool = True, **kwargs) -> dict[str, Tensor]:
        check_split_qkv(split_qkv)
        layout = QKVLayout.of(pretrained) if isinstance(pretrained, Mapping) and split_qkv else QKVLayout()
        if not layout or isinstance(task_vectors, Mapping):  # nothing to split / let fn report misuse
            return fn(pretrained, task_vectors, *args, **kwargs)
        taus = [
            layout.split(t, name=f"task vector {i}") if isinstance(t, Mapping) else t
            for i, t in enumerate(task_vectors)
        ]
        return layout.fuse(fn(layout.split(pretrained, name="pretrained state dict"), taus, *args, **kwargs))

    run.splits_fused_qkv = True  # type: ignore[attr-defined]
    return run


def check_split_qkv(value: object, method: str | None = None) -> bool:
    """``value`` when it is True or False; else a :class:`MergeError` naming ``method``'s option."""
    if not isinstance(value, bool):
        raise MergeError(f"{method + ' ' if method else ''}split_qkv must be True or False, got {value!r}")
    return value


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U, S, Vᴴ`` of ``a`` that every per-matrix method takes: ``torch.linalg.svd(a,
    full_matrices=False)``, retried in float64 (then cast back) when LAPACK's divide-and-conquer fails
    to converge. It does on matrices with many repeated singular values, e.g. Iso-CTS's task
    vectors with the common subspace projected out (rank r − k, the rest exactly zero): seen on
    ViT-B/32-sized random weights on CPU."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)
