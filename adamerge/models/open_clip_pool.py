"""A :class:`~adamerge.models.pool.ModelPool` over an open_clip CLIP and expert checkpoint files.

θ_0 is ``clip.visual`` of the pretrained model; expert k is read from its file only when a method
asks for it (``pool.expert_state(k)`` / ``pool.task_vectors()``), so a pool of 8-20 ViT-B/32 experts
never holds more than one expert in memory. Zero-shot heads come from the text tower and each task's
class names and templates (:mod:`adamerge.models.heads`), cached on disk when ``cache_dir`` is set.

Class names and templates are passed in (``task_info``: a task name → ``classnames``/``templates``
lookup such as :func:`adamerge.data.registry.get_task`, or a mapping); loading knows no task registry.
Use it from YAML::

    model_pool:
      class_path: adamerge.models.open_clip_pool.OpenCLIPPool
      init_args:
        model_name: ViT-B-32-quickgelu   # the OpenAI weights run QuickGELU (plain ViT-B-32 is refused)
        pretrained: openai
        experts: {mnist: ckpts/mnist.safetensors, eurosat: tanganke/clip-vit-base-patch32_eurosat}
        task_info: adamerge.data.registry.get_task   # or linked from the data by the CLI
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from torch import Tensor, nn

from adamerge.merging.task_vectors import MergeError, check_compatible
from adamerge.models.activation import (
    ActivationMismatchError,
    activation_of,
    activation_of_tag,
    check_activation,
)
from adamerge.models.checkpoints import (
    CheckpointError,
    check_finite,
    is_path,
    load_visual_state,
    read_checkpoint,
)
from adamerge.models.export import export_merged
from adamerge.models.heads import ZeroShotTask, cached_zero_shot_head, logit_scale_of, text_tower_fingerprint
from adamerge.models.hf_clip import HFConversionError, convert_hf_clip_state, is_hf_state
from adamerge.models.hub import (
    hub_open_clip_config,
    hub_tag_weights,
    hub_weights,
    is_hub_id,
    resolve_checkpoint,
    resolve_pretrained,
)
from adamerge.models.pool import ModelPool, check_task_list

__all__ = ["ExpertFile", "OpenCLIPPool", "TaskLookup", "load_clip", "model_config_of", "register_model_config",
           "task_lookup"]

_LOCAL_DIR = "local-dir:"

TaskLookup = Callable[[str], Any] | Mapping[str, Any]
"""Where a pool's class names and templates come from: a function task name → :class:`ZeroShotTask`, or a
mapping task → :class:`ZeroShotTask` or ``{"classnames": [...], "templates": [...]}`` (YAML-friendly)."""


@dataclass(frozen=True)
class _Texts:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def task_lookup(task_info: TaskLookup | None) -> Callable[[str], ZeroShotTask]:
    """``task_info`` as a function task name → :class:`ZeroShotTask` (a mapping's error names its tasks)."""
    if task_info is None:
        raise ValueError(
            "task_info is needed for the zero-shot heads' class names and templates: pass "
            "adamerge.data.registry.get_task (the CLI links it from the data) or a mapping task → "
            "{classnames, templates}"
        )
    if isinstance(task_info, Mapping):
        infos = {
            t: _Texts(tuple(i["classnames"]), tuple(i["templates"])) if isinstance(i, Mapping) else i
            for t, i in task_info.items()
        }

        def lookup(task: str) -> ZeroShotTask:
            if task not in infos:
                known = ", ".join(sorted(infos))
                raise ValueError(f"no class names for task {task!r} in task_info (tasks: {known})")
            return infos[task]

        return lookup
    if not callable(task_info):
        raise TypeError(f"task_info must map task names to class names and templates, got {task_info!r}")
    return task_info


class ExpertFile:
    """A zero-argument loader of one expert file (what :class:`ModelPool` calls on demand).

    Args:
        path: the expert checkpoint (file or folder).
        reference: θ_0's visual state dict (keys, shapes and dtypes to match).
        allow_pickle: accept pickled files (unpickling runs code from the file).
        model_name: the configured open_clip model: an activation the file records must be its.
        model_config: that model's open_clip config (None: open_clip's config of ``model_name``).
        label: how the expert was named (a Hub id whose files ``path`` is in the cache; None: ``path``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reference: Mapping[str, Tensor],
        allow_pickle: bool = False,
        model_name: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        label: str | None = None,
    ):
        self.path = Path(path)
        self.label = label or str(path)
        self.reference = reference
        self.allow_pickle = allow_pickle
        self.model_name = model_name
        self.model_config = model_config

    def __call__(self) -> dict[str, Tensor]:
        return load_visual_state(
            self.path, reference=self.reference, allow_pickle=self.allow_pickle,
            projection=self.reference.get("proj"), model_name=self.model_name, model_config=self.model_config,
        )

    def __repr__(self) -> str:
        return f"ExpertFile({self.label!r})"


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip model-config JSON and return its model name (the file's stem)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {p}")
    with open(p, encoding="utf-8") as f:
        cfg = json.load(f)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"{p}: not an open_clip model config (missing {missing[0]!r})")
    open_clip.add_model_config(p)
    return p.stem


@contextlib.contextmanager
def _weights_loaded_after():
    """open_clip warns "No pretrained weights loaded … initialized randomly" whenever it loads none
    itself; :func:`load_clip` loads the local weights right after, so exactly that warning is dropped."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _hub_source(model_name: str | None, pretrained: str | None) -> str | None:
    """The ``hf-hub:org/name`` id when the model comes from the Hub (as ``model_name`` or ``pretrained``);
    such a repository carries its architecture and weights, so nothing else may be given (but a
    ``local-dir:`` pretrained, which wins over any model name)."""
    if isinstance(pretrained, str) and pretrained.startswith(_LOCAL_DIR):
        return None
    if is_hub_id(pretrained):
        return pretrained
    if is_hub_id(model_name):
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} with model_name={model_name!r}: an hf-hub model carries its "
                             "own weights; leave pretrained unset")
        return model_name
    return None


