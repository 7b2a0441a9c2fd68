"""RegMean and Fisher merging as Lightning systems: one pass over the unlabeled stream, then a closed-form merge.

Every statistic is recomputed here independently of adamerge.systems: the linear layers' inputs by a
forward written out by hand (attention included), the Fishers from per-example autograd gradients.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import make_tiny_pool, quiet_trainer
from safetensors.torch import load_file
from test_data_datamodule import TinySource
from torch import nn

from adamerge.data.datamodule import TestTimeDataModule
from adamerge.merging.fisher import fisher_merge
from adamerge.merging.regmean import regmean_merge, regmean_solve
from adamerge.merging.task_vectors import linear_combination
from adamerge.models.pool import ModelPool, zero_shot_logits
from adamerge.systems.fisher import FisherMerging
from adamerge.systems.regmean import RegMean, attention_context
from adamerge.systems.runs import CheckpointMismatchError
from adamerge.systems.statistics import StatisticsMerge

LINEAR = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def pool(scale: float = 0.2, logit_scale: float = 10.0) -> ModelPool:
    """The tiny pool with enlarged task vectors and a moderate logit scale (predictions not one-hot, so
    the Fisher's expectation over labels weighs several classes)."""
    p = make_tiny_pool(scale=scale)
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, logit_scale, name="tiny")


