"""Datasets by Hub id: parquet shards of one split, served lazily in order with registry labels.

The parquet reading (shards, row groups, labels, workers) is checked in-process on local files; the Hub
path runs in a fresh interpreter against a cache in huggingface_hub's real layout with ``HF_HUB_OFFLINE=1``
(tests/hubcache.py), as a user's offline run would. Expected pixels come from PIL decoding the PNG bytes
written, expected labels from the rows written, never from the code under test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hubcache import cache_repo, parquet_split, png, run_offline
from PIL import Image
from torch.utils.data import DataLoader

from adamerge.data.hub_datasets import (
    FUSIONBENCH_DATASETS,
    HubDatasetSource,
    ParquetImageDataset,
    split_shards,
)
from adamerge.data.registry import get_task, register_task, task_set
from adamerge.data.source import CombinedSource, TaskSource

COLORS = ["red", "green", "dark blue"]
register_task("hub_colors", COLORS, ["a {} thing."])


def pixels(data: bytes) -> np.ndarray:
    """What an image should decode to, [3, H, W] in 0..255 (PIL directly, not the dataset)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def as_pixels(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().to(torch.uint8).numpy()


def write_shards(folder, rows, per_shard, **kw):
    """``rows`` = [(png seed, label)] split into shards of ``per_shard``; returns the files and PNG bytes."""
    files, images = [], [png(seed) for seed, _ in rows]
    for k in range(0, len(rows), per_shard):
        path = folder / f"test-{k // per_shard:05d}-of-{-(-len(rows) // per_shard):05d}.parquet"
        path.write_bytes(parquet_split(images[k:k + per_shard], [lab for _, lab in rows[k:k + per_shard]], **kw))
        files.append(path)
    return files, images


# ---- parquet reading, in-process -------------------------------------------------------------------
def test_split_shards_follow_the_datasets_naming_rules():
    files = ["README.md", "data/train-00000-of-00001.parquet", "data/test-00001-of-00002.parquet",
             "data/test-00000-of-00002.parquet", "data/test_gaussian_noise-00000-of-00001.parquet"]
    assert split_shards(files, "test") == ["data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet"]
    assert split_shards(files, "test_gaussian_noise") == ["data/test_gaussian_noise-00000-of-00001.parquet"]
    assert split_shards(files, "validation") == []
    loose = ["a/test/0000.parquet", "b/test/0000.parquet", "b/train/0000.parquet", "latest.parquet",
             "contest.parquet", "my_test.parquet", "test.parquet", "test.csv"]
    assert split_shards(loose, "test") == ["a/test/0000.parquet", "b/test/0000.parquet", "my_test.parquet",
                                           "test.parquet"]
    assert split_shards(loose, "test", subset="b") == ["b/test/0000.parquet"]
    assert split_shards(["test_set/train.parquet"], "test", subset="test_set") == []  # the subset is no split


def test_shards_and_row_groups_are_served_in_order_with_their_images_and_labels(tmp_path):
    rows = [(seed, seed % 3) for seed in range(11)]
    files, images = write_shards(tmp_path, rows, per_shard=6, row_group_size=4)  # groups of 4+2, 4+1
    ds = ParquetImageDataset(files, COLORS)
    assert len(ds) == 11 and len(ds._blocks) == 4 and ds.classes == COLORS
    assert ds.image_column == "image" and ds.label_column == "label"
    for i in [0, 5, 6, 10, 3, 9, 1]:  # across shards and row groups, out of order
        image, label = ds[i]
        assert label == rows[i][1] and image.dtype == torch.float32
        np.testing.assert_array_equal(as_pixels(image), pixels(images[i]))
    assert len(ds._cache) <= 4  # bounded: a few row groups per process
    np.testing.assert_array_equal(as_pixels(ds[-1][0]), pixels(images[10]))
    with pytest.raises(IndexError):
        ds[11]


def test_columns_are_found_by_feature_type_or_name_and_can_be_named(tmp_path):
    (tmp_path / "a.parquet").write_bytes(parquet_split([png(1), png(2)], [2, 0], image_column="img",
                                                        label_column="cls"))
    ds = ParquetImageDataset([tmp_path / "a.parquet"], COLORS, transform=lambda im: im.size)
    assert (ds.image_column, ds.label_column) == ("img", "cls") and ds[0] == ((20, 20), 2)
    with pytest.raises(ValueError, match=r"here: no column 'picture' \(image_column\)"):
        ParquetImageDataset([tmp_path / "a.parquet"], COLORS, image_column="picture", where="here")

    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = pa.table({"jpg": pa.array([{"bytes": png(3), "path": None}, {"bytes": png(4), "path": None}]),
                      "label": pa.array([True, False])})  # no `huggingface` metadata; PCam's bool labels
    pq.write_table(plain, tmp_path / "plain.parquet")
    ds = ParquetImageDataset([tmp_path / "plain.parquet"], ["lymph node", "tumor"])
    assert ds.image_column == "jpg" and [ds[i][1] for i in range(2)] == [1, 0]
    np.testing.assert_array_equal(as_pixels(ds[1][0]), pixels(png(4)))


def test_class_names_in_another_order_than_the_registry_are_remapped(tmp_path):
    names = ["green", "dark_blue", "red"]  # dataset label 0 is green, registry label 1
    (tmp_path / "a.parquet").write_bytes(parquet_split([png(i) for i in range(6)], [0, 1, 2, 2, 1, 0], names))
    ds = ParquetImageDataset([tmp_path / "a.parquet"], COLORS)
    assert [ds[i][1] for i in range(6)] == [COLORS.index(names[lab].replace("_", " ")) for lab in [0, 1, 2, 2, 1, 0]]

    gtsrb = get_task("gtsrb").classnames  # "20" lies within class 0's words: integer names are numbers
    (tmp_path / "g.parquet").write_bytes(parquet_split([png(0), png(1)], [20, 42], [str(i) for i in range(43)]))
    assert [ParquetImageDataset([tmp_path / "g.parquet"], gtsrb)[i][1] for i in range(2)] == [20, 42]

    (tmp_path / "c.parquet").write_bytes(parquet_split([png(0)], [0], ["dark blue", "cyan", "magenta"]))
    with pytest.raises(ValueError, match=r"X: class name 'dark blue' \(label 0\) names registry class 2"):
        ParquetImageDataset([tmp_path / "c.parquet"], COLORS, where="X")  # would mislabel: refused


def test_class_count_mismatch_and_labels_out_of_range_are_refused(tmp_path):
    (tmp_path / "two.parquet").write_bytes(parquet_split([png(0)], [0], ["red", "green"]))
    with pytest.raises(ValueError, match=r"task 'x': its label feature has 2 classes but the registry's task has 3"):
        ParquetImageDataset([tmp_path / "two.parquet"], COLORS, where="task 'x'")
    for bad in (3, -1):
        path = tmp_path / f"bad{bad}.parquet"
        path.write_bytes(parquet_split([png(0), png(1)], [0, bad]))
        with pytest.raises(ValueError, match=rf"task 'x': label {bad} in .*bad{bad}.parquet is outside the "
                                             r"registry's 3 classes \(0..2\)"):
            ParquetImageDataset([path], COLORS, where="task 'x'")


def test_a_dataloader_with_two_forked_workers_reads_every_row(tmp_path):
    rows = [(seed, (seed * 7) % 3) for seed in range(13)]
    files, images = write_shards(tmp_path, rows, per_shard=7, row_group_size=3)
    ds = ParquetImageDataset(files, COLORS)
    ds[12]  # open a file and cache a row group in the parent first: the workers must not share them
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork"))
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [lab for _, lab in rows]
    got = torch.cat([b[0] for b in batches])
    for i in range(13):
        np.testing.assert_array_equal(as_pixels(got[i]), pixels(images[i]))


# ---- the source, without the Hub -------------------------------------------------------------------
def test_catalog_covers_the_20_tasks_but_fer2013_and_bad_arguments_are_named():
    assert set(FUSIONBENCH_DATASETS) == set(task_set("20")) - {"fer2013"}
    src = HubDatasetSource(["svhn", "food101", "sun397"], repos={"sun397": "me/sun@v2"})
    assert isinstance(src, TaskSource) and src.tasks == ["svhn", "food101", "sun397"]
    assert (src.specs["svhn"].repo, src.specs["svhn"].subset) == ("ufldl-stanford/svhn", "cropped_digits")
    assert (str(src.specs["sun397"]), src.specs["sun397"].revision) == ("me/sun@v2", "v2")
    assert src.splits["food101"]["test"] == "validation" and src.num_classes("sun397") == 397
    assert HubDatasetSource(["food101"], repos={"food101": "me/food"}).splits["food101"]["test"] == "test"
    with pytest.raises(ValueError, match=r"task 'fer2013': no Hub dataset known \(FusionBench reads "
                                         r"clip-benchmark/wds_fer2013, a webdataset.*ImageFolderSource"):
        HubDatasetSource(["mnist", "fer2013"])
    with pytest.raises(ValueError, match=r"task 'mnist': dataset 'mnist' is not org/name\[@revision\]\[:subset\]"):
        HubDatasetSource(["mnist"], repos={"mnist": "mnist"})
    with pytest.raises(ValueError, match="repos names task 'cars', which is not in tasks"):
        HubDatasetSource(["mnist"], repos={"cars": "a/b"})
    with pytest.raises(ValueError, match=r"splits\['mnist'\] names split 'dev'"):
        HubDatasetSource(["mnist"], splits={"mnist": {"dev": "validation"}})


def test_combined_source_serves_each_task_from_its_source_and_parses_from_a_config(tmp_path):
    from jsonargparse import ArgumentParser

    from adamerge.data.imagefolder import ImageFolderSource

    for task in ("fer2013", "mnist"):
        (tmp_path / task / "test" / "0").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / task / "test" / "0" / "a.png")
    folders = ImageFolderSource(str(tmp_path), ["fer2013"])
    both = CombinedSource([HubDatasetSource(["mnist", "svhn"]), folders])
    assert isinstance(both, TaskSource) and both.tasks == ["mnist", "svhn", "fer2013"]
    assert len(both.dataset("fer2013", "test")) == 1
    with pytest.raises(ValueError, match="task 'cars' is not served by any of the sources"):
        both.dataset("cars", "test")
    with pytest.raises(ValueError, match=r"task 'mnist' is served by two sources \(HubDatasetSource and "
                                         r"ImageFolderSource\)"):
        CombinedSource([HubDatasetSource(["mnist"]), ImageFolderSource(str(tmp_path), ["mnist"])])
    parser = ArgumentParser()
    parser.add_argument("--source", type=TaskSource)
    cfg = parser.parse_object({"source": {"class_path": "adamerge.data.source.CombinedSource", "init_args": {
        "sources": [{"class_path": "adamerge.data.hub_datasets.HubDatasetSource",
                     "init_args": {"tasks": ["svhn"], "repos": {"svhn": "me/digits@v1:cropped"},
                                   "splits": {"svhn": {"val": "train"}}}},
                    {"class_path": "adamerge.data.imagefolder.ImageFolderSource",
                     "init_args": {"root": str(tmp_path), "tasks": ["fer2013"]}}]}}})
    src = parser.instantiate(cfg).source
    assert src.tasks == ["svhn", "fer2013"] and str(src.sources[0].specs["svhn"]) == "me/digits@v1:cropped"


