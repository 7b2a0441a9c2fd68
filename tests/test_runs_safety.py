"""Issue #10 on the systems: resume identity, no overwrite, atomic export sets, input validation."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_tiny_pool, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from test_systems_base import ScaledProbe, TinySource

from adamerge.components.adamerging import AdaMergingModel
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.files import read_manifest
from adamerge.merging.task_vectors import MergeError, check_compatible
from adamerge.models.open_clip_pool import ExpertFile
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.runs import CheckpointMismatchError, RunExistsError

ROOT = Path(__file__).resolve().parent.parent


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def _dm(system, steps: int = 2) -> TestTimeDataModule:
    return TestTimeDataModule(TinySource(n=8), tasks=system.tasks, batch_size=4, steps_per_epoch=steps)


def _fit(tmp_path, system, steps=2, ckpt_path=None, **kwargs):
    counter = CountSteps()
    callbacks = [counter, *kwargs.pop("callbacks", [])]
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(system, _dm(system, steps), ckpt_path=ckpt_path)
    return counter.steps


def _file_pool(tmp_path: Path, swap: str | None = None) -> ModelPool:
    """The tiny pool with its experts in safetensors files (``swap``: that task's file holds other weights)."""
    base = make_tiny_pool()
    folder = tmp_path / ("experts-" + (swap or "orig"))
    folder.mkdir(exist_ok=True)
    reference = base.pretrained_state()
    sources = {}
    for i, task in enumerate(base.tasks):
        state = base.expert_state(task)
        if task == swap:
            state = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state.items()}
        path = folder / f"{task}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        sources[task] = ExpertFile(path, reference)
    return ModelPool(base.encoder, sources, base.heads, logit_scale=100.0, name="tiny")


def _checkpointed(tmp_path, system, steps=2) -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, system, steps, enable_checkpointing=True, callbacks=[ckpt])
    return tmp_path / "ckpt" / "last.ckpt"


# ---- resume: state only, and only into the run that made it ---------------------------------------
def test_resume_with_a_swapped_expert_file_is_refused_before_any_step(tmp_path):
    path = _checkpointed(tmp_path, AdaMerging(_file_pool(tmp_path), model=partial(AdaMergingModel, granularity="task")))
    resumed = AdaMerging(_file_pool(tmp_path, swap="task1"), model=partial(AdaMergingModel, granularity="task"))
    counter = CountSteps()
    with pytest.raises(CheckpointMismatchError, match=r"experts\.task1 = '[0-9a-f]{16}', this run has '[0-9a-f]{16}'"):
        quiet_trainer(tmp_path, max_steps=4, callbacks=[counter]).fit(resumed, _dm(resumed), ckpt_path=str(path))
    assert counter.steps == 0
    # the same files resume fine and continue at the checkpoint's step
    same = AdaMerging(_file_pool(tmp_path), model=partial(AdaMergingModel, granularity="task"))
    assert _fit(tmp_path, same, steps=4, ckpt_path=str(path)) == 2


def test_resume_into_another_granularity_or_method_is_refused(tmp_path):
    pool = make_tiny_pool()
    path = _checkpointed(tmp_path, AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer")))
    with pytest.raises(CheckpointMismatchError, match="method.granularity = 'layer', this run has 'task'"):
        _fit(tmp_path, AdaMerging(pool, model=partial(AdaMergingModel, granularity="task")), 4, ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match="method.directions.method = 'task_arithmetic', this run has 'ties'"):
        _fit(tmp_path, AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer", directions={"method": "ties", "keep": 0.2})), 4, ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match="system = 'AdaMerging', this run has 'ScaledProbe'"):
        _fit(tmp_path, ScaledProbe(pool), 4, ckpt_path=str(path))


def test_a_non_finite_checkpoint_state_is_refused_at_load(tmp_path):
    pool = make_tiny_pool()
    path = _checkpointed(tmp_path, AdaMerging(pool, model=partial(AdaMergingModel, granularity="task")))
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.lambdas"][1, 0] = math.nan
    torch.save(ckpt, tmp_path / "nan.ckpt")
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="task"))
    with pytest.raises(CheckpointMismatchError, match="'model.lambdas' holds NaN or Inf"):
        _fit(tmp_path, system, 4, ckpt_path=str(tmp_path / "nan.ckpt"))
    ckpt["state_dict"]["model.lambdas"] = ckpt["state_dict"]["model.lambdas"].double().nan_to_num()
    torch.save(ckpt, tmp_path / "f64.ckpt")
    with pytest.raises(CheckpointMismatchError, match="'model.lambdas' is torch.float64"):
        _fit(tmp_path, AdaMerging(pool, model=partial(AdaMergingModel, granularity="task")), 4, ckpt_path=str(tmp_path / "f64.ckpt"))


