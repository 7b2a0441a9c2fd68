"""TestTimeSystem: the shared loop, metrics, data checks, learnable-only checkpoints and export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_data_datamodule import TinySource
from torch import nn

from adamerge.components.losses import entropy
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.merging.task_vectors import state_fingerprint
from adamerge.models.pool import ModelPool
from adamerge.systems.base import CheckpointMismatchError, TestTimeSystem


class ScaledProbe(TestTimeSystem):
    """A minimal subclass: frozen encoder (real parameters, frozen) + a learnable temperature per task."""

    def __init__(self, pool, tasks=None, optimizer=None, export_dir=None):
        kwargs = {} if optimizer is None else {"optimizer": optimizer}
        super().__init__(pool, tasks, export_dir=export_dir, **kwargs)
        self.encoder = pool.build_encoder()
        self.temperature = nn.Parameter(torch.ones(len(self.tasks)))

    def task_logits(self, task, images):
        return self.temperature[self.tasks.index(task)] * self.logits(task, self.encoder(images))




def test_tasks_default_to_pool_and_unknown_tasks_fail():
    pool = make_tiny_pool()
    assert ScaledProbe(pool).tasks == pool.tasks
    with pytest.raises(ValueError, match="task 'task9' has no expert in the pool"):
        ScaledProbe(pool, tasks=["task0", "task9"])
    with pytest.raises(ValueError, match="empty task list"):
        ScaledProbe(pool, tasks=[])


def test_training_step_sums_entropies_and_never_reads_labels():
    pool = make_tiny_pool()
    system = ScaledProbe(pool)
    g = torch.Generator().manual_seed(0)
    images = {t: torch.randn(4, 3, 16, 16, generator=g) for t in pool.tasks}

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("labels were read")

    batch = {"task0": (images["task0"], Untouchable()), "task1": images["task1"], "task2": [images["task2"]]}
    system.log = lambda *a, **k: None  # no trainer attached
    loss = system.training_step(batch, 0)
    expected = sum(
        entropy(F.normalize(pool.encoder(x), dim=-1) @ pool.heads[t].t() * pool.logit_scale).mean()
        for t, x in images.items()
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="task 'other'"):
        system.training_step({"other": images["task0"]}, 0)


def test_fit_logs_per_task_losses_and_validate_logs_accuracies(tmp_path):
    pool, src = make_tiny_pool(), TinySource(n=12)
    dm = TestTimeDataModule(src, batch_size=4, eval_batch_size=5, steps_per_epoch=2)
    system = ScaledProbe(pool)
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    tr.fit(system, dm)
    assert {"train/loss", "train/loss/task0", "train/loss/task1", "train/loss/task2"} <= set(
        tr.callback_metrics
    )
    tr = trainer(tmp_path)
    metrics = tr.validate(system, dm, verbose=False)[0]
    expected = {}
    for t in pool.tasks:  # independent accuracy over the whole test split
        x, y = src.dataset(t, "test").tensors
        pred = (F.normalize(pool.encoder(x), dim=-1) @ pool.heads[t].t()).argmax(-1)
        expected[f"val/acc/{t}"] = (pred == y).float().mean().item()
    expected["val/acc/avg"] = sum(expected.values()) / 3
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    test = tr.test(system, dm, verbose=False)[0]
    assert set(test) == {k.replace("val/", "test/") for k in expected}


def test_only_learnable_parameters_reach_the_optimizer():
    pool = make_tiny_pool()
    system = ScaledProbe(pool)
    opt = system.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    assert [p for g in opt.param_groups for p in g["params"]] == [system.temperature]
    sgd = ScaledProbe(pool, optimizer=lambda params: torch.optim.SGD(params, lr=0.5)).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.5


@pytest.mark.parametrize(
    "data_tasks, message",
    [
        (["task0", "task1", "task2"], "the data has task 'task2' that the model does not"),
        (["task0"], "the model has task 'task1' that the data does not"),
    ],
)
def test_task_mismatch_between_data_and_model_fails_before_training(tmp_path, data_tasks, message):
    system = ScaledProbe(make_tiny_pool(), tasks=["task0", "task1"])
    before = system.temperature.detach().clone()
    dm = TestTimeDataModule(TinySource(n=8), tasks=data_tasks, batch_size=4)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, max_steps=1).fit(system, dm)
    assert torch.equal(system.temperature, before)


def test_head_class_count_mismatch_fails(tmp_path):
    system = ScaledProbe(make_tiny_pool())
    dm = TestTimeDataModule(TinySource(n=8, classes=(3, 7, 5)), batch_size=4)
    with pytest.raises(ValueError, match="task 'task1': the zero-shot head has 4 classes but the data has 7"):
        trainer(tmp_path, max_steps=1).fit(system, dm)


def fit_with_checkpoint(tmp_path, system, steps=3):
    dm = TestTimeDataModule(TinySource(n=8), tasks=system.tasks, batch_size=4, steps_per_epoch=steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=steps, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(
        system, dm
    )
    return tmp_path / "ckpt" / "last.ckpt"


def test_checkpoint_holds_only_learnable_parameters_and_metadata(tmp_path):
    pool = make_tiny_pool()
    system = ScaledProbe(pool)
    path = fit_with_checkpoint(tmp_path, system)
    ckpt = torch.load(path, weights_only=False)
    assert list(ckpt["state_dict"]) == ["temperature"]
    meta = ckpt["adamerge"]
    assert {k: meta[k] for k in ("system", "pool", "tasks", "num_classes", "method")} == {
        "system": "ScaledProbe",
        "pool": "tiny",
        "tasks": pool.tasks,
        "num_classes": {"task0": 3, "task1": 4, "task2": 5},
        "method": {},
    }
    assert meta["run_id"] == system.run_id
    # content fingerprints: θ0 and one per expert, all distinct, recomputed from the tensors
    assert meta["pretrained"] == state_fingerprint(pool.pretrained_state())
    assert meta["experts"] == {t: state_fingerprint(pool.expert_state(t)) for t in pool.tasks}
    assert len(set(meta["experts"].values())) == len(pool.tasks)
    assert "hyper_parameters" not in ckpt  # a checkpoint holds state, never configuration
    assert path.stat().st_size < 20_000  # the frozen encoder (tens of kB here) is not in it
    assert not torch.equal(system.temperature.detach(), torch.ones(3))
    restored = ScaledProbe.load_from_checkpoint(path, pool=pool)
    torch.testing.assert_close(restored.temperature, system.temperature)


def test_checkpoint_from_another_pool_or_task_list_is_refused(tmp_path):
    pool = make_tiny_pool()
    path = fit_with_checkpoint(tmp_path, ScaledProbe(pool))
    other = ModelPool(pool.encoder, {t: pool.expert_state(t) for t in pool.tasks}, pool.heads, name="other")
    with pytest.raises(CheckpointMismatchError, match="pool = 'tiny', this run has 'other'"):
        ScaledProbe.load_from_checkpoint(path, pool=other)
    # Resuming a fit with a different task list fails before any step.
    system = ScaledProbe(pool, tasks=["task0", "task1"])
    dm = TestTimeDataModule(TinySource(n=8), tasks=["task0", "task1"], batch_size=4)
    with pytest.raises(CheckpointMismatchError, match="tasks"):
        trainer(tmp_path, max_steps=5).fit(system, dm, ckpt_path=path)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        ScaledProbe(pool).load_state_dict({})


def test_fit_end_exports_learned_parameters_and_metrics(tmp_path):
    pool = make_tiny_pool()
    out = tmp_path / "export"
    system = ScaledProbe(pool, export_dir=str(out))
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, steps_per_epoch=2)
    trainer(tmp_path, max_steps=2).fit(system, dm)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["logged"]) == {"val/acc/task0", "val/acc/task1", "val/acc/task2", "val/acc/avg"}
    assert set(metrics["accuracy"]) == {"task0", "task1", "task2"}
    logged = metrics["logged"]
    assert logged["val/acc/avg"] == pytest.approx(sum(logged[f"val/acc/task{k}"] for k in range(3)) / 3)
    assert metrics["accuracy"] == {f"task{k}": pytest.approx(logged[f"val/acc/task{k}"]) for k in range(3)}
    assert metrics["avg"] == pytest.approx(logged["val/acc/avg"]) and metrics["method"] == "ScaledProbe"
    learned = load_file(out / "learned.safetensors")
    torch.testing.assert_close(learned["temperature"], system.temperature.detach())


def test_metrics_say_which_step_they_were_measured_at(tmp_path):
    pool = make_tiny_pool()
    out = tmp_path / "export"
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, steps_per_epoch=2)
    trainer(tmp_path, max_steps=2).fit(ScaledProbe(pool, export_dir=str(out)), dm)
    assert json.loads((out / "metrics.json").read_text())["evaluated_at_step"] == 2
    # 3 steps with validation every 2: the export is step 3's, the metrics step 2's, and it says so
    with pytest.warns(UserWarning, match="last validation ran at step 2, the exported model is from step 3"):
        trainer(tmp_path, max_steps=3).fit(ScaledProbe(pool, export_dir=str(tmp_path / "export3")), dm)
    metrics = json.loads((tmp_path / "export3" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["evaluated_at_step"] == 2
