"""``adamerge merge``: one static merge of any pool, written where a user's tools load it.

    adamerge merge --config merge.yaml
    adamerge merge --base Qwen/Qwen2-0.5B --experts.math ./math --experts.code org/code-lora \\
        --method ties --options.keep 0.2 --options.lam 0.5 --out merged/ --dtype bfloat16

Hugging Face models (``--base`` a model folder or Hub id; experts full fine-tunes or PEFT LoRA
adapters, mixed) are merged out of core where the method allows (:func:`adamerge.merging.dispatch.
out_of_core`; ``--in-memory`` for the others) into a folder ``AutoModel*.from_pretrained`` loads.
open_clip models (``--model_name ViT-B-32``; ``--base`` its ``pretrained`` tag, file or id; experts
checkpoints) are merged in memory into one full-CLIP ``.safetensors`` that
``open_clip.create_model(name, pretrained=FILE)`` loads. Either way an existing ``--out`` is refused
unless ``--overwrite``, and the output appears whole or not at all.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from adamerge.merging.dispatch import merge_pool, out_of_core
from adamerge.merging.task_vectors import MergeError, check_compatible, task_vector

__all__ = ["main", "parser"]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="adamerge merge", description=__doc__.split("\n\n")[0], exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file holding any of the options below")
    p.add_argument("--base", type=str, required=True,
                   help="the pretrained model: an HF model folder or Hub id (org/name[@rev]); with --model_name, "
                        "the open_clip pretrained tag, file or Hub id")
    p.add_argument("--experts", type=dict[str, str], required=True,
                   help="task name → expert: an HF model folder, a PEFT LoRA adapter folder or a Hub id "
                        "(open_clip: a checkpoint); --experts.math ./math or --experts '{math: ./math}'")
    p.add_argument("--method", type=str, required=True, help="a merging method (`adamerge methods` lists them)")
    p.add_argument("--preset", type=str | None, default=None, help="a named official setting of the method")
    p.add_argument("--options", type=dict[str, Any], default={},
                   help="the method's arguments, e.g. --options.keep 0.2 --options.lam 0.5")
    p.add_argument("--tasks", type=list[str] | None, default=None, help="the experts merged, in order (default all)")
    p.add_argument("--out", type=str, required=True,
                   help="output: a folder (HF) or a .safetensors file (open_clip); refused if it exists")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out, once the new one is whole")
    p.add_argument("--device", type=str, default="cpu", help="where the merge arithmetic runs (cpu, cuda)")
    p.add_argument("--dtype", type=Literal["float32", "float16", "bfloat16"] | None, default=None,
                   help="floating-point dtype of the output (default: the base's)")
    p.add_argument("--max_shard_size", type=str, default="5GB", help="HF output: the largest shard (5GB, 500MB)")
    p.add_argument("--in_memory", type=bool, default=False,
                   help="HF: run a method with no out-of-core version on the whole model in memory")
    p.add_argument("--include", type=list[str] | None, default=None,
                   help="HF: merge only tensors whose name matches one of these regular expressions")
    p.add_argument("--exclude", type=list[str] | None, default=None,
                   help="HF: keep tensors whose name matches one of these at the base (e.g. '^visual\\.')")
    p.add_argument("--vocab_source", type=str | None, default=None,
                   help="HF: on a vocabulary mismatch, 'base' or the task whose vocabulary and tokenizer the "
                        "merge keeps (shared rows are merged); unset: refused")
    p.add_argument("--model_name", type=str | None, default=None,
                   help="open_clip architecture (ViT-B-32 ...): merge open_clip image towers instead of HF models")
    p.add_argument("--allow_pickle", type=bool, default=False,
                   help="open_clip: accept pickled expert files (unpickling runs their code: trusted files only)")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    return p


class _VisualExperts:
    """open_clip image towers as a task-vector source: θ_0's and each expert file's, read on demand."""

    def __init__(self, visual: dict, experts: dict) -> None:
        self.visual, self.experts = visual, experts

    def pretrained_state(self) -> dict:
        return {k: v.clone() for k, v in self.visual.items()}

    def task_vectors(self, tasks: Sequence[str] | None = None):
        for task in tasks or list(self.experts):
            state = self.experts[task]()
            check_compatible(self.visual, state, name=f"expert {task!r}")
            yield task, task_vector(state, self.visual)


def _open_clip(a) -> Path:
    from adamerge.models.checkpoints import CheckpointError
    from adamerge.models.export import export_merged
    from adamerge.models.hub import resolve_checkpoint, resolve_pretrained
    from adamerge.models.open_clip_pool import ExpertFile, load_clip, model_config_of

    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: an open_clip merge is written as one .safetensors file")
    if out.exists() and not a.overwrite:
        from adamerge.models.hf_merge import OutputExistsError

        raise OutputExistsError(f"{out} exists: refusing to overwrite it (pass --overwrite to replace it)")
    unused = [k for k in ("include", "exclude", "vocab_source", "dtype") if getattr(a, k) is not None]
    if unused or a.in_memory:
        raise MergeError(f"--{(unused or ['in_memory'])[0]} applies to HF models only (an open_clip merge runs in "
                         "memory on the image tower)")
    pretrained = resolve_pretrained(a.base)
    clip, _, _ = load_clip(a.model_name, pretrained, a.allow_pickle)
    name, config = model_config_of(a.model_name, pretrained)
    visual = {k: v.detach() for k, v in clip.visual.state_dict().items()}
    experts = {}
    for task, value in a.experts.items():
        path = resolve_checkpoint(value, label=f"expert {task!r}: {value}")
        if not Path(path).exists():
            raise CheckpointError(f"expert {task!r}: checkpoint not found: {value}")
        experts[task] = ExpertFile(path, visual, a.allow_pickle, name, config, label=str(value))
    tasks = a.tasks or list(experts)
    unknown = [t for t in tasks if t not in experts]
    if unknown:
        raise MergeError(f"task {unknown[0]!r} has no expert (experts: {', '.join(experts)})")
    merged = merge_pool(_VisualExperts(visual, experts), a.method, tasks, a.preset, **a.options)
    if a.device != "cpu":
        print(f"adamerge merge: an open_clip merge runs on the CPU (--device {a.device} ignored)", file=sys.stderr)
    return export_merged(clip, merged, out, model_name=name, model_config=config)


def _hf(a) -> Path:
    from adamerge.models.hf_merge import merge_hf
    from adamerge.models.hf_pool import HFPool

    if a.allow_pickle:
        raise MergeError("--allow_pickle applies to open_clip experts only (HF models are read from safetensors)")
    pool = HFPool(a.base, a.experts, include=a.include, exclude=a.exclude, vocab_source=a.vocab_source,
                  device=a.device)
    return merge_hf(pool, a.method, a.out, tasks=a.tasks, preset=a.preset, dtype=a.dtype,
                    max_shard_size=a.max_shard_size, overwrite=a.overwrite, in_memory=a.in_memory,
                    progress=a.progress, **a.options)


def main(args: Sequence[str] | None = None) -> Path:
    """Parse ``args`` (default ``sys.argv[1:]``), merge, and print where the output is."""
    a = parser().parse_args(list(sys.argv[1:] if args is None else args))
    a.options = dict(a.options or {})
    if a.model_name is not None:
        path = _open_clip(a)
        mode = "in memory"
    else:
        path = _hf(a)
        mode = "in memory" if a.in_memory or out_of_core(a.method) is None else f"out of core, {out_of_core(a.method)}"
    print(json.dumps({"out": str(path), "method": a.method, "mode": mode}))
    return path