# ---- no run overwrites another ----------------------------------------------------------------------
def test_a_second_run_into_an_export_dir_is_refused_unless_overwrite(tmp_path):
    pool = make_tiny_pool()
    out = tmp_path / "export"
    first = ScaledProbe(pool, export_dir=str(out))
    _fit(tmp_path, first)
    before = read_manifest(out)
    assert before["run_id"] == first.run_id
    second = ScaledProbe(pool, export_dir=str(out))
    counter = CountSteps()
    with pytest.raises(RunExistsError, match=f"already holds run {first.run_id}.*--overwrite=true"):
        quiet_trainer(tmp_path, max_steps=2, callbacks=[counter]).fit(second, _dm(second))
    assert counter.steps == 0 and read_manifest(out) == before  # refused before training, nothing touched
    second.overwrite = True
    assert _fit(tmp_path, second) == 2
    assert read_manifest(out)["run_id"] == second.run_id
    # a folder of someone else's files is refused as well
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunExistsError, match="files not written by an adamerge export"):
        _fit(tmp_path, ScaledProbe(pool, export_dir=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_same_run_resumed_may_replace_its_own_export(tmp_path):
    pool = make_tiny_pool()
    out = tmp_path / "export"
    first = ScaledProbe(pool, export_dir=str(out))
    path = _checkpointed(tmp_path, first)
    resumed = ScaledProbe(pool, export_dir=str(out))
    assert _fit(tmp_path, resumed, steps=4, ckpt_path=str(path)) == 2
    assert resumed.run_id == first.run_id and read_manifest(out)["step"] == 4


def test_an_export_dir_that_would_swallow_the_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    system = ScaledProbe(make_tiny_pool(), export_dir=str(out))
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints")
    with pytest.raises(ValueError, match="would contain the run's checkpoint dir"):
        _fit(tmp_path, system, enable_checkpointing=True, callbacks=[ckpt])


def test_shipped_configs_keep_logs_and_checkpoints_outside_the_export():
    for config in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = yaml.safe_load(config.read_text()) or {}
        export = ((cfg.get("model") or {}).get("init_args") or {}).get("export_dir")
        if export is None:
            continue
        trainer = cfg.get("trainer") or {}
        logger = trainer.get("logger") or {}
        others = [trainer.get("default_root_dir"), (logger.get("init_args") or {}).get("save_dir")]
        for other in filter(None, others):
            assert not (Path(other) == Path(export) or Path(export) in Path(other).parents), (config, other)


# ---- validation before training --------------------------------------------------------------------
@pytest.mark.parametrize("lr", [1e30, 0.0, -1e-3, math.nan, math.inf])
def test_an_insane_learning_rate_is_refused_naming_lr(tmp_path, lr):
    def optimizer(params):  # set behind torch's back (torch itself only refuses some of these)
        opt = torch.optim.SGD(params, lr=0.1)
        opt.param_groups[0]["lr"] = lr
        return opt

    counter = CountSteps()
    system = ScaledProbe(make_tiny_pool(), optimizer=optimizer)
    with pytest.raises(ValueError, match=r"optimizer lr \(param group 0\) must be a positive finite number"):
        quiet_trainer(tmp_path, max_steps=2, callbacks=[counter]).fit(system, _dm(system))
    assert counter.steps == 0


def test_init_outside_the_clamp_range_is_refused():
    with pytest.raises(ValueError, match=r"init_lam 1.5 is outside the clamp range \[0, 1\]"):
        AdaMerging(make_tiny_pool(), model=partial(AdaMergingModel, init_lam=1.5))
    AdaMerging(make_tiny_pool(), model=partial(AdaMergingModel, init_lam=1.5, clamp=False))  # without the clamp it is a valid start


def test_duplicate_task_names_are_refused():
    pool = make_tiny_pool()
    with pytest.raises(ValueError, match="task 'task0' is listed twice"):
        pool.check_tasks(["task0", "task1", "task0"])
    with pytest.raises(ValueError, match="task 'task0' is listed twice"):
        AdaMerging(pool, tasks=["task0", "task0"])


def test_an_integer_tensor_at_a_float_key_is_refused_naming_the_key():
    ref = {"w": torch.zeros(2, 2), "ids": torch.arange(2)}
    with pytest.raises(MergeError, match=r"key 'w' holds torch.int64 values where the model has torch.float32"):
        check_compatible(ref, {"w": torch.zeros(2, 2, dtype=torch.long), "ids": torch.arange(2)})
    with pytest.raises(MergeError, match=r"key 'ids' holds torch.float32"):
        check_compatible(ref, {"w": torch.zeros(2, 2), "ids": torch.zeros(2)})
    check_compatible(ref, {"w": torch.zeros(2, 2, dtype=torch.bfloat16), "ids": torch.arange(2)})  # float kinds mix


def test_export_set_manifest_hashes_every_file(tmp_path):
    out = tmp_path / "export"
    system = AdaMerging(make_tiny_pool(), model=partial(AdaMergingModel, granularity="task"), export_dir=str(out))
    _fit(tmp_path, system, limit_val_batches=1)
    manifest = read_manifest(out)  # verifies every sha256
    assert set(manifest["files"]) == {"learned.safetensors", "merged.safetensors", "coefficients.json",
                                      "coefficients.safetensors", "metrics.json"}
    assert manifest["step"] == 2 and manifest["method"] == "AdaMerging (task-wise)"
    assert json.loads((out / "coefficients.json").read_text())["granularity"] == "task"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries
