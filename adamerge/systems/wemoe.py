"""WEMoE and E-WEMoE as LightningModules: routers of weight-ensembling MLPs trained at test time.

    W_b = W_0 + Σ_k r_bk(x) τ_k  in every block's MLP,   min_routers  Σ_k mean_b H(softmax(logits_k(x_k,b)))

Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024,
arXiv 2402.00433; E-WEMoE: Shen et al., arXiv 2410.21804. The model is
:mod:`adamerge.components.wemoe` (equations, router definition, batched per-sample merging). Defaults
follow the paper's code: non-MLP weights by task arithmetic λ = 0.3, routers' last bias 0.3, entropy
loss summed over tasks, Adam lr 1e-4, 1000 steps, batch 16 per task (steps and batch live in the
trainer / data config). During training the routing weights are averaged over each task's batch
(``batch_reduce``, the FusionBench default: one merge per task per step, memory of a plain model);
at evaluation every sample gets its own merged MLP, and its routing weights are recorded per task (a
running mean per block and expert, and the first few samples): ``diagnostics()`` gives them as plain
data (:mod:`adamerge.wandb_story` draws them).

Checkpoints hold only the routers (7.16M numbers for ViT-B/32 with 8 tasks; E-WEMoE ~0.6M).
``export`` writes ``learned.safetensors`` (routers), ``wemoe.safetensors`` (routers, merged non-MLP
weights, W_0 and the MLP task vectors: everything :func:`load_wemoe` needs to rebuild the model on
the same architecture) and ``wemoe.json`` (tasks, configuration, counts).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adamerge.components.wemoe import LINEARS, WEMoEError, WEMoEModel, assemble, find_mlp_blocks
from adamerge.files import atomic_path, write_text
from adamerge.models.pool import ModelPool
from adamerge.systems.base import CheckpointMismatchError, TestTimeSystem
from adamerge.systems.base_merge import BaseMerge, base_merge_state, is_path

__all__ = ["WEMoE", "load_wemoe", "save_wemoe", "wemoe_optimizer"]

_PREFIX = "model."
_ROUTING_SAMPLES = 32  # per-sample routing weights kept per task and evaluation (for their spread)


def wemoe_optimizer(params) -> torch.optim.Optimizer:
    """Adam, lr 1e-4, betas (0.9, 0.999): the WEMoE default."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999))


class WEMoE(TestTimeSystem):
    """Weight-ensembling MoE routers trained by test-time entropy minimisation.

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge and adapt on, in order; default all of the pool's tasks.
        base_merge: where the non-MLP parameters come from: a static method name, a mapping
            ``{method: ties, keep: 0.2, lam: 0.3}``, or the path of a merged image-encoder state dict
            (e.g. an AdaMerging run's ``merged.safetensors``), see :mod:`adamerge.systems.base_merge`;
            None: the paper's task arithmetic, λ = 0.3, computed in the component's one pass.
        model: the upscaled model, ``class_path: adamerge.components.wemoe.WEMoEModel`` with its
            ``init_args`` (router layout, pruning, storage dtype, evaluation; documented there).
            E-WEMoE is its configuration ``shared_router: true, keep: 0.1``.
        optimizer: optimizer for the routers (default Adam, lr 1e-4).
        export_dir: if set, routers, the upscaled model and ``metrics.json`` go here after fit.
        lr_scheduler: an optional schedule of the optimizer's lr, stepped every step (see TestTimeSystem).
    """

    def __init__(
        self,
        pool: ModelPool,
        tasks: list[str] | None = None,
        base_merge: BaseMerge | None = None,
        model: Callable[[ModelPool, list[str], Mapping[str, Tensor] | None], WEMoEModel] | None = None,
        optimizer: OptimizerCallable = wemoe_optimizer,
        export_dir: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(pool, tasks, optimizer, export_dir, lr_scheduler=lr_scheduler)
        base = None if base_merge is None else base_merge_state(pool, base_merge, self.tasks)
        self.use_component((model or WEMoEModel)(pool, self.tasks, base))
        self.base_merge = base_merge
        self.model.config["base_merge"] = str(base_merge) if is_path(base_merge) else base_merge
        self._routing: dict[str, dict] = {}

    def method_identity(self) -> dict:
        return {**super().method_identity(), "base_merge": self.model.config["base_merge"]}

    def task_logits(self, task: str, images: Tensor) -> Tensor:
        if self.training or not self.model.eval_batch_reduce:
            return self.logits(task, self.model(images))
        self.model.set_batch_reduce(True)  # one routing vector per evaluation batch (published numbers)
        try:
            return self.logits(task, self.model(images))
        finally:
            self.model.set_batch_reduce(False)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        self.model.set_batch_reduce(self.model.batch_reduce)
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self.model.set_batch_reduce(False)

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.routers.parameters())

    # ---- routing weights seen at evaluation ---------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._routing = {}

    def on_test_epoch_start(self) -> None:
        self._routing = {}

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        self._record_routing(self._eval_tasks[dataloader_idx])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().test_step(batch, batch_idx, dataloader_idx)
        self._record_routing(self._eval_tasks[dataloader_idx])

    def _record_routing(self, task: str) -> None:
        """Add the batch's per-sample routing weights (``last_weights`` of every block) to ``task``'s
        running sum ``[L, K]``; keep its first samples ``[n, L, K]``. Stays on the device."""
        r = torch.stack([m.last_weights for m in self.model.mlps]).float()  # [L, B, K] (or [L, K])
        r = (r.unsqueeze(1) if r.dim() == 2 else r).transpose(0, 1)  # [B, L, K]
        seen = self._routing.setdefault(task, {"sum": torch.zeros_like(r[0]), "count": 0, "samples": r[:0]})
        seen["sum"] += r.sum(dim=0)
        seen["count"] += r.shape[0]
        if seen["samples"].shape[0] < _ROUTING_SAMPLES:
            seen["samples"] = torch.cat([seen["samples"], r[: _ROUTING_SAMPLES - seen["samples"].shape[0]]])

    def diagnostics(self) -> dict:
        """``{"routing": {tasks, experts, layers, mean, samples, count}}`` from the last evaluation: per
        evaluated task its mean routing weight per block and expert (``mean`` ``[T, L, K]``), its first
        per-sample weights (``samples[task]`` ``[n, L, K]``) and sample count; on CPU. Under DDP it holds
        this rank's batches. Nothing before an evaluation."""
        tasks = [t for t in self.tasks if self._routing.get(t, {}).get("count")]
        if not tasks:
            return {}
        seen = [self._routing[t] for t in tasks]
        return {"routing": {
            "tasks": tasks, "experts": list(self.tasks), "layers": [f"b{i}" for i in range(len(self.model.mlps))],
            "mean": torch.stack([s["sum"] / s["count"] for s in seen]).cpu(),
            "samples": {t: s["samples"].cpu() for t, s in zip(tasks, seen)},
            "count": {t: s["count"] for t, s in zip(tasks, seen)},
        }}

    # ---- checkpoints -------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        self.check_router_state(state, source="checkpoint")

    def check_router_state(self, state: dict[str, Tensor], source: str) -> None:
        """Raise :class:`CheckpointMismatchError` unless ``state`` (system keys) fits these routers."""
        routers = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
        try:
            self.model.check_router_state(routers, source=source)
        except WEMoEError as e:
            raise CheckpointMismatchError(str(e)) from None

    def load_routers(self, path: str | os.PathLike) -> None:
        """Load routers from an export's ``learned.safetensors`` (same tasks and router layout)."""
        state = load_file(str(path))
        self.check_router_state(state, source=str(path))
        self.load_state_dict(state)

    # ---- export ------------------------------------------------------------------------------
    def export(self, directory: Path) -> None:
        """Write ``learned.safetensors`` (routers), ``wemoe.safetensors`` and ``wemoe.json``."""
        directory = Path(directory)
        super().export(directory)
        save_wemoe(self.model, directory, extra={"system": type(self).__name__})


