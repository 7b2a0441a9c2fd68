"""TSV-M out of core, holding one task vector of a tensor at a time.

TSV-M (:mod:`adamerge.merging.tsv`) merges a matrix from each task's top k = ⌊min(m, n)/K⌋ singular
triplets, stacked and orthogonalised; any other tensor is the mean of the task vectors. The
per-tensor path (:class:`~adamerge.merging.registry.OneTensor`) holds θ_0 and all K task vectors of a
tensor in float32 while it works: on a Qwen2-0.5B's 151936 × 896 embedding with K = 4, 2.5 GiB. Here
each tensor is merged as

    for t in 1..K:  τ_t read, U_t Σ_t V_tᵀ its top k triplets kept, τ_t and its full SVD freed
    τ = U⊥ Σ V⊥ᵀ     the stacks orthogonalised (their parts freed once stacked)
    θ = θ_0 + α τ    a block of rows of θ_0 at a time, written over τ

so the peak is one τ with its SVD, or the stacks with theirs (a few float32 copies of the tensor).
Same arithmetic in the same order as :func:`~adamerge.merging.tsv.tsv_merge`: the result equals it
bit for bit (``tests/test_hf_merge.py``; ``benchmarks/hf_merge_memory.py`` measures the peak).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_lam
from adamerge.merging.fused import QKVLayout, check_split_qkv
from adamerge.merging.registry import TensorStream, plus_pretrained, register_streaming
from adamerge.merging.tsv import is_tsv_matrix, orthogonalised_stack, task_components, tsv_rank

__all__ = ["tsv_stream"]


@register_streaming("tsv_m")
def tsv_stream(
    stream: TensorStream,
    tasks: Sequence[str],
    lam: float = 1.0,
    split_qkv: bool = True,
    is_svd_merged: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """TSV-M out of core: yields ``(key, θ[key])`` for every key of ``stream.merge_keys()``; the
    arguments are :func:`~adamerge.merging.tsv.tsv_merge`'s."""
    lam = check_lam(lam)
    check_split_qkv(split_qkv, "tsv")
    chosen = is_svd_merged or is_tsv_matrix
    for key in stream.merge_keys():
        yield key, plus_pretrained(stream, key, _merged_tau(stream, tasks, key, chosen, split_qkv, device), lam)


def _merged_tau(stream: TensorStream, tasks: Sequence[str], key: str, chosen: Callable[[str, Tensor], bool],
                split_qkv: bool, device: str | torch.device | None) -> Tensor:
    """TSV-M's merged τ of one tensor (fused q;k;v merged as three matrices when ``split_qkv``)."""
    components: dict[str, list] = {}  # name → each task's (U_k, σ_k, V_kᵀ) (SVD-merged matrices)
    rest: dict[str, list[Tensor]] = {}  # name → each task's τ (averaged)
    shapes: dict[str, tuple[int, ...]] = {}
    layout, home = None, None
    for task in tasks:
        tau = stream.task_vector_tensor(task, key)
        if layout is None:
            layout, home = (QKVLayout.of({key: tau}) if split_qkv else QKVLayout()), tau.device
        views = layout.split({key: tau}) if layout else {key: tau}
        del tau
        for name, view in views.items():
            shapes[name] = tuple(view.shape)
            if view.dim() == 2 and chosen(name, view):
                if tsv_rank(*view.shape, len(tasks)):
                    components.setdefault(name, []).append(task_components(view.to(device or home).float(),
                                                                           len(tasks)))
                else:
                    components.setdefault(name, [])
            else:
                rest.setdefault(name, []).append(view)
        del views
    merged: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name in rest:
            merged[name] = torch.stack([t.float() for t in rest.pop(name)]).mean(0)
            continue
        found = orthogonalised_stack(components.pop(name))
        if found is None:
            merged[name] = torch.zeros(*shape, dtype=torch.float32, device=home)
            continue
        u_orth, sigma, vh_orth, _ = found
        del found
        merged[name] = (u_orth.mul_(sigma) @ vh_orth).to(home)  # in place: the values of u_orth * sigma
    return layout.fuse(merged)[key] if layout else merged[key]
