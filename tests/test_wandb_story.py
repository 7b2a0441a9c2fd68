"""W&B that tells the story: tiny offline runs of AdaMerging, WEMoE and SurgeryV2 are opened on disk
(the ``run-*.wandb`` record log and its media files) and every logged item is checked against an
independent computation; the plotting helpers are checked on ViT-B/32's 158 tensor names."""

from __future__ import annotations

import itertools
import json
import struct
import time
from functools import partial
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import wandb
from conftest import make_tiny_pool, quiet_trainer
from lightning.pytorch.loggers import WandbLogger
from test_data_datamodule import TinySource

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.surgery import (
    SurgeryModel,
    alignment_loss,
    encode_with_block_means,
    layer_alignment_losses,
)
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.models.pool import ModelPool
from adamerge.records import write_metrics
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.surgery import Surgery
from adamerge.systems.wemoe import WEMoE
from adamerge.wandb_story import (
    COLUMN_INCH,
    WandbStory,
    accuracy_rows,
    coefficient_heatmap,
    colour_range,
    layer_label,
    reference_accuracy,
)


# ---- reading an offline run (wandb 0.31 writes a LevelDB-style log of protobuf records) -------------
def run_records(run_dir: Path):
    """Every ``wandb.proto`` Record of the run's ``run-*.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            return
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            yield pb.Record.FromString(pending + payload)
            pending = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += payload


def finished_records(run_dir: Path, timeout: float = 30.0) -> list:
    """The run's records once all are on disk (the last is ``exit``): wandb 0.31's offline ``finish()``
    may return before its writer has flushed the file (seen as a 7-byte file, header only)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(run_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history(run_dir: Path) -> list[dict]:
    """The run's history rows: ``{key: value}`` with nested media fields as dicts."""
    rows = []
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def logged(rows: list[dict], key: str) -> list[dict]:
    return [row for row in rows if key in row]


def table(run_dir: Path, value: dict) -> dict:
    assert value["_type"] == "table-file", value
    return json.loads((run_dir / "files" / value["path"]).read_text())


def png(run_dir: Path, value: dict) -> bytes:
    assert value["_type"] == "image-file" and value["format"] == "png", value
    data = (run_dir / "files" / value["path"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) == value["size"]
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (value["width"], value["height"])
    return data


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if wandb.run is not None:  # a run another test left open would be reused (and its rows read here)
        wandb.finish()
    return tmp_path


def fit_logged(tmp_path, system, source, story: WandbStory, test: bool = False, append: bool = False,
               **trainer_kwargs) -> Path:
    """Fit 2 steps (one validation at the end) with a WandbLogger and ``story`` (given to the Trainer, or
    ``append``-ed to its callbacks afterwards, as the CLI does); optionally test; return the run's folder."""
    logger = WandbLogger(project="adamerge-test", save_dir=str(tmp_path), offline=True)
    dm = TestTimeDataModule(source, batch_size=4, eval_batch_size=4, steps_per_epoch=2)
    trainer = quiet_trainer(tmp_path, max_steps=2, logger=logger, callbacks=[] if append else [story],
                            log_every_n_steps=1, **trainer_kwargs)
    if append:
        trainer.callbacks.append(story)
    trainer.fit(system, dm)
    if test:
        trainer.test(system, dm, verbose=False)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    return run_dir


def accuracy_by_hand(encode, pool, source, split="test") -> dict[str, float]:
    out = {}
    for t in pool.tasks:
        x, y = source.dataset(t, split).tensors
        with torch.no_grad():
            out[t] = (F.normalize(encode(x), dim=-1) @ pool.heads[t].t()).argmax(-1).eq(y).float().mean().item()
    return out


# ---- the runs --------------------------------------------------------------------------------------
def test_adamerging_run_logs_accuracy_with_references_and_the_heatmap(offline):
    p = make_tiny_pool(scale=0.2)
    pool = ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, 10.0, name="tiny")
    refs = offline / "records"
    zero_shot = [{"task0": 0.2, "task1": 0.3, "task2": 0.1}, {"task0": 0.4, "task1": 0.5, "task2": 0.3}]
    for seed, acc in enumerate(zero_shot):
        write_metrics(refs / f"zs{seed}", "Zero-shot", acc, seed=seed, benchmark="tiny")
    write_metrics(refs / "ex", "Individual experts", {"task0": 0.9, "task1": 0.8, "task2": 0.5}, seed=0, benchmark="tiny")
    write_metrics(refs / "other", "Zero-shot", {"task0": 0.0, "task1": 0.0, "task2": 0.0}, seed=0, benchmark="mini")
    write_metrics(refs / "ta", "Task arithmetic (λ=0.3)", {"task0": 0.7, "task1": 0.7, "task2": 0.7}, benchmark="tiny")

    source = TinySource(n=8)
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"),
                        optimizer=lambda params: torch.optim.Adam(params, lr=0.05))
    run = fit_logged(offline, system, source, WandbStory(references=str(refs)), test=True, num_sanity_val_steps=1)
    rows = history(run)

    # accuracy: one validation row (none from the sanity check), merged values computed by hand
    (val,) = logged(rows, "val/acc/table")
    assert val["trainer/global_step"] == 2
    heat_rows = logged(rows, "coefficients/heatmap")  # after the validation and the test, never the sanity check
    assert [("val/acc/table" in r, "test/acc/table" in r, r["trainer/global_step"]) for r in heat_rows] == [
        (True, False, 2), (False, True, 2)]
    expected = accuracy_by_hand(lambda x: system.encode(x, system.model.merged_parameters()), pool, source)
    data = table(run, val["val/acc/table"])
    assert data["columns"] == ["task", "merged", "zero-shot", "experts", "normalized"]
    assert [r[0] for r in data["data"]] == ["task0", "task1", "task2", "average"]
    experts = {"task0": 0.9, "task1": 0.8, "task2": 0.5}
    for t, (task, merged, zs, ex, normalized) in zip(pool.tasks, data["data"]):
        assert task == t
        assert merged == pytest.approx(100 * expected[t]) == pytest.approx(100 * system.last_metrics[f"val/acc/{t}"])
        assert zs == pytest.approx(100 * (zero_shot[0][t] + zero_shot[1][t]) / 2)  # mean over seeds, the "mini" record ignored
        assert ex == pytest.approx(100 * experts[t]) and normalized == pytest.approx(100 * expected[t] / experts[t])
    average = data["data"][-1]
    assert average[1] == pytest.approx(100 * system.last_metrics["val/acc/avg"])
    assert average[3] == pytest.approx(100 * sum(experts.values()) / 3)
    png(run, val["val/acc/chart"])

    # the test split gets its own table
    (test,) = logged(rows, "test/acc/table")
    merged_test = [r[1] for r in table(run, test["test/acc/table"])["data"][:3]]
    assert merged_test == pytest.approx([100 * system.last_metrics[f"test/acc/{t}"] for t in pool.tasks])

    # the heatmap: one column per tensor at the fixed column width; the coefficients as a table
    heat = val["coefficients/heatmap"]
    png(run, heat)
    n = len(system.model.layer_names)
    assert heat["width"] == round(max(4.0, 2.5 + COLUMN_INCH * n) * 100)
    coef = table(run, val["coefficients/table"])
    assert coef["columns"] == ["task", *system.model.layer_names]
    values = torch.tensor([r[1:] for r in coef["data"]])
    torch.testing.assert_close(values, system.model.coefficients().detach())
    assert not torch.allclose(values, torch.full_like(values, 0.3))  # λ moved, and the table shows it


