"""WEMoE / E-WEMoE systems: training on the shared loop, router-only checkpoints, export, resume errors."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import make_tiny_pool
from conftest import quiet_trainer as trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from test_data_datamodule import TinySource

from adamerge.components.losses import entropy
from adamerge.components.wemoe import WEMoEModel
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.systems.base import CheckpointMismatchError
from adamerge.systems.base_merge import base_merge_state
from adamerge.systems.wemoe import WEMoE, load_wemoe


def images(n=4, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_defaults_and_learnable_parameters():
    pool = make_tiny_pool()
    system = WEMoE(pool)
    opt = system.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-4
    learnable = system.learnable_state_dict()
    assert learnable and all(k.startswith("model.routers.") for k in learnable)
    assert sum(v.numel() for v in learnable.values()) == system.model.trainable_parameter_count()
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    assert trainable == set(learnable)
    e = WEMoE(pool, model=partial(WEMoEModel, shared_router=True, keep=0.1, chunk_size=3, impl="experts"))  # E-WEMoE is a config
    assert len(e.model.routers) == 1 and e.model.config["keep"] == 0.1
    assert (e.method_label, system.method_label) == ("E-WEMoE", "WEMoE")
    assert e.model.mlps[0].chunk_size == 3 and e.model.mlps[1].impl == "experts"
    with pytest.raises(ValueError, match="tv_dtype"):
        WEMoE(pool, model=partial(WEMoEModel, tv_dtype="int8"))


def test_training_step_reduces_over_the_batch_and_evaluation_does_not():
    pool = make_tiny_pool()
    system = WEMoE(pool)
    system.log = lambda *a, **k: None
    batch = {t: images(4, seed=k) for k, t in enumerate(pool.tasks)}
    loss = system.training_step(batch, 0)
    assert system.model.mlps[0].last_weights.shape == (3,)  # one weight vector for the batch
    system.model.set_batch_reduce(True)
    expected = sum(entropy(system.task_logits(t, x)).mean() for t, x in batch.items())
    system.model.set_batch_reduce(False)
    torch.testing.assert_close(loss, expected)
    system.task_logits("task0", images(4))
    assert system.model.mlps[0].last_weights.shape == (4, 3)  # per sample outside training
    no_reduce = WEMoE(pool, model=partial(WEMoEModel, batch_reduce=False))
    no_reduce.log = system.log
    no_reduce.training_step(batch, 0)
    assert no_reduce.model.mlps[0].last_weights.shape == (4, 3)


def fit(tmp_path, system, steps=2, **kwargs):
    dm = TestTimeDataModule(TinySource(n=8), tasks=system.tasks, batch_size=4, steps_per_epoch=steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, max_steps=steps, enable_checkpointing=True, callbacks=[ckpt], **kwargs)
    tr.fit(system, dm)
    return tmp_path / "ckpt" / "last.ckpt"


def test_fit_checkpoints_routers_only_and_exports_a_rebuildable_model(tmp_path):
    pool = make_tiny_pool()
    out = tmp_path / "export"
    system = WEMoE(pool, export_dir=str(out))
    before = {k: v.clone() for k, v in system.learnable_state_dict().items()}
    path = fit(tmp_path, system)
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(before)
    assert any(not torch.equal(ckpt["state_dict"][k], before[k]) for k in before)  # routers moved
    assert path.stat().st_size < 60_000

    meta = json.loads((out / "wemoe.json").read_text())
    assert meta["tasks"] == pool.tasks and meta["num_routers"] == 2 and meta["system"] == "WEMoE"
    assert meta["trainable_parameters"] == system.model.trainable_parameter_count()
    assert meta["config"]["router_hidden_layers"] == 1 and meta["config"]["shared_router"] is False
    learned = load_file(out / "learned.safetensors")
    assert set(learned) == set(before)
    assert set(json.loads((out / "metrics.json").read_text())["logged"]) >= {"val/acc/avg", "val/acc/task0"}

    rebuilt = load_wemoe(out, pool.encoder)
    x = images(5)
    torch.testing.assert_close(rebuilt(x), system.model(x))
    assert set(rebuilt.state_dict()) == {k[len("model.") :] for k in before}


def test_export_round_trip_with_shared_router_and_bfloat16(tmp_path):
    pool = make_tiny_pool()
    system = WEMoE(pool, model=partial(WEMoEModel, shared_router=True, keep=0.1, tv_dtype="bfloat16"))
    with torch.no_grad():
        for p in system.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    system.export(tmp_path)
    rebuilt = load_wemoe(tmp_path, pool.encoder)
    assert rebuilt.mlps[0].tau_w_fc.dtype == torch.bfloat16
    assert all(m.router is rebuilt.routers[0] for m in rebuilt.mlps)
    torch.testing.assert_close(rebuilt(images()), system.model(images()))
    with pytest.raises(FileNotFoundError, match="not a WEMoE export"):
        load_wemoe(tmp_path / "nothing", pool.encoder)


def test_resume_with_other_router_layout_or_tasks_is_refused(tmp_path):
    pool = make_tiny_pool()
    path = fit(tmp_path, WEMoE(pool), limit_val_batches=0)
    shared = WEMoE(pool, model=partial(WEMoEModel, shared_router=True))
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4)
    with pytest.raises(CheckpointMismatchError, match="router"):
        trainer(tmp_path, max_steps=4).fit(shared, dm, ckpt_path=path)
    deeper = WEMoE(pool, model=partial(WEMoEModel, router_hidden_layers=2))
    with pytest.raises(CheckpointMismatchError, match="router_hidden_layers"):
        deeper.on_load_checkpoint(torch.load(path, weights_only=False))
    two = WEMoE(pool, tasks=["task0", "task1"])
    with pytest.raises(CheckpointMismatchError, match="tasks"):
        two.on_load_checkpoint(torch.load(path, weights_only=False))
    # the routers alone (as in an export) with the wrong task count
    routers = {k: v for k, v in torch.load(path, weights_only=False)["state_dict"].items()}
    save_file(routers, tmp_path / "routers.safetensors")
    with pytest.raises(CheckpointMismatchError, match="3 outputs .* merges 2"):
        two.load_routers(tmp_path / "routers.safetensors")
    same = WEMoE(pool)
    same.load_routers(tmp_path / "routers.safetensors")
    for k, v in same.learnable_state_dict().items():
        assert torch.equal(v, routers[k])


def test_base_merge_file_sets_the_non_mlp_weights(tmp_path):
    pool = make_tiny_pool()
    theta0 = pool.pretrained_state()
    merged = {k: (v + 0.5).contiguous() for k, v in theta0.items()}
    save_file(merged, tmp_path / "merged.safetensors")
    system = WEMoE(pool, base_merge=str(tmp_path / "merged.safetensors"))
    assert torch.equal(system.model.encoder.conv1.weight, merged["conv1.weight"])
    assert torch.equal(system.model.mlps[1].w0_proj, theta0["transformer.resblocks.1.mlp.c_proj.weight"])
    assert system.model.config["base_merge"].endswith("merged.safetensors")
    with pytest.raises(Exception, match="base_merge: .*not found"):
        WEMoE(pool, base_merge=str(tmp_path / "missing.safetensors"))


def test_default_base_is_the_papers_task_arithmetic_outside_the_mlps():
    pool = make_tiny_pool()
    direct = WEMoEModel(pool, base_state=base_merge_state(pool, {"method": "task_arithmetic", "lam": 0.3}))
    system = WEMoE(pool)  # the component's own one-pass task arithmetic
    for name, buf in direct.encoder.state_dict().items():
        torch.testing.assert_close(system.model.encoder.state_dict()[name], buf, rtol=0, atol=1e-6)


def test_eval_batch_reduce_averages_routing_over_each_evaluation_batch_as_the_published_numbers_did():
    """FusionBench / E-WEMoE evaluate with one routing vector per test batch (their code clears
    batch_reduce on the root module only); ``eval_batch_reduce`` reproduces that, off by default."""
    pool = make_tiny_pool()
    torch.manual_seed(0)
    published = WEMoE(pool, model=partial(WEMoEModel, eval_batch_reduce=True)).eval()
    torch.manual_seed(0)  # the same routers
    paper = WEMoE(pool).eval()
    x = images(4, seed=3)
    got = published.task_logits("task1", x)
    assert published.model.mlps[0].last_weights.shape == (3,)  # one vector for the batch
    paper.model.set_batch_reduce(True)
    torch.testing.assert_close(got, paper.task_logits("task1", x))  # same routers: the averaged-routing logits
    paper.model.set_batch_reduce(False)
    per_sample = paper.task_logits("task1", x)
    assert paper.model.mlps[0].last_weights.shape == (4, 3) and not torch.allclose(got, per_sample)
    assert not published.model.mlps[0].batch_reduce  # restored after the batch


def test_an_lr_scheduler_steps_every_training_step_and_resumes(tmp_path):
    """The original WEMoE repo anneals lr by cosine over its 1000 steps: the schedule is the system's,
    stepped per step, and saved in the checkpoint (a resume continues it)."""
    import math

    pool = make_tiny_pool()
    sched = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4)
    system = WEMoE(pool, optimizer=partial(torch.optim.Adam, lr=1e-3), lr_scheduler=sched)
    ckpt = fit(tmp_path, system, steps=2)
    lr = system.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    assert torch.load(ckpt, weights_only=True)["lr_schedulers"][0]["last_epoch"] == 2
