"""``adamerge reproduce --tasks 8`` end to end on a Hugging Face cache the test lays out on disk.

The cache (tests/hubcache.py, huggingface_hub's real layout, read with ``HF_HUB_OFFLINE=1``) holds what a
real run downloads, only tiny: a pretrained HF CLIPModel, one HF CLIPVisionModel expert per task under
FusionBench's task names, and each task's test split as parquet under the dataset ids of FusionBench's
catalog (``tanganke/sun397``, ``ufldl-stanford/svhn`` subset ``cropped_digits``, ``ylecun/mnist``, ...),
with a train split beside it that must not be read. Nothing of adamerge's loading is mocked; the model
is a one-layer CLIP (``--arch tiny``) instead of ViT-B/32, and ``--steps 1`` shortens the test-time runs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from hubcache import (
    ROOT,
    TINY_CFG,
    cache_repo,
    hf_clip_files,
    hf_vision_files,
    offline_env,
    parquet_split,
    png,
)

from adamerge.data.registry import get_task, task_set

pytest.importorskip("pyarrow")

TASKS = task_set("8")
EXPERT_NAME = {"cars": "stanford-cars"}  # FusionBench's name where it differs from the registry's
IMAGES = 6


def _dataset_files(task: str, subset: str | None, seed: int) -> dict[str, bytes]:
    classes = get_task(task).classnames
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(classes), (IMAGES,), generator=g).tolist()
    test = parquet_split([png(1000 * seed + i) for i in range(IMAGES)], labels, classes, row_group_size=4)
    train = parquet_split([png(7)], [len(classes) - 1], classes)  # must never be read
    folder = f"{subset}/" if subset else "data/"
    return {f"{folder}test-00000-of-00001.parquet": test, f"{folder}train-00000-of-00001.parquet": train,
            "README.md": b"# tiny\n"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from adamerge.data.hub_datasets import FUSIONBENCH_DATASETS

    home = tmp_path_factory.mktemp("hf_home")
    (home / "tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(home / "tiny.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny")
    cache_repo(home / "hub", "adamerge-test/tiny-clip", hf_clip_files(clip))
    experts = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        # a CLIPVisionModel carries no projection: FusionBench's experts share the pretrained one
        experts[task] = {k: v if k == "proj" else v + 0.05 * torch.randn(v.shape, generator=g)
                         for k, v in clip.visual.state_dict().items()}
        cache_repo(home / "hub", f"adamerge-test/tiny-clip_{EXPERT_NAME.get(task, task)}", hf_vision_files(experts[task]))
        repo, _, subset = FUSIONBENCH_DATASETS[task].partition(":")
        cache_repo(home / "hub", repo, _dataset_files(task, subset or None, seed=i), repo_type="dataset")
    return home, clip, experts


def _reproduce(home: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--tasks", "8", "--arch", "tiny", "--model-config", str(home / "tiny.json"),
            "--pretrained", "adamerge-test/tiny-clip", "--experts", "adamerge-test/tiny-clip_{task}",
            "--out", str(out), "--num-workers", "0", "--eval-batch-size", "64", *extra]
    return subprocess.run([sys.executable, "-m", "adamerge.reproduce", *args], env=offline_env(home), cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)


def _zero_shot_accuracy(clip, visual_state, task: str, home: Path, seed: int) -> float:
    """Accuracy computed here, independently of adamerge: open_clip's own transform, text and image towers."""
    import pyarrow.parquet as pq
    from PIL import Image

    model = open_clip.create_model("tiny")
    model.load_state_dict(clip.state_dict())
    model.visual.load_state_dict(visual_state)
    model.eval()
    info = get_task(task)
    tokenizer = open_clip.get_tokenizer("tiny")
    with torch.no_grad():
        rows = []
        for c in info.classnames:
            e = model.encode_text(tokenizer([t.format(c) for t in info.templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            rows.append(e.mean(0) / e.mean(0).norm())
        head = torch.stack(rows)
        table = pq.read_table(io.BytesIO(_dataset_files(task, None, seed)["data/test-00000-of-00001.parquet"]))
        transform = open_clip.image_transform(TINY_CFG["vision_cfg"]["image_size"], is_train=False)
        images = torch.stack([transform(Image.open(io.BytesIO(x["bytes"])).convert("RGB"))
                              for x in table.column("image").to_pylist()])
        f = model.encode_image(images)
        pred = (f / f.norm(dim=-1, keepdim=True) @ head.T).argmax(1)
    return float((pred == torch.tensor(table.column("label").to_pylist())).float().mean())


def test_reproduce_runs_every_method_from_the_offline_hub_cache_and_writes_the_table(hub, tmp_path):
    home, clip, experts = hub
    out = tmp_path / "out"
    r = _reproduce(home, out, "--steps", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    table = json.loads((out / "results" / "results.json").read_text())
    keys = [row["method"] for row in table["rows"]]
    assert keys == ["zero_shot", "experts", "weight_averaging", "regmean", "regmean_plusplus", "fisher", "task_arithmetic", "ties", "pcb", "consensus_ta",
                    "tsv_m", "iso_c", "iso_cts", "cart", "wudi", "emr", "tall_masks", "adamerging_task", "adamerging_layer",
                    "adamerging_plusplus", "adamerging_cart", "adarank", "surgery_ta", "wemoe", "ewemoe"]
    rows = {row["method"]: row for row in table["rows"]}
    for task in ("eurosat", "mnist"):  # the numbers are the models' on the cached test images
        i = TASKS.index(task)
        want = _zero_shot_accuracy(clip, clip.visual.state_dict(), task, home, seed=i)
        assert rows["zero_shot"]["accuracy"][task] == pytest.approx(100 * want, abs=1e-6)
        want = _zero_shot_accuracy(clip, experts[task], task, home, seed=i)
        assert rows["experts"]["accuracy"][task] == pytest.approx(100 * want, abs=1e-6)
    for row in table["rows"]:
        assert set(row["accuracy"]) == set(TASKS)
        assert row["avg"] == pytest.approx(sum(row["accuracy"].values()) / len(TASKS))
        assert row["published"] is None  # an architecture nobody published
    markdown = (out / "results" / "results.md").read_text()
    assert markdown in r.stdout and "| Zero-shot |" in markdown and "| E-WEMoE |" in markdown
    csv_lines = (out / "results" / "results.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["method", "label", "sun397"] and len(csv_lines) == 1 + len(keys)
    progress = [line for line in r.stdout.splitlines() if line.startswith("[adamerge reproduce")]
    assert sum(": running" in line for line in progress) == len(keys)

    again = _reproduce(home, out, "--steps", "1")  # resumable: every record is reused, the table is the same
    assert again.returncode == 0, again.stderr[-4000:]
    assert sum("done before, record reused" in line for line in again.stdout.splitlines()) == len(keys)
    assert json.loads((out / "results" / "results.json").read_text())["rows"] == table["rows"]

    other = _reproduce(home, out, "--steps", "1", "--expert", "mnist=adamerge-test/tiny-clip_dtd")
    assert other.returncode == 2 and "holds the results of another setup" in other.stderr


def test_dry_run_lists_each_repository_with_its_size_and_what_is_not_cached(hub, tmp_path):
    home, _, _ = hub
    out = tmp_path / "out"
    r = _reproduce(home, out, "--dry-run", "--dataset", "mnist=adamerge-test/not-cached")
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    blob = home / "hub" / "datasets--tanganke--eurosat" / "snapshots"
    size = next(blob.rglob("test-*.parquet")).stat().st_size
    eurosat = next(line for line in lines if line.startswith("  dataset eurosat (test split): tanganke/eurosat"))
    assert f"1 file, {size / 1000:.1f} KB (cached" in eurosat  # the test shard only, not the train shard
    assert sum(line.startswith("  expert ") and "2 files" in line and "(cached" in line for line in lines) == len(TASKS)
    assert any("expert cars: adamerge-test/tiny-clip_stanford-cars" in line for line in lines)  # FusionBench's name
    missing = next(line for line in lines if line.startswith("  dataset mnist"))
    assert "adamerge-test/not-cached" in missing and "not in the cache" in missing
    assert lines[-1].startswith("Would run: zero_shot, experts, weight_averaging")
    assert not out.exists()  # a dry run writes nothing


def _setup(*argv: str):
    from adamerge.reproduce import parse_args
    from adamerge.reproduce.setup import resolve

    return resolve(parse_args(list(argv)))


def test_the_defaults_are_fusionbench_s_checkpoints_and_data(tmp_path):
    s = _setup("--out", str(tmp_path))
    assert (s.arch, s.pretrained) == ("ViT-B-32-quickgelu", "openai/clip-vit-base-patch32")
    assert s.experts["cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert s.datasets["svhn"] == "ufldl-stanford/svhn:cropped_digits" and s.datasets["mnist"] == "ylecun/mnist"
    assert s.tasks == TASKS and len(s.methods) == 25
    from adamerge.reproduce.published import reference

    assert reference("adamerging_layer", s.arch, 8) == (82.6, "FusionBench (same checkpoints)")
    assert reference("pcb", s.arch, 8) == (76.3, "paper")
    assert reference("ties", "ViT-B-32-quickgelu", 20) == (63.4, "paper")
    assert reference("zero_shot", s.arch, 8) is None


def test_a_task_without_expert_or_data_and_an_unknown_method_are_named_before_anything_runs(tmp_path):
    from adamerge.reproduce.catalog import ReproduceError

    with pytest.raises(ReproduceError, match=r"task 'emnist_digits': FusionBench publishes no expert for it; give "
                                             r"one with --expert emnist_digits=ID"):
        _setup("--tasks", "20")
    with pytest.raises(ReproduceError, match=r"task 'fer2013': no dataset repository on the Hub in parquet form; "
                                             r"give its images with --image-folders DIR"):
        _setup("--tasks", "14")
    with pytest.raises(ReproduceError, match=r"unknown method 'adamerging_layerwise' \(did you mean adamerging_layer"):
        _setup("--methods", "adamerging_layerwise")
    with pytest.raises(ReproduceError, match=r"--model 'ViT-H-14': known models are ViT-B-32, ViT-B-16, ViT-L-14"):
        _setup("--model", "ViT-H-14")


def test_a_task_set_may_mix_hub_datasets_and_image_folders(tmp_path):
    from adamerge.reproduce.setup import build, setup_config

    (tmp_path / "folders" / "fer2013" / "test").mkdir(parents=True)
    s = _setup("--tasks", "14", "--image-folders", str(tmp_path / "folders"), "--out", str(tmp_path / "out"))
    assert s.folder_tasks == ["fer2013"] and "fer2013" not in s.datasets and len(s.datasets) == 13
    config = setup_config(s)
    assert config["model"]["init_args"]["pool"]["init_args"]["experts"]["fer2013"] == \
        "tanganke/clip-vit-base-patch32_fer2013"
    source = build(config["data"]["init_args"]["source"])
    assert type(source).__name__ == "CombinedSource" and sorted(source.tasks) == sorted(s.tasks)  # both sources
    assert config["data"]["init_args"]["tasks"] == s.tasks  # the run keeps the set's order


def _parity_section() -> str:
    text = (ROOT / "docs" / "parity.md").read_text()
    return text[text.index("## Paper numbers"):]


# docs/parity.md "Paper numbers" row → the reproduce methods its one or two (" / ") values belong to
PARITY_ROWS = {"Individual experts": ("experts",), "Weight averaging": ("weight_averaging",),
               "Task arithmetic (λ 0.3)": ("task_arithmetic",), "TIES": ("ties",), "PCB": ("pcb",),
               "AdaMerging task-wise / ++": ("adamerging_task", None),
               "AdaMerging layer-wise / ++": ("adamerging_layer", "adamerging_plusplus"),
               "Surgery on TA / LW-AdaMerging": ("surgery_ta", None), "WEMoE": ("wemoe",),
               "E-WEMoE (90 % pruned)": ("ewemoe",), "Consensus TA": ("consensus_ta",), "TSV-M": ("tsv_m",),
               "Iso-C": ("iso_c",), "Iso-CTS": ("iso_cts",), "CART": ("cart",), "WUDI": ("wudi",),
               "EMR-Merging (task id)": ("emr",), "AdaMerging + CART (layer-wise)": ("adamerging_cart",),
               "AdaRank on CART": ("adarank",)}


def test_the_published_numbers_are_those_docs_parity_gives():
    from adamerge.reproduce.published import FUSIONBENCH, PAPER

    lines = [line for line in _parity_section().splitlines() if line.startswith("|")]
    columns = [c.strip().replace(" × ", "×") for c in lines[0].strip("|").split("|")]
    found: dict[str, dict[str, float]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        keys = PARITY_ROWS[cells[0]]
        for column, cell in zip(columns[2:], cells[2:], strict=False):
            if "×" not in column or cell == "—":
                continue
            for key, value in zip(keys, cell.split(" / "), strict=True):
                if key is not None:
                    found.setdefault(key, {})[column] = float(value)
    assert found == PAPER
    prose = " ".join(_parity_section().split())
    for key, label in (("experts", "fine-tuned"), ("task_arithmetic", "TA"), ("ties", "TIES"),
                       ("adamerging_task", "task-wise AdaMerging"), ("adamerging_layer", "layer-wise AdaMerging"),
                       ("ewemoe", "E-WEMoE"), ("wemoe", "WEMoE")):
        assert "(B/32 × 8): " in prose and f" {label} {FUSIONBENCH[key]['B/32×8']}" in prose
    assert "(L/14 × 8): layer-wise AdaMerging 91.0, WEMoE 93.8; TSV-M (B/32 × 8" in prose
    assert f"TSV-M (B/32 × 8, `examples/task_singular_vector/results`) {FUSIONBENCH['tsv_m']['B/32×8']}" in prose
    assert {k: v.get("L/14×8") for k, v in FUSIONBENCH.items() if "L/14×8" in v} == {
        "adamerging_layer": 91.0, "wemoe": 93.8, "regmean": 90.4, "regmean_plusplus": 91.0, "fisher": 80.3}
    b32 = " / ".join(str(FUSIONBENCH[k]["B/32×8"]) for k in ("regmean", "regmean_plusplus", "fisher"))
    l14 = " / ".join(str(FUSIONBENCH[k]["L/14×8"]) for k in ("regmean", "regmean_plusplus", "fisher"))
    assert f"RegMean / RegMean++ / Fisher merging (its batch estimator): {b32} (B/32 × 8), {l14} (L/14 × 8)" in prose
