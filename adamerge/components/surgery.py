"""Representation Surgery (v1) and SurgeryV2: per-task aligners on top of any frozen merged model.

Aligner of task k (rank r, default 16), applied to a feature z ∈ R^d (one token or one embedding):

    z' = z − W_up · ReLU(W_down · z),    W_down ∈ R^{r×d} (Kaiming-uniform),  W_up ∈ R^{d×r} (zeros)

so every aligner starts as the identity and the surgery model starts as the merged model.

* v1 — Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024, arXiv
  2402.02705: one aligner per task on the final image embedding f_merged(x) (before the head).
  Loss on task k's unlabeled batch: L1(z'_merged, f_k(x)), f_k the frozen expert.
* V2 — Yang et al., "SurgeryV2: Bridging the Gap Between Model Merging and Multi-Task Learning
  with Deep Representation Surgery", arXiv 2410.14389: per task, one aligner after every transformer
  block ℓ = 1..L, applied to every token; the aligned tokens feed block ℓ+1, so corrections propagate.
  Plus one aligner on the final embedding. Loss: Σ_ℓ L1(mean_tokens(h'_ℓ), mean_tokens(h_ℓ^k))
  + L1(z'_merged, f_k(x)), where mean_tokens averages a block's output over all its tokens (class token
  included, as the official code does) and h_ℓ^k is expert k's block-ℓ output.

Widths and depths are read from the model (``encoder.transformer.resblocks``, ``transformer.width``,
``output_dim``), not hard-coded: the official V2 code assumes 12 blocks of width 768. Per-block
aligners are attached with forward hooks on the blocks, so open_clip's own forward (patch dropout,
pooling, ln_post, proj) runs unchanged. Blocks in open_clip ≥ 2.24 are batch-first ``[B, L, D]``;
older versions (e.g. the task_vectors checkpoints, open-clip-torch 2.0.2) are ``[L, B, D]``: the
layout is read from ``transformer.batch_first`` (absent → sequence-first).

Trainable parameters: 2·d·r per aligner. ViT-B/32, 8 tasks, r = 16: v1 8·2·512·16 = 131,072;
V2 8·(12·2·768·16 + 2·512·16) = 2,490,368.

Memory of the frozen experts (:class:`ExpertFeatures`): each expert encoder is held once per task
(``cache=True``) or rebuilt from the pool for every batch (``cache=False``, one at a time). ViT-B/32's
image tower has 88M parameters: 350 MB per expert in float32, 175 MB in bfloat16/float16 (8 experts:
2.8 GB / 1.4 GB); ViT-L/14's has 304M (1.2 GB / 0.6 GB per expert). Expert features are computed under
``torch.no_grad()`` for the current batch only and never kept across steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.components.frozen import freeze_as_buffers
from adamerge.models.pool import ModelPool

__all__ = [
    "VERSIONS",
    "AlignedFeatures",
    "Aligner",
    "ExpertFeatures",
    "SurgeryModel",
    "alignment_loss",
    "encode_with_block_means",
    "layer_alignment_losses",
    "transformer_blocks",
]

VERSIONS = ("v1", "v2")


class AlignedFeatures(NamedTuple):
    """Final embedding ``[B, D]`` and, for V2, one ``[B, width]`` token mean per block (else empty)."""

    final: Tensor
    blocks: tuple[Tensor, ...] = ()


class Aligner(nn.Module):
    """z' = z − up(ReLU(down(z))) over the last dimension; identity at initialisation.

    Args:
        dim: feature width d.
        rank: bottleneck width r.
    """

    def __init__(self, dim: int, rank: int = 16) -> None:
        super().__init__()
        if int(dim) < 1 or int(rank) < 1:
            raise ValueError(f"aligner needs dim >= 1 and rank >= 1, got dim={dim}, rank={rank}")
        self.dim, self.rank = int(dim), int(rank)
        self.down = nn.Linear(self.dim, self.rank, bias=False)
        self.up = nn.Linear(self.rank, self.dim, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(f"aligner of width {self.dim} got features of width {z.shape[-1]}")
        return z - self.up(F.relu(self.down(z.to(self.down.weight.dtype)))).to(z.dtype)


def transformer_blocks(encoder: nn.Module) -> tuple[nn.ModuleList, int, bool]:
    """``(resblocks, width, batch_first)`` of an open_clip-style ViT, or a clear error."""
    transformer = getattr(encoder, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"SurgeryV2 needs per-block hooks, but {type(encoder).__name__} has no non-empty "
            "`transformer.resblocks` ModuleList (an open_clip VisionTransformer has one; "
            "timm/ResNet towers do not: use version='v1')"
        )
    width = getattr(transformer, "width", None)
    if width is None:
        raise TypeError(f"{type(transformer).__name__} has no `width` attribute to size the V2 aligners")
    return blocks, int(width), bool(getattr(transformer, "batch_first", False))


def _output_dim(encoder: nn.Module) -> int:
    dim = getattr(encoder, "output_dim", None)
    if dim is None and isinstance(getattr(encoder, "proj", None), Tensor):
        dim = encoder.proj.shape[-1]
    if dim is None:
        raise TypeError(
            f"cannot read the embedding width of {type(encoder).__name__} (no `output_dim` or `proj`): "
            "pass feature_dim explicitly"
        )
    return int(dim)


class _BlockRecorder:
    """Forward hooks on every block: optionally align each block's tokens, record their token mean."""

    def __init__(self, blocks: nn.ModuleList, batch_first: bool) -> None:
        self.seq_dim, self.batch_dim = (1, 0) if batch_first else (0, 1)
        self.aligners: Sequence[Callable[[Tensor], Tensor]] | None = None
        self.means: list[Tensor | None] = [None] * len(blocks)
        self.active = False
        self.handles = [b.register_forward_hook(_BlockHook(self, i)) for i, b in enumerate(blocks)]

    def on_block_output(self, index: int, output: Any) -> Tensor | None:
        if not self.active:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"block {index} returned {type(output).__name__}, expected a token tensor")
        if self.aligners is not None:
            output = self.aligners[index](output)
        self.means[index] = output.mean(dim=self.seq_dim)  # slot, not append: re-runs overwrite
        return output

    def run(
        self, encoder: nn.Module, images: Tensor, aligners: Sequence[Callable[[Tensor], Tensor]] | None
    ) -> tuple[Tensor, tuple]:
        self.aligners, self.active, self.means = aligners, True, [None] * len(self.means)
        try:
            final = encoder(images)
            means = tuple(self.means)
        finally:
            self.aligners, self.active, self.means = None, False, [None] * len(self.means)
        if any(m is None for m in means):
            raise RuntimeError("not every transformer block ran during the forward pass")
        return final, means

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _BlockHook:
    """A picklable, deep-copyable forward hook (a closure would keep pointing at the original recorder)."""

    def __init__(self, recorder: _BlockRecorder, index: int) -> None:
        self.recorder, self.index = recorder, index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        return self.recorder.on_block_output(self.index, output)


