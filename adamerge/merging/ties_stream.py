"""TIES-Merging out-of-core, exactly: the whole-model statistics in passes over a tensor stream.

    h_k = the ⌊d·k⌋-th largest |τ_k| over the whole model        (per task; d float entries)
    maj = sign(Σ_entries γ⁰),  γ⁰ = sign(Σ_k τ_k·[|τ_k| ≥ h_k])   (what zero-sum entries take)
    θ   = θ_0 + λ · disjoint_merge(τ_k·[|τ_k| ≥ h_k], γ)         (:mod:`.ties`, key by key)

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv 2306.01708. Trimming needs each task's magnitude threshold over the whole model, so merging
tensor by tensor with a per-tensor threshold (mergekit's ``ties``) is another method. Here the
stream (one tensor of θ_0 and of each expert at a time) is read four times:

1. a histogram of the upper 16 bits of |τ_k| (float32 bits of a non-negative number order like the
   numbers), one per task: it finds the bin holding the threshold;
2. a histogram of the lower 16 bits of the entries in that bin: the threshold's exact bits;
3. the elected signs' total (the majority sign of zero-sum entries);
4. the merge of each tensor, by the same arithmetic as :func:`adamerge.merging.ties.ties_merge`.

The result equals the in-memory merge bit for bit (tests/test_hf_merge.py), with one tensor of θ_0
and K of task vectors held at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from adamerge.merging._common import check_lam, check_ratio
from adamerge.merging.registry import TensorStream, block_of, register_streaming, row_blocks
from adamerge.merging.task_vectors import MergeError, add_task_vector
from adamerge.merging.ties import MERGE_FUNCS, _disjoint, _majority, _n_keep, _sign

__all__ = ["stream_thresholds", "ties_stream"]

_HI = 1 << 15  # |x| has sign bit 0: the upper 16 bits of its float32 pattern are below 2^15
_LO = 1 << 16


def _bits(x: Tensor) -> Tensor:
    return x.detach().float().abs().reshape(-1).view(torch.int32)


def _walk(hist: Tensor, rank: int) -> tuple[int, int]:
    """(bin, rank within it) of the ``rank``-th largest entry (1-based) counted by ``hist``."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return hist.numel() - 1 - i, rank - above


def stream_thresholds(stream: TensorStream, tasks: Sequence[str], keep: float) -> list[float]:
    """Each task's trimming threshold h_k (:func:`adamerge.merging.ties.ties_threshold`, exactly), in
    two passes over the stream with one task-vector tensor held at a time."""
    keep = check_ratio(keep, "ties keep ratio")
    keys = stream.merge_keys()
    if not keys:
        raise MergeError("the model has no floating-point tensors to merge")
    hi = [None] * len(tasks)
    d = 0
    for key, rows in _blocks(stream, keys):
        for i, task in enumerate(tasks):
            b = _bits(block_of(stream.task_vector_tensor, task, key, rows=rows))
            h = torch.bincount(b >> 16, minlength=_HI).to("cpu", torch.int64)
            hi[i] = h if hi[i] is None else hi[i].add_(h)
            if i == 0:
                d += b.numel()
    n = _n_keep(d, keep)
    bins = [_walk(h, n) for h in hi]
    lo = [torch.zeros(_LO, dtype=torch.int64) for _ in tasks]
    for key, rows in _blocks(stream, keys):
        for i, task in enumerate(tasks):
            b = _bits(block_of(stream.task_vector_tensor, task, key, rows=rows))
            sel = b[(b >> 16) == bins[i][0]] & 0xFFFF
            if sel.numel():
                lo[i].add_(torch.bincount(sel, minlength=_LO).to("cpu", torch.int64))
    out = []
    for (top, rank), h in zip(bins, lo):
        low, _ = _walk(h, rank)
        out.append(float(torch.tensor([(top << 16) | low], dtype=torch.int32).view(torch.float32)))
    return out


@register_streaming("ties")
def ties_stream(
    stream: TensorStream, tasks: Sequence[str], keep: float = 0.2, merge: str = "sum", lam: float = 0.3,
    dare: float | None = None, seed: int = 0,
) -> Iterator[tuple[str, Tensor]]:
    """:func:`adamerge.merging.ties.ties_merge` over a tensor stream: yields (key, merged θ[key]).

    Args: as :func:`~adamerge.merging.ties.ties_merge` (``dare`` is refused: its masks are drawn
    over the whole model in task order; use ``dare_ties`` in memory).
    """
    lam = check_lam(lam)
    if merge not in MERGE_FUNCS:
        raise MergeError(f"unknown TIES merge function {merge!r}: use one of {MERGE_FUNCS}")
    if dare is not None:
        raise MergeError("ties with dare= has no out-of-core version (its masks are drawn over the whole "
                         "model, task after task): merge it in memory")
    del seed
    thresholds = stream_thresholds(stream, tasks, keep)
    keys = stream.merge_keys()
    total = 0.0
    for key, rows in _blocks(stream, keys):
        flat = [block_of(stream.task_vector_tensor, t, key, rows=rows).reshape(-1) for t in tasks]
        total += float(_sign(flat, thresholds).sum())
    majority = _majority(total)
    for key in keys:
        out = None
        for rows in row_blocks(stream, key) or [None]:
            theta0 = block_of(stream.pretrained_tensor, key, rows=rows)
            flat = [block_of(stream.task_vector_tensor, t, key, rows=rows).reshape(-1) for t in tasks]
            gamma = _sign(flat, thresholds)
            gamma.masked_fill_(gamma == 0, majority)
            merged = _disjoint(flat, gamma, thresholds, merge).view(theta0.shape)
            del flat, gamma
            part = add_task_vector({key: theta0}, {key: merged}, lam)[key]
            if rows is None:
                out = part
                break
            if out is None:
                out = part.new_empty((row_blocks(stream, key)[-1].stop, *part.shape[1:]))
            out[rows] = part
            del merged, part
        yield key, out


def _blocks(stream: TensorStream, keys: Sequence[str]) -> Iterator[tuple[str, slice | None]]:
    """(key, rows) for every key: its row blocks, or (key, None) where it is read whole."""
    for key in keys:
        for rows in row_blocks(stream, key) or [None]:
            yield key, rows
