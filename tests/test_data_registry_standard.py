"""The eight standard tasks carry task_vectors' class names and templates (spot-checked by hand)."""

from __future__ import annotations

import pytest

from adamerge.data.registry import UnknownTaskError, check_tasks, get_task, list_tasks
from adamerge.data.standard_tasks import STANDARD_TASKS

# (number of classes, number of templates, first class, last class) from mlfoundations/task_vectors
EXPECTED = {
    "sun397": (397, 2, "abbey", "youth hostel"),
    "cars": (196, 8, "AM General Hummer SUV 2000", "smart fortwo Convertible 2012"),
    "resisc45": (45, 18, "airplane", "wetland"),
    "eurosat": (10, 3, "annual crop land", "lake or sea"),
    "svhn": (10, 1, "0", "9"),
    "gtsrb": (43, 3, "red and white circle 20 kph speed limit",
              "white circle with gray strike bar indicating no passing for trucks has ended"),
    "mnist": (10, 1, "0", "9"),
    "dtd": (47, 8, "banded", "zigzagged"),
}


def test_all_eight_registered_lowercase():
    assert set(STANDARD_TASKS) == set(EXPECTED)
    assert set(EXPECTED) <= set(list_tasks())
    assert check_tasks(list(STANDARD_TASKS)) == list(STANDARD_TASKS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_and_ends(name):
    n_classes, n_templates, first, last = EXPECTED[name]
    info = get_task(name)
    assert info.num_classes == n_classes and len(set(info.classnames)) == n_classes
    assert len(info.templates) == n_templates and len(set(info.templates)) == n_templates
    assert (info.classnames[0], info.classnames[-1]) == (first, last)
    assert all(t.count("{}") == 1 for t in info.templates)


def test_templates_render_like_task_vectors_lambdas():
    c = "stop"
    assert [t.format(c) for t in get_task("gtsrb").templates] == [
        f'a zoomed in photo of a "{c}" traffic sign.',
        f'a centered photo of a "{c}" traffic sign.',
        f'a close up photo of a "{c}" traffic sign.',
    ]
    assert get_task("mnist").templates == ('a photo of the number: "{}".',)
    assert get_task("resisc45").templates[:2] == ("satellite imagery of {}.", "aerial imagery of {}.")
    assert get_task("resisc45").templates[-1] == "aerial view of the {}."
    assert get_task("dtd").templates[3] == "a photo of a {} object."
    assert get_task("cars").templates[3] == "i love my {}!"


def test_spot_checked_class_names():
    assert get_task("sun397").classnames[8] == "apartment building outdoor"
    assert get_task("cars").classnames[5] == "Acura Integra Type R 2001"  # cars_meta order, not sorted
    assert get_task("resisc45").classnames[2] == "baseball diamond"
    assert get_task("eurosat").classnames[2] == "brushland or shrubland"
    assert get_task("gtsrb").classnames[14] == "stop"
    assert get_task("dtd").classnames[30] == "polka-dotted"


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'imagenet'.*mnist"):
        get_task("imagenet")
