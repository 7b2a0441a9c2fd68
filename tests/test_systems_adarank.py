"""AdaRank LightningModule: fits through a real Trainer, exports the merged model and the kept ranks,
checkpoints only λ and the mask logits, and hands its ranks to the W&B story."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_components_adarank import explicit_merge, masks_by_matrix, soft_pool
from test_data_datamodule import TinySource

from adamerge.components.adarank import AdaRankModel
from adamerge.components.losses import entropy
from adamerge.data.datamodule import TestTimeDataModule
from adamerge.systems.adarank import AdaRank
from adamerge.systems.base import CheckpointMismatchError
from adamerge.wandb_story import diagnostics_media, rank_heatmap

FAST = partial(AdaRankModel, mask_temp=1.0)  # logits start at ±0.1: lr 0.05 flips masks within a few steps


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def hard_counts(model: AdaRankModel, logits: torch.Tensor) -> dict[str, list[int]]:
    """{matrix name: kept components per task}, counted here from the logits: sigmoid(z / T) > 1/2."""
    out, offset = {}, 0
    for mat in model.matrices:
        on = torch.sigmoid(logits[:, offset : offset + mat.rank] / model.mask_temp) > 0.5
        out[mat.name] = on.sum(1).tolist()
        offset += mat.rank
    return out


def summed_entropy(system: AdaRank, src: TinySource) -> float:
    with torch.no_grad():
        return sum(entropy(system.task_logits(t, src.dataset(t, "test").tensors[0])).mean().item()
                   for t in system.tasks)


def test_fit_exports_the_merged_model_and_the_hard_masks_ranks(tmp_path):
    pool, src = soft_pool(), TinySource(n=16)
    out = tmp_path / "export"
    system = AdaRank(pool, model=FAST, optimizer=adam(0.05), export_dir=str(out))
    before = summed_entropy(system, src)
    dm = TestTimeDataModule(src, batch_size=8, eval_batch_size=16, steps_per_epoch=12)
    quiet_trainer(tmp_path, max_steps=12).fit(system, dm)
    after = summed_entropy(system, src)
    assert after < before - 0.05, (before, after)

    learned = load_file(out / "learned.safetensors")
    assert set(learned) == {"model.lambdas", "model.mask_logits"}
    model = system.model
    torch.testing.assert_close(learned["model.mask_logits"], model.mask_logits.detach())
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["tasks"] == pool.tasks and ranks["matrices"] == model.matrix_names and len(ranks["matrices"]) == 12
    assert ranks["full_rank"] == [32] * 12 and ranks["stored_rank"] == [32] * 12
    counts = hard_counts(model, learned["model.mask_logits"])
    assert ranks["ranks"] == [[counts[name][k] for name in ranks["matrices"]] for k in range(3)]
    assert min(min(row) for row in ranks["ranks"]) < 32  # the fit pruned components

    merged = load_file(out / "merged.safetensors")
    taus = [pool.task_vector(t) for t in pool.tasks]
    expected = explicit_merge(pool.pretrained_state(), taus, learned["model.lambdas"], masks_by_matrix(model), temp=1.0)
    assert set(merged) == set(pool.pretrained_state())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-5, msg=key)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "AdaRank" and set(metrics["accuracy"]) == set(pool.tasks)


def test_checkpoint_holds_lambdas_and_mask_logits_only_and_restores(tmp_path):
    pool = soft_pool()
    model = partial(AdaRankModel, directions={"method": "cart", "rank_ratio": 1.0}, init_lam=2.3,
                    initial_rank_ratio=0.16, split_qkv=False)
    system = AdaRank(pool, model=model, optimizer=adam(0.05))
    assert system.method_label == "AdaRank+CART"
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, steps_per_epoch=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(system, dm)
    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=False)
    assert list(state["state_dict"]) == ["model.lambdas", "model.mask_logits"]
    assert state["adamerge"]["method"] == {
        "component": "adamerge.components.adarank.AdaRankModel", "granularity": "layer", "clamp": False,
        "directions": {"method": "cart", "rank_ratio": 1.0}, "mask_temp": 10.0, "split_qkv": False,
        "max_rank_ratio": 1.0}
    assert path.stat().st_size < 40_000  # λ and 3 × 256 logits, no factors
    restored = AdaRank.load_from_checkpoint(path, pool=pool, model=model)
    torch.testing.assert_close(restored.model.mask_logits, system.model.mask_logits)
    torch.testing.assert_close(restored.model.merged_state_dict(), system.model.merged_state_dict())
    with pytest.raises(CheckpointMismatchError, match="split_qkv"):
        AdaRank.load_from_checkpoint(path, pool=pool, model=partial(model, split_qkv=True))


def test_diagnostics_give_the_ranks_and_the_story_draws_them():
    pool = soft_pool()
    system = AdaRank(pool, model=partial(AdaRankModel, initial_rank_ratio=0.5))
    with torch.no_grad():
        system.model.mask_logits[1, :3] = -1.0  # task1 drops 3 components of the first matrix of its group
    d = system.diagnostics()
    assert set(d) == {"coefficients", "ranks"}
    r = d["ranks"]
    assert (r["tasks"], r["layers"], r["full"]) == (pool.tasks, system.model.matrix_names, [32] * 12)
    counts = hard_counts(system.model, system.model.mask_logits.detach())
    expected = torch.tensor([[counts[name][k] for name in r["layers"]] for k in range(3)])
    torch.testing.assert_close(r["values"], expected)
    assert sorted(set(expected.flatten().tolist())) == [13, 16]  # int(0.5·32), and 16 − 3 once
    fig = rank_heatmap(r["values"], r["tasks"], r["layers"], r["full"])
    drawn = fig.axes[0].images[0].get_array()
    torch.testing.assert_close(torch.as_tensor(drawn.data, dtype=torch.float32), expected.float() / 32)
    media = diagnostics_media(d)
    assert {"ranks/heatmap", "ranks/table", "coefficients/heatmap"} <= set(media)
    assert media["ranks/table"].columns == ["task", *r["layers"]]
    assert [row[1:] for row in media["ranks/table"].data] == expected.tolist()
