"""Surgery LightningModule: loss and logits against written-out computations, training, checkpoints, export."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from adamerge.components.surgery import SurgeryModel
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.merging.task_vectors import MergeError, add_task_vector, sum_task_vectors
from adamerge.systems.base import CheckpointMismatchError
from adamerge.systems.surgery import Surgery


class _TinySource:
    """Per-task labeled random images; class counts equal the tiny pool's heads (3 + k)."""

    def __init__(self, num_tasks: int = 3, n: int = 24) -> None:
        self._data = {}
        for k in range(num_tasks):
            g = torch.Generator().manual_seed(100 + k)
            self._data[f"task{k}"] = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % (3 + k))

    @property
    def tasks(self) -> list[str]:
        return list(self._data)

    def dataset(self, task: str, split: str):
        return self._data[task]


def _ta_state(pool, lam=0.3):
    taus = [tau for _, tau in pool.task_vectors()]
    return add_task_vector(pool.pretrained_state(), sum_task_vectors(taus), lam)


def _hand_block_means(visual, images):
    """Final embedding and each block's token mean of an open_clip ViT, forward written out here."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    means = []
    for block in visual.transformer.resblocks:
        x = block(x)
        means.append(x.mean(dim=1))
    return visual.ln_post(x)[:, 0] @ visual.proj, means


def _images(n=6, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _trainer(tmp_path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
        limit_val_batches=0, **kw,
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_loss_and_logits_match_written_out_computations_at_init(version):
    pool = make_tiny_pool()
    system = Surgery(pool, base_merge={"method": "task_arithmetic", "lam": 0.3}, model=partial(SurgeryModel, version=version, rank=4))
    merged = pool.build_encoder(_ta_state(pool))
    x = _images()
    with torch.no_grad():
        for task in pool.tasks:
            expert = pool.build_encoder(pool.expert_state(task))
            m_final, m_means = _hand_block_means(merged, x)
            e_final, e_means = _hand_block_means(expert, x)
            expected = (m_final - e_final).abs().mean()
            if version == "v2":
                expected = expected + sum((a - b).abs().mean() for a, b in zip(m_means, e_means))
            torch.testing.assert_close(system.adaptation_loss(task, x), expected, rtol=1e-4, atol=1e-6)
            logits = 100.0 * F.normalize(m_final, dim=-1) @ pool.head(task).t()
            torch.testing.assert_close(system.task_logits(task, x), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fit_trains_only_aligners_and_pulls_features_toward_the_expert(tmp_path, version):
    pool = make_tiny_pool(scale=0.2)
    system = Surgery(pool, optimizer=partial(torch.optim.Adam, lr=1e-2), model=partial(SurgeryModel, version=version, rank=8))
    frozen_before = {k: v.clone() for k, v in system.model.frozen_state_dict().items()}
    x = _images(16, seed=5)
    with torch.no_grad():
        before = {t: system.adaptation_loss(t, x).item() for t in pool.tasks}
    dm = TestTimeDataModule(_TinySource(), batch_size=8, steps_per_epoch=20)
    _trainer(tmp_path, steps=20).fit(system, datamodule=dm)
    with torch.no_grad():
        after = {t: system.adaptation_loss(t, x).item() for t in pool.tasks}
    assert all(after[t] < before[t] for t in pool.tasks), (before, after)
    frozen_after = system.model.frozen_state_dict()
    assert frozen_before and all(torch.equal(frozen_before[k], v) for k, v in frozen_after.items())
    names = [n for n, p in system.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("model.aligners.", "model.block_aligners.")) for n in names)
    assert all(torch.count_nonzero(p) > 0 for n, p in system.named_parameters() if ".up." in n)


def test_ddp_ignores_the_frozen_encoder():
    system = Surgery(make_tiny_pool(), model=partial(SurgeryModel, version="v2", rank=4))
    system.setup("fit")
    ignored = set(system._ddp_params_and_buffers_to_ignore)
    frozen = {f"model.encoder.{k}" for k in system.model.frozen_state_dict()}
    assert frozen and frozen <= ignored  # never broadcast, never bucketed
    assert not ignored & {n for n, _ in system.named_parameters()}


def test_checkpoint_holds_only_aligners_and_refuses_other_shapes(tmp_path):
    pool = make_tiny_pool()
    system = Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4))
    dm = TestTimeDataModule(_TinySource(), batch_size=4, steps_per_epoch=2)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(system, datamodule=dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt["state_dict"]) == {n for n, _ in system.named_parameters()}
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == system.model.trainable_parameter_count()
    fresh = Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4))
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(fresh.task_logits("task1", x), system.task_logits("task1", x))
    with pytest.raises(CheckpointMismatchError, match="method.version = 'v2', this run has 'v1'"):
        Surgery(pool, model=partial(SurgeryModel, version="v1", rank=4)).on_load_checkpoint(ckpt)
    with pytest.raises(CheckpointMismatchError, match="method.rank = 4, this run has 8"):
        Surgery(pool, model=partial(SurgeryModel, version="v2", rank=8)).on_load_checkpoint(ckpt)
    with pytest.raises(CheckpointMismatchError, match="tasks"):
        Surgery(pool, tasks=["task0", "task1"], model=partial(SurgeryModel, version="v2", rank=4)).on_load_checkpoint(ckpt)


def test_export_writes_aligners_metadata_and_merged_model_that_load_back(tmp_path):
    pool = make_tiny_pool()
    system = Surgery(pool, export_dir=str(tmp_path / "out"), model=partial(SurgeryModel, version="v2", rank=4))
    with torch.no_grad():
        for p in system.parameters():
            p.normal_(0, 0.1)
    system.export(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert info["version"] == "v2" and info["tasks"] == pool.tasks and info["depth"] == 2
    assert info["trainable_parameters"] == system.model.trainable_parameter_count()
    merged = load_file(str(tmp_path / "out" / "merged.safetensors"))
    ref = _ta_state(pool)
    assert all(torch.allclose(merged[k], ref[k], atol=1e-6) for k in ref)
    fresh = Surgery(pool, base_merge=str(tmp_path / "out" / "merged.safetensors"), model=partial(SurgeryModel, version="v2", rank=4))
    fresh.load_aligners(tmp_path / "out" / "learned.safetensors")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(fresh.task_logits("task2", x), system.task_logits("task2", x))
    with pytest.raises(ValueError, match="not in this model"):
        Surgery(pool, model=partial(SurgeryModel, version="v1", rank=4)).load_aligners(tmp_path / "out" / "learned.safetensors")
    with pytest.raises(ValueError, match="tasks"):
        Surgery(pool, tasks=["task0"], model=partial(SurgeryModel, version="v2", rank=4)).load_aligners(tmp_path / "out" / "learned.safetensors")


def test_base_merge_from_an_adamerging_style_export(tmp_path):
    pool = make_tiny_pool()
    state = {k: 0.5 * v for k, v in pool.expert_state("task0").items()}
    path = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    system = Surgery(pool, base_merge=str(path), model=partial(SurgeryModel, version="v1", rank=4))
    x = _images()
    with torch.no_grad():
        f = pool.build_encoder(state)(x)
        torch.testing.assert_close(system.model("task0", x).final, f)


def test_half_precision_experts_give_a_close_loss():
    pool = make_tiny_pool(scale=0.2)
    x = _images()
    with torch.no_grad():
        full = Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4)).adaptation_loss("task1", x)
        half = Surgery(pool, expert_dtype="bfloat16", cache_experts=False, model=partial(SurgeryModel, version="v2", rank=4))
        torch.testing.assert_close(half.adaptation_loss("task1", x), full, rtol=0.05, atol=0.01)


def test_bad_configuration_is_refused_before_training():
    pool = make_tiny_pool()
    with pytest.raises(ValueError, match="expert_dtype"):
        Surgery(pool, expert_dtype="int8")
    with pytest.raises(ValueError, match="rank must be at least 1"):
        Surgery(pool, model=partial(SurgeryModel, rank=0))
    with pytest.raises(ValueError, match="unknown surgery version"):
        Surgery(pool, model=partial(SurgeryModel, version="v3"))
    with pytest.raises(MergeError, match="unknown merging method 'nope'"):
        Surgery(pool, base_merge="nope")
    with pytest.raises(Exception, match="not found|does not exist"):
        Surgery(pool, base_merge="/no/such/merged.safetensors")
    with pytest.raises(ValueError, match="task 'mnist'"):
        Surgery(pool, tasks=["mnist"])


def test_v2_on_a_pool_whose_encoder_has_no_blocks_is_refused():
    from adamerge.models.pool import ModelPool

    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    state = {k: v + 0.1 for k, v in enc.state_dict().items()}
    pool = ModelPool(enc, {"a": state}, {"a": F.normalize(torch.randn(3, 8), dim=-1)})
    with pytest.raises(TypeError, match="transformer.resblocks"):
        Surgery(pool, model=partial(SurgeryModel, version="v2"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_batched_step_losses_equal_per_task_losses(version):
    pool = make_tiny_pool(scale=0.2)
    system = Surgery(pool, model=partial(SurgeryModel, version=version, rank=4))
    with torch.no_grad():
        for p in system.parameters():
            p.normal_(0, 0.1)
        images = {t: _images(4, seed=k) for k, t in enumerate(pool.tasks)}
        batched = system.adaptation_losses(images)
        for t, x in images.items():
            torch.testing.assert_close(batched[t], system.adaptation_loss(t, x), rtol=1e-5, atol=1e-6)


def test_resuming_from_a_checkpoint_of_another_version_fails_before_training(tmp_path):
    pool = make_tiny_pool()
    dm = TestTimeDataModule(_TinySource(), batch_size=4, steps_per_epoch=2)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4)), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "v2.ckpt")
    v1 = Surgery(pool, model=partial(SurgeryModel, version="v1", rank=4))
    before = {k: v.clone() for k, v in v1.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="method.version = 'v2', this run has 'v1'"):
        _trainer(tmp_path, steps=4).fit(v1, datamodule=dm, ckpt_path=str(tmp_path / "v2.ckpt"))
    assert all(torch.equal(before[k], v) for k, v in v1.state_dict().items())
