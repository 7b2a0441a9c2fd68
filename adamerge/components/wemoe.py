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

E-WEMoE: each MLP task-vector tensor is pruned to its top ``keep_ratio`` (0.1) magnitudes, and one
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

W_0, τ and every frozen parameter are non-persistent buffers: ``state_dict()`` holds only the routers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.merging.task_vectors import check_compatible, dtype_named

__all__ = [
    "LINEARS",
    "WEMoEError",
    "WEMoEModel",
    "WeightEnsemblingMLP",
    "assemble",
    "build_router",
    "ensemble_linear",
    "find_mlp_blocks",
    "params_to_buffers",
    "prune_top_magnitude",
]

Impl = Literal["weights", "experts"]
LINEARS = ("fc", "proj")


class WEMoEError(ValueError):
    """A model that cannot be upscaled, or routers that do not fit the model / task list."""


def build_router(
    width: int, num_experts: int, hidden_layers: int = 1, init_lambda: float = 0.3
) -> nn.Sequential:
    """The router of eq. (1): ``hidden_layers`` × (Linear(d, d) → ReLU), then Linear(d, K).

    Args:
        width: input width d (the MLP's input features).
        num_experts: K, the number of task vectors.
        hidden_layers: number of hidden Linear(d, d) → ReLU stages (0, 1 = paper, 2).
        init_lambda: initial value of the last bias (router output at init ≈ λ).
    """
    if hidden_layers < 0:
        raise WEMoEError(f"router_hidden_layers must be >= 0, got {hidden_layers}")
    if num_experts < 1:
        raise WEMoEError(f"a router needs at least one expert, got {num_experts}")
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_experts))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    nn.init.constant_(layers[-1].bias, init_lambda)
    return nn.Sequential(*layers)


def ensemble_linear(
    x: Tensor, w0: Tensor, b0: Tensor, tau_w: Tensor, tau_b: Tensor, r: Tensor, impl: Impl = "weights"
) -> Tensor:
    """y = x (W_0 + Σ_k r_k τ_k)ᵀ + (b_0 + Σ_k r_k τ^b_k), batched over samples.

    Args:
        x: inputs ``[B, T, in]``.
        w0: base weight ``[out, in]``; b0: base bias ``[out]``.
        tau_w: stacked weight task vectors ``[K, out, in]``; tau_b: bias task vectors ``[K, out]``.
        r: per-sample weights ``[B, K]``, or one weight vector ``[K]`` shared by the batch.
        impl: ``"weights"`` (per-sample weights via bmm) or ``"experts"`` (factorised through τ).
    """
    dt = x.dtype
    tau_w, tau_b, r = tau_w.to(dt), tau_b.to(dt), r.to(dt)
    K, out, inp = tau_w.shape
    if r.shape[-1] != K:
        raise WEMoEError(f"routing weights have {r.shape[-1]} entries but there are {K} task vectors")
    if r.dim() == 1:
        w = w0.to(dt) + torch.tensordot(r, tau_w, dims=1)
        return F.linear(x, w, b0.to(dt) + r @ tau_b)
    B = x.shape[0]
    b = torch.addmm(b0.to(dt).unsqueeze(0), r, tau_b)  # [B, out]
    if impl == "weights":
        w = torch.addmm(w0.to(dt).reshape(1, -1), r, tau_w.reshape(K, -1)).view(B, out, inp)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    if impl == "experts":
        per_expert = torch.einsum("bti,koi->bkto", x, tau_w)
        return F.linear(x, w0.to(dt)) + torch.einsum("bk,bkto->bto", r, per_expert) + b.unsqueeze(1)
    raise WEMoEError(f"unknown impl {impl!r}: expected 'weights' or 'experts'")


def prune_top_magnitude(t: Tensor, keep_ratio: float) -> Tensor:
    """A copy of ``t`` keeping its ⌈keep_ratio · numel⌉ largest-magnitude entries, the rest 0.

    Args:
        t: any tensor (one task-vector tensor).
        keep_ratio: fraction kept, in (0, 1]; 1 returns an unpruned copy.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise WEMoEError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if keep_ratio == 1.0 or t.numel() == 0:
        return t.clone()
    k = max(1, math.ceil(keep_ratio * t.numel()))
    flat = t.reshape(-1)
    idx = flat.abs().float().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(t)


def find_mlp_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every transformer block of an open_clip ViT, checking each has an MLP.

    An MLP is ``block.mlp``, a Sequential with ``nn.Linear`` children ``c_fc`` (first) and ``c_proj``
    (last); anything in between (activation, optional norm) is kept as is.
    """
    blocks = getattr(getattr(encoder, "transformer", None), "resblocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise WEMoEError(
            f"{type(encoder).__name__} has no transformer.resblocks: WEMoE expects an open_clip "
            "VisionTransformer (model.visual)"
        )
    found = []
    for i, block in enumerate(blocks):
        name = f"transformer.resblocks.{i}"
        mlp = getattr(block, "mlp", None)
        children = list(mlp.named_children()) if isinstance(mlp, nn.Module) else []
        ok = (
            len(children) >= 2
            and children[0][0] == "c_fc"
            and children[-1][0] == "c_proj"
            and isinstance(children[0][1], nn.Linear)
            and isinstance(children[-1][1], nn.Linear)
            and children[0][1].bias is not None
            and children[-1][1].bias is not None
        )
        if not ok:
            raise WEMoEError(
                f"block {name!r} ({type(block).__name__}) has no recognisable MLP: expected "
                "`.mlp` with nn.Linear `c_fc` first and `c_proj` last (both with bias)"
            )
        found.append((name, block))
    return found


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (in place) into a non-persistent, gradient-free buffer."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach().requires_grad_(False), persistent=False)
    return module


