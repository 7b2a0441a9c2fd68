"""The weight-ensembling MLP of WEMoE / E-WEMoE (arXiv 2402.00433, 2410.21804) and its router.

    W_b = W_0 + Σ_k r_bk τ_k,      r_b = (1/T) Σ_t router(h_bt)  ∈ R^K                      (1)

for both linears of a block's MLP; :func:`ensemble_linear` evaluates (1) per sample, batched (the
``"weights"`` and ``"experts"`` forms and their costs are described in :mod:`adamerge.components.wemoe`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LINEARS",
    "Impl",
    "WEMoEError",
    "WeightEnsemblingMLP",
    "build_router",
    "ensemble_linear",
    "find_mlp_blocks",
    "prune_top_magnitude",
]

Impl = Literal["weights", "experts"]
LINEARS = ("fc", "proj")


class WEMoEError(ValueError):
    """A model that cannot be upscaled, or routers that do not fit the model / task list."""


def build_router(
    width: int, num_experts: int, hidden_layers: int = 1, init_lam: float = 0.3
) -> nn.Sequential:
    """The router of eq. (1): ``hidden_layers`` × (Linear(d, d) → ReLU), then Linear(d, K).

    Args:
        width: input width d (the MLP's input features).
        num_experts: K, the number of task vectors.
        hidden_layers: number of hidden Linear(d, d) → ReLU stages (0, 1 = paper, 2).
        init_lam: initial value of the last bias (router output at init ≈ λ).
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
    nn.init.constant_(layers[-1].bias, init_lam)
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


def prune_top_magnitude(t: Tensor, keep: float) -> Tensor:
    """A copy of ``t`` keeping its ⌈keep · numel⌉ largest-magnitude entries, the rest 0.

    Args:
        t: any tensor (one task-vector tensor).
        keep: fraction kept, in (0, 1]; 1 returns an unpruned copy.
    """
    if not 0.0 < keep <= 1.0:
        raise WEMoEError(f"keep must be in (0, 1], got {keep}")
    if keep == 1.0 or t.numel() == 0:
        return t.clone()
    k = max(1, math.ceil(keep * t.numel()))
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