class Batches(L.Callback):
    """Keeps a copy of every training batch the system saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append({t: x.clone() for t, x in batch.items()})


def run(system, steps: int = 2, batch: int = 4, tmp_path=None, **trainer_kwargs):
    batches = Batches()
    dm = TestTimeDataModule(TinySource(n=12), batch_size=batch, eval_batch_size=6, steps_per_epoch=steps)
    trainer = quiet_trainer(tmp_path, callbacks=[batches], **{"limit_val_batches": 0, "max_epochs": -1, **trainer_kwargs})
    trainer.fit(system, dm)
    return trainer, batches.seen, dm


# ---- the linear layers' inputs, by hand -------------------------------------------------------
def block_inputs(block: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inputs of a block's four linear maps and its output, written out (tiny CLIP: batch-first);
    checks that the written-out attention and block give the modules' outputs."""
    attn = block.attn
    h = block.ln_1(x)
    b, t, d = h.shape
    heads, hd = attn.num_heads, d // attn.num_heads
    q, k, v = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (z.view(b, t, heads, hd).transpose(1, 2) for z in (q, k, v))
    ctx = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1) @ v
    ctx = ctx.transpose(1, 2).reshape(b, t, d)
    attn_out = ctx @ attn.out_proj.weight.t() + attn.out_proj.bias
    torch.testing.assert_close(attn_out, attn(h, h, h, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    mid = x + attn_out
    m = block.ln_2(mid)
    act = block.mlp.gelu(block.mlp.c_fc(m))
    out = mid + block.mlp.c_proj(act)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    return dict(zip(LINEAR, (h, ctx, m, act))), out


def add_grams(grams: dict, prefix: str, inputs: dict[str, torch.Tensor]) -> None:
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).double()
        s, n = grams.get(prefix + name, (0, 0))
        grams[prefix + name] = (s + x.t() @ x, n + x.shape[0])


def means(grams: dict) -> dict[str, torch.Tensor]:
    return {k: s / n for k, (s, n) in grams.items()}


def expert_grams(p: ModelPool, task: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    enc = p.build_encoder(p.expert_state(task))
    grams: dict = {}
    with torch.no_grad():
        for batch in batches:
            x = enc._embeds(batch[task])
            for i, block in enumerate(enc.transformer.resblocks):
                inputs, x = block_inputs(block, x)
                add_grams(grams, f"transformer.resblocks.{i}.", inputs)
    return means(grams)


# ---- the pass ---------------------------------------------------------------------------------
def test_the_pass_reads_one_epoch_of_batches_and_stops_without_an_optimizer(tmp_path):
    system = RegMean(pool())
    trainer, seen, _ = run(system, steps=3, tmp_path=tmp_path, max_steps=2)  # max_steps cannot end it
    assert system.batches_seen == len(seen) == 3 and trainer.global_step == 0
    assert sum(len(g["params"]) for o in trainer.optimizers for g in o.param_groups) == 0
    assert system.images_seen == {t: 12 for t in system.tasks}
    assert list(system.parameters()) == [] and system.learnable_state_dict() == {}
    assert trainer.current_epoch == 1 and trainer.should_stop


def test_without_the_stop_max_steps_never_ends_it(tmp_path):
    """Lightning's global_step counts optimizer steps: without an optimizer it stays 0, so only the epoch
    limit ends a pass that does not stop itself."""

    class NoStop(RegMean):
        def on_train_epoch_end(self) -> None:
            pass

    system = NoStop(pool())
    trainer, seen, _ = run(system, steps=2, tmp_path=tmp_path, max_steps=1, max_epochs=3)
    assert trainer.global_step == 0 and system.batches_seen == len(seen) == 6


def test_regmean_equals_the_pure_merge_on_grams_recomputed_by_hand(tmp_path):
    p = pool()
    system = RegMean(p, alpha=0.9)
    _, seen, _ = run(system, steps=2, tmp_path=tmp_path)
    grams = [expert_grams(p, t, seen) for t in p.tasks]
    got = system.grams()
    for t, g in zip(p.tasks, grams):
        assert set(got[t]) == set(g) and len(g) == 8  # two blocks x four linear maps, attention included
        for key in g:
            assert got[t][key].dtype == torch.float64
            torch.testing.assert_close(got[t][key], g[key], rtol=1e-5, atol=1e-6)  # float32 inputs
    expected = regmean_merge([p.expert_state(t) for t in p.tasks], grams, alpha=0.9)
    merged = system.merged_state_dict()
    average = linear_combination([p.expert_state(t) for t in p.tasks], [1 / 3] * 3)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-5)
    for key in grams[0]:  # RegMean, not the average (the released pipeline's silent fallback)
        assert (merged[key] - average[key]).abs().max() > 1e-3, key


def test_attention_context_is_what_out_proj_receives():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32)  # batch 3, 5 tokens, width 32: no dimension alike
    for batch_first in (True, False):
        attn = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
        inp = x if batch_first else x.transpose(0, 1)
        out = attn(inp, inp, inp, need_weights=False)[0]
        ctx = attention_context(attn, inp)
        torch.testing.assert_close(nn.functional.linear(ctx, attn.out_proj.weight, attn.out_proj.bias), out)


def plus_plus_reference(p: ModelPool, batches: list[dict[str, torch.Tensor]], alpha: float) -> dict:
    """RegMean++ written out: the average's stem, then block by block the experts' Grams on the merged
    model's tokens (the hand-written block inputs above)."""
    states = [p.expert_state(t) for t in p.tasks]
    merged = linear_combination(states, [1 / len(states)] * len(states))
    enc = p.build_encoder(merged)
    experts = [p.build_encoder(s) for s in states]
    with torch.no_grad():
        tokens = {t: [enc._embeds(b[t]) for b in batches] for t in p.tasks}
        for i, block in enumerate(enc.transformer.resblocks):
            prefix = f"transformer.resblocks.{i}."
            grams = []
            for t, expert in zip(p.tasks, experts):
                g: dict = {}
                for x in tokens[t]:
                    add_grams(g, prefix, block_inputs(expert.transformer.resblocks[i], x)[0])
                grams.append(means(g))
            for key in grams[0]:
                merged[key] = regmean_solve([s[key] for s in states], [g[key] for g in grams], alpha)
            enc.load_state_dict(merged)
            tokens = {t: [block(x) for x in xs] for t, xs in tokens.items()}
    return merged


