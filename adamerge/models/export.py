"""Export a merged image encoder as a full open_clip CLIP checkpoint.

The file is a safetensors state dict of the whole CLIP model: the text tower, projections and
``logit_scale`` of the pretrained model, and the merged ``visual.*`` tensors. It loads back with
``open_clip.create_model(model_name, pretrained=PATH)`` (open_clip reads ``.safetensors`` paths with
``safetensors.torch.load_file`` and loads strictly). It is written atomically: a temporary file next
to the target, then a rename, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from adamerge.merging.task_vectors import MergeError, check_compatible
from adamerge.models.checkpoints import SAFETENSORS_SUFFIX, CheckpointError, check_finite, save_state_dict

__all__ = ["export_merged", "full_clip_state"]


def _clip_of(pool_or_clip: object) -> nn.Module:
    clip = getattr(pool_or_clip, "clip", pool_or_clip)
    if not isinstance(clip, nn.Module) or not isinstance(getattr(clip, "visual", None), nn.Module):
        raise TypeError(
            f"export needs an open_clip CLIP model or a pool holding one (.clip), got {type(pool_or_clip).__name__}"
        )
    return clip


def full_clip_state(pool_or_clip: object, visual_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The CLIP state dict with ``visual.*`` replaced by ``visual_state`` (validated, cast to θ_0 dtypes).

    Args:
        pool_or_clip: an open_clip CLIP, or a pool with a ``clip`` attribute (OpenCLIPPool).
        visual_state: the merged image encoder, open_clip ``model.visual`` keys.
    """
    clip = _clip_of(pool_or_clip)
    ref = clip.visual.state_dict()
    try:
        check_compatible(ref, visual_state, name="merged visual state dict")
        check_finite(visual_state, name="merged visual state dict")
    except MergeError as e:
        raise CheckpointError(str(e)) from None
    full = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    full.update({f"visual.{k}": visual_state[k].detach().to(ref[k].dtype) for k in ref})
    return full


def export_merged(pool_or_clip: object, visual_state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write the full CLIP (pretrained text tower + merged visual tower) to ``path`` as safetensors.

    Args:
        pool_or_clip: an open_clip CLIP, or a pool with a ``clip`` attribute (OpenCLIPPool).
        visual_state: the merged image encoder, open_clip ``model.visual`` keys.
        path: target ``.safetensors`` file (written atomically; nothing is written on error).
    """
    target = Path(path)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{target}: a full CLIP export is written as .safetensors; rename the target")
    full = full_clip_state(pool_or_clip, visual_state)
    return save_state_dict(full, target, metadata={"format": "open_clip", "producer": "adamerge"})