def load_clip(
    model_name: str, pretrained: str | None, allow_pickle: bool = False, precision: str = "fp32"
) -> tuple[nn.Module, object, str]:
    """(CLIP model, tokenizer, identity string) for an open_clip name and a ``pretrained`` source.

    Args:
        model_name: open_clip architecture name (``ViT-B-32``) or a registered custom config.
        pretrained: an open_clip tag (``openai``), a local ``.pt``/``.bin``/``.safetensors`` full CLIP
            state dict, an HF ``CLIPModel`` folder or Hub repo id (``openai/clip-vit-base-patch32``, or
            ``…@rev`` for a branch, tag or commit; pair it with a ``-quickgelu`` model name),
            ``local-dir:DIR`` (open_clip folder with ``open_clip_config.json``; ``model_name`` is then
            ignored, as for an open_clip repository's id), ``hf-hub:org/name[@rev]`` (an open_clip
            repository; also accepted as ``model_name``), or None for random weights. Repositories are
            read through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``):
            :func:`adamerge.models.hub.resolve_pretrained`. An open_clip tag has no ``/``; a string
            with one that is no existing path and no checkpoint file name is a repo id.
        allow_pickle: accept a pickled local ``pretrained`` file.
        precision: open_clip precision (``fp32``, ``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16``).

    Raises:
        ActivationMismatchError: the tag or file records another activation than ``model_name``'s
            (e.g. ``openai`` weights with ``ViT-B-32`` instead of ``ViT-B-32-quickgelu``); a tag is
            checked before anything is downloaded.
    """
    hub = _hub_source(model_name, pretrained)
    if hub is not None and "@" not in hub:
        hub_open_clip_config(hub)  # config and weights come from huggingface_hub's cache (or are downloaded
        hub_weights(hub)           # into it) here, so a failure names the id and what to do
        clip = open_clip.create_model(hub, precision=precision)
        return clip.eval(), open_clip.get_tokenizer(hub), hub
    named, pretrained = hub or pretrained, resolve_pretrained(hub or pretrained)  # a repo id → its local files
    if pretrained and pretrained.startswith(_LOCAL_DIR):
        clip = open_clip.create_model(pretrained, precision=precision)
        return clip.eval(), open_clip.get_tokenizer(pretrained), named
    model_name = model_name.replace("/", "-")  # open_clip's own spelling: ViT-B/32 → ViT-B-32
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; register a config JSON with model_config=")
    local = is_path(pretrained)
    if pretrained and not local:
        check_activation(model_name, None, activation_of_tag(model_name, pretrained))
        hub_tag_weights(model_name, pretrained)  # through the Hugging Face cache, with our errors
    with _weights_loaded_after() if local else contextlib.nullcontext():
        clip = open_clip.create_model(model_name, pretrained=None if local else pretrained, precision=precision)
    if local:
        state, found = read_checkpoint(pretrained, allow_pickle=allow_pickle)
        try:
            check_activation(model_name, None, found)
        except ActivationMismatchError as e:
            raise ActivationMismatchError(f"pretrained {named!r}: {e}" if named != pretrained else str(e)) from None
        if is_hf_state(state):
            try:
                state = convert_hf_clip_state(state, source=str(named))
            except HFConversionError as e:
                raise CheckpointError(str(e)) from None
        try:
            check_compatible(clip.state_dict(), state, name=f"pretrained {named} (a full {model_name} CLIP)")
            check_finite(state, name=f"pretrained {named}")
        except MergeError as e:
            raise CheckpointError(str(e)) from None
        clip.load_state_dict(state, strict=True)
    return clip.eval(), open_clip.get_tokenizer(model_name), f"{model_name}:{named}"