# ---- whole-model files ---------------------------------------------------------------------------
def save_wemoe(model: WEMoEModel, directory: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``wemoe.safetensors`` (every tensor of the upscaled model) and ``wemoe.json``; return the JSON."""
    directory = Path(directory)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    tensors.update({n: b.detach().cpu().contiguous() for n, b in model.named_buffers()})
    meta = {
        "format": "adamerge.wemoe/1",
        **(extra or {}),
        "tasks": list(model.tasks),
        "num_blocks": len(model.mlps),
        "num_routers": len(model.routers),
        "trainable_parameters": model.trainable_parameter_count(),
        "stored_numbers": sum(t.numel() for t in tensors.values()),
        "config": model.config,
        "rebuild": "adamerge.systems.wemoe.load_wemoe(directory, encoder) with encoder = the pool's encoder",
    }
    with atomic_path(directory / "wemoe.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"tasks": json.dumps(model.tasks)})
    write_text(directory / "wemoe.json", json.dumps(meta, indent=2))
    return meta


def load_wemoe(directory: str | os.PathLike, encoder: nn.Module) -> WEMoEModel:
    """Rebuild a model written by :func:`save_wemoe` on a copy of ``encoder`` (same architecture).

    Args:
        directory: the export folder (``wemoe.json`` and ``wemoe.safetensors``).
        encoder: an encoder of the same architecture (e.g. ``pool.encoder``); it is not modified.
    """
    directory = Path(directory)
    for name in ("wemoe.json", "wemoe.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not a WEMoE export")
    meta = json.loads((directory / "wemoe.json").read_text())
    tensors = load_file(str(directory / "wemoe.safetensors"))
    enc = copy.deepcopy(encoder)
    K = len(meta["tasks"])
    taus = {}
    for name, block in find_mlp_blocks(enc):
        taus[name] = {}
        for k in LINEARS:
            lin = getattr(block.mlp, f"c_{k}")
            taus[name][k] = (torch.empty(K, *lin.weight.shape), torch.empty(K, *lin.bias.shape))
    model = assemble(enc, taus, meta["tasks"], meta["config"])
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise WEMoEError(f"{directory}: the export does not fit this encoder ({what})")
    with torch.no_grad():
        for name, t in own.items():
            src = tensors[name]
            if tuple(t.shape) != tuple(src.shape):
                raise WEMoEError(
                    f"{directory}: shape mismatch at {name!r}: file {tuple(src.shape)}, model {tuple(t.shape)}"
                )
            t.data = src.to(t.dtype) if isinstance(t, nn.Parameter) else src
    return model
