"""Export a merged image encoder as a full open_clip CLIP checkpoint.

The file is a safetensors state dict of the whole CLIP model: the text tower, projections and
``logit_scale`` of the pretrained model, and the merged ``visual.*`` tensors. It loads back with
``open_clip.create_model(model_name, pretrained=PATH)`` (open_clip reads ``.safetensors`` paths with
``safetensors.torch.load_file`` and loads strictly). It is written atomically: a temporary file next
to the target, then a rename, so a crash never leaves half a checkpoint.

The safetensors metadata records what the model runs (:func:`adamerge.models.activation.export_metadata`):
``activation`` (``quick_gelu`` / ``gelu``, from the model's modules) and, when the model name is given,
``open_clip_model`` and ``open_clip_config`` (JSON, ``quick_gelu`` explicit). Loading the file back as
a pretrained model, an expert or a base merge checks it against the configured model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from adamerge.merging.task_vectors import MergeError, check_compatible
from adamerge.models.activation import export_metadata
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


def export_merged(
    pool_or_clip: object,
    visual_state: Mapping[str, Tensor],
    path: str | os.PathLike,
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the full CLIP (pretrained text tower + merged visual tower) to ``path`` as safetensors.

    Args:
        pool_or_clip: an open_clip CLIP, or a pool with a ``clip`` attribute (OpenCLIPPool).
        visual_state: the merged image encoder, open_clip ``model.visual`` keys.
        path: target ``.safetensors`` file (written atomically; nothing is written on error).
        model_name: the CLIP's open_clip model name, recorded in the metadata (None: not recorded).
        model_config: its open_clip model config (None: ``open_clip.get_model_config(model_name)``).
    """
    target = Path(path)
    if target.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{target}: a full CLIP export is written as .safetensors; rename the target")
    full = full_clip_state(pool_or_clip, visual_state)
    metadata = {"format": "open_clip", "producer": "adamerge",
                **export_metadata(_clip_of(pool_or_clip), model_name, model_config)}
    return save_state_dict(full, target, metadata=metadata)