def model_config_of(model_name: str, pretrained: str | None) -> tuple[str, dict]:
    """(open_clip model name, its model config) that :func:`load_clip` builds: for ``local-dir:DIR`` the
    folder's ``open_clip_config.json`` ``model_cfg`` under the name ``local-dir:DIR``; for an open_clip
    repository the repo's, under its ``hf-hub:`` id (``org/name@rev`` → ``hf-hub:org/name@rev``)."""
    hub = _hub_source(model_name, pretrained)
    if hub is not None:
        return hub, hub_open_clip_config(hub)["model_cfg"]
    source = resolve_pretrained(pretrained)
    if source and source.startswith(_LOCAL_DIR):
        path = Path(source[len(_LOCAL_DIR):]) / "open_clip_config.json"
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)["model_cfg"]
        return (pretrained if source == pretrained else "hf-hub:" + pretrained), cfg
    model_name = model_name.replace("/", "-")
    return model_name, open_clip.get_model_config(model_name)


class OpenCLIPPool(ModelPool):
    """Pretrained open_clip CLIP + expert checkpoint files + zero-shot heads from the given class names.

    Args:
        model_name: open_clip architecture (``ViT-B-32``, ``ViT-L-14``, or the name of ``model_config``).
        pretrained: open_clip tag (``openai``, ``laion2b_s34b_b79k``), a local full-CLIP
            ``.pt``/``.bin``/``.safetensors`` file, an HF CLIPModel folder or Hub id (FusionBench's
            ``openai/clip-vit-base-patch32``, ``@rev`` for a branch, tag or commit), an open_clip
            repository id, ``local-dir:DIR``, ``hf-hub:org/name[@rev]``, or None for random weights.
        experts: task name → expert checkpoint: ``.safetensors``, ``.pt`` (read with
            ``weights_only=True``), a pickled task_vectors ImageEncoder (needs ``allow_pickle``), an
            HF CLIPVisionModel / CLIPModel folder, or a Hub repo id of one (``tanganke/
            clip-vit-base-patch32_mnist[@rev]``; only its weights are fetched, into the Hugging Face cache:
            :func:`adamerge.models.hub.resolve_checkpoint`). Every task must be known to ``task_info``. Where
            ``pretrained`` or an expert records its activation (a tag, HF ``hidden_act``, pickled
            QuickGELU modules, adamerge export metadata), it must be ``model_name``'s: OpenAI-derived
            weights need ``ViT-B-32-quickgelu`` (:mod:`adamerge.models.activation`).
        tasks: which experts to use, in order (default: all of ``experts``).
        allow_pickle: accept pickled checkpoints. Unpickling runs code from the file: trusted files only.
        cache_dir: folder caching zero-shot heads (None: always recompute).
        device: where the text tower runs while building heads (weights stay on CPU afterwards).
        precision: open_clip precision of the pretrained model (``fp32``, ``fp16``, ``bf16``, ...).
        model_config: path to an open_clip model-config JSON registered before loading (its file
            stem is its name; ``model_name`` may then be left to that stem).
        task_info: each task's class names and templates: a function task name → object with
            ``classnames`` and ``templates`` (in YAML ``adamerge.data.registry.get_task``; the CLI
            links the data's) or a mapping task → such object. None: the task registry (transitional).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        experts: dict[str, str],
        tasks: list[str] | None = None,
        allow_pickle: bool = False,
        cache_dir: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        model_config: str | None = None,
        task_info: TaskLookup | None = None,
    ) -> None:
        if model_config is not None:
            registered = register_model_config(model_config)
            model_name = model_name or registered
        lookup = task_lookup(task_info)
        tasks = self._select_tasks(experts, tasks, lookup)
        paths = {t: resolve_checkpoint(experts[t], label=f"expert for task {t!r}: {experts[t]}") for t in tasks}
        for t in tasks:
            if not Path(paths[t]).exists():
                raise CheckpointError(f"expert for task {t!r}: checkpoint not found: {experts[t]}")
        clip, tokenizer, identity = load_clip(model_name, pretrained, allow_pickle, precision)
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_id = text_tower_fingerprint(clip)
        self.identity = identity
        self.model_name, self.model_config = model_config_of(model_name, pretrained)
        self._check_activations({t: paths[t] for t in tasks}, experts)
        heads = self._build_heads(tasks, lookup, cache_dir, device)
        reference = {k: v.detach() for k, v in clip.visual.state_dict().items()}
        sources = {t: ExpertFile(paths[t], reference, allow_pickle, self.model_name, self.model_config,
                                 label=str(experts[t])) for t in tasks}
        super().__init__(clip.visual, sources, heads, logit_scale=logit_scale_of(clip), name=model_name)

    @staticmethod
    def _select_tasks(
        experts: Mapping[str, str], tasks: list[str] | None, lookup: Callable[[str], ZeroShotTask]
    ) -> list[str]:
        if not experts:
            raise ValueError("empty expert list: a model pool needs at least one expert")
        for t in experts:
            lookup(t)  # the lookup's error names the task (the registry's also the known ones)
        return check_task_list(list(experts) if tasks is None else tasks, list(experts))

    def _build_heads(
        self, tasks: list[str], lookup: Callable[[str], ZeroShotTask], cache_dir: str | None, device: str
    ) -> dict[str, Tensor]:
        moved = device != "cpu"
        if moved:
            self.clip.to(device)
        try:
            heads = {}
            for t in tasks:
                info = lookup(t)
                heads[t] = cached_zero_shot_head(
                    self.clip, self.tokenizer, t, info.classnames, info.templates, cache_dir,
                    model_id=self.model_id, device=device,
                )
        finally:
            if moved:
                self.clip.to("cpu")
        return heads

    def _check_activations(self, paths: Mapping[str, str], named: Mapping[str, str]) -> None:
        """Refuse, before any head is built, experts whose config or metadata records another activation
        (pickled experts tell theirs only when unpickled: :class:`ExpertFile` checks on every load)."""
        for task, path in paths.items():
            try:
                check_activation(self.model_name, self.model_config, activation_of(path))
            except ActivationMismatchError as e:
                by_id = f" {named[task]!r}" if str(named[task]) != str(path) else ""
                raise ActivationMismatchError(f"expert for task {task!r}{by_id}: {e}") from None

    def export(self, visual_state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
        """Write the full CLIP (pretrained text tower + ``visual_state``) as safetensors, atomically, its
        model name, config and activation in the file's metadata."""
        return export_merged(self, visual_state, path, model_name=self.model_name, model_config=self.model_config)
