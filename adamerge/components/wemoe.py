"""Weight-ensembling mixture of experts: WEMoE and E-WEMoE.

WEMoE: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024,
arXiv 2402.00433. E-WEMoE: Shen et al., "Efficient and Effective Weight-Ensembling Mixture of Experts
for Multi-Task Model Merging", arXiv 2410.21804.

Every transformer block's MLP (both linears ``c_fc`` and ``c_proj``, weights and biases) becomes

    W_b = W_0 + Σ_k r_bk τ_k,      r_b = (1/T) Σ_t router(h_bt)  ∈ R^K                      (1)

where h_bt are the tokens entering the MLP (after the block's ``ln_2``), W_0 the pretrained weights and
τ_k = θ_k − θ_0 the MLP task vectors. The router is dense (no softmax, no top-k); every sample gets its
own merged MLP. All other parameters are merged once by task arithmetic, θ = θ_0 + λ Σ_k τ_k (λ = 0.3),
or taken from a given merged state dict (e.g. a finished AdaMerging run).

Router (``router_hidden_layers`` = n, the number of hidden ``Linear(d, d) → ReLU`` stages):
n = 0: Linear(d, K); n = 1: Linear(d, d) → ReLU → Linear(d, K) (the paper's "2-layer" router,
7.16M trainable parameters on ViT-B/32 with 8 tasks); n = 2: two hidden stages. Weights N(0, 0.01²),
hidden biases 0, last bias λ, so at init r ≈ λ and (1) is task arithmetic.

E-WEMoE: each MLP task-vector tensor is pruned to its top ``keep`` (0.1) magnitudes, and one
router (input width d, the same at every block of a ViT) is shared by all blocks; at block l it reads
block l's MLP input.

Per-sample merging is batched, never a loop over samples. Two equivalent evaluations of
y_b = x_b W_bᵀ + b_b are implemented (:func:`ensemble_linear`):

* ``"weights"`` (default): W_b = W_0 + r_b · τ as one GEMM ``[B, K] @ [K, out·in]``, then one ``baddbmm``.
  Cost per sample K·in·out + T·in·out multiply-adds.
* ``"experts"``: x_b W_0ᵀ + Σ_k r_bk (x_b τ_kᵀ) with one einsum over the stacked τ. Cost (K+1)·T·in·out.

With ViT token counts (T = 50 for B/32, 257 for L/14) and K ≈ 8, ``"weights"`` does ~(K+T)/((K+1)T) ≈
1/8 of the work, so it is the default (benchmarks/wemoe_throughput.py measures both; ViT-B/32, K = 8,
B = 64 on 2 CPU cores: 0.50 vs 0.23 images/s, against 0.06 for a per-sample loop). Its transient
memory is B·out·in per linear (600 MB at B = 64 for B/32's c_fc in float32; ``set_chunk_size`` bounds
it by merging a few samples at a time). ``batch_reduce=True``
averages r over the batch, merges once and runs a plain matmul (cheap; used while adapting).

W_0, τ and every frozen parameter are non-persistent buffers (the components' one freeze rule,
:func:`~adamerge.components.frozen.freeze_as_buffers`): ``state_dict()`` holds only the routers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from adamerge.components.frozen import freeze_as_buffers
from adamerge.components.wemoe_mlp import (
    LINEARS,
    Impl,
    WeightEnsemblingMLP,
    WEMoEError,
    build_router,
    ensemble_linear,
    find_mlp_blocks,
    prune_top_magnitude,
)
from adamerge.merging.task_vectors import add_task_vector, check_compatible, dtype_named

__all__ = [
    "LINEARS",
    "WEMoEError",
    "WEMoEModel",
    "WeightEnsemblingMLP",
    "assemble",
    "build_router",
    "ensemble_linear",
    "find_mlp_blocks",
    "prune_top_magnitude",
]

class WEMoEModel(nn.Module):
    """An encoder upscaled with weight-ensembling MLPs: ``forward(images) -> features``; only the
    routers are parameters.

    Built from a pool: every block's MLP becomes W_0 + Σ_k r_k(x) τ_k (the K experts' MLP task
    vectors stacked, optionally pruned), the other parameters come from ``base_state`` (default
    the paper's task arithmetic, θ_0 + 0.3 Σ_k τ_k, computed in the same pass over the experts).

    Args:
        pool: the model pool (θ_0, experts); task vectors are streamed one expert at a time.
        tasks: the experts to merge (default: all of the pool's tasks, in its order).
        base_state: a merged encoder state to take the non-MLP parameters from (its MLP entries are
            ignored: W_0 is always θ_0's MLP); None: task arithmetic with λ = 0.3.
        init_lam: the routers' last bias (initial routing weight of every expert).
        router_hidden_layers: hidden Linear(d, d) → ReLU stages per router: 0 (linear router),
            1 (the paper's Linear(d, d) → ReLU → Linear(d, K)), 2.
        shared_router: one router for all blocks (E-WEMoE) instead of one per block.
        keep: fraction of each MLP task-vector tensor's largest magnitudes kept (E-WEMoE: 0.1).
        tv_dtype: storage dtype of the MLP task vectors: ``float32``, ``bfloat16`` or ``float16``.
        impl: per-sample evaluation, ``weights`` (per-sample weights + bmm) or ``experts`` (factorised
            through the K task vectors); see :func:`ensemble_linear`.
        chunk_size: merge per-sample weights for at most this many samples at a time (bounds the
            transient memory, chunk_size × the MLP's weights per linear); None: the whole batch.
        batch_reduce: while training, average the routing weights over each task's batch (one merge
            per batch, the FusionBench default).
        eval_batch_reduce: also average them over each evaluation batch. Off: every test sample gets its
            own merged MLP (the paper). On: what the published E-WEMoE and FusionBench numbers measured
            (their code turns batch averaging off on the root module only), which depends on the
            evaluation batch (FusionBench: 128, unshuffled); see docs/parity.md.
    """

    def __init__(
        self,
        pool,
        tasks: Sequence[str] | None = None,
        base_state: Mapping[str, Tensor] | None = None,
        init_lam: float = 0.3,
        router_hidden_layers: int = 1,
        shared_router: bool = False,
        keep: float = 1.0,
        tv_dtype: str = "float32",
        impl: Impl = "weights",
        chunk_size: int | None = None,
        batch_reduce: bool = True,
        eval_batch_reduce: bool = False,
    ) -> None:
        super().__init__()
        try:
            storage = dtype_named(tv_dtype, "tv_dtype")
        except ValueError as e:
            raise WEMoEError(str(e)) from None
        encoder, taus, tasks, config = _upscale(
            pool, tasks, base_state, init_lam, router_hidden_layers, shared_router, keep, storage
        )
        self._setup(*_attach_routers(encoder, taus, tasks, config))
        self.set_impl(impl)
        self.set_chunk_size(chunk_size)
        self.batch_reduce = bool(batch_reduce)
        self.eval_batch_reduce = bool(eval_batch_reduce)

    @classmethod
    def from_parts(
        cls, encoder: nn.Module, routers: nn.ModuleList, tasks: Sequence[str], config: Mapping
    ) -> WEMoEModel:
        """Wrap an already upscaled ``encoder`` (blocks' ``mlp`` are :class:`WeightEnsemblingMLP`)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._setup(encoder, routers, tasks, config)
        model.batch_reduce, model.eval_batch_reduce = True, False
        return model

    @property
    def label(self) -> str:
        """``E-WEMoE`` for its configuration (one shared router over pruned MLP task vectors), else ``WEMoE``."""
        return "E-WEMoE" if self.config["shared_router"] and self.config["keep"] < 1.0 else "WEMoE"

    def identity(self) -> dict:
        """What the routers mean (compared when a run is resumed)."""
        return {k: self.config[k] for k in ("router_hidden_layers", "shared_router", "keep", "init_lam")}

    def _setup(self, encoder: nn.Module, routers: nn.ModuleList, tasks: Sequence[str], config: Mapping) -> None:
        self.encoder = encoder
        self.routers = routers
        self.tasks = list(tasks)
        self.config = dict(config)
        self.mlps = [b.mlp for b in encoder.transformer.resblocks]
        if not all(isinstance(m, WeightEnsemblingMLP) for m in self.mlps):
            raise WEMoEError("every block's mlp must be a WeightEnsemblingMLP")
        if len(routers) not in (1, len(self.mlps)):
            raise WEMoEError(
                f"got {len(routers)} routers for {len(self.mlps)} blocks (expected 1 or {len(self.mlps)})"
            )
        for i, router in enumerate(routers):
            k = router[-1].out_features
            if k != len(self.tasks):
                raise WEMoEError(
                    f"router {i} has {k} outputs but there are {len(self.tasks)} tasks {self.tasks}"
                )

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def set_batch_reduce(self, value: bool) -> None:
        """One weight vector per batch (mean over samples) instead of one per sample."""
        for m in self.mlps:
            m.batch_reduce = bool(value)

    def set_impl(self, impl: Impl) -> None:
        """Choose how per-sample merging is evaluated (see :func:`ensemble_linear`)."""
        if impl not in ("weights", "experts"):
            raise WEMoEError(f"unknown impl {impl!r}: expected 'weights' or 'experts'")
        for m in self.mlps:
            m.impl = impl

    def set_chunk_size(self, chunk_size: int | None) -> None:
        """Merge per-sample weights for at most ``chunk_size`` samples at a time (None: whole batch).

        Bounds the transient memory of per-sample merging (chunk_size · out · in per linear).
        """
        if chunk_size is not None and int(chunk_size) < 1:
            raise WEMoEError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        for m in self.mlps:
            m.chunk_size = None if chunk_size is None else int(chunk_size)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def check_router_state(self, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
        """Raise :class:`WEMoEError` unless ``state`` holds routers of this model's number and shape."""
        ours = self.state_dict()
        n_theirs = len({k.split(".")[1] for k in state if k.startswith("routers.")})
        last = f"routers.0.{len(self.routers[0]) - 1}.bias"
        if n_theirs != len(self.routers) or last not in state:
            hidden = (len(self.routers[0]) - 1) // 2  # a router is h × (Linear, ReLU), then Linear
            raise WEMoEError(
                f"{source} has {n_theirs} router(s) of a different layout; this model has {len(self.routers)} "
                f"router(s) with {hidden} hidden layer(s) "
                f"(router_hidden_layers / shared_router must match the run that wrote it)"
            )
        k = state[last].shape[0]
        if k != len(self.tasks):
            raise WEMoEError(
                f"{source} routers have {k} outputs (tasks) but this model merges {len(self.tasks)}: {self.tasks}"
            )
        check_compatible(ours, {k: v for k, v in state.items() if k in ours}, name=source)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        self.check_router_state(state_dict, source="state dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _mlp_state_keys(blocks: Sequence[tuple[str, nn.Module]]) -> dict[str, dict[str, tuple[str, str]]]:
    """block name → {"fc"/"proj": (weight key, bias key)} in the encoder's state dict."""
    return {
        name: {k: (f"{name}.mlp.c_{k}.weight", f"{name}.mlp.c_{k}.bias") for k in LINEARS}
        for name, _ in blocks
    }


def assemble(
    encoder: nn.Module,
    taus: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    tasks: Sequence[str],
    config: Mapping,
) -> WEMoEModel:
    """A :class:`WEMoEModel` around ``encoder`` (modified in place) and its blocks' stacked MLP τ
    (see :func:`_attach_routers`); used to rebuild exported models."""
    return WEMoEModel.from_parts(*_attach_routers(encoder, taus, tasks, config))


def _attach_routers(
    encoder: nn.Module,
    taus: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    tasks: Sequence[str],
    config: Mapping,
) -> tuple[nn.Module, nn.ModuleList, list[str], dict]:
    """Upscale ``encoder`` (modified in place: pass your own copy) given its blocks' stacked MLP τ.

    Args:
        encoder: an encoder holding the merged non-MLP weights and W_0 in its MLPs.
        taus: block name → {"fc"/"proj": (τ_w [K, out, in], τ_b [K, out])}.
        tasks: the K task names.
        config: must hold ``init_lam``, ``router_hidden_layers`` and ``shared_router``.
    """
    blocks = find_mlp_blocks(encoder)
    widths = {b.mlp.c_fc.in_features for _, b in blocks}
    K = len(tasks)
    make = lambda d: build_router(d, K, int(config["router_hidden_layers"]), float(config["init_lam"]))
    if config["shared_router"]:
        if len(widths) != 1:
            raise WEMoEError(f"a shared router needs one MLP input width across blocks, got {sorted(widths)}")
        routers = nn.ModuleList([make(widths.pop())])
    else:
        routers = nn.ModuleList([make(b.mlp.c_fc.in_features) for _, b in blocks])
    batch_first = bool(getattr(encoder.transformer, "batch_first", False))  # open_clip < 2.24 ran [T, B, d]
    for i, (name, block) in enumerate(blocks):
        router = routers[0] if config["shared_router"] else routers[i]
        block.mlp = WeightEnsemblingMLP(block.mlp, taus[name], router, batch_first=batch_first)
    freeze_as_buffers(encoder)
    return encoder, routers, list(tasks), {**config, "batch_first": batch_first}


def _upscale(pool, tasks, merged_state, init_lam, router_hidden_layers, shared_router, keep, tv_dtype):
    """(encoder with θ_0's MLPs and the merged other weights, stacked MLP τ per block, tasks, config):
    one streamed pass over the experts (see :class:`WEMoEModel` for the arguments)."""
    scaling_factor = 0.3  # the paper's task arithmetic for the non-MLP weights when no merged_state
    tasks = pool.check_tasks(pool.tasks if tasks is None else tasks)
    prune_top_magnitude(torch.zeros(1), keep)  # validate cheap arguments before any heavy work
    build_router(1, len(tasks), router_hidden_layers, init_lam)
    blocks = find_mlp_blocks(pool.encoder)
    keys = _mlp_state_keys(blocks)
    mlp_keys = {k for per in keys.values() for pair in per.values() for k in pair}
    theta0 = pool.pretrained_state()
    stacks: dict[str, Tensor] = {}
    ta_sum: dict[str, Tensor] = {}
    for i, (_, tau) in enumerate(pool.task_vectors(tasks)):
        for key, t in tau.items():
            if key in mlp_keys:
                if key not in stacks:
                    stacks[key] = torch.empty((len(tasks), *t.shape), dtype=tv_dtype or t.dtype)
                stacks[key][i] = prune_top_magnitude(t, keep)
            elif merged_state is None:
                ta_sum[key] = t.float().clone() if key not in ta_sum else ta_sum[key].add_(t.float())
        del tau
    if merged_state is None:  # task arithmetic: θ_0 + λ Σ_k τ_k on the non-MLP weights
        state = add_task_vector(theta0, ta_sum, lam=scaling_factor)
    else:
        check_compatible(theta0, merged_state, name="merged_state")
        state = {k: (theta0[k] if k in mlp_keys else merged_state[k].detach()) for k in theta0}
    del ta_sum
    taus = {name: {k: (stacks[w], stacks[b]) for k, (w, b) in per.items()} for name, per in keys.items()}
    config = {
        "init_lam": float(init_lam),
        "scaling_factor": None if merged_state is not None else float(scaling_factor),
        "router_hidden_layers": int(router_hidden_layers),
        "shared_router": bool(shared_router),
        "keep": float(keep),
        "tv_dtype": str(next(iter(stacks.values())).dtype).replace("torch.", ""),
        "pool": getattr(pool, "name", "pool"),
    }
    return pool.build_encoder(state), taus, tasks, config