# ---- the Hub, offline in a fresh interpreter -------------------------------------------------------
@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    test = [(seed, seed % 3) for seed in range(7)]
    cache_repo(hub, "hubtest/colors", {
        "README.md": b"colors",
        "data/test-00000-of-00002.parquet": parquet_split([png(s) for s, _ in test[:4]], [y for _, y in test[:4]],
                                                          COLORS, row_group_size=3),
        "data/test-00001-of-00002.parquet": parquet_split([png(s) for s, _ in test[4:]], [y for _, y in test[4:]],
                                                          COLORS, row_group_size=3),
        "data/train-00000-of-00001.parquet": parquet_split([png(100)], [1], COLORS),
    }, repo_type="dataset")
    cache_repo(hub, "hubtest/digits", {"cropped/test-00000-of-00001.parquet": parquet_split([png(50)], [0])},
               repo_type="dataset")  # main: not the one asked for
    cache_repo(hub, "hubtest/digits", {"cropped/test-00000-of-00001.parquet": parquet_split([png(60), png(61)], [7, 9]),
                                       "full/test-00000-of-00001.parquet": parquet_split([png(70)], [3])},
               repo_type="dataset", commit="f" * 40, refs=("v1",))
    cache_repo(hub, "ethz/food101", {"data/validation-00000-of-00001.parquet": parquet_split([png(80)], [100]),
                                     "data/train-00000-of-00001.parquet": parquet_split([png(81)], [5])},
               repo_type="dataset")
    fer = home / "folders" / "fer2013" / "test"
    for label, seed in ((4, 90), (6, 91)):
        (fer / str(label)).mkdir(parents=True)
        (fer / str(label) / "a.png").write_bytes(png(seed))
    return home, test