class WeightEnsemblingMLP(nn.Module):
    """A block's MLP with weights merged per sample by eq. (1) (the router is held by reference).

    Args:
        mlp: the block's MLP (``c_fc``, middle modules, ``c_proj``), holding W_0 and b_0.
        taus: ``{"fc": (τ_w [K, out, in], τ_b [K, out]), "proj": (...)}``.
        router: the router module (registered in :class:`WEMoEModel`, only referenced here).
        batch_first: token layout of the block input (``[B, T, d]`` if True, else ``[T, B, d]``).
    """

    def __init__(
        self,
        mlp: nn.Module,
        taus: Mapping[str, tuple[Tensor, Tensor]],
        router: nn.Module,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        children = list(mlp.named_children())
        self.middle = nn.Sequential(*[m for _, m in children[1:-1]])
        for key, lin in (("fc", children[0][1]), ("proj", children[-1][1])):
            tau_w, tau_b = taus[key]
            if tuple(tau_w.shape[1:]) != tuple(lin.weight.shape) or tuple(tau_b.shape[1:]) != tuple(
                lin.bias.shape
            ):
                raise WEMoEError(
                    f"task-vector shapes {tuple(tau_w.shape)} do not fit c_{key} {tuple(lin.weight.shape)}"
                )
            self.register_buffer(f"w0_{key}", lin.weight.detach().clone(), persistent=False)
            self.register_buffer(f"b0_{key}", lin.bias.detach().clone(), persistent=False)
            self.register_buffer(f"tau_w_{key}", tau_w, persistent=False)
            self.register_buffer(f"tau_b_{key}", tau_b, persistent=False)
        object.__setattr__(self, "router", router)  # not a submodule: may be shared by all blocks
        self.batch_first = batch_first
        self.batch_reduce = False
        self.impl: Impl = "weights"
        self.chunk_size: int | None = None
        self.last_weights: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.tau_w_fc.shape[0]

    def routing_weights(self, x: Tensor) -> Tensor:
        """r of eq. (1) for ``x`` ``[B, T, d]``: ``[B, K]``, or ``[K]`` when ``batch_reduce``."""
        dtype = next(self.router.parameters()).dtype
        r = self.router(x.to(dtype)).mean(dim=1)
        return r.mean(dim=0) if self.batch_reduce else r

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        r = self.routing_weights(x)
        self.last_weights = r.detach()
        if r.dim() == 2 and self.chunk_size and x.shape[0] > self.chunk_size:
            n = self.chunk_size
            y = torch.cat([self._mlp(xc, rc) for xc, rc in zip(x.split(n), r.split(n))])
        else:
            y = self._mlp(x, r)
        return y if self.batch_first else y.transpose(0, 1)

    def _mlp(self, x: Tensor, r: Tensor) -> Tensor:
        h = ensemble_linear(x, self.w0_fc, self.b0_fc, self.tau_w_fc, self.tau_b_fc, r, self.impl)
        return ensemble_linear(
            self.middle(h), self.w0_proj, self.b0_proj, self.tau_w_proj, self.tau_b_proj, r, self.impl
        )


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
        init_lambda: the routers' last bias (initial routing weight of every expert).
        router_hidden_layers: hidden Linear(d, d) → ReLU stages per router: 0 (linear router),
            1 (the paper's Linear(d, d) → ReLU → Linear(d, K)), 2.
        shared_router: one router for all blocks (E-WEMoE) instead of one per block.
        keep_ratio: fraction of each MLP task-vector tensor's largest magnitudes kept (E-WEMoE: 0.1).
        tv_dtype: storage dtype of the MLP task vectors: ``float32``, ``bfloat16`` or ``float16``.
        impl: per-sample evaluation, ``weights`` (per-sample weights + bmm) or ``experts`` (factorised
            through the K task vectors); see :func:`ensemble_linear`.
        chunk_size: merge per-sample weights for at most this many samples at a time (bounds the
            transient memory, chunk_size × the MLP's weights per linear); None: the whole batch.
        batch_reduce: while training, average the routing weights over each task's batch (one merge
            per batch, the FusionBench default); evaluation always merges per sample.
    """

    def __init__(
        self,
        pool,
        tasks: Sequence[str] | None = None,
        base_state: Mapping[str, Tensor] | None = None,
        init_lambda: float = 0.3,
        router_hidden_layers: int = 1,
        shared_router: bool = False,
        keep_ratio: float = 1.0,
        tv_dtype: str = "float32",
        impl: Impl = "weights",
        chunk_size: int | None = None,
        batch_reduce: bool = True,
    ) -> None:
        super().__init__()
        try:
            storage = dtype_named(tv_dtype, "tv_dtype")
        except ValueError as e:
            raise WEMoEError(str(e)) from None
        encoder, taus, tasks, config = _upscale(
            pool, tasks, base_state, init_lambda, router_hidden_layers, shared_router, keep_ratio, storage
        )
        self._setup(*_attach_routers(encoder, taus, tasks, config))
        self.set_impl(impl)
        self.set_chunk_size(chunk_size)
        self.batch_reduce = bool(batch_reduce)

    @classmethod
    def from_parts(
        cls, encoder: nn.Module, routers: nn.ModuleList, tasks: Sequence[str], config: Mapping
    ) -> WEMoEModel:
        """Wrap an already upscaled ``encoder`` (blocks' ``mlp`` are :class:`WeightEnsemblingMLP`)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._setup(encoder, routers, tasks, config)
        model.batch_reduce = True
        return model

    @property
    def label(self) -> str:
        """``E-WEMoE`` for its configuration (one shared router over pruned MLP task vectors), else ``WEMoE``."""
        return "E-WEMoE" if self.config["shared_router"] and self.config["keep_ratio"] < 1.0 else "WEMoE"

    def identity(self) -> dict:
        """What the routers mean (compared when a run is resumed)."""
        return {k: self.config[k] for k in ("router_hidden_layers", "shared_router", "keep_ratio", "init_lambda")}

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
            raise WEMoEError(
                f"{source} has {n_theirs} router(s) of a different layout; this model has {len(self.routers)} "
                f"router(s) with {len(self.routers[0]) - 1} hidden layer(s) "
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
        config: must hold ``init_lambda``, ``router_hidden_layers`` and ``shared_router``.
    """
    blocks = find_mlp_blocks(encoder)
    widths = {b.mlp.c_fc.in_features for _, b in blocks}
    K = len(tasks)
    make = lambda d: build_router(d, K, int(config["router_hidden_layers"]), float(config["init_lambda"]))
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
    params_to_buffers(encoder)
    return encoder, routers, list(tasks), {**config, "batch_first": batch_first}


def _upscale(pool, tasks, merged_state, init_lambda, router_hidden_layers, shared_router, keep_ratio, tv_dtype):
    """(encoder with θ_0's MLPs and the merged other weights, stacked MLP τ per block, tasks, config):
    one streamed pass over the experts (see :class:`WEMoEModel` for the arguments)."""
    scaling_factor = 0.3  # the paper's task arithmetic for the non-MLP weights when no merged_state
    tasks = pool.check_tasks(pool.tasks if tasks is None else tasks)
    prune_top_magnitude(torch.zeros(1), keep_ratio)  # validate cheap arguments before any heavy work
    build_router(1, len(tasks), router_hidden_layers, init_lambda)
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
                stacks[key][i] = prune_top_magnitude(t, keep_ratio)
            elif merged_state is None:
                ta_sum[key] = t.float().clone() if key not in ta_sum else ta_sum[key].add_(t.float())
        del tau
    if merged_state is None:
        state = {k: v for k, v in theta0.items()}
        for key, s in ta_sum.items():
            state[key] = (theta0[key].float() + scaling_factor * s).to(theta0[key].dtype)
    else:
        check_compatible(theta0, merged_state, name="merged_state")
        state = {k: (theta0[k] if k in mlp_keys else merged_state[k].detach()) for k in theta0}
    del ta_sum
    taus = {name: {k: (stacks[w], stacks[b]) for k, (w, b) in per.items()} for name, per in keys.items()}
    config = {
        "init_lambda": float(init_lambda),
        "scaling_factor": None if merged_state is not None else float(scaling_factor),
        "router_hidden_layers": int(router_hidden_layers),
        "shared_router": bool(shared_router),
        "keep_ratio": float(keep_ratio),
        "tv_dtype": str(next(iter(stacks.values())).dtype).replace("torch.", ""),
        "pool": getattr(pool, "name", "pool"),
    }
    return pool.build_encoder(state), taus, tasks, config