class _SliceAligners:
    """Apply aligner k to the k-th slice (of ``sizes``) of a batch along ``dim``."""

    def __init__(self, aligners: Sequence[nn.Module], sizes: Sequence[int], dim: int) -> None:
        self.aligners, self.sizes, self.dim = aligners, list(sizes), dim

    def __call__(self, x: Tensor) -> Tensor:
        parts = x.split(self.sizes, dim=self.dim)
        return torch.cat([a(p) for a, p in zip(self.aligners, parts)], dim=self.dim)


def encode_with_block_means(encoder: nn.Module, images: Tensor) -> AlignedFeatures:
    """Plain forward of an open_clip ViT returning its embedding and every block's token mean."""
    blocks, _, batch_first = transformer_blocks(encoder)
    recorder = _BlockRecorder(blocks, batch_first)
    try:
        final, means = recorder.run(encoder, images, None)
    finally:
        recorder.remove()
    return AlignedFeatures(final, means)


class SurgeryModel(nn.Module):
    """A frozen merged encoder followed by per-task aligners (v1: final embedding; V2: every block too).

    The encoder is deep-copied, kept in eval mode and frozen by the components' one rule
    (:func:`~adamerge.components.frozen.freeze_as_buffers`): its weights are non-persistent buffers, so
    ``parameters()`` and ``state_dict()`` hold only the aligners (kilobytes to megabytes), ``.to()`` /
    ``.half()`` move it, and the systems keep DDP off it (buffers are never broadcast).

    Args:
        encoder: any merged image encoder ``images -> [B, D]`` (never modified).
        tasks: task names, one set of aligners each.
        rank: aligner bottleneck width r (16 in the papers for ViT-B; 4 for ViT-L/14 in SurgeryV2).
        version: ``"v1"`` (one aligner per task on the final embedding) or ``"v2"`` (one after every
            transformer block, per token, plus the final embedding).
        feature_dim: embedding width D; read from ``encoder.output_dim`` / ``encoder.proj`` if omitted.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[str],
        rank: int = 16,
        version: str = "v1",
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("SurgeryModel needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {tasks}")
        if version not in VERSIONS:
            raise ValueError(f"unknown surgery version {version!r}; expected one of {VERSIONS}")
        if int(rank) < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.tasks, self.version, self.rank = tasks, version, int(rank)
        frozen = copy.deepcopy(encoder).eval()
        self._encoder_keys = list(frozen.state_dict())
        self.encoder = freeze_as_buffers(frozen)
        self.depth, self.width, self._recorder = 0, 0, None
        if version == "v2":
            blocks, self.width, batch_first = transformer_blocks(frozen)
            self.depth = len(blocks)
            self._recorder = _BlockRecorder(blocks, batch_first)
        self.feature_dim = int(feature_dim) if feature_dim is not None else _output_dim(frozen)
        self.aligners = nn.ModuleDict({t: Aligner(self.feature_dim, self.rank) for t in tasks})
        self.block_aligners = nn.ModuleDict(
            {t: nn.ModuleList(Aligner(self.width, self.rank) for _ in range(self.depth)) for t in tasks}
        )
        self.register_load_state_dict_pre_hook(self._check_loaded_state)

    def train(self, mode: bool = True) -> SurgeryModel:
        super().train(mode)
        self.encoder.eval()  # the frozen encoder never trains (no dropout, fixed norms)
        return self

    def frozen_state_dict(self) -> dict[str, Tensor]:
        """The frozen merged encoder's weights under its own state-dict keys (here they are
        non-persistent buffers, so ``self.encoder.state_dict()`` is empty)."""
        buffers = dict(self.encoder.named_buffers())
        return {k: buffers[k].detach() for k in self._encoder_keys}

    def _check_task(self, task: str) -> None:
        if task not in self.aligners:
            raise KeyError(f"no aligner for task {task!r} (tasks: {self.tasks})")

    def forward(self, task: str, images: Tensor) -> AlignedFeatures:
        """Aligned final embedding of ``images`` for ``task`` (+ V2's aligned per-block token means)."""
        self._check_task(task)
        if self.version == "v1":
            with torch.no_grad():  # nothing upstream of the aligner learns: keep no activations
                z = self.encoder(images)
            return AlignedFeatures(self.aligners[task](z))
        z, means = self._recorder.run(self.encoder, images, self.block_aligners[task])
        return AlignedFeatures(self.aligners[task](z), means)

    def forward_many(self, images: Mapping[str, Tensor]) -> dict[str, AlignedFeatures]:
        """``{task: forward(task, images[task])}`` in one batched pass of the shared merged encoder.

        The tasks' batches are concatenated; every aligner is applied to its own task's slice (V2:
        inside each block's hook), so the result equals the per-task calls at a K-th of the launches.
        Batches of different image shapes fall back to one pass per task.
        """
        tasks = list(images)
        for t in tasks:
            self._check_task(t)
        if len({tuple(x.shape[1:]) for x in images.values()}) != 1:
            return {t: self(t, images[t]) for t in tasks}
        sizes = [images[t].shape[0] for t in tasks]
        x = torch.cat([images[t] for t in tasks])
        if self.version == "v1":
            with torch.no_grad():
                z = self.encoder(x)
            return {t: AlignedFeatures(self.aligners[t](zt)) for t, zt in zip(tasks, z.split(sizes))}
        dim = self._recorder.batch_dim
        per_block = [
            _SliceAligners([self.block_aligners[t][i] for t in tasks], sizes, dim) for i in range(self.depth)
        ]
        z, means = self._recorder.run(self.encoder, x, per_block)
        finals, split_means = z.split(sizes), [m.split(sizes) for m in means]
        return {
            t: AlignedFeatures(self.aligners[t](finals[k]), tuple(m[k] for m in split_means))
            for k, t in enumerate(tasks)
        }

    @property
    def label(self) -> str:
        """``Surgery`` or ``SurgeryV2``."""
        return "SurgeryV2" if self.version == "v2" else "Surgery"

    def identity(self) -> dict:
        """What the aligners mean (compared when a run is resumed)."""
        return {"version": self.version, "rank": self.rank}

    def trainable_parameter_count(self) -> int:
        """Number of aligner parameters (everything that learns)."""
        return sum(p.numel() for p in self.parameters())

    def _check_loaded_state(self, module: nn.Module, state: Mapping[str, Tensor], prefix: str, *args: Any) -> None:
        """Refuse a checkpoint whose aligners belong to other tasks, another depth or width."""
        own = {k: v.shape for k, v in self.state_dict(prefix=prefix).items()}
        theirs = {k: v.shape for k, v in state.items() if k.startswith(prefix)}
        their_tasks = sorted({k[len(prefix) :].split(".")[1] for k in theirs})
        if sorted(self.tasks) != their_tasks:
            raise ValueError(
                f"surgery checkpoint has aligners for tasks {their_tasks}, this model has {sorted(self.tasks)}"
            )
        for key in sorted(set(own) | set(theirs)):
            if key not in theirs or key not in own:
                where = "missing from the checkpoint" if key not in theirs else "not in this model"
                raise ValueError(
                    f"surgery checkpoint key {key!r} is {where} (model: {self.version}, depth {self.depth})"
                )
            if tuple(theirs[key]) != tuple(own[key]):
                raise ValueError(
                    f"surgery checkpoint aligner {key!r} has shape {tuple(theirs[key])}, the backbone needs "
                    f"{tuple(own[key])} (feature width {self.feature_dim}, block width {self.width}, rank {self.rank})"
                )


def alignment_loss(merged: AlignedFeatures, expert: AlignedFeatures) -> Tensor:
    """Σ over layers of mean |merged − expert| (v1: the final embedding only); experts detached."""
    if len(merged.blocks) != len(expert.blocks):
        raise ValueError(f"merged model has {len(merged.blocks)} block features, expert {len(expert.blocks)}")
    loss = F.l1_loss(merged.final.float(), expert.final.detach().float())
    for m, e in zip(merged.blocks, expert.blocks):
        loss = loss + F.l1_loss(m.float(), e.detach().float())
    return loss


@torch.no_grad()
def layer_alignment_losses(merged: AlignedFeatures, expert: AlignedFeatures) -> Tensor:
    """The terms of :func:`alignment_loss`, detached: ``[L + 1]``, every block's L1 in order, then the
    final embedding's (v1: ``[1]``, the final embedding only)."""
    if len(merged.blocks) != len(expert.blocks):
        raise ValueError(f"merged model has {len(merged.blocks)} block features, expert {len(expert.blocks)}")
    pairs = [*zip(merged.blocks, expert.blocks), (merged.final, expert.final)]
    return torch.stack([F.l1_loss(m.float(), e.float()) for m, e in pairs])


class ExpertFeatures:
    """Frozen expert features of the current batch: eval mode, ``torch.no_grad()``, optional half precision.

    Args:
        pool: the model pool the experts come from.
        tasks: the tasks whose experts are needed.
        with_blocks: also return every block's token mean (SurgeryV2 targets).
        dtype: the experts' dtype (``torch.bfloat16`` / ``torch.float16`` halve their memory); outputs
            are returned in float32.
        cache: keep one built expert encoder per task after first use (fast); ``False`` rebuilds the
            expert from the pool for every batch so only one is materialised at a time (least memory).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: Sequence[str],
        with_blocks: bool = False,
        dtype: torch.dtype | None = None,
        cache: bool = True,
    ) -> None:
        self.pool, self.tasks = pool, pool.check_tasks(tasks)
        self.with_blocks, self.dtype, self.cache = with_blocks, dtype, cache
        self._encoders: dict[str, nn.Module] = {}

    def encoder(self, task: str, device: torch.device) -> nn.Module:
        """The frozen expert of ``task`` on ``device`` (built, cast and cached on first use)."""
        if task not in self.tasks:
            raise KeyError(f"no expert requested for task {task!r} (tasks: {self.tasks})")
        enc = self._encoders.get(task)
        if enc is None:
            enc = self.pool.build_encoder(self.pool.expert_state(task))
            if self.dtype is not None:
                enc = enc.to(self.dtype)
            if self.cache:
                self._encoders[task] = enc
        first = next(enc.parameters(), None)
        if first is not None and first.device != device:
            enc.to(device)
        return enc

    @torch.no_grad()
    def __call__(self, task: str, images: Tensor) -> AlignedFeatures:
        enc = self.encoder(task, images.device)
        dtype = next(enc.parameters()).dtype
        x = images.to(dtype)
        out = encode_with_block_means(enc, x) if self.with_blocks else AlignedFeatures(enc(x))
        return AlignedFeatures(out.final.float(), tuple(b.float() for b in out.blocks))

    def clear(self) -> None:
        """Drop every cached expert encoder."""
        self._encoders.clear()
