from __future__ import annotations

import pytest

from adamerge.data.registry import UnknownTaskError, check_tasks, get_task, list_tasks, task_set
from adamerge.data.standard_tasks import STANDARD_TASKS
from adamerge.data.tall_tasks import TALL_TASKS

# (number of classes — the dataset's size —, number of templates, first class, last class), from
# nik-dim/tall_masks src/datasets/*.py (torchvision's `.classes` where it uses them) and templates.py
EXPECTED = {
    "flowers102": (102, 1, "pink primrose", "blackberry lily"),
    "pcam": (2, 1, "lymph node", "lymph node containing metastatic tumor tissue"),
    "fer2013": (7, 6, "['angry']", "['neutral', 'bored']"),
    "oxford_pets": (37, 1, "Abyssinian", "Yorkshire Terrier"),
    "stl10": (10, 2, "airplane", "truck"),
    "cifar100": (100, 18, "apple", "worm"),
    "cifar10": (10, 18, "airplane", "truck"),
    "food101": (101, 1, "apple_pie", "waffles"),
    "fashion_mnist": (10, 2, "T-shirt/top", "Ankle boot"),
    "emnist_digits": (10, 1, "0", "9"),  # tall_masks: torchvision EMNIST(split="digits")
    "kmnist": (10, 1, "o", "wo"),
    "rendered_sst2": (2, 1, "negative", "positive"),
}

# the sets' published order (FusionBench config/model/clip-vit/clip-vit-base-patch32_TALL20.yaml)
EIGHT = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
FOURTEEN = EIGHT + ["flowers102", "pcam", "fer2013", "oxford_pets", "stl10", "cifar100"]
TWENTY = FOURTEEN + ["cifar10", "food101", "fashion_mnist", "emnist_digits", "kmnist", "rendered_sst2"]


def test_the_twelve_are_registered_lowercase():
    assert set(TALL_TASKS) == set(EXPECTED)
    assert set(EXPECTED) <= set(list_tasks())
    assert all(t == t.lower() for t in TALL_TASKS)
    assert check_tasks(list(TALL_TASKS)) == list(TALL_TASKS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_ends_and_templates(name):
    n_classes, n_templates, first, last = EXPECTED[name]
    info = get_task(name)
    assert info.num_classes == n_classes
    assert len(set(info.classnames)) == n_classes, "duplicate class names"
    assert (info.classnames[0], info.classnames[-1]) == (first, last)
    assert len(info.templates) == n_templates and len(set(info.templates)) == n_templates
    assert all(t.count("{}") == 1 for t in info.templates)


def test_templates_render_like_tall_masks_lambdas():
    assert get_task("pcam").templates[0].format("lymph node") == "this is a photo of lymph node"  # no period
    assert get_task("food101").templates == ("a photo of {}, a type of food.",)
    assert get_task("emnist_digits").templates == ('a photo of the digit character: "{}".',)
    assert get_task("kmnist").templates == ("a photo of the character {}.",)
    assert get_task("cifar10").templates == get_task("cifar100").templates
    assert get_task("cifar100").templates[2] == "a black and white photo of a {}."
    assert get_task("cifar100").templates[-1] == "a photo of the big {}."
    assert get_task("stl10").templates == get_task("fashion_mnist").templates == get_task("sun397").templates


def test_fer2013_prompts_are_tall_masks_formatted_synonym_lists():
    # tall_masks formats each class's *list* of synonyms into the template; its heads read so
    fer = get_task("fer2013")
    assert fer.templates[4].format(fer.classnames[3]) == "they look ['happy', 'smiling']."
    assert fer.classnames[5] == "['surprised', 'shocked', 'spooked']"


def test_spot_checked_class_names():
    assert get_task("flowers102").classnames[15] == "globe flower"  # FusionBench: "globe-flower"
    assert get_task("flowers102").classnames[59] == "pink and yellow dahlia"
    assert get_task("flowers102").classnames[92] == "air plant"  # FusionBench: "ball moss"
    assert get_task("oxford_pets").classnames[5] == "Bengal"  # torchvision label order, not CLIP's
    assert get_task("cifar100").classnames[26] == "crab"  # FusionBench: "cra"
    assert get_task("cifar100").classnames[1] == "aquarium_fish"
    assert get_task("food101").classnames[16:18] == ("cheese_plate", "cheesecake")  # sorted()
    assert get_task("kmnist").classnames[3] == "tsu"


def test_task_sets_are_8_14_20_registered_tasks_in_published_order():
    assert task_set("8") == EIGHT == list(STANDARD_TASKS)
    assert task_set("14") == FOURTEEN
    assert task_set("20") == TWENTY
    for name, n in (("8", 8), ("14", 14), ("20", 20)):
        tasks = task_set(name)
        assert len(set(tasks)) == n
        assert check_tasks(tasks) == tasks
    assert task_set(14) == task_set("14")


def test_task_set_is_a_fresh_list():
    task_set("8").append("oops")
    assert task_set("8") == EIGHT


def test_unknown_task_set_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match=r"unknown task set 'tall14'; known sets: '8', '14', '20'"):
        task_set("tall14")
