"""AdaMerging of a causal language model (Yang et al., ICLR 2024, arXiv 2310.02575), on HF folders.

    layer-wise:  θ^l = θ_0^l + Σ_k λ_k^l τ_k^l      (one λ per merged tensor l per task k)
    task-wise:   θ   = θ_0   + Σ_k λ_k   τ_k
    loss:        L_k = mean_b  mean_{t ∈ P_b}  H( softmax( f(x_b; θ)_t ) )      (next-token entropy)

f is the ``AutoModelForCausalLM`` of the base folder, run on the merged weights through
:func:`torch.func.functional_call`; θ_0, the experts and which tensors are merged come from an
:class:`~adamerge.models.hf_pool.HFPool` (full fine-tunes or LoRA adapters; ``include`` /
``exclude`` choose the tensors, the others stay θ_0's). A "layer" is one merged tensor of the
checkpoint (``model.layers.3.mlp.down_proj.weight``, ``model.norm.weight`` …), the same granularity
as AdaMerging's per-tensor λ on CLIP and FusionBench's ``LayerWiseMergedModel``; tied weights
(``lm_head.weight`` = ``model.embed_tokens.weight``) are one tensor and one λ.

P_b, the positions whose next-token distribution counts (:func:`next_token_entropy`): ``"all"`` the
non-padding positions of prompt b (each one's prediction of the token after it, the last one's of
the continuation), ``"last"`` only its last token (the prediction of the answer's first token, as
FusionBench's Flan-T5 AdaMerging takes the first decoder step). Per-prompt means, then the batch
mean, so long prompts do not outweigh short ones.

Memory: the LM's weights are non-persistent float32 buffers of one model instance (loaded once,
never copied); the K directions are one flat ``[K, N]`` buffer (float32, or bfloat16); a step adds
the merged weights (one model's worth, differentiable in λ through one fused node) and activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.components.adamerging import (
    FusedMerge,
    Granularity,
    check_coefficient_args,
    direction_spec,
    stack_task_vectors,
)
from adamerge.components.frozen import freeze_as_buffers
from adamerge.merging.dispatch import merge_directions
from adamerge.merging.registry import LABELS
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_causal_lm import CausalLMPool
from adamerge.models.hf_pool import HFPool

Positions = Literal["all", "last"]

__all__ = ["CausalLMAdaMerging", "Positions", "next_token_entropy", "next_token_targets"]


# ---- the math ---------------------------------------------------------------------------------------
def next_token_entropy(logits: Tensor, attention_mask: Tensor, positions: Positions = "all") -> Tensor:
    """Per-prompt mean entropy (nats) of the next-token distributions: ``[B, T, V]``, ``[B, T]`` → ``[B]``.

    Args:
        logits: the LM's logits at every position.
        attention_mask: 1 at a prompt's tokens, 0 at padding (anywhere: left, right or inside).
        positions: ``"all"`` the mean over every non-padding position, ``"last"`` the last
            non-padding position only.
    """
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    if logits.dim() != 3 or attention_mask.shape != logits.shape[:2]:
        raise ValueError(f"logits [B, T, V] and attention_mask [B, T] expected, got {tuple(logits.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.bool)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"prompt {int((counts == 0).nonzero()[0])} of the batch has no tokens (all padding)")
    if positions == "last":
        index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask).masked_fill(~mask, -1).amax(dim=1)
        rows = logits[torch.arange(logits.shape[0], device=logits.device), index]
        log_p = torch.log_softmax(rows.float(), dim=-1)
        return -(log_p.exp() * log_p).sum(dim=-1)
    log_p = torch.log_softmax(logits[mask].float(), dim=-1)  # [N, V], only the prompts' positions
    h = -(log_p.exp() * log_p).sum(dim=-1)
    owner = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], device=h.device, dtype=h.dtype).index_add_(0, owner, h) / counts.to(h.dtype)


def next_token_targets(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(logits ``[N, V]``, next tokens ``[N]``) at every position t whose token and next token are both
    the prompt's (teacher-forced next-token prediction, for accuracy)."""
    mask = attention_mask.to(torch.bool)
    pairs = mask[:, :-1] & mask[:, 1:]
    return logits[:, :-1][pairs], input_ids[:, 1:][pairs]