def test_regmean_plus_plus_takes_each_blocks_inputs_from_the_merged_model(tmp_path):
    p = pool()
    system = RegMean(p, alpha=0.95, plus_plus=True)
    _, seen, _ = run(system, steps=2, tmp_path=tmp_path)
    merged = plus_plus_reference(p, seen, alpha=0.95)
    got = system.merged_state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    plain = RegMean(p, alpha=0.95)
    run(plain, steps=2, tmp_path=tmp_path)
    key = "transformer.resblocks.1.mlp.c_fc.weight"  # a later block: the inputs differ from plain RegMean's
    assert (plain.merged_state_dict()[key] - got[key]).abs().max() > 1e-4


# ---- Fisher -------------------------------------------------------------------------------------
def per_example_fisher(p: ModelPool, task: str, images: list[torch.Tensor], labels=None) -> dict[str, torch.Tensor]:
    """Σ_x Σ_y w_y (∂ log p_y(x) / ∂θ)² / n with autograd, one example and one class at a time;
    w = p(y | x) (exact) or 1 for the given label."""
    enc = p.build_encoder(p.expert_state(task)).requires_grad_(True)
    params = dict(enc.named_parameters())
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for b, batch in enumerate(images):
        for i in range(batch.shape[0]):
            log_p = torch.log_softmax(zero_shot_logits(enc(batch[i:i + 1]), p.heads[task], p.logit_scale)[0], -1)
            classes = range(log_p.shape[0]) if labels is None else [int(labels[b][i])]
            for y in classes:
                grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=True)
                w = float(log_p[y].detach().exp()) if labels is None else 1.0
                for (k, _), g in zip(params.items(), grads):
                    total[k] += w * g.square()
            n += 1
    return {k: v / n for k, v in total.items()}


def test_exact_fisher_equals_per_example_gradients_and_the_merge_the_pure_function(tmp_path):
    p = pool()
    system = FisherMerging(p, chunk=3)  # 3 vectors at a time: classes split in chunks of 3 (4 and 5 classes)
    _, seen, _ = run(system, steps=2, batch=3, tmp_path=tmp_path)
    fishers = [per_example_fisher(p, t, [b[t] for b in seen]) for t in p.tasks]
    got = system.fishers()
    for t, f in zip(p.tasks, fishers):
        for key, value in f.items():
            torch.testing.assert_close(got[t][key], value, rtol=1e-4, atol=1e-9)
    wide = FisherMerging(p)  # default chunk: all classes of several examples in one vmap
    for batch in seen:
        for t in p.tasks:
            wide.accumulate(t, batch[t])
    for t in p.tasks:
        for key, value in wide.fishers()[t].items():
            torch.testing.assert_close(value, got[t][key], rtol=1e-4, atol=1e-9)
    expected = fisher_merge([p.expert_state(t) for t in p.tasks], fishers)
    merged = system.merged_state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-6)


def test_sampled_fisher_uses_one_label_drawn_from_each_prediction():
    p = pool()
    system = FisherMerging(p, estimator="sampled")
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 16, 16, generator=g)]
    torch.manual_seed(7)
    system.accumulate("task1", images[0])
    torch.manual_seed(7)  # the same draw, from the expert's predicted distribution
    enc = p.build_encoder(p.expert_state("task1"))
    with torch.no_grad():
        probs = torch.softmax(zero_shot_logits(enc(images[0]), p.heads["task1"], p.logit_scale), -1)
    labels = [torch.multinomial(probs, 1).squeeze(1)]
    expected = per_example_fisher(p, "task1", images, labels)
    for key, value in expected.items():
        torch.testing.assert_close(system.fishers()["task1"][key], value, rtol=1e-4, atol=1e-9)