def test_hub_datasets_offline_split_subset_revision_and_a_combined_datamodule(hub_home):
    home, test = hub_home
    out = run_offline(home, f"""
        from adamerge.data.registry import register_task
        register_task("hub_colors", {COLORS!r}, ["a {{}} thing."])
        from adamerge.data.datamodule import TestTimeDataModule
        from adamerge.data.hub_datasets import HubDatasetSource
        from adamerge.data.imagefolder import ImageFolderSource
        from adamerge.data.source import CombinedSource

        def rows(ds):
            return [((img * 255).round().int().tolist(), label) for img, label in (ds[i] for i in range(len(ds)))]

        src = HubDatasetSource(["hub_colors", "svhn", "food101"],
                               repos={{"hub_colors": "hubtest/colors", "svhn": "hubtest/digits@v1:cropped"}})
        out["colors"] = rows(src.dataset("hub_colors", "test"))
        out["digits"] = rows(src.dataset("svhn", "test"))
        out["food"] = rows(src.dataset("food101", "test"))  # the catalog's repo: its validation split
        out["food_train"] = [y for _, y in rows(src.dataset("food101", "train"))]

        both = CombinedSource([src, ImageFolderSource({str(home / "folders")!r}, ["fer2013"])])
        dm = TestTimeDataModule(both, tasks=["hub_colors", "fer2013"], batch_size=2, eval_batch_size=4,
                                steps_per_epoch=2)
        out["num_classes"] = dm.num_classes
        loader = dm.train_dataloader()
        iter(loader)
        out["train"] = [{{t: list(x.shape) for t, x in batch.items()}} for batch, _, _ in loader]
        out["eval"] = [[y.tolist() for _, y in loader] for loader in dm.test_dataloader()]
    """)
    for key, expected in (("colors", [(png(s), y) for s, y in test]), ("digits", [(png(60), 7), (png(61), 9)]),
                          ("food", [(png(80), 100)])):
        assert [y for _, y in out[key]] == [y for _, y in expected], key
        for (got, _), (data, _) in zip(out[key], expected, strict=True):
            np.testing.assert_array_equal(np.array(got), pixels(data))
    assert out["food_train"] == [5]
    assert out["num_classes"] == {"hub_colors": 3, "fer2013": 7}
    assert out["train"] == [{"hub_colors": [2, 3, 20, 20], "fer2013": [2, 3, 20, 20]}] * 2
    assert out["eval"] == [[[y for _, y in test[:4]], [y for _, y in test[4:]]], [[4, 6]]]