# ---- the component ---------------------------------------------------------------------------------------
def _tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that is tied (one tensor under several names, e.g. ``lm_head.weight``
    and ``model.embed_tokens.weight``)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class CausalLMAdaMerging(nn.Module):
    """A causal LM with weights θ_0 + Σ_k λ_k τ_k on the merged tensors, differentiable in λ.

    Args:
        pool: the LM pool (an :class:`HFPool` is wrapped); the directions are read one expert at a time.
        tasks: the experts to merge, in order; default all of the pool's tasks.
        granularity: ``"layer"`` (one λ per merged tensor per task) or ``"task"`` (one λ per task).
        init_lam: initial value of every coefficient (0.3 in the paper).
        clamp: clamp λ to [0, 1] inside the merge (official AdaMerging; FusionBench's LM versions do not).
        directions: what λ scales: ``task_arithmetic`` (θ_0 and the task vectors), ``{method: ties,
            keep: 0.2}`` (AdaMerging++), or any merge registered with ``register_directions``.
        tv_dtype: storage dtype of the stacked directions, ``"float32"`` or ``"bfloat16"`` (half the memory).
    """

    def __init__(
        self,
        pool: CausalLMPool | HFPool,
        tasks: Sequence[str] | None = None,
        granularity: Granularity = "layer",
        init_lam: float = 0.3,
        clamp: bool = True,
        directions: str | dict[str, Any] = "task_arithmetic",
        tv_dtype: str = "float32",
    ) -> None:
        super().__init__()
        pool = CausalLMPool(pool) if isinstance(pool, HFPool) else pool
        if not isinstance(pool, CausalLMPool):
            raise TypeError(f"pool must be a CausalLMPool or an HFPool, got {type(pool).__name__}")
        storage = check_coefficient_args(granularity, init_lam, clamp, tv_dtype)
        self.task_names = pool.check_tasks(pool.tasks if tasks is None else list(tasks))
        self.layer_names = list(pool.merge_keys())
        if not self.layer_names:
            raise MergeError("no tensors to merge: the pool's include / exclude patterns leave none")
        self.directions = direction_spec(directions)
        args = dict(self.directions)
        origin, dirs = merge_directions(pool.hf, args.pop("method"), tasks=self.task_names, **args)
        lm = pool.load_model()
        self._tied = _tied_groups(lm)
        self._check_names(lm, origin)
        self.lm = freeze_as_buffers(lm)  # our own instance: frozen in place, never copied
        weights = dict(self.lm.named_buffers())
        with torch.no_grad():  # the origin (θ_0, or the base merge's) comes from the pool's files
            for key in self.layer_names:
                weights[key].copy_(origin[key])
        del origin
        reference = {k: weights[k] for k in self.layer_names}  # the LM's own tensors: no second copy
        self.register_buffer("task_vectors", stack_task_vectors(dirs, reference, storage), persistent=False)
        self._shapes = [tuple(v.shape) for v in reference.values()]
        self._sizes = [v.numel() for v in reference.values()]
        self.granularity, self.clamp, self.init_lam = granularity, bool(clamp), float(init_lam)
        shape = (len(self.task_names), len(self.layer_names) if granularity == "layer" else 1)
        self.lambdas = nn.Parameter(torch.full(shape, self.init_lam))

    def _check_names(self, lm: nn.Module, origin: Mapping[str, Tensor]) -> None:
        tensors = {**dict(lm.named_parameters(remove_duplicate=False)), **dict(lm.named_buffers())}
        for group in self._tied:
            merged = [n for n in group if n in self.layer_names]
            if len(merged) > 1:
                raise MergeError(f"tensors {merged[0]!r} and {merged[1]!r} are one tied weight: merge one of them "
                                 f"only (exclude {merged[1]!r})")
        for key in self.layer_names:
            if key not in tensors:
                raise MergeError(f"tensor {key!r} of the base folder is no weight of the {type(lm).__name__} built "
                                 "from it (a key transformers renames on loading?): exclude it from the merge")
            if tuple(tensors[key].shape) != tuple(origin[key].shape):
                raise MergeError(f"tensor {key!r}: the model's weight has shape {tuple(tensors[key].shape)}, the "
                                 f"files' {tuple(origin[key].shape)}")

    @property
    def label(self) -> str:
        """``AdaMerging (layer-wise)``, ``AdaMerging++ (task-wise)``, …: the row name in results tables."""
        method = self.directions["method"]
        name = {"task_arithmetic": "AdaMerging", "ties": "AdaMerging++"}.get(method, f"AdaMerging+{LABELS[method]}")
        return f"{name} ({self.granularity}-wise)"

    def identity(self) -> dict:
        """What the learned λ means (compared when a run is resumed)."""
        return {"granularity": self.granularity, "clamp": self.clamp, "directions": dict(self.directions),
                "layers": len(self.layer_names)}

    @property
    def num_tasks(self) -> int:
        return self.lambdas.shape[0]

    def coefficients(self) -> Tensor:
        """The effective coefficients ``[K, L]`` (clamped if ``clamp``; task-wise broadcast to L)."""
        lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
        return lam.expand(self.num_tasks, len(self.layer_names))

    def train(self, mode: bool = True) -> CausalLMAdaMerging:
        """Only λ learns: the LM stays in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        return self

    # ---- merge and forward ----------------------------------------------------------------------------
    def merged_parameters(self) -> dict[str, Tensor]:
        """θ_0 + Σ_k λ_k d_k for every merged tensor, differentiable in λ (float32 arithmetic)."""
        theta0 = dict(self.lm.named_buffers())
        lam = self.lambdas.clamp(0.0, 1.0) if self.clamp else self.lambdas
        bases = [theta0[k] for k in self.layer_names]
        with torch.autocast(self.task_vectors.device.type, enabled=False):
            merged = FusedMerge.apply(lam, self.task_vectors, self._sizes, self._shapes, *bases)
        return dict(zip(self.layer_names, merged))

    @torch.no_grad()
    def merged_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, merged tensor) in merge order, one at a time, detached, on the CPU (for export)."""
        theta0 = dict(self.lm.named_buffers())
        lam = self.coefficients().float()
        offset = 0
        for l, (key, size, shape) in enumerate(zip(self.layer_names, self._sizes, self._shapes)):
            delta = lam[:, l] @ self.task_vectors[:, offset: offset + size].float()
            offset += size
            yield key, (theta0[key].float() + delta.view(shape)).cpu()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of the LM on the merged weights (``params``: precomputed, else merged now)."""
        params = dict(self.merged_parameters() if params is None else params)
        for group in self._tied:  # frozen as buffers, tied weights are separate tensors: pass the merge to each
            merged = next((params[n] for n in group if n in params), None)
            if merged is not None:
                params.update(dict.fromkeys(group, merged))
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        return functional_call(self.lm, params, (), inputs).logits
