"""The twelve extra tasks of the TALL-masks benchmark: class names, zero-shot templates, task sets.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024,
arXiv 2405.07813; code: nik-dim/tall_masks) grow the eight standard tasks to 14 and 20:

* 14 = the eight + Flowers102, PCAM, FER2013, OxfordIIITPet, STL10, CIFAR100;
* 20 = the 14 + CIFAR10, Food101, FashionMNIST, EMNIST, KMNIST, RenderedSST2.

Registry names (lowercase, like the standard eight): ``flowers102, pcam, fer2013, oxford_pets,
stl10, cifar100, cifar10, food101, fashion_mnist, emnist_digits, kmnist, rendered_sst2``.
``emnist_digits`` names the EMNIST split tall_masks uses (``split="digits"``, 10 classes);
FusionBench's TALL20 uses another dataset there, ``emnist_letters`` (26 classes).

Order of :data:`TASK_SETS`: FusionBench's (``config/model/clip-vit/clip-vit-base-patch32_TALL20.yaml``
and ``config/modelpool/CLIPVisionModelPool/clip-vit-base-patch32_TALL14.yaml``): the standard eight in
task_vectors' order, then the extras as listed above. tall_masks' ``src/utils/variables_and_paths.py``
(``ALL_DATASETS``; ``DATASETS_14``/``DATASETS_20`` are its first 14/20) holds the same sets in
another order: Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SVHN, SUN397 | STL10, OxfordIIITPet,
Flowers102, CIFAR100, PCAM, FER2013 | CIFAR10, Food101, FashionMNIST, RenderedSST2, EMNIST, KMNIST.

Class names and templates are tall_masks' (commit d10af8b), in label order, so zero-shot heads match
the frozen heads its experts were fine-tuned with (``finetune.py`` freezes the head built by
``src/models/heads.py`` from ``dataset.classnames`` and ``src/datasets/templates.py``). Templates are
stored as format strings with one ``{}`` (tall_masks stores lambdas); FusionBench's
(``fusion_bench/tasks/clip_classification/*.py``) are identical for all twelve tasks. Class names:

* flowers102, pcam: the literal lists of ``src/datasets/{flowers102,pcam}.py`` (= OpenAI CLIP's
  ``data/prompts.md``). FusionBench ``flower102.py`` differs in three: ``globe-flower``,
  ``pink-yellow dahlia?``, ``ball moss`` for ``globe flower``, ``pink and yellow dahlia``, ``air plant``.
* fer2013: ``src/datasets/fer2013.py`` keeps CLIP's synonym lists (``["happy", "smiling"]``) but its
  head builder formats each *list* into the template (``f"they look {c}."`` with ``c`` a list), so its
  prompts read ``they look ['happy', 'smiling'].``. We store those strings, ``str(list(synonyms))``,
  to build the same head. FusionBench uses one name each, alphabetically (``angry, disgusted, fearful,
  happy, neutral, sad, surprised``): another label order (neutral 5th, not 7th) for its own dataset.
* the rest are torchvision's ``dataset.classes`` (tall_masks pins torchvision 0.14.1), unchanged:
  oxford_pets: ``OxfordIIITPet`` (breed words title-cased, in label order ``Abyssinian`` …; FusionBench
  ``oxford_iiit_pet.py``: ``abyssinian``, ``american_bulldog`` …); stl10: the archive's
  ``class_names.txt`` (= CLIP, = FusionBench); cifar10 / cifar100: the archive's meta file, *with*
  underscores (``aquarium_fish``; FusionBench ``cifar100.py`` has the same but ``cra`` for ``crab``);
  food101: ``sorted`` folder names, *with* underscores (``apple_pie``; FusionBench ``food101.py``:
  ``apple pie``); fashion_mnist: ``T-shirt/top`` … (FusionBench ``T - shirt / top``); emnist_digits:
  ``0`` … ``9``; kmnist: the romanised ``o, ki, su, …`` (FusionBench ``kmnist.py``: hiragana
  ``お, き, す, …``); rendered_sst2: ``negative, positive`` (= FusionBench).

This module is data only: :mod:`adamerge.data.registry` imports it, registers the tasks and serves
the sets (:func:`adamerge.data.registry.task_set`).
"""

from __future__ import annotations

from adamerge.data.standard_tasks import STANDARD_TASKS

__all__ = ["CLASSNAMES", "TALL14_EXTRA", "TALL20_EXTRA", "TALL_TASKS", "TASK_SETS", "TEMPLATES"]

FLOWERS102 = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink and yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis",
    "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress",
    "canna lily", "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea", "camellia",
    "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)