def test_wemoe_run_logs_the_routing_weights_per_task(offline):
    pool = make_tiny_pool()
    source = TinySource(n=8)
    system = WEMoE(pool)
    run = fit_logged(offline, system, source, WandbStory(), append=True)
    (val,) = logged(history(run), "val/acc/table")
    data = table(run, val["val/acc/table"])
    assert data["columns"] == ["task", "merged"]  # no references, and the tiny pool records no experts
    assert [r[1] for r in data["data"][:3]] == pytest.approx([100 * system.last_metrics[f"val/acc/{t}"] for t in pool.tasks])
    png(run, val["wemoe/routing"])

    routing = table(run, val["wemoe/routing_table"])
    assert routing["columns"] == ["task", "layer", "task0", "task1", "task2"]
    blocks = len(system.model.mlps)
    assert [r[:2] for r in routing["data"]] == [[t, f"b{i}"] for t in pool.tasks for i in range(blocks)]
    system.eval()
    for k, t in enumerate(pool.tasks):  # all 8 images at once: the mean over the two eval batches
        with torch.no_grad():
            system.model(source.dataset(t, "test").tensors[0])
        mean = torch.stack([m.last_weights.mean(dim=0) for m in system.model.mlps])
        logged_mean = torch.tensor([r[2:] for r in routing["data"][k * blocks : (k + 1) * blocks]])
        torch.testing.assert_close(logged_mean, mean, rtol=1e-5, atol=1e-6)
    samples = system.diagnostics()["routing"]["samples"]
    assert {t: s.shape for t, s in samples.items()} == {t: (8, blocks, 3) for t in pool.tasks}


