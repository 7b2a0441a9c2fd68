"""AdaRank: learned masks over the singular components of each task's direction (Lee et al., arXiv 2503.22178).

For every 2-D attention / MLP weight l and task k, with d_k^l = U_k^l diag(σ_k^l) V_k^lᵀ the SVD of the
task's direction (its task vector, or a base merge's per-task part):

    θ^l = o^l + Σ_k λ_k^l U_k^l diag(σ_k^l ⊙ m_k^l) V_k^lᵀ        (attn / mlp weights)
    θ^l = o^l + Σ_k λ_k^l d_k^l                                  (every other float tensor)
    m_k^l = 1[s > 1/2] in the forward pass,  s = sigmoid(z_k^l / T),  ∂m/∂z := ∂s/∂z  (straight through)

o and d_k come from a static merge's split (:func:`adamerge.merging.dispatch.merge_directions`):
task arithmetic gives θ_0 and τ_k ("AdaRank (TA)"), ``{method: cart, rank_ratio: 1.0}`` the weight
average and the centred τ_k − τ̄ at full rank ("AdaRank (CART)": the masks do the truncation). λ and the
mask logits z are learned together by test-time entropy minimisation (the shared loop of
:mod:`adamerge.systems.base`); the export is an ordinary merged model and the kept ranks Σ_j m_kj^l.

What follows the authors' code (david3684/AdaRank ``vision/src/models/merge_vit/adaptive.py``):
weights with ``attn`` or ``mlp`` in the name and neither ``ln`` nor ``bias`` get masks
(:func:`~adamerge.merging.cart.cart_lowrank_key`); one λ per state-dict entry per task (``prior``:
0.3 on TA, 2.3 on CART for ViT-B/32 × 8), not clamped; z starts at +0.1 for the first
int(ρ·min(m, n)) components and −0.1 for the rest (``initial_rank_ratio`` ρ: 1.0 on TA, 0.16 on CART,
0 meaning 1/K), T = 10; the SVD is of the full direction (no truncation). One choice differs: q, k, v
of open_clip's fused ``attn.in_proj_weight`` are three matrices with a mask each (as HF CLIP and
:mod:`adamerge.merging.fused`); ``split_qkv=False`` takes one SVD of the fused [3d, d] matrix, as
their open_clip run did. Options of theirs left out (off in every shipped config): ``soft_mask``,
``extend_clamp``, ``normalized_merging_weights``; their ``clamp_weights`` is ``clamp``.

Storage: the factors live in non-persistent buffers, grouped by matrix shape: ``U`` [G, m, K·r],
``Vᵀ`` [G, K·r, n] (float32 or bfloat16, ``svd_dtype``) and σ [G, K, r] (float32). At full rank
that is (m + n)·min(m, n) numbers per matrix and task instead of m·n: on ViT-B/32 × 8 (the other
tensors' directions included) 4.17 GB in float32 and 2.13 GB in bfloat16 with q, k, v split (3.72 /
1.91 GB fused), against 2.81 GB for AdaMerging's 8 float32 task vectors. ``max_rank_ratio`` keeps
only the top r = max(1, int(ρ_max·min(m, n))) components (the rest are never on): 2.13 GB at 0.5,
0.74 GB at 0.16 (float32, split). The merge is fused: per group of same-shaped matrices one batched
product (U ⊙ c) Vᵀ with c = λ·σ·m over all K·r components (chunked to bound the temporary), one autograd
node whose backward computes ∂L/∂c = diag(Uᵀ G V) without saving anything of size K·r·m; the other
tensors go through AdaMerging's fused merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adamerge.components.adamerging import FusedMerge, LearnedMerge, load_directions, stack_task_vectors
from adamerge.components.frozen import freeze_as_buffers
from adamerge.merging.cart import cart_lowrank_key
from adamerge.merging.fused import QKVLayout, svd
from adamerge.merging.registry import LABELS
from adamerge.merging.task_vectors import (
    MergeError,
    check_compatible,
    check_finite,
    dtype_named,
    is_mergeable,
)
from adamerge.models.pool import ModelPool

__all__ = ["AdaRankModel", "MaskedMatrix"]

_INIT_LOGIT = 0.1  # the authors' mask logits: +0.1 kept, -0.1 pruned (sigmoid(±0.01) straddles 1/2)
_CHUNK = 1 << 24  # numbers of U and Vᵀ upcast / scaled at once in the fused product (64 MiB in float32)


@dataclass(frozen=True)
class MaskedMatrix:
    """One masked matrix: ``key``'s rows ``row0 : row0 + m`` (a whole weight, or q / k / v of a fused one).

    Args:
        name: its name (the key, or the HF-style ``…q_proj.weight`` of a split part).
        key: the state-dict entry it belongs to.
        row0: its first row in that entry.
        shape: (m, n).
        rank: singular components stored (and masked), r <= min(m, n).
    """

    name: str
    key: str
    row0: int
    shape: tuple[int, int]
    rank: int

    @property
    def full_rank(self) -> int:
        return min(self.shape)


class _LowRankDelta(torch.autograd.Function):
    """Δ[g] = U[g] diag(c[g]) Vᵀ[g] for a group of same-shaped matrices, c [G, K·r] differentiable.

    Forward: one batched product per chunk of matrices (bfloat16 factors upcast a chunk at a time).
    Backward: ∂L/∂c[g, j] = u_jᵀ (∂L/∂Δ[g]) v_j, through the smaller of G·Vᵀᵀ and Uᵀ·G; only the
    factors (buffers) are saved.
    """

    @staticmethod
    def forward(ctx, c: Tensor, u: Tensor, vh: Tensor, step: int) -> Tensor:
        ctx.save_for_backward(u, vh)
        ctx.step = step
        ctx.set_materialize_grads(False)
        g, m, _ = u.shape
        out = torch.empty(g, m, vh.shape[2], dtype=torch.float32, device=u.device)
        for i in range(0, g, step):
            j = min(i + step, g)
            torch.bmm(u[i:j].float() * c[i:j, None, :], vh[i:j].float(), out=out[i:j])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor | None):
        if grad is None:
            return None, None, None, None
        u, vh = ctx.saved_tensors
        g, m, kr = u.shape
        out = torch.empty(g, kr, dtype=torch.float32, device=u.device)
        for i in range(0, g, ctx.step):
            j = min(i + ctx.step, g)
            gr = grad[i:j].float()
            if m <= vh.shape[2]:
                out[i:j] = (u[i:j].float() * torch.bmm(gr, vh[i:j].float().transpose(1, 2))).sum(1)
            else:
                out[i:j] = (torch.bmm(u[i:j].float().transpose(1, 2), gr) * vh[i:j].float()).sum(2)
        return out, None, None, None


def _svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, σ, Vᵀ of ``a``, decomposing the tall orientation (LAPACK is several times slower on wide
    matrices: 768 × 3072 took 5x the time of 3072 × 768 on a 2-core CPU)."""
    if a.shape[0] >= a.shape[1]:
        return svd(a)
    v, s, uh = svd(a.mT)
    return uh.mT, s, v.mT


