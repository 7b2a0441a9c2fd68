"""ImageFolderSource: labels follow the registry (by name, by integer folder, by sorted position),
missing folders and class-count mismatches are named, images come out through the preprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adamerge.data.imagefolder import ImageFolderSource
from adamerge.data.registry import UnknownTaskError, register_task
from adamerge.data.source import TaskSource

register_task("if_colors", ["red", "green", "dark blue"], ["a {} thing."])
register_task("if_numbers", [f"n{i}" for i in range(12)], ["{}"])
register_task("if_scenes", ["annual crop land", "forest", "lake or sea"], ["a {}."])


def _write(root, task, split, folders, per_class=2):
    """One folder per class; every pixel of an image in folder j has value 10·(j+1) (label check)."""
    for j, name in enumerate(folders):
        d = root / task / split / name
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 10 * (j + 1), dtype=np.uint8)).save(d / f"{k}.png")


def _labels_by_folder(ds, folders):
    """folder index (from the pixel value) → label the dataset gave."""
    out = {}
    for i in range(len(ds)):
        img, label = ds[i]
        j = round(float(img[0, 0, 0]) * 255 / 10) - 1
        out.setdefault(folders[j], set()).add(label)
    return out


def test_labels_follow_registry_names_not_sort_order(tmp_path):
    folders = ["dark_blue", "green", "red"]  # sorted: dark_blue first, but registry says red = 0
    _write(tmp_path, "if_colors", "test", folders)
    src = ImageFolderSource(str(tmp_path), ["if_colors"])
    assert isinstance(src, TaskSource) and src.tasks == ["if_colors"]
    ds = src.dataset("if_colors", "test")
    assert len(ds) == 6
    assert _labels_by_folder(ds, folders) == {"red": {0}, "green": {1}, "dark_blue": {2}}
    assert ds.classes == ["red", "green", "dark blue"]


def test_integer_folders_are_labels(tmp_path):
    folders = ["0", "2", "10", "11"]  # lexical sort would put 10 and 11 before 2
    _write(tmp_path, "if_numbers", "val", folders, per_class=1)
    ds = ImageFolderSource(str(tmp_path), ["if_numbers"]).dataset("if_numbers", "val")
    assert _labels_by_folder(ds, folders) == {"0": {0}, "2": {2}, "10": {10}, "11": {11}}


def test_other_names_map_by_sorted_position(tmp_path):
    folders = ["AnnualCrop", "Forest", "SeaLake"]  # task_vectors' EuroSAT convention
    _write(tmp_path, "if_scenes", "train", folders, per_class=1)
    ds = ImageFolderSource(str(tmp_path), ["if_scenes"]).dataset("if_scenes", "train")
    assert _labels_by_folder(ds, folders) == {"AnnualCrop": {0}, "Forest": {1}, "SeaLake": {2}}


def test_open_clip_preprocess_by_model_name_and_callable(tmp_path):
    _write(tmp_path, "if_colors", "test", ["red", "green", "dark blue"], per_class=1)
    img, _ = ImageFolderSource(str(tmp_path), ["if_colors"], preprocess="ViT-B-32").dataset("if_colors", "test")[0]
    assert img.shape == (3, 224, 224) and img.dtype == torch.float32
    assert float(img.mean()) < 0  # normalised with CLIP's mean/std: a dark image is below zero
    cfg = tmp_path / "if-tiny-model.json"
    cfg.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"image_size": 12, "patch_size": 4, "width": 8,
                                                                "layers": 1}, "text_cfg": {"width": 8}}))
    img, _ = ImageFolderSource(str(tmp_path), ["if_colors"], preprocess=str(cfg)).dataset("if_colors", "test")[0]
    assert img.shape == (3, 12, 12)
    src = ImageFolderSource(str(tmp_path), ["if_colors"], preprocess=lambda im: torch.ones(1))
    assert src.dataset("if_colors", "test")[0][0].shape == (1,)


# ---- bad input -------------------------------------------------------------------------------------
def test_class_count_mismatch_names_the_folder(tmp_path):
    _write(tmp_path, "if_scenes", "test", ["AnnualCrop", "Forest"], per_class=1)
    src = ImageFolderSource(str(tmp_path), ["if_scenes"])
    with pytest.raises(ValueError, match=r"if_scenes/test.*2 class folders.*3 classes"):
        src.dataset("if_scenes", "test")


def test_integer_folder_beyond_registry(tmp_path):
    _write(tmp_path, "if_numbers", "test", ["0", "12"], per_class=1)
    with pytest.raises(ValueError, match="'12'"):
        ImageFolderSource(str(tmp_path), ["if_numbers"]).dataset("if_numbers", "test")


def test_missing_task_split_and_unknown_names(tmp_path):
    _write(tmp_path, "if_colors", "test", ["red", "green", "dark blue"], per_class=1)
    with pytest.raises(FileNotFoundError, match="'if_scenes'.*if_scenes"):
        ImageFolderSource(str(tmp_path), ["if_colors", "if_scenes"])
    src = ImageFolderSource(str(tmp_path), ["if_colors"])
    with pytest.raises(FileNotFoundError, match=r"'if_colors'.*if_colors/val"):
        src.dataset("if_colors", "val")
    with pytest.raises(ValueError, match="unknown split"):
        src.dataset("if_colors", "dev")
    with pytest.raises(ValueError, match="not served"):
        src.dataset("if_scenes", "test")
    with pytest.raises(UnknownTaskError, match="'if_nope'"):
        ImageFolderSource(str(tmp_path), ["if_nope"])
    with pytest.raises(ValueError, match="empty task list"):
        ImageFolderSource(str(tmp_path), [])
    with pytest.raises(FileNotFoundError, match="root not found"):
        ImageFolderSource(str(tmp_path / "nowhere"), ["if_colors"])


def test_parses_as_a_task_source_class_path(tmp_path):
    """LightningCLI configs name it under a ``TaskSource``-typed argument (jsonargparse checks the
    protocol's signatures, so ``dataset`` must be annotated ``-> Dataset`` exactly)."""
    from jsonargparse import ArgumentParser

    _write(tmp_path, "if_colors", "test", ["red", "green", "dark blue"], per_class=1)
    parser = ArgumentParser()
    parser.add_argument("--source", type=TaskSource)
    cfg = parser.parse_object({"source": {
        "class_path": "adamerge.data.imagefolder.ImageFolderSource",
        "init_args": {"root": str(tmp_path), "tasks": ["if_colors"], "preprocess": "ViT-B-32"},
    }})
    src = parser.instantiate(cfg).source
    assert isinstance(src, ImageFolderSource) and src.dataset("if_colors", "test")[0][0].shape == (3, 224, 224)


def test_folder_names_match_registry_classes_by_their_words_and_a_clash_is_refused(tmp_path):
    """FashionMNIST's ``T-shirt/top`` can't be a folder name; FER2013's registry names are synonym lists.
    Both match by words; sorted position (the fallback) would have mislabelled both, and a folder that
    names one class but sits at another's position is refused instead of mislabelled."""
    from adamerge.data.registry import get_task

    fashion = get_task("fashion_mnist").classnames  # registry order: T-shirt/top, Trouser, ..., Ankle boot
    folders = [c.replace("/", "_").replace(" ", "_") for c in fashion]
    _write(tmp_path, "fashion_mnist", "test", folders, per_class=1)
    ds = ImageFolderSource(str(tmp_path), ["fashion_mnist"]).dataset("fashion_mnist", "test")
    assert _labels_by_folder(ds, folders) == {f: {i} for i, f in enumerate(folders)}
    assert sorted(folders).index("T-shirt_top") != 0  # position alone would have been wrong

    fer = get_task("fer2013").classnames  # synonym lists: "['happy', 'smiling']", ...
    kaggle = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]  # Kaggle's folders, sorted
    _write(tmp_path / "kaggle", "fer2013", "test", kaggle, per_class=1)
    with pytest.raises(ValueError, match=r"class folder 'neutral' names class 6 .* would get label 4"):
        ImageFolderSource(str(tmp_path / "kaggle"), ["fer2013"]).dataset("fer2013", "test")  # not mislabelled
    words = ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]
    _write(tmp_path, "fer2013", "test", sorted(words), per_class=1)
    ds = ImageFolderSource(str(tmp_path), ["fer2013"]).dataset("fer2013", "test")
    assert _labels_by_folder(ds, sorted(words)) == {w: {words.index(w)} for w in words}
    assert all(w in fer[i] for i, w in enumerate(words))

    register_task("if_clash", ["red", "green", "blue"], ["a {}."])
    _write(tmp_path, "if_clash", "test", ["blue", "crimson", "verdant"], per_class=1)  # "blue" sorts first
    with pytest.raises(ValueError, match=r"class folder 'blue' names class 2 \('blue'\) but would get label 0"):
        ImageFolderSource(str(tmp_path), ["if_clash"]).dataset("if_clash", "test")