def test_surgery_v2_run_logs_the_per_layer_alignment_loss(offline):
    pool = make_tiny_pool()
    system = Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4))
    run = fit_logged(offline, system, TinySource(n=8), WandbStory())
    rows = history(run)
    (val,) = logged(rows, "val/acc/table")
    png(run, val["surgery/layer_loss"])
    losses = table(run, val["surgery/layer_loss_table"])
    assert losses["columns"] == ["task", "b0", "b1", "final"]
    assert [r[0] for r in losses["data"]] == pool.tasks
    last_step = logged(rows, "train/loss/task0")[-1]  # the loss the last step trained on, logged by Lightning
    for task, *per_layer in losses["data"]:
        assert sum(per_layer) == pytest.approx(last_step[f"train/loss/{task}"], rel=1e-5)
        assert all(v > 0 for v in per_layer)


def test_layer_losses_are_the_terms_of_the_alignment_loss(tiny_pool):
    model = SurgeryModel(tiny_pool.build_encoder(tiny_pool.expert_state("task0")), ["task0"], rank=4, version="v2")
    torch.nn.init.normal_(model.block_aligners["task0"][0].up.weight, std=0.5)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    merged = model("task0", x)
    expert = encode_with_block_means(tiny_pool.build_encoder(tiny_pool.expert_state("task1")), x)
    terms = layer_alignment_losses(merged, expert)
    assert terms.shape == (3,) and not terms.requires_grad
    by_hand = [(m - e).abs().mean() for m, e in [*zip(merged.blocks, expert.blocks), (merged.final, expert.final)]]
    torch.testing.assert_close(terms, torch.stack(by_hand).detach())
    torch.testing.assert_close(terms.sum(), alignment_loss(merged, expert).detach())


def test_nothing_is_drawn_without_a_wandb_logger():
    class Module:
        def diagnostics(self):
            raise AssertionError("diagnostics read without a WandbLogger")

    class Trainer:
        loggers, is_global_zero, sanity_checking = [], True, False

    WandbStory().on_validation_end(Trainer(), Module())
    WandbStory().on_test_end(Trainer(), Module())
    with pytest.raises(FileNotFoundError, match="references"):
        WandbStory(references="/no/such/folder")


# ---- the pure helpers -------------------------------------------------------------------------------
def vitb32_names() -> list[str]:
    """The 158 tensors layer-wise AdaMerging learns on ViT-B/32 (task_vectors' ImageEncoder: the CLIP
    model without its text transformer), built on the meta device."""
    with torch.device("meta"):
        clip = open_clip.CLIP(**open_clip.get_model_config("ViT-B-32"))
    return [f"model.{n}" for n in clip.state_dict() if not n.startswith("transformer.")]


