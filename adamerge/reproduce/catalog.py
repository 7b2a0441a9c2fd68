"""What ``adamerge reproduce`` knows: FusionBench's models on the Hub and the methods of the table.

A model is the pretrained HF CLIPModel, the open_clip architecture it runs as (OpenAI weights run
QuickGELU) and the pattern of FusionBench's expert ids; a method is a static merge run in-process or a
test-time method run through ``adamerge fit`` with its official configuration fragments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adamerge.errors import AdaMergeError

__all__ = ["CONFIGS", "FUSIONBENCH_TASKS", "METHODS", "MODELS", "Method", "ModelSpec", "ReproduceError", "method"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ReproduceError(AdaMergeError):
    """A reproduce request that cannot run as asked (unknown method, a task without expert or data...)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model as FusionBench publishes it.

    Args:
        arch: the open_clip architecture the weights run as.
        pretrained: Hub id of the pretrained HF CLIPModel.
        experts: Hub id pattern of the experts; ``{task}`` is FusionBench's task name.
        paper: the folder of the paper setups under ``configs/paper``.
    """

    arch: str
    pretrained: str
    experts: str
    paper: str


MODELS: dict[str, ModelSpec] = {
    "ViT-B-32": ModelSpec("ViT-B-32-quickgelu", "openai/clip-vit-base-patch32",
                          "tanganke/clip-vit-base-patch32_{task}", "vit-b-32"),
    "ViT-B-16": ModelSpec("ViT-B-16-quickgelu", "openai/clip-vit-base-patch16",
                          "tanganke/clip-vit-base-patch16_{task}", "vit-b-16"),
    "ViT-L-14": ModelSpec("ViT-L-14-quickgelu", "openai/clip-vit-large-patch14",
                          "tanganke/clip-vit-large-patch14_{task}", "vit-l-14"),
}

# Registry task name → FusionBench's name in its expert ids (the others are the same). FusionBench has no
# expert for EMNIST digits (its 20-task set uses EMNIST letters): give one with --expert emnist_digits=ID.
FUSIONBENCH_TASKS: dict[str, str | None] = {
    "cars": "stanford-cars", "flowers102": "oxford_flowers102", "oxford_pets": "oxford-iiit-pet",
    "rendered_sst2": "rendered-sst2", "emnist_digits": None,
}


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Args:
        key: its name on the command line and its folder.
        label: its row name.
        merge: for a static merge, the :func:`adamerge.merging.merge_pool` method.
        preset: its registered preset (the authors' run), None for its defaults.
        conditioned: ``merge`` is a task-conditioned merge (:mod:`adamerge.merging.conditioned`): each
            task is evaluated with its own model, as its paper does.
        configs: for a test-time method, the ``configs/method`` fragments of its official run.
        overrides: command-line overrides on top of them.
    """

    key: str
    label: str
    merge: str | None = None
    preset: str | None = None
    conditioned: bool = False
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def trains(self) -> bool:
        return bool(self.configs)


METHODS: tuple[Method, ...] = (
    Method("zero_shot", "Zero-shot"),
    Method("experts", "Individual experts"),
    Method("weight_averaging", "Weight averaging", merge="weight_average"),
    Method("regmean", "RegMean", configs=("regmean_official.yaml",)),
    Method("regmean_plusplus", "RegMean++", configs=("regmean_official.yaml",),
           overrides=("--model.init_args.plus_plus=true",)),
    Method("fisher", "Fisher merging", configs=("fisher_official.yaml",)),
    Method("task_arithmetic", "Task arithmetic (λ=0.3)", merge="task_arithmetic"),
    Method("ties", "TIES-Merging", merge="ties"),
    Method("pcb", "PCB-Merging", merge="pcb"),
    Method("consensus_ta", "Consensus TA", merge="consensus_ta", preset="official"),
    Method("tsv_m", "TSV-M", merge="tsv_m", preset="official"),
    Method("iso_c", "Iso-C", merge="iso_c", preset="official"),
    Method("iso_cts", "Iso-CTS", merge="iso_cts", preset="official"),
    Method("cart", "CART", merge="cart", preset="official"),
    Method("wudi", "WUDI", merge="wudi", preset="official"),
    Method("emr", "EMR-Merging (task id)", merge="emr", conditioned=True),
    Method("tall_masks", "TALL masks (task id)", merge="tall_masks", conditioned=True),
    Method("adamerging_task", "AdaMerging (task-wise)", configs=("adamerging_official.yaml",),
           overrides=("--model.init_args.model.init_args.granularity=task",)),
    Method("adamerging_layer", "AdaMerging (layer-wise)", configs=("adamerging_official.yaml",)),
    Method("adamerging_plusplus", "AdaMerging++ (layer-wise)", configs=("adamerging_plusplus_official.yaml",)),
    Method("adamerging_cart", "AdaMerging+CART (layer-wise)", configs=("adamerging_cart_official.yaml",)),
    Method("adarank", "AdaRank+CART", configs=("adarank_official.yaml",)),
    Method("surgery_ta", "Surgery on TA", configs=("surgery_official.yaml",)),
    Method("wemoe", "WEMoE", configs=("wemoe_published.yaml",)),
    Method("ewemoe", "E-WEMoE", configs=("ewemoe_published.yaml",)),
)
_BY_KEY = {m.key: m for m in METHODS}


def method(key: str) -> Method:
    """The method called ``key``; the error names the close ones and all."""
    import difflib

    if key not in _BY_KEY:
        close = difflib.get_close_matches(key, list(_BY_KEY), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ReproduceError(f"--methods: unknown method {key!r}{hint}; known: {', '.join(_BY_KEY)}")
    return _BY_KEY[key]