def _rank(full: int, ratio: float) -> int:
    return full if ratio >= 1.0 else max(1, int(ratio * full))


class AdaRankModel(LearnedMerge):
    """The encoder with weights o + Σ_k λ_k U_k diag(σ_k ⊙ m_k) V_kᵀ, learnable in λ and the mask logits.

    Args:
        pool: the model pool (θ_0 and the experts).
        tasks: the experts to merge, in order; default all of the pool's tasks.
        directions: what is decomposed and scaled: a static merge's per-task directions by name, or
            ``{method: name, **its direction arguments}`` (as AdaMergingModel): ``task_arithmetic``
            (default: θ_0 and the task vectors), ``{method: cart, rank_ratio: 1.0}`` (the weight
            average and the full centred task vectors, AdaRank on CART), ``tsv_m``, ``ties``, …
        granularity: ``"layer"`` (one λ per tensor per task, the authors') or ``"task"``.
        init_lam: initial value of every λ (the authors' ``prior``: 0.3 on TA, 2.3 on CART for
            ViT-B/32 × 8).
        clamp: clamp λ to [0, 1] inside the merge (the authors' ``clamp_weights``, off).
        mask_temp: temperature T of the mask, s = sigmoid(z / T) (the authors' ``mask_temp``, 10).
        initial_rank_ratio: fraction ρ of each matrix's min(m, n) components kept at the start: the
            first int(ρ·min(m, n)) logits are +0.1, the others −0.1 (1.0 on TA, 0.16 on CART for
            ViT-B/32 × 8); 0 means 1/K, as in the authors' code.
        split_qkv: treat open_clip's fused ``in_proj_weight`` [3d, d] as three masked matrices q, k, v
            (default); ``False`` takes one SVD of the fused matrix, as the authors' open_clip runs.
        max_rank_ratio: keep only the top r = max(1, int(ρ·min(m, n))) singular components of each
            direction (less memory; the others are always pruned); 1.0 (default, the authors') keeps all.
        svd_dtype: storage of the singular vectors, ``"float32"`` or ``"bfloat16"`` (half the memory;
            the products run in float32).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: Sequence[str] | None = None,
        directions: str | dict[str, Any] = "task_arithmetic",
        granularity: Literal["task", "layer"] = "layer",
        init_lam: float = 0.3,
        clamp: bool = False,
        mask_temp: float = 10.0,
        initial_rank_ratio: float = 1.0,
        split_qkv: bool = True,
        max_rank_ratio: float = 1.0,
        svd_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        storage = dtype_named(svd_dtype, "svd_dtype", ("float32", "bfloat16"))
        _check_options(init_lam, clamp, mask_temp, initial_rank_ratio, split_qkv, max_rank_ratio)
        task_names, self.directions, origin, dirs = load_directions(pool, tasks, directions)
        encoder = pool.encoder
        reference = {k: v for k, v in origin.items() if is_mergeable(v)}
        num_tasks = len(dirs)
        self.task_names, self.granularity, self.clamp = list(task_names), granularity, bool(clamp)
        self.init_lam, self.mask_temp = float(init_lam), float(mask_temp)
        self.split_qkv, self.max_rank_ratio = bool(split_qkv), float(max_rank_ratio)
        self.layer_names = list(reference)
        self.matrices = _plan_matrices(reference, split_qkv, max_rank_ratio)
        if not self.matrices:
            raise MergeError("AdaRank found no 2-D attention / MLP weights to decompose (keys with 'attn' or "
                             "'mlp' and neither 'ln' nor 'bias')")
        masked_keys = {mat.key for mat in self.matrices}
        self._dense = [k for k in self.layer_names if k not in masked_keys]
        self._dense_idx = [self.layer_names.index(k) for k in self._dense]
        self._dense_shapes = [tuple(reference[k].shape) for k in self._dense]
        self._dense_sizes = [reference[k].numel() for k in self._dense]

        self.encoder = freeze_as_buffers(copy.deepcopy(encoder).eval())
        with torch.no_grad():  # the origin (θ_0, or the base's) comes from the pool, not the module's weights
            for key, buf in self.encoder.named_buffers():
                buf.copy_(origin[key])
        self._groups = self._decompose(dirs, reference, storage)
        shape = (num_tasks, len(self.layer_names)) if granularity == "layer" else (num_tasks, 1)
        self.lambdas = nn.Parameter(torch.full(shape, self.init_lam))
        self.mask_logits = nn.Parameter(self._initial_logits(num_tasks, initial_rank_ratio))

    # ---- construction ---------------------------------------------------------------------
    def _decompose(self, dirs: Sequence[dict[str, Tensor]], reference: dict[str, Tensor],
                   storage: torch.dtype) -> list[dict]:
        """Read each task's direction once (``dirs`` may be lazy), SVD its masked matrices into one
        (U, σ, Vᵀ) buffer triple per shape group and stack its other tensors; returns the groups.

        Matrices are grouped by (m, n, r) in state-dict order (q, k, v of one key stay adjacent, so a
        fused key's delta is a view); the mask logits are laid out group by group, matrix by matrix."""
        k = len(dirs)
        members: dict[tuple, list[MaskedMatrix]] = {}
        for mat in self.matrices:
            members.setdefault((*mat.shape, mat.rank), []).append(mat)
        self.matrices = [mat for group in members.values() for mat in group]  # mask_logits columns follow it
        factors = [(torch.empty(len(g), m, k * r, dtype=storage), torch.empty(len(g), k * r, n, dtype=storage),
                    torch.empty(len(g), k, r)) for (m, n, r), g in members.items()]
        dense_ref = {key: reference[key] for key in self._dense}
        dense = torch.zeros(k, sum(self._dense_sizes))
        for t in range(k):
            d = dirs[t]
            check_compatible(reference, d, name=f"direction {t}")
            check_finite(d, name=f"direction {t}")
            if dense_ref:
                dense[t] = stack_task_vectors([{key: d[key] for key in dense_ref}], dense_ref)[0]
            for (u, vh, s), group in zip(factors, members.values()):
                for i, mat in enumerate(group):
                    r = mat.rank
                    uk, sk, vk = _svd(d[mat.key][mat.row0 : mat.row0 + mat.shape[0]].float())
                    u[i, :, t * r : (t + 1) * r] = uk[:, :r]
                    vh[i, t * r : (t + 1) * r] = vk[:r]
                    s[i, t] = sk[:r]
            del d
        self.register_buffer("dense_directions", dense, persistent=False)
        out, offset = [], 0
        for gi, ((m, n, r), group) in enumerate(members.items()):
            u, vh, s = factors[gi]
            self.register_buffer(f"svd_u{gi}", u, persistent=False)
            self.register_buffer(f"svd_vh{gi}", vh, persistent=False)
            self.register_buffer(f"svd_s{gi}", s, persistent=False)
            self.register_buffer(f"layers{gi}", torch.tensor([self.layer_names.index(mat.key) for mat in group]),
                                 persistent=False)  # the λ column of each matrix
            spans: list[list] = []  # [key, first index in the group, matrices of that key]
            for i, mat in enumerate(group):
                if spans and spans[-1][0] == mat.key:
                    spans[-1][2] += 1
                else:
                    spans.append([mat.key, i, 1])
            out.append({"count": len(group), "rank": r, "offset": offset, "spans": spans,
                        "step": max(1, _CHUNK // (k * r * (m + n)))})
            offset += len(group) * r
        return out

    def _initial_logits(self, num_tasks: int, ratio: float) -> Tensor:
        ratio = 1.0 / num_tasks if ratio == 0.0 else ratio
        cols = []
        for mat in self.matrices:
            kept = mat.full_rank if ratio >= 1.0 else int(mat.full_rank * ratio)
            z = torch.full((mat.rank,), -_INIT_LOGIT)
            z[:kept] = _INIT_LOGIT
            cols.append(z)
        return torch.cat(cols).expand(num_tasks, -1).clone()

    # ---- identity and labels --------------------------------------------------------------
    @property
    def label(self) -> str:
        """``AdaRank`` (on task arithmetic), ``AdaRank+CART``, …; ``(task-wise λ)`` when so: the results row."""
        method = self.directions["method"]
        name = "AdaRank" if method == "task_arithmetic" else f"AdaRank+{LABELS.get(method, method)}"
        return name if self.granularity == "layer" else f"{name} (task-wise λ)"

    def identity(self) -> dict:
        """What the learned λ and mask logits mean (compared when a run is resumed)."""
        return {"granularity": self.granularity, "clamp": self.clamp, "directions": dict(self.directions),
                "mask_temp": self.mask_temp, "split_qkv": self.split_qkv, "max_rank_ratio": self.max_rank_ratio}

    @property
    def num_tasks(self) -> int:
        return self.lambdas.shape[0]

    @property
    def matrix_names(self) -> list[str]:
        """The masked matrices in state-dict order (``…q_proj.weight`` etc. for split q, k, v)."""
        return [mat.name for mat in sorted(self.matrices, key=self._position)]

    def _position(self, mat: MaskedMatrix) -> tuple[int, int]:
        return self.layer_names.index(mat.key), mat.row0

    # ---- coefficients and masks -----------------------------------------------------------
    def coefficients(self) -> Tensor:
        """The effective λ ``[K, L]`` (clamped if ``clamp``; task-wise broadcast to L)."""
        lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
        return lam.expand(self.num_tasks, len(self.layer_names))

    def soft_masks(self) -> Tensor:
        """s = sigmoid(z / T), ``[K, Σ r]`` in :attr:`matrices` order."""
        return torch.sigmoid(self.mask_logits / self.mask_temp)

    def hard_masks(self) -> Tensor:
        """The masks the merge uses, 1[s > 1/2] (float), ``[K, Σ r]`` in :attr:`matrices` order."""
        return (self.soft_masks() > 0.5).float()

    def ranks(self) -> Tensor:
        """Kept components per task and matrix, ``[K, M]`` (long), columns as :attr:`matrix_names`."""
        hard = self.hard_masks().detach()
        counts, offset = {}, 0
        for mat in self.matrices:
            counts[mat.name] = hard[:, offset : offset + mat.rank].sum(1)
            offset += mat.rank
        return torch.stack([counts[name] for name in self.matrix_names], dim=1).long().cpu()

    def full_ranks(self) -> list[int]:
        """min(m, n) of every matrix, in :attr:`matrix_names` order."""
        return [mat.full_rank for mat in sorted(self.matrices, key=self._position)]

    def stored_ranks(self) -> list[int]:
        """Components stored (and masked) of every matrix, in :attr:`matrix_names` order."""
        return [mat.rank for mat in sorted(self.matrices, key=self._position)]

    def svd_bytes(self) -> int:
        """Bytes held by the singular factors (U, σ, Vᵀ of every group)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n.startswith("svd_"))

    # ---- merge ----------------------------------------------------------------------------
    def merged_parameters(self) -> dict[str, Tensor]:
        """The merged float tensors, differentiable in λ and (straight through) the mask logits."""
        bases = dict(self.encoder.named_buffers())
        lam = self.coefficients()
        soft = self.soft_masks()
        mask = soft + ((soft > 0.5).float() - soft).detach()  # hard forward, soft gradient
        k = self.num_tasks
        merged: dict[str, Tensor] = {}
        with torch.autocast(bases[self.layer_names[0]].device.type, enabled=False):
            for gi, grp in enumerate(self._groups):
                count, r, off = grp["count"], grp["rank"], grp["offset"]
                m = mask[:, off : off + count * r].view(k, count, r).transpose(0, 1)  # [G, K, r]
                c = lam[:, getattr(self, f"layers{gi}")].t()[:, :, None] * getattr(self, f"svd_s{gi}") * m
                delta = _LowRankDelta.apply(c.reshape(count, k * r), getattr(self, f"svd_u{gi}"),
                                            getattr(self, f"svd_vh{gi}"), grp["step"])
                for key, i, parts in grp["spans"]:  # q, k, v of a fused key: adjacent, one view
                    merged[key] = bases[key] + delta[i : i + parts].reshape(bases[key].shape).to(bases[key].dtype)
            if self._dense:
                dense_lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
                if self.granularity == "layer":
                    dense_lam = dense_lam[:, self._dense_idx]
                out = FusedMerge.apply(dense_lam, self.dense_directions, self._dense_sizes, self._dense_shapes,
                                        *[bases[key] for key in self._dense])
                merged.update(zip(self._dense, out))
        return {key: merged[key] for key in self.layer_names}


def _check_options(init_lam, clamp, mask_temp, initial_rank_ratio, split_qkv, max_rank_ratio) -> None:
    """Raise a ValueError (TypeError for a non-bool ``split_qkv``) naming the first bad option."""
    if not isinstance(init_lam, (int, float)) or not math.isfinite(init_lam):
        raise ValueError(f"init_lam must be a finite number, got {init_lam!r}")
    if clamp and not 0.0 <= init_lam <= 1.0:
        raise ValueError(f"init_lam {init_lam} is outside the clamp range [0, 1]: λ would never move; "
                         "use an init_lam in [0, 1] or clamp: false")
    if not isinstance(mask_temp, (int, float)) or not math.isfinite(mask_temp) or mask_temp <= 0:
        raise ValueError(f"mask_temp must be a finite number > 0, got {mask_temp!r}")
    if not isinstance(initial_rank_ratio, (int, float)) or not 0.0 <= initial_rank_ratio <= 1.0:
        raise ValueError(f"initial_rank_ratio must lie in [0, 1], got {initial_rank_ratio!r}")
    if not isinstance(max_rank_ratio, (int, float)) or not 0.0 < max_rank_ratio <= 1.0:
        raise ValueError(f"max_rank_ratio must lie in (0, 1], got {max_rank_ratio!r}")
    if not isinstance(split_qkv, bool):
        raise TypeError(f"split_qkv must be True or False, got {split_qkv!r}")


def _plan_matrices(reference: dict[str, Tensor], split_qkv: bool, max_rank_ratio: float) -> list[MaskedMatrix]:
    """The masked matrices of ``reference`` in key order; a fused q;k;v weight is three when ``split_qkv``."""
    layout = QKVLayout.of(reference) if split_qkv else QKVLayout()
    fused = {key: d for key, d, kind in layout.fused if kind == "weight"}
    out = []
    for key, t in reference.items():
        if not cart_lowrank_key(key, t):
            continue
        m, n = t.shape
        if key in fused:
            d = fused[key]
            for part, name in enumerate(layout.split_names(key, "weight")):
                out.append(MaskedMatrix(name, key, part * d, (d, n), _rank(min(d, n), max_rank_ratio)))
        else:
            out.append(MaskedMatrix(key, key, 0, (m, n), _rank(min(m, n), max_rank_ratio)))
    return out