def test_vitb32_tensors_are_labelled_by_block_and_kind():
    names = vitb32_names()
    assert len(names) == 158
    labels = [layer_label(n) for n in names]
    assert layer_label("model.visual.transformer.resblocks.3.attn.in_proj_weight") == (3, "attn.in_proj_w")
    kinds = {b: sorted(k for bb, k in labels if bb == b) for b in range(12)}
    assert all(kinds[b] == kinds[0] for b in range(12)) and len(kinds[0]) == 12
    assert kinds[0] == sorted(["ln_1.w", "ln_1.b", "attn.in_proj_w", "attn.in_proj_b", "attn.out_proj.w",
                               "attn.out_proj.b", "ln_2.w", "ln_2.b", "mlp.c_fc.w", "mlp.c_fc.b",
                               "mlp.c_proj.w", "mlp.c_proj.b"])
    outside = sorted(k for b, k in labels if b is None)
    assert outside == sorted(["conv1.w", "class_embedding", "positional_embedding", "ln_pre.w", "ln_pre.b",
                              "ln_post.w", "ln_post.b", "proj", "positional_embedding", "text_projection",
                              "logit_scale", "token_embedding.w", "ln_final.w", "ln_final.b"])


def test_the_heatmap_fits_158_tensors_and_centres_the_colours_on_init():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = vitb32_names()
    values = torch.rand(8, 158, generator=torch.Generator().manual_seed(0))
    fig = coefficient_heatmap(values, [f"t{k}" for k in range(8)], names, init_lam=0.3, clamp=True)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    torch.testing.assert_close(torch.tensor(ax.images[0].get_array().data), values)
    labels = ax.get_xticklabels()
    assert labels[names.index("model.visual.transformer.resblocks.3.attn.in_proj_weight")].get_text() == "b3 attn.in_proj_w"
    boxes = [label.get_window_extent() for label in labels]
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes)), "tensor labels overlap"
    assert fig.get_size_inches()[0] <= 22  # 158 columns of COLUMN_INCH, plus the labels and the colour bar
    blocks = [t.get_text() for t in ax.child_axes[0].get_xticklabels()]  # block names above the columns
    assert blocks == [f"block {b}" for b in range(12)]
    norm, cmap = ax.images[0].norm, ax.images[0].cmap
    assert (norm.vmin, norm.vcenter, norm.vmax) == (0.0, 0.3, 1.0)
    assert cmap(norm(0.3)) == cmap(0.5)  # the initial λ is the neutral colour
    flat = coefficient_heatmap(torch.full((2, 3), 0.31), ["a", "b"], ["x", "y", "z"], init_lam=0.3, clamp=True)
    assert (flat.axes[0].images[0].norm.vmin, flat.axes[0].images[0].norm.vmax) == (0.0, 1.0)  # fixed range


def test_colour_range():
    assert colour_range(0.3, clamp=True) == (0.0, 0.3, 1.0)
    assert colour_range(0.3, clamp=False) == pytest.approx((-0.4, 0.3, 1.0))
    assert colour_range(0.0, clamp=True) == (-1.0, 0.0, 1.0)  # the centre stays strictly inside
    assert colour_range(2.0, clamp=False) == (0.0, 2.0, 4.0)


def test_accuracy_rows_and_references(tmp_path):
    columns, rows = accuracy_rows(["a", "b", "c"], {"a": 0.5, "b": 0.25}, {"experts": {"a": 1.0}, "zero-shot": {}})
    assert columns == ["task", "merged", "experts", "normalized"]
    assert rows == [["a", 50.0, 100.0, 50.0], ["b", 25.0, None, None], ["average", 37.5, None, None]]
    write_metrics(tmp_path / "1", "Zero-shot", {"a": 0.1}, seed=1, benchmark="x", split="test")
    write_metrics(tmp_path / "2", "zero shot", {"a": 0.3}, seed=2, benchmark="x", split="test")
    write_metrics(tmp_path / "3", "Zero-shot", {"a": 0.9}, seed=3, benchmark="x", split="val")
    write_metrics(tmp_path / "4", "Individual experts", {"a": 0.8}, seed=1, benchmark="x")
    assert reference_accuracy(tmp_path, "x", "test") == {"zero-shot": {"a": pytest.approx(0.2)}, "experts": {"a": 0.8}}
    assert reference_accuracy(tmp_path, "y", "test") == {}
