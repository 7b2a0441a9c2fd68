"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849) and RegMean++ from one pass over unlabeled test batches.

    Wᵀ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ,   Gᵢ = Xᵢᵀ Xᵢ / nᵢ,   G̃ = α G + (1 − α) diag(G)      (each linear layer)

Xᵢ: the layer's inputs (nᵢ rows: every token of every image) when expert i encodes task i's unlabeled
test batches; every other parameter is the experts' average (:func:`adamerge.merging.regmean.regmean_merge`).
Gram matrices are accumulated in float64 on the inputs' device, one layer at a time, from forward
hooks, and scaled to a mean over rows as the official code does (FusionBench
``fusion_bench/method/regmean``; bloomberg/dataless-model-merging).

open_clip's attention is ``nn.MultiheadAttention``, which calls ``F.multi_head_attention_forward``
with ``in_proj_weight`` and ``out_proj.weight`` directly, so module hooks never see either input. Here
they are captured explicitly: q, k, v share the block's input (``in_proj_weight`` gets that Gram
matrix), and ``out_proj``'s input — the attention context — is recomputed from the hooked input
(:func:`attention_context`). Hooking only ``nn.Linear`` modules would leave attention averaged.

RegMean++ (FusionBench ``fusion_bench/method/regmean_plusplus``): the stem (patch embedding, class and
position embeddings, pre-norm) is averaged first; each block's Gram matrices are taken in expert i's
block on the inputs the *merged* model gives that block (the merged earlier blocks), block by block.
The pass stores the merged stem's tokens of every image (N·B·T·D floats per task); the blocks are
merged when the model is first needed. FusionBench leaves the post-norm at θ_0; here it is averaged
like every other parameter outside the linear layers.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.merging.regmean import regmean_merge, regmean_solve
from adamerge.merging.task_vectors import linear_combination
from adamerge.models.pool import ModelPool
from adamerge.systems.statistics import StatisticsMerge

__all__ = ["RegMean", "attention_context", "linear_layers"]

Layer = tuple[nn.Module, str]  # (module, "linear" | "in_proj" | "out_proj")


def linear_layers(encoder: nn.Module) -> dict[str, Layer]:
    """Weight key → (module, kind) of every linear map of ``encoder``: each ``nn.Linear``'s
    ``weight`` (``"linear"``), and each ``nn.MultiheadAttention``'s ``in_proj_weight`` (``"in_proj"``)
    and ``out_proj.weight`` (``"out_proj"``), both read from the attention module."""
    attention = {id(m.out_proj) for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)}
    layers: dict[str, Layer] = {}
    for name, m in encoder.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
                raise ValueError(f"RegMean: attention {name!r} has separate q/k/v widths, bias_k/v or zero "
                                 "attention, which its input capture does not handle")
            layers[f"{prefix}in_proj_weight"] = (m, "in_proj")
            layers[f"{prefix}out_proj.weight"] = (m, "out_proj")
        elif isinstance(m, nn.Linear) and id(m) not in attention:
            layers[f"{prefix}weight"] = (m, "linear")
    return layers


def attention_context(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """The input of ``attn.out_proj`` for unmasked self-attention on ``x`` (``attn``'s layout:
    ``[B, T, D]`` when ``batch_first``, else ``[T, B, D]``): softmax(q kᵀ / √d_h) v, heads concatenated."""
    xb = x if attn.batch_first else x.transpose(0, 1)
    b, t, d = xb.shape
    h = attn.num_heads
    q, k, v = F.linear(xb, attn.in_proj_weight, attn.in_proj_bias).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
    return ctx if attn.batch_first else ctx.transpose(0, 1)


@contextlib.contextmanager
def _capture(layers: dict[str, Layer], keys: list[str], add: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``add(key, inputs)`` for the linear maps ``keys`` while active."""
    handles, attention = [], {}
    for key in keys:
        module, kind = layers[key]
        if kind == "linear":
            handles.append(module.register_forward_pre_hook(lambda m, args, key=key: add(key, args[0])))
        else:
            attention.setdefault(id(module), [module, {}])[1][kind] = key

    def on_attention(module, args, kwargs, output, kinds):
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        if k is not q or v is not q or kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise ValueError("RegMean captures unmasked self-attention only (an image tower's); this attention "
                             "got a different key/value or a mask")
        if "in_proj" in kinds:
            add(kinds["in_proj"], q)
        if "out_proj" in kinds:
            add(kinds["out_proj"], attention_context(module, q))

    for module, kinds in attention.values():
        handles.append(module.register_forward_hook(
            lambda m, a, kw, out, kinds=kinds: on_attention(m, a, kw, out, kinds), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Grams:
    """Σ XᵀX (float64) and row counts per weight key, for one expert."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.rows[key] = 0
        self.sums[key].addmm_(x.t(), x)
        self.rows[key] += x.shape[0]

    def means(self, keys: list[str], task: str) -> dict[str, Tensor]:
        missing = [k for k in keys if k not in self.sums]
        if missing:
            raise RuntimeError(f"RegMean: layer {missing[0]!r} never ran in expert {task!r}'s forward; leave it "
                               "out with the layers option")
        return {k: self.sums[k] / self.rows[k] for k in keys}


class RegMean(StatisticsMerge):
    """RegMean / RegMean++: each linear layer merged in closed form from its inputs' Gram matrices.

    Args:
        pool: the model pool (pretrained encoder, experts, zero-shot heads).
        tasks: the tasks to merge, in order; default all of the pool's tasks.
        alpha: off-diagonal scale α of G̃ = α G + (1 − α) diag(G), in [0, 1]; 0.95 as FusionBench's CLIP
            runs (the authors' language-model configs: 0.1 or 0.9; 1 = no reduction).
        layers: a regular expression (``re.search``) choosing, among the encoder's linear weights
            (attention ``in_proj_weight`` and ``out_proj.weight``, MLP ``c_fc``/``c_proj``), those
            merged by RegMean, e.g. ``"mlp"``; default every linear weight. The rest are averaged.
        plus_plus: RegMean++: each block's Gram matrices from the inputs the merged earlier blocks
            give it (open_clip ``VisionTransformer`` encoders only).
        export_dir: if set, ``merged.safetensors``, ``statistics.json`` and ``metrics.json`` are
            written here at the end of ``fit``.
    """

    identity = ("alpha", "layers", "plus_plus")

    def __init__(self, pool: ModelPool, tasks: list[str] | None = None, alpha: float = 0.95,
                 layers: str | None = None, plus_plus: bool = False, export_dir: str | None = None) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
        pattern = _pattern(layers)
        super().__init__(pool, tasks, export_dir=export_dir)
        self.alpha, self.layers, self.plus_plus = float(alpha), layers, bool(plus_plus)
        found = list(linear_layers(self.experts[0]))
        self.regmean_keys = [k for k in found if pattern is None or pattern.search(k)]
        if not self.regmean_keys:
            raise ValueError(f"layers={layers!r} matches none of the linear weights ({', '.join(found[:4])}, ...)")
        self._layers = [linear_layers(e) for e in self.experts]
        if self.plus_plus:
            self._check_plus_plus()
            with torch.no_grad():  # the merged stem: the experts' average (blocks are merged later)
                average = linear_combination([self.expert_weights(t) for t in self.tasks], [1 / len(self.tasks)] * len(self.tasks))
                for key, value in self._state(self.merged_encoder).items():
                    value.copy_(average[key])
        self.reset_statistics()

    @property
    def method_label(self) -> str:
        return "RegMean++" if self.plus_plus else "RegMean"

    def _check_plus_plus(self) -> None:
        enc = self.merged_encoder
        blocks = getattr(getattr(enc, "transformer", None), "resblocks", None)
        if not hasattr(enc, "_embeds") or not isinstance(blocks, nn.ModuleList):
            raise ValueError("plus_plus needs an open_clip VisionTransformer encoder (_embeds, transformer.resblocks)")
        outside = [k for k in self.regmean_keys if not k.startswith("transformer.resblocks.")]
        if outside:
            raise ValueError(f"plus_plus merges linear layers inside the blocks only; {outside[0]!r} is outside "
                             "(leave it out with the layers option)")

    # ---- statistics ------------------------------------------------------------------------
    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._grams = {t: _Grams() for t in self.tasks}
        self._tokens: dict[str, list[Tensor]] = {t: [] for t in self.tasks}

    def accumulate(self, task: str, images: Tensor) -> None:
        """Plain: the Gram matrices of every chosen layer under ``task``'s expert; ++: the merged stem's tokens."""
        with torch.no_grad():
            if self.plus_plus:
                self._tokens[task].append(self.merged_encoder._embeds(images))
                return
            index = self.tasks.index(task)
            with _capture(self._layers[index], self.regmean_keys, self._grams[task].add):
                self.experts[index](images)

    def grams(self) -> dict[str, dict[str, Tensor]]:
        """Task → key → mean Gram matrix XᵀX / n gathered so far (plain RegMean)."""
        return {t: self._grams[t].means(self.regmean_keys, t) for t in self.tasks}

    def statistics_summary(self) -> dict:
        return {**super().statistics_summary(), "alpha": self.alpha, "layers": self.layers,
                "plus_plus": self.plus_plus, "regmean_keys": list(self.regmean_keys)}

    # ---- merge -----------------------------------------------------------------------------
    def merge_statistics(self) -> dict[str, Tensor]:
        states = [self.expert_weights(t) for t in self.tasks]
        if not self.plus_plus:
            grams = self.grams()
            return regmean_merge(states, [grams[t] for t in self.tasks], self.alpha, names=self.tasks)
        return self._merge_plus_plus(states)

    def _merge_plus_plus(self, states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        merged = linear_combination(states, [1 / len(states)] * len(states))
        own = self._state(self.merged_encoder)
        tokens = {t: list(self._tokens[t]) for t in self.tasks}
        blocks = self.merged_encoder.transformer.resblocks
        for i, block in enumerate(blocks):
            prefix = f"transformer.resblocks.{i}."
            keys = [k for k in self.regmean_keys if k.startswith(prefix)]
            grams = []
            for index, task in enumerate(self.tasks):
                g = _Grams()
                with _capture(self._layers[index], keys, g.add):
                    for x in tokens[task]:
                        self._block(self.experts[index].transformer.resblocks[i], x)
                grams.append(g.means(keys, task))
            for key in keys:
                merged[key] = regmean_solve([s[key] for s in states], [g[key] for g in grams], self.alpha,
                                            key=key, names=self.tasks)
            for key in own:
                if key.startswith(prefix):
                    own[key].copy_(merged[key])
            if i + 1 < len(blocks):
                tokens = {t: [self._block(block, x) for x in xs] for t, xs in tokens.items()}
        return merged

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        """One residual block on batch-first tokens ``x`` (transposed for a sequence-first transformer)."""
        if self.merged_encoder.transformer.batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)


def _pattern(layers: str | None) -> re.Pattern | None:
    if layers is None:
        return None
    try:
        return re.compile(layers)
    except re.error as e:
        raise ValueError(f"layers={layers!r} is not a regular expression: {e}") from None