def test_batch_fisher_is_fusionbenchs_squared_batch_gradient():
    p = pool()
    system = FisherMerging(p, estimator="batch")
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    system.accumulate("task2", x)
    enc = p.build_encoder(p.expert_state("task2")).requires_grad_(True)
    log_p = torch.log_softmax(zero_shot_logits(enc(x), p.heads["task2"], p.logit_scale), -1)
    loss = (log_p.detach().exp().sqrt() * log_p).sum(-1).sum(0)
    grads = torch.autograd.grad(loss, list(enc.parameters()))
    for (key, _), g in zip(enc.named_parameters(), grads):
        expected = g.square() / 5
        torch.testing.assert_close(system.fishers()["task2"][key], expected, rtol=1e-3, atol=1e-6 * float(expected.max()))


# ---- evaluation, export, caching, errors ----------------------------------------------------------
def test_validation_uses_the_merged_model_and_export_writes_it(tmp_path):
    p = pool()
    out = tmp_path / "export"
    system = FisherMerging(p, estimator="batch", export_dir=str(out))
    trainer, _, dm = run(system, steps=2, tmp_path=tmp_path, limit_val_batches=None)
    merged = system.merged_state_dict()
    encoder = p.build_encoder(merged)
    src = dm.source
    for t in p.tasks:
        x, y = src.dataset(t, "test").tensors
        acc = (encoder(x) @ p.heads[t].t()).argmax(-1).eq(y).float().mean().item()
        assert float(trainer.callback_metrics[f"val/acc/{t}"]) == pytest.approx(acc, abs=1e-6)
    files = load_file(out / "merged.safetensors")
    assert set(files) == set(merged) and all(torch.equal(files[k], merged[k]) for k in merged)
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["batches_seen"] == 2 and stats["estimator"] == "batch" and stats["tasks"] == p.tasks
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["accuracy"]) == set(p.tasks)
    assert not (out / "learned.safetensors").exists()  # nothing learns


def test_the_merge_is_recomputed_only_when_the_statistics_change():
    system = RegMean(pool())
    calls = []
    original = system.merge_statistics
    system.merge_statistics = lambda: calls.append(1) or original()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    system.training_step({t: x for t in system.tasks}, 0)
    first = system.merged_state_dict()
    system.task_logits("task0", x)
    system.merged_state_dict()
    assert len(calls) == 1
    system.training_step({t: x * 2 for t in system.tasks}, 1)
    second = system.merged_state_dict()
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert len(calls) == 2 and not torch.equal(first[key], second[key])


def test_errors_before_a_pass_on_resume_and_on_bad_options(tmp_path):
    p = pool()
    dm = TestTimeDataModule(TinySource(n=8), batch_size=4, eval_batch_size=8, steps_per_epoch=1)
    with pytest.raises(RuntimeError, match="RegMean has no statistics yet: run fit"):
        quiet_trainer(tmp_path).validate(RegMean(p), dm, verbose=False)
    system = RegMean(p, layers="mlp")
    trainer, _, _ = run(system, steps=1, tmp_path=tmp_path, num_sanity_val_steps=2, limit_val_batches=None)
    assert all("mlp" in k for k in system.regmean_keys) and len(system.regmean_keys) == 4  # the sanity check
    assert trainer.num_sanity_val_steps == 2 and "val/acc/avg" in trainer.callback_metrics  # skipped, then ran
    path = tmp_path / "pass.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match="RegMean keeps its statistics out of checkpoints"):
        quiet_trainer(tmp_path, limit_val_batches=0, max_epochs=-1).fit(RegMean(p, layers="mlp"), dm, ckpt_path=path)
    with pytest.raises(ValueError, match="layers='nothing' matches none of the linear weights"):
        RegMean(p, layers="nothing")
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 2"):
        RegMean(p, alpha=2)
    with pytest.raises(ValueError, match="estimator must be one of exact, sampled, batch, got 'hard'"):
        FisherMerging(p, estimator="hard")
    with pytest.raises(ValueError, match="training batch has task 'other'"):
        system.training_step({"other": torch.zeros(1, 3, 16, 16)}, 0)
    assert issubclass(RegMean, StatisticsMerge) and issubclass(FisherMerging, StatisticsMerge)
