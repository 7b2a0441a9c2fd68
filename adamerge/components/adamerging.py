"""AdaMerging: merging coefficients learned at test time (Yang et al., ICLR 2024, arXiv 2310.02575).

    task-wise:   θ   = θ_0   + Σ_k λ_k   τ_k          (K coefficients)
    layer-wise:  θ^l = θ_0^l + Σ_k λ_k^l τ_k^l        (one coefficient per tensor l per task k)
    AdaMerging++: the same over TIES-preprocessed τ_k (trimmed, sign-elected; their sum is TIES "sum")
    on any base: θ = o + Σ_k λ_k d_k with a static merge's origin o and per-task directions d_k
                 (``directions``: CART's θ_avg and low-rank centred vectors, TSV-M's per-task
                 subspace parts, …; :func:`adamerge.merging.dispatch.merge_directions`)

The merged weights are recomputed every forward pass, differentiably in λ, and the encoder runs
on them through :func:`torch.func.functional_call`. "Layer" means one floating-point entry of the
encoder's state dict (152 in open_clip 3.x's ViT-B/32 visual tower), as in the official code.

Storage (what makes a checkpoint kilobytes): the encoder is a deep copy whose parameters have been
turned into *non-persistent buffers* (:func:`~adamerge.components.frozen.freeze_as_buffers`, the
components' one freeze rule) — they hold θ_0, move with ``.to(device)``, never require grad and
never reach ``state_dict``. The K task vectors are stacked into one flat non-persistent buffer
``[K, N]`` (float32, or bfloat16 to halve memory). The only parameter, and the only entry of
``state_dict()``, is the coefficient tensor ``lambdas``.

The merge is fused: task-wise it is one matrix-vector product ``λ @ T`` over the whole flat buffer;
layer-wise it is one product ``λ[:, l] @ T[:, slice_l]`` per tensor — never a Python loop over
tasks. It runs on the buffers' device with autocast disabled (float32 arithmetic under AMP).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.components.frozen import freeze_as_buffers
from adamerge.merging.dispatch import merge_directions
from adamerge.merging.registry import LABELS
from adamerge.merging.task_vectors import (
    MergeError,
    check_compatible,
    check_finite,
    dtype_named,
    is_mergeable,
)
from adamerge.models.pool import ModelPool

Granularity = Literal["task", "layer"]

__all__ = [
    "AdaMergingModel",
    "FusedMerge",
    "Granularity",
    "LearnedMerge",
    "check_coefficient_args",
    "direction_spec",
    "load_directions",
    "stack_task_vectors",
]


def stack_task_vectors(
    taus: Sequence[Mapping[str, Tensor]],
    reference: Mapping[str, Tensor],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Validate K task vectors against ``reference`` (float keys and shapes) and stack them flat.

    Returns a ``[K, N]`` tensor, row k = τ_k's tensors flattened in ``reference`` order. Task
    vectors are read one at a time (``taus`` may be a lazy sequence), so peak memory is the output.
    """
    k = len(taus)
    if k == 0:
        raise MergeError("no task vectors given: AdaMerging needs at least one")
    n = sum(v.numel() for v in reference.values())
    out = torch.empty(k, n, dtype=dtype)
    for i in range(k):
        tau = taus[i]
        check_compatible(reference, tau, name=f"task vector {i}")
        check_finite(tau, name=f"task vector {i}")
        offset = 0
        for key, ref in reference.items():
            out[i, offset : offset + ref.numel()] = tau[key].detach().reshape(-1).to(dtype)
            offset += ref.numel()
    return out