PCAM = ("lymph node", "lymph node containing metastatic tumor tissue")

FER2013_SYNONYMS = (
    ("angry",), ("disgusted",), ("fearful",), ("happy", "smiling"), ("sad", "depressed"),
    ("surprised", "shocked", "spooked"), ("neutral", "bored"),
)
"""OpenAI CLIP's synonyms per FER2013 class, in label order; the class names are their list reprs."""

OXFORD_PETS = (
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle", "Bengal",
    "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
    "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees", "Havanese",
    "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher", "Newfoundland",
    "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard", "Samoyed",
    "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx", "Staffordshire Bull Terrier", "Wheaten Terrier",
    "Yorkshire Terrier",
)

STL10 = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo",
    "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree",
    "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow_tree", "wolf", "woman", "worm",
)

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

FOOD101 = (
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets",
    "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad", "cannoli",
    "caprese_salad", "carrot_cake", "ceviche", "cheese_plate", "cheesecake", "chicken_curry",
    "chicken_quesadilla", "chicken_wings", "chocolate_cake", "chocolate_mousse", "churros",
    "clam_chowder", "club_sandwich", "crab_cakes", "creme_brulee", "croque_madame", "cup_cakes",
    "deviled_eggs", "donuts", "dumplings", "edamame", "eggs_benedict", "escargots", "falafel",
    "filet_mignon", "fish_and_chips", "foie_gras", "french_fries", "french_onion_soup", "french_toast",
    "fried_calamari", "fried_rice", "frozen_yogurt", "garlic_bread", "gnocchi", "greek_salad",
    "grilled_cheese_sandwich", "grilled_salmon", "guacamole", "gyoza", "hamburger", "hot_and_sour_soup",
    "hot_dog", "huevos_rancheros", "hummus", "ice_cream", "lasagna", "lobster_bisque",
    "lobster_roll_sandwich", "macaroni_and_cheese", "macarons", "miso_soup", "mussels", "nachos",
    "omelette", "onion_rings", "oysters", "pad_thai", "paella", "pancakes", "panna_cotta", "peking_duck",
    "pho", "pizza", "pork_chop", "poutine", "prime_rib", "pulled_pork_sandwich", "ramen", "ravioli",
    "red_velvet_cake", "risotto", "samosa", "sashimi", "scallops", "seaweed_salad", "shrimp_and_grits",
    "spaghetti_bolognese", "spaghetti_carbonara", "spring_rolls", "steak", "strawberry_shortcake",
    "sushi", "tacos", "takoyaki", "tiramisu", "tuna_tartare", "waffles",
)

FASHION_MNIST = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

KMNIST = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")

_A_PHOTO = ("a photo of a {}.", "a photo of the {}.")

_CIFAR = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "flowers102": ("a photo of a {}, a type of flower.",),
    "pcam": ("this is a photo of {}",),
    "fer2013": (
        "a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
        "a photo of a face looking {}.", "a face that looks {}.", "they look {}.",
        "look at how {} they are.",
    ),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stl10": _A_PHOTO,
    "cifar100": _CIFAR,
    "cifar10": _CIFAR,
    "food101": ("a photo of {}, a type of food.",),
    "fashion_mnist": _A_PHOTO,
    "emnist_digits": ('a photo of the digit character: "{}".',),
    "kmnist": ("a photo of the character {}.",),
    "rendered_sst2": ("a {} review of a movie.",),
}

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "flowers102": FLOWERS102,
    "pcam": PCAM,
    "fer2013": tuple(str(list(s)) for s in FER2013_SYNONYMS),
    "oxford_pets": OXFORD_PETS,
    "stl10": STL10,
    "cifar100": CIFAR100,
    "cifar10": CIFAR10,
    "food101": FOOD101,
    "fashion_mnist": FASHION_MNIST,
    "emnist_digits": tuple(str(i) for i in range(10)),
    "kmnist": KMNIST,
    "rendered_sst2": ("negative", "positive"),
}

TALL14_EXTRA = ("flowers102", "pcam", "fer2013", "oxford_pets", "stl10", "cifar100")
TALL20_EXTRA = ("cifar10", "food101", "fashion_mnist", "emnist_digits", "kmnist", "rendered_sst2")
TALL_TASKS = TALL14_EXTRA + TALL20_EXTRA

TASK_SETS: dict[str, tuple[str, ...]] = {
    "8": STANDARD_TASKS,
    "14": STANDARD_TASKS + TALL14_EXTRA,
    "20": STANDARD_TASKS + TALL14_EXTRA + TALL20_EXTRA,
}
"""The 8-, 14- and 20-task sets by name, in FusionBench's order (see the module docstring)."""
