"""The six tasks of the mini benchmark: each its own input domain and its own class names.

Lessons from two prototypes (issue 3): merging only behaves as on the papers' ViT benchmark when no
two tasks share both an input domain and class names (MNIST vs rotated MNIST with the same names
interfere worst). So every task here has

* its own domain: a deterministic transform (rotation, down-scaling) of its source image plus a
  fixed colouring ``rgb = bg·(1−x) + fg·x`` of the grey intensity x ∈ [0, 1];
* its own class names and templates (English / German / Spanish number words, numerals, fine and
  coarse garment names), registered in :mod:`adamerge.data.registry` on import.

=====================  =========  ============================  ==========================
task                   source     domain                        class names
=====================  =========  ============================  ==========================
mini_mnist             MNIST 5k   grey, upright                 English number words
mini_fashion           Fashion    grey, upright                 Fashion-MNIST names
mini_digits            sklearn    8x8 upsampled, red on navy    numerals "0".."9"
mini_mnist_rot         MNIST 5k   rotated 90°, black on green   German number words
mini_fashion_coarse    Fashion    navy on yellow                4 coarse garment names
mini_mnist_small       MNIST 5k   half size, cyan on black      Spanish number words
=====================  =========  ============================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adamerge.data.registry import register_task

__all__ = ["MiniTask", "MINI_TASKS", "TASK_NAMES", "render", "NORM_MEAN", "NORM_STD",
           "FASHION_NAMES", "FASHION_FAMILY", "COARSE_NAMES", "ENGLISH", "pretrain_captions"]

NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)

ENGLISH = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GERMAN = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
SPANISH = ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")
NUMERALS = tuple(str(i) for i in range(10))
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
COARSE_NAMES = ("top", "trousers or dress", "shoe", "bag")
# Fashion label -> coarse label (tops, trousers/dress, shoes, bags)
FASHION_FAMILY = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)


@dataclass(frozen=True)
class MiniTask:
    """One mini-benchmark task.

    Args:
        name: registry name.
        source: ``"mnist"``, ``"fashion"`` or ``"digits"``.
        classnames: class names in label order (after ``label_map``).
        templates: zero-shot prompt templates with one ``{}``.
        fg: foreground RGB in [0, 1]; bg: background RGB.
        quarter_turns: counter-clockwise 90° rotations of the source image.
        scale: the digit is resized to ``scale`` of the canvas and centred.
        label_map: source label -> task label (None: identity).
        in_pretraining: whether a small slice of this domain, captioned with this task's own names,
            joins the pretraining mix (upright grey MNIST / Fashion are in the mix anyway).
    """

    name: str
    source: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    fg: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    quarter_turns: int = 0
    scale: float = 1.0
    label_map: tuple[int, ...] | None = None
    in_pretraining: bool = True

    def labels(self, source_labels: np.ndarray) -> np.ndarray:
        if self.label_map is None:
            return source_labels.astype(np.int64)
        return np.asarray(self.label_map, dtype=np.int64)[source_labels]


MINI_TASKS: tuple[MiniTask, ...] = (
    MiniTask("mini_mnist", "mnist", ENGLISH,
             ('a photo of the number "{}".', "a handwritten {}.", "the digit {}, written by hand."),
             in_pretraining=False),
    MiniTask("mini_fashion", "fashion", FASHION_NAMES,
             ("a photo of a {}.", "a grey photo of a {}.", "a picture of the {}."),
             in_pretraining=False),
    MiniTask("mini_digits", "digits", NUMERALS,
             ("a blurry picture of the numeral {}.", "a low resolution numeral {}.", "the symbol {}."),
             fg=(1.0, 0.15, 0.1), bg=(0.05, 0.05, 0.35)),
    MiniTask("mini_mnist_rot", "mnist", GERMAN,
             ("ein Bild der Zahl {}.", "eine gedrehte {}.", "die Ziffer {}."),
             fg=(0.0, 0.0, 0.0), bg=(0.2, 0.75, 0.25), quarter_turns=1),
    MiniTask("mini_fashion_coarse", "fashion", COARSE_NAMES,
             ("a photo of a {}.", "a kind of {}.", "something to wear: a {}."),
             fg=(0.05, 0.1, 0.45), bg=(1.0, 0.9, 0.2), label_map=FASHION_FAMILY),
    MiniTask("mini_mnist_small", "mnist", SPANISH,
             ("una foto del número {}.", "un pequeño {}.", "el dígito {}."),
             fg=(0.1, 0.9, 0.95), bg=(0.0, 0.0, 0.0), scale=0.5),
)
TASK_NAMES = tuple(t.name for t in MINI_TASKS)
_BY_NAME = {t.name: t for t in MINI_TASKS}

for _t in MINI_TASKS:
    register_task(_t.name, _t.classnames, _t.templates)


def get_mini_task(name: str) -> MiniTask:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown mini-benchmark task {name!r}; tasks: {', '.join(TASK_NAMES)}") from None


def render(task: MiniTask, images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 grey images [N, h, w] -> normalised float images [N, 3, size, size] in ``task``'s domain."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    if task.quarter_turns:
        x = torch.rot90(x, task.quarter_turns, dims=(2, 3))
    inner = max(1, round(size * task.scale))
    x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False, antialias=True)
    if inner != size:
        lo = (size - inner) // 2
        x = F.pad(x, (lo, size - inner - lo, lo, size - inner - lo))
    x = x.clamp_(0, 1)
    fg = torch.tensor(task.fg).view(1, 3, 1, 1)
    bg = torch.tensor(task.bg).view(1, 3, 1, 1)
    rgb = bg * (1 - x) + fg * x
    mean = torch.tensor(NORM_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(NORM_STD).view(1, 3, 1, 1)
    return ((rgb - mean) / std).contiguous()


GREY_MNIST = MiniTask("pretrain_mnist", "mnist", ENGLISH, ("{}",))
GREY_FASHION = MiniTask("pretrain_fashion", "fashion", FASHION_NAMES, ("{}",))


def pretrain_captions(source: str, label: int) -> list[str]:
    """Rich captions (several granularities) for an upright grey pretraining image."""
    if source == "mnist":
        w = ENGLISH[label]
        return [f'a photo of the number "{w}".', f"a handwritten {w}.", f"the digit {w}, written by hand.",
                f"{w}", f"a handwritten digit: {w}, the numeral {label}.", f"the number {w}."]
    if source == "fashion":
        n, fam = FASHION_NAMES[label], COARSE_NAMES[FASHION_FAMILY[label]]
        return [f"a photo of a {n}.", f"a grey photo of a {n}.", f"a picture of the {n}.", f"{n}",
                f"a {n}, a kind of {fam}.", f"a photo of a {fam}."]
    raise ValueError(f"no pretraining captions for source {source!r}")
