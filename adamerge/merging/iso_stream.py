"""Iso-C out of core, in the memory of a few copies of the largest tensor.

Iso-C's merge of a tensor is a function of one statistic, the summed task vector Δ = Σ_t τ_t
(:mod:`adamerge.merging.iso`): a matrix becomes σ̄ U Vᵀ of Δ's SVD, any other tensor Δ / T. So each
tensor is merged as

    Δ  = Σ_t τ_t                     summed a block of rows at a time into one float32 buffer
    τ  = σ̄ U Vᵀ  (matrices)          U Σ Vᵀ = Δ, σ̄ = mean(Σ);  Δ is freed before U Vᵀ is formed
         Δ / T   (the rest)
    θ  = θ_0 + α τ                   a block of rows at a time, written over τ

The per-tensor path (:class:`~adamerge.merging.registry.OneTensor`) holds θ_0 and the T task vectors
of a tensor in float32 at once: on a Qwen2-0.5B's 151936 × 896 embedding with T = 4 that is 2.5 GiB
before the SVD starts. Here the peak is Δ, LAPACK's column-major copy of it and U (three float32
copies of the tensor), and the result is the in-memory :func:`~adamerge.merging.iso.iso_c` bit for
bit: the same sums in the same order, the same SVD call, the same products
(``tests/test_hf_merge.py``; ``benchmarks/hf_merge_memory.py`` measures the peak).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_lam
from adamerge.merging.fused import QKVLayout, check_split_qkv, svd
from adamerge.merging.iso import is_iso_matrix
from adamerge.merging.registry import (
    TensorStream,
    by_row_blocks,
    plus_pretrained,
    register_streaming,
    row_blocks,
)

__all__ = ["iso_c_stream", "summed_task_vector"]


def summed_task_vector(stream: TensorStream, tasks: Sequence[str], key: str) -> Tensor:
    """Σ_t τ_t[key] in float32, in task order, read a block of rows at a time where the stream has
    row blocks (one buffer the tensor's size, plus one block per task)."""
    return by_row_blocks(row_blocks(stream, key), lambda rows: _sum_rows(stream, tasks, key, rows))


def _sum_rows(stream: TensorStream, tasks: Sequence[str], key: str, rows: slice | None) -> Tensor:
    total = None
    for task in tasks:  # τ read fresh each time, so the first is the accumulator (iso's _sum clones it)
        t = stream.task_vector_tensor(task, key) if rows is None else stream.task_vector_tensor(task, key, rows)
        total = t if total is None else total.add_(t)
    return total


def _flat_spectrum(parts: list[Tensor], device: str | torch.device | None) -> Tensor:
    """σ̄ U Vᵀ of the one matrix in ``parts`` (popped, so that Δ is freed once LAPACK has copied it)."""
    delta = parts.pop()
    home = delta.device
    u, s, vh = svd(delta.to(device or home))
    del delta
    tau = u @ vh
    del u
    return tau.mul_(s.mean()).to(home)


@register_streaming("iso_c")
def iso_c_stream(
    stream: TensorStream,
    tasks: Sequence[str],
    lam: float = 1.0,
    is_matrix: Callable[[str, Tensor], bool] | None = None,
    device: str | torch.device | None = None,
    split_qkv: bool = True,
) -> Iterator[tuple[str, Tensor]]:
    """Iso-C out of core: yields ``(key, θ[key])`` for every key of ``stream.merge_keys()``; the
    arguments are :func:`~adamerge.merging.iso.iso_c`'s."""
    lam = check_lam(lam)
    check_split_qkv(split_qkv)
    pick = is_matrix or is_iso_matrix
    for key in stream.merge_keys():
        delta = summed_task_vector(stream, tasks, key)
        layout = QKVLayout.of({key: delta}) if split_qkv else QKVLayout()
        if layout:  # open_clip's fused q;k;v: three matrices, as iso_c splits them
            views = layout.split({key: delta})
            del delta
            tau = layout.fuse({name: _merged(name, [part], pick, len(tasks), device) for name, part in views.items()})
            del views
            tau = tau[key]
        else:
            parts = [delta]
            del delta
            tau = _merged(key, parts, pick, len(tasks), device)
        yield key, plus_pretrained(stream, key, tau, lam)


def _merged(name: str, parts: list[Tensor], pick: Callable[[str, Tensor], bool], num_tasks: int,
            device: str | torch.device | None) -> Tensor:
    t = parts[0]
    if t.dim() == 2 and t.numel() > 0 and pick(name, t):
        return _flat_spectrum(parts, device)
    return parts.pop() / num_tasks
