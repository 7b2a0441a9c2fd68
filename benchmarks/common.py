"""What the benchmark scripts share: random-weight encoders and pools built in memory, timing, peak memory.

Every script runs as ``python benchmarks/NAME.py`` (``benchmarks/`` is then on ``sys.path``) and
imports these with ``from common import ...``. Weights are random (``pretrained=None``): only the
sizes matter, and nothing is downloaded.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adamerge.models.pool import ModelPool

__all__ = [
    "build_visual",
    "peak_memory_mib",
    "random_pool",
    "reset_peak_memory",
    "status_kib",
    "sync",
    "timed",
]


def build_visual(model: str, seed: int = 0) -> nn.Module:
    """A CLIP image tower with random weights, in eval mode.

    Args:
        model: ``tiny`` (the tests' 2-block ViT, 16 px), ``mini`` (the mini benchmark's ViT) or any
            open_clip model name (``ViT-B-32-quickgelu``, ``ViT-L-14-quickgelu``, ...).
        seed: torch seed for the initialisation.
    """
    torch.manual_seed(seed)
    if model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_clip

        return make_tiny_clip(seed).visual.eval()
    if model == "mini":
        from adamerge.data.mini.model import create_clip, get_preset

        return create_clip(get_preset("default"), seed=seed).visual.eval()
    import open_clip

    return open_clip.create_model(model, pretrained=None).visual.eval()


def random_pool(
    encoder: nn.Module,
    num_tasks: int,
    scale: float = 1e-3,
    classes: int = 10,
    name: str = "bench",
    noise_device: str | torch.device = "cpu",
) -> ModelPool:
    """A pool over ``encoder``: K experts θ_0 + scale·N(0, 1) (expert k drawn from seed k + 1, made
    on demand, one at a time) and random unit-row zero-shot heads of ``classes`` rows.
    ``noise_device="cuda"`` draws the noise there (ViT-L/14's 300M numbers in milliseconds, not
    seconds); the experts are on the CPU either way."""
    base = {k: v.detach() for k, v in encoder.state_dict().items()}

    def expert(seed: int):
        def load():
            g = torch.Generator(device=noise_device).manual_seed(seed)
            return {
                k: v + scale * torch.randn(v.shape, generator=g, device=noise_device).to(v.device)
                if v.is_floating_point()
                else v
                for k, v in base.items()
            }

        return load

    tasks = [f"task{k}" for k in range(num_tasks)]
    g = torch.Generator().manual_seed(0)
    heads = {t: F.normalize(torch.randn(classes, encoder.output_dim, generator=g), dim=-1) for t in tasks}
    return ModelPool(
        encoder, {t: expert(k + 1) for k, t in enumerate(tasks)}, heads, logit_scale=100.0, name=name
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, arg, device: torch.device) -> float:
    """Seconds of one ``fn(arg)``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn(arg)
    sync(device)
    return time.perf_counter() - start


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's peak allocated memory, or on CPU the resident set's high-water mark
    (through ``/proc/self/clear_refs``). False where the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """MiB: CUDA's peak allocated memory since the last reset, or on CPU the resident set's
    high-water mark (``VmHWM``; the process's ``ru_maxrss`` where there is none)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
