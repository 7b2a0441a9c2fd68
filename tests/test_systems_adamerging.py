"""AdaMerging LightningModule: a short fit lowers the entropy; checkpoints, export, diagnostics."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_data_datamodule import TinySource

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.losses import entropy
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.base import CheckpointMismatchError


def soft_pool(name: str = "tiny", logit_scale: float = 10.0) -> ModelPool:
    """The tiny pool with a moderate logit scale (entropy far from saturated), task vectors enlarged."""
    p = make_tiny_pool(scale=0.2)
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, logit_scale, name=name)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return quiet_trainer(tmp_path, **{"limit_val_batches": 0, **kwargs})


def summed_entropy(system: AdaMerging, src: TinySource) -> float:
    with torch.no_grad():
        return sum(
            entropy(system.task_logits(t, src.dataset(t, "test").tensors[0])).mean().item()
            for t in system.tasks
        )


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_short_fit_lowers_entropy(tmp_path, granularity):
    pool, src = soft_pool(), TinySource(n=16)
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity=granularity), optimizer=lambda params: torch.optim.Adam(params, lr=0.05))
    before = summed_entropy(system, src)
    dm = TestTimeDataModule(src, batch_size=8, steps_per_epoch=15)
    trainer(tmp_path, max_steps=15).fit(system, dm)
    after = summed_entropy(system, src)
    print(f"summed entropy {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)
    coef = system.model.coefficients()
    assert not torch.allclose(coef, torch.full_like(coef, 0.3))
    assert coef.min() >= 0 and coef.max() <= 1


def test_adaptation_losses_match_per_task_forward():
    pool = soft_pool()
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"))
    g = torch.Generator().manual_seed(2)
    images = {t: torch.randn(3, 3, 16, 16, generator=g) for t in pool.tasks}
    losses = system.adaptation_losses(images)  # one merge, one concatenated forward
    encoder = pool.build_encoder(system.model.merged_state_dict())
    for t, x in images.items():
        logits = pool.logit_scale * F.normalize(encoder(x), dim=-1) @ pool.heads[t].t()
        torch.testing.assert_close(losses[t], entropy(logits).mean(), rtol=1e-4, atol=1e-5)


def test_validation_names_and_values(tmp_path):
    pool, src = soft_pool(), TinySource(n=10)
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="task"))
    dm = TestTimeDataModule(src, eval_batch_size=4)
    metrics = trainer(tmp_path, limit_val_batches=None).validate(system, dm, verbose=False)[0]
    encoder = pool.build_encoder(system.model.merged_state_dict())
    accs = []
    for t in pool.tasks:
        x, y = src.dataset(t, "test").tensors
        accs.append((encoder(x) @ pool.heads[t].t()).argmax(-1).eq(y).float().mean().item())
        assert metrics[f"val/acc/{t}"] == pytest.approx(accs[-1], abs=1e-6)
    assert metrics["val/acc/avg"] == pytest.approx(sum(accs) / 3, abs=1e-6)
    assert set(metrics) == {"val/acc/task0", "val/acc/task1", "val/acc/task2", "val/acc/avg"}


def test_checkpoint_is_coefficients_only_and_restores(tmp_path):
    pool = soft_pool()
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, steps_per_epoch=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(system, dm)
    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=False)
    assert list(state["state_dict"]) == ["model.lambdas"]
    assert "hyper_parameters" not in state  # state, never configuration
    assert state["adamerge"]["method"] == {"component": "adamerge.components.adamerging.AdaMergingModel",
                                           "granularity": "layer", "clamp": True,
                                           "directions": {"method": "task_arithmetic"}}
    assert path.stat().st_size < 20_000
    restored = AdaMerging.load_from_checkpoint(path, pool=pool)
    torch.testing.assert_close(restored.model.lambdas, system.model.lambdas)
    other = soft_pool(name="other-pool")
    with pytest.raises(CheckpointMismatchError, match="pool = 'tiny', this run has 'other-pool'"):
        AdaMerging.load_from_checkpoint(path, pool=other)
    with pytest.raises(CheckpointMismatchError, match="tasks"):
        AdaMerging.load_from_checkpoint(path, pool=pool, tasks=["task0", "task1"])
    with pytest.raises(CheckpointMismatchError, match="method.granularity = 'layer', this run has 'task'"):
        AdaMerging.load_from_checkpoint(path, pool=pool, model=partial(AdaMergingModel, granularity="task"))
    with pytest.raises(CheckpointMismatchError, match="method.directions"):  # λ learned on other directions
        AdaMerging.load_from_checkpoint(path, pool=pool, model=partial(AdaMergingModel, directions="cart"))


def test_export_writes_merged_model_and_coefficients(tmp_path):
    pool = soft_pool()
    out = tmp_path / "export"
    system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"), export_dir=str(out))
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, eval_batch_size=8, steps_per_epoch=2)
    trainer(tmp_path, max_steps=2, limit_val_batches=None).fit(system, dm)
    merged = load_file(out / "merged.safetensors")
    expected = system.model.merged_state_dict()
    assert set(merged) == set(pool.pretrained_state())
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v)
    data = json.loads((out / "coefficients.json").read_text())
    assert data["tasks"] == pool.tasks and data["layers"] == system.model.layer_names
    torch.testing.assert_close(torch.tensor(data["coefficients"]), system.model.coefficients().detach())
    torch.testing.assert_close(
        load_file(out / "coefficients.safetensors")["coefficients"], system.model.coefficients().detach()
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["logged"]) == {"val/acc/task0", "val/acc/task1", "val/acc/task2", "val/acc/avg"}
    assert set(metrics["accuracy"]) == {"task0", "task1", "task2"}


def test_diagnostics_give_the_coefficients_as_plain_data():
    pool = soft_pool()
    layer = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer", init_lam=0.4, clamp=False))
    with torch.no_grad():
        layer.model.lambdas[1, 2] = 1.7  # an unclamped λ is shown as it is
    d = layer.diagnostics()["coefficients"]
    assert (d["tasks"], d["layers"], d["clamp"]) == (pool.tasks, layer.model.layer_names, False)
    assert d["init_lam"] == pytest.approx(0.4)  # λ's float32 value
    expected = torch.full((3, len(layer.model.layer_names)), 0.4)
    expected[1, 2] = 1.7
    torch.testing.assert_close(d["values"], expected)
    task = AdaMerging(pool, model=partial(AdaMergingModel, granularity="task"))
    with torch.no_grad():
        task.model.lambdas[0, 0] = 1.5  # clamped to 1 in the merge, and in what is shown
    d = task.diagnostics()["coefficients"]
    assert d["layers"] == ["all"] and d["init_lam"] == pytest.approx(0.3)
    torch.testing.assert_close(d["values"], torch.tensor([[1.0], [0.3], [0.3]]))


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    pool, src = soft_pool(), TinySource(n=12)

    def run(max_steps, ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        system = AdaMerging(pool, model=partial(AdaMergingModel, granularity="layer"), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
        dm = TestTimeDataModule(src, batch_size=4, steps_per_epoch=4, seed=3)
        tr = trainer(
            tmp_path, max_steps=max_steps, enable_checkpointing=bool(callbacks), callbacks=list(callbacks)
        )
        tr.fit(system, dm, ckpt_path=ckpt_path)
        return system.model.lambdas.detach().clone()

    full = run(6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    first = run(3, callbacks=[ckpt])  # killed mid-way through the first epoch (step 3 of 4)
    assert not torch.allclose(first, full)
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    resumed = run(6, ckpt_path=tmp_path / "ckpt" / "last.ckpt", callbacks=[again])
    torch.testing.assert_close(resumed, full)