class FusedMerge(torch.autograd.Function):
    """θ^l = θ_0^l + λ[:, l] · T[:, slice_l] for all tensors l, as a single autograd node.

    Forward: task-wise one matrix-vector product over the flat ``[K, N]`` stack (float32 storage),
    otherwise one ``[K] @ [K, n_l]`` product per tensor. Backward: ∂L/∂λ[:, l] = T[:, slice_l] @
    vec(∂L/∂θ^l), again one product per tensor, nothing of size K·N saved or materialised (bfloat16
    slices are upcast one tensor at a time). One node instead of ~10 per tensor keeps autograd
    overhead negligible even for small models.
    """

    @staticmethod
    def forward(ctx, lam: Tensor, tv: Tensor, sizes: list[int], shapes: list[tuple], *bases: Tensor):
        ctx.save_for_backward(lam, tv)
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)
        lam32 = lam.float()
        if lam.shape[1] == 1 and tv.dtype == torch.float32:
            deltas = torch.split(lam32[:, 0] @ tv, sizes)
        else:
            col = (lambda l: 0) if lam.shape[1] == 1 else (lambda l: l)
            deltas = [lam32[:, col(l)] @ t.float() for l, t in enumerate(torch.split(tv, sizes, dim=1))]
        return tuple(b + d.view(shape).to(b.dtype) for b, d, shape in zip(bases, deltas, shapes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor | None):
        lam, tv = ctx.saved_tensors
        cols = []
        for t, g in zip(torch.split(tv, ctx.sizes, dim=1), grads):
            if g is None:
                cols.append(torch.zeros(tv.shape[0], device=tv.device))
            else:
                cols.append(t.float() @ g.reshape(-1).float())
        grad = torch.stack(cols, dim=1)
        if lam.shape[1] == 1:
            grad = grad.sum(dim=1, keepdim=True)
        return (grad.to(lam.dtype), None, None, None, *([None] * len(grads)))


def check_coefficient_args(granularity: str, init_lam: float, clamp: bool, tv_dtype: str) -> torch.dtype:
    """Validate AdaMerging's coefficient arguments (any model it merges); returns the directions' storage dtype."""
    if granularity not in ("task", "layer"):
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    storage = dtype_named(tv_dtype, "tv_dtype", ("float32", "bfloat16"))
    if not math.isfinite(init_lam):
        raise ValueError(f"init_lam must be finite, got {init_lam}")
    if clamp and not 0.0 <= init_lam <= 1.0:
        raise ValueError(
            f"init_lam {init_lam} is outside the clamp range [0, 1]: the clamp would zero every gradient and λ "
            "would never move; use an init_lam in [0, 1] or clamp: false"
        )
    return storage


def direction_spec(directions: str | Mapping[str, Any]) -> dict[str, Any]:
    """``{"method": name, **arguments}`` from a name or a mapping (errors name the option)."""
    if isinstance(directions, str):
        return {"method": directions}
    if isinstance(directions, Mapping) and isinstance(directions.get("method"), str):
        return dict(directions)
    raise ValueError(f"directions must be a method name or a mapping with a 'method' name, got {directions!r}")


class _TensorSource:
    """A pool-shaped view of an encoder, θ_0 and a (possibly lazy) sequence of task vectors."""

    def __init__(self, encoder: nn.Module, pretrained_state, task_vectors, names: list[str]) -> None:
        self.encoder, self._theta0, self._taus, self.tasks = encoder, pretrained_state, task_vectors, names

    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"task {unknown[0]!r} has no task vector (tasks: {self.tasks})")
        return list(tasks)

    def pretrained_state(self):
        return self._theta0

    def task_vector(self, task: str):
        return self._taus[self.tasks.index(task)]

    def task_vectors(self, tasks: Sequence[str] | None = None):
        for task in self.check_tasks(self.tasks if tasks is None else tasks):
            yield task, self.task_vector(task)


class LearnedMerge(nn.Module):
    """A frozen encoder (``self.encoder``, weights in non-persistent buffers) run on the weights that
    ``merged_parameters()`` builds from a few learnable tensors (AdaMerging's λ, AdaRank's λ and masks)."""

    encoder: nn.Module

    def merged_parameters(self) -> dict[str, Tensor]:
        """The merged float tensors by name, differentiable in the learnable parameters."""
        raise NotImplementedError

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The full merged state dict (non-float buffers passed through), detached, on CPU."""
        with torch.no_grad():
            merged = self.merged_parameters()
        return {key: merged.get(key, value).detach().cpu().clone() for key, value in self.encoder.named_buffers()}

    def forward(self, images: Tensor) -> Tensor:
        return functional_call(self.encoder, self.merged_parameters(), (images,))

    def train(self, mode: bool = True) -> LearnedMerge:
        """Only the merge's own parameters learn: the encoder stays in eval mode (no dropout, frozen norms)."""
        super().train(mode)
        self.encoder.eval()
        return self


def load_directions(
    pool, tasks: Sequence[str] | None, directions: str | Mapping[str, Any],
) -> tuple[list[str], dict[str, Any], dict[str, Tensor], Sequence[Mapping[str, Tensor]]]:
    """(task names, the directions spec, origin, [d_1..d_K]) for a learned merge on ``pool``: θ_0 checked
    against the encoder, then :func:`~adamerge.merging.dispatch.merge_directions` of the named base."""
    task_names = pool.check_tasks(pool.tasks if tasks is None else tasks)
    spec = direction_spec(directions)
    encoder, theta0 = pool.encoder, pool.pretrained_state()
    check_compatible(encoder.state_dict(), theta0, name="pretrained state dict")
    check_finite(theta0, name="pretrained state dict")
    del theta0
    args = dict(spec)
    origin, dirs = merge_directions(pool, args.pop("method"), tasks=task_names, **args)
    return list(task_names), spec, origin, dirs


class AdaMergingModel(LearnedMerge):
    """The encoder with weights θ_0 + Σ_k λ_k τ_k, differentiable in the coefficients λ.

    Args:
        pool: the model pool (θ_0 and the experts; task vectors are read one expert at a time and
            stacked, so only one expert is ever materialised).
        tasks: the experts to merge, in order; default all of the pool's tasks.
        granularity: ``"task"`` (one λ per task) or ``"layer"`` (one λ per tensor per task).
        init_lam: initial value λ of every coefficient (0.3 in the paper).
        clamp: clamp λ to [0, 1] inside the merge (official code; FusionBench does not).
        directions: what the coefficients scale: the name of a static merge whose per-task directions
            are taken, or ``{method: name, **its direction arguments}``. ``task_arithmetic`` (default:
            θ_0 and the task vectors), ``{method: ties, keep: 0.2}`` (AdaMerging++), ``{method: cart,
            rank_ratio: 0.12}`` (AdaMerging + CART: θ_avg and the low-rank centred vectors),
            ``tsv_m`` (TSV-M's per-task subspace parts), with ``preset: official`` for the authors'
            settings; any merge registered with ``register_directions``.
        tv_dtype: storage dtype of the stacked task vectors, ``"float32"`` or ``"bfloat16"`` (half
            the memory).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: Sequence[str] | None = None,
        granularity: Granularity = "layer",
        init_lam: float = 0.3,
        clamp: bool = True,
        directions: str | dict[str, Any] = "task_arithmetic",
        tv_dtype: str = "float32",
    ) -> None:
        super().__init__()
        storage = check_coefficient_args(granularity, init_lam, clamp, tv_dtype)
        task_names, self.directions, origin, task_vectors = load_directions(pool, tasks, directions)
        encoder = pool.encoder
        reference = {k: v for k, v in origin.items() if is_mergeable(v)}
        if not reference:
            raise MergeError("the encoder has no floating-point tensors to merge")
        num_tasks = len(task_vectors)
        self.task_names = list(task_names)
        self.granularity, self.clamp = granularity, bool(clamp)
        self.layer_names = list(reference)
        self._shapes = [tuple(v.shape) for v in reference.values()]
        self._sizes = [v.numel() for v in reference.values()]

        self.encoder = freeze_as_buffers(copy.deepcopy(encoder).eval())
        with torch.no_grad():  # the origin (θ_0, or the base's) comes from the pool, not the module's weights
            for key, buf in self.encoder.named_buffers():
                buf.copy_(origin[key])
        self.register_buffer(
            "task_vectors", stack_task_vectors(task_vectors, reference, storage), persistent=False
        )
        shape = (num_tasks, len(self.layer_names)) if granularity == "layer" else (num_tasks, 1)
        self.init_lam = float(init_lam)  # every λ's start (diagnostics centre their colours on it)
        self.lambdas = nn.Parameter(torch.full(shape, self.init_lam))

    @classmethod
    def from_task_vectors(
        cls,
        encoder: nn.Module,
        pretrained_state: Mapping[str, Tensor],
        task_vectors: Sequence[Mapping[str, Tensor]],
        task_names: Sequence[str] | None = None,
        **kwargs,
    ) -> AdaMergingModel:
        """Build from tensors instead of a pool.

        Args:
            encoder: the pretrained module (θ_0's architecture); it is deep-copied, never modified.
            pretrained_state: θ_0 (same keys and shapes as ``encoder.state_dict()``).
            task_vectors: K task vectors τ_k over θ_0's floating-point keys (a sequence; may be lazy).
            task_names: names of the K tasks (for export and plots); default ``task0..task{K-1}``.
            **kwargs: the constructor's method arguments (granularity, init_lam, clamp, directions, tv_dtype).
        """
        if len(task_vectors) == 0:
            raise MergeError("no task vectors given: AdaMerging needs at least one")
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(task_vectors))]
        if len(names) != len(task_vectors):
            raise ValueError(f"{len(names)} task names for {len(task_vectors)} task vectors")
        return cls(_TensorSource(encoder, pretrained_state, task_vectors, names), names, **kwargs)

    @property
    def label(self) -> str:
        """``AdaMerging (layer-wise)``, ``AdaMerging++ (task-wise)``, ``AdaMerging+CART (layer-wise)``, …:
        the row name in results tables."""
        method = self.directions["method"]
        name = {"task_arithmetic": "AdaMerging", "ties": "AdaMerging++"}.get(method, f"AdaMerging+{LABELS[method]}")
        return f"{name} ({self.granularity}-wise)"

    def identity(self) -> dict:
        """What the learned λ means (compared when a run is resumed)."""
        return {"granularity": self.granularity, "clamp": self.clamp, "directions": dict(self.directions)}

    # ---- coefficients ---------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.lambdas.shape[0]

    def coefficients(self) -> Tensor:
        """The effective coefficients ``[K, L]`` (clamped if ``clamp``; task-wise broadcast to L)."""
        lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
        return lam.expand(self.num_tasks, len(self.layer_names))

    # ---- merge ----------------------------------------------------------------------------
    def merged_parameters(self) -> dict[str, Tensor]:
        """θ_0 + Σ_k λ_k τ_k for every float tensor, differentiable in λ (float32 arithmetic)."""
        theta0 = dict(self.encoder.named_buffers())
        lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
        bases = [theta0[k] for k in self.layer_names]
        with torch.autocast(self.task_vectors.device.type, enabled=False):
            merged = FusedMerge.apply(lam, self.task_vectors, self._sizes, self._shapes, *bases)
        return dict(zip(self.layer_names, merged))