def test_hub_dataset_failures_name_the_task_repo_split_and_what_to_do(hub_home):
    home, _ = hub_home
    out = run_offline(home, f"""
        from adamerge.data.registry import register_task
        register_task("hub_colors", {COLORS!r}, ["a {{}} thing."])
        from adamerge.data.hub_datasets import HubDatasetSource

        src = HubDatasetSource(["hub_colors", "mnist", "svhn"],
                               repos={{"hub_colors": "hubtest/colors", "svhn": "hubtest/digits@v1:cropped"}})
        for key, (task, split) in {{"not_cached": ("mnist", "test"), "no_split": ("hub_colors", "val"),
                                   "no_split_in_subset": ("svhn", "train")}}.items():
            try:
                src.dataset(task, split)
                out[key] = "served"
            except Exception as e:
                out[key] = f"{{type(e).__name__}}: {{e}}"
    """)
    assert out["not_cached"].startswith("HubError: task 'mnist': dataset ylecun/mnist: the snapshot is not in the "
                                        "Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in out["not_cached"] and "hf download ylecun/mnist --repo-type dataset" in out["not_cached"]
    assert out["no_split"] == ("HubError: task 'hub_colors': dataset hubtest/colors: no parquet shard of split "
                               "'validation' (our 'val'); splits present: test, train: name the repository's split "
                               "with splits={'hub_colors': {'val': '<split>'}}")
    assert out["no_split_in_subset"].startswith("HubError: task 'svhn': dataset hubtest/digits@v1:cropped: no parquet "
                                                "shard of split 'train' (our 'train') in subset 'cropped'; splits "
                                                "present: test:")
