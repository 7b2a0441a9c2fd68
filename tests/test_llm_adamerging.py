"""Test-time AdaMerging of a causal LM: a tiny Llama (2 layers, hidden 32, vocab 64) and two experts built here,
saved as sharded HF folders; the merge, the next-token entropy, gradients, the CLI, export, resume, DDP and FSDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

pytest.importorskip("transformers")

from lightning.pytorch.callbacks import ModelCheckpoint
from test_data_prompts import write_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adamerge.cli import AdaMergeCLI, main
from adamerge.components.causal_lm import CausalLMAdaMerging, next_token_entropy
from adamerge.data.prompts import PromptDataModule, PromptSource
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_pool import HFPool
from adamerge.systems.adamerging_lm import AdaMergingLM
from adamerge.systems.base import CheckpointMismatchError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "llm" / "adamerging_layer.yaml"
TASKS = ("math", "code")
# initializer_range 0.2: logits of a few units, so the entropy is far from log(64) and its gradient not tiny
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2}


def build_family(root: Path, tied: bool = False, scale: float = 0.05) -> dict:
    """θ_0 and two experts (θ_0 + seeded noise on every parameter) saved in 20 KB shards with a word-level
    tokenizer in the base folder, and each task's prompts (.txt for math, .jsonl for code)."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, tie_word_embeddings=tied)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(str(root / "base"), max_shard_size="20KB")
    write_tokenizer(root / "base")
    states = {"base": {k: v.detach().clone() for k, v in base.state_dict().items()}}
    for i, task in enumerate(TASKS):
        expert, g = copy.deepcopy(base), torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in expert.parameters():  # tied weights are one parameter: one perturbation
                p.add_(scale * torch.randn(p.shape, generator=g))
        expert.save_pretrained(str(root / task), max_shard_size="20KB")
        states[task] = {k: v.detach().clone() for k, v in expert.state_dict().items()}
    (root / "math.txt").write_text("\n".join(" ".join(f"w{(3 * j + k) % 60}" for k in range(2 + j % 5)) for j in range(10)))
    (root / "code.jsonl").write_text("\n".join(
        json.dumps({"prompt": " ".join(f"w{(7 * j + 5 * k) % 60}" for k in range(1 + j % 4))}) for j in range(10)))
    return {"root": root, "config": config, "states": states}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("llama"))


def pool_of(fam: dict, **kwargs) -> HFPool:
    root = fam["root"]
    return HFPool(root / "base", {t: root / t for t in TASKS}, **kwargs)


def prompts_of(fam: dict) -> dict[str, str]:
    return {"math": str(fam["root"] / "math.txt"), "code": str(fam["root"] / "code.jsonl")}


def merged_state(fam: dict, coefficients) -> dict[str, torch.Tensor]:
    """θ_0 + Σ_k c_k(key) (θ_k − θ_0) for every tensor, written out from the in-memory models; ``coefficients``
    maps a key to its [c_math, c_code] (a missing key keeps θ_0)."""
    s = fam["states"]
    out = {}
    for key, theta0 in s["base"].items():
        c = coefficients(key)
        out[key] = theta0 if c is None else theta0 + sum(c[i] * (s[t][key] - theta0) for i, t in enumerate(TASKS))
    return out


def reference_lm(fam: dict, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(fam["config"]).eval()
    model.load_state_dict(state)
    return model


def written_out_entropy(model, texts_ids: list[list[int]], positions: str = "all") -> torch.Tensor:
    """Mean over prompts of the mean over their positions of −Σ p log p, each prompt run alone (no padding), float64."""
    per_prompt = []
    for ids in texts_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        p = torch.softmax(logits, dim=-1)
        h = -(p * torch.log(p)).sum(dim=-1)
        per_prompt.append(h.mean() if positions == "all" else h[-1])
    return torch.stack(per_prompt).mean()


# ---- the merge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_coefficients_at_init_reproduce_task_arithmetic(tied, family, tmp_path):
    """λ = 0.3 everywhere is task arithmetic with λ 0.3, weight by weight and in the logits; with tied
    embeddings the merged embedding must also be the output layer (a frozen copy would keep θ_0's there)."""
    fam = build_family(tmp_path, tied=True) if tied else family
    system = AdaMergingLM(pool_of(fam))
    expected = merged_state(fam, lambda key: [0.3, 0.3])
    merged = system.model.merged_parameters()
    assert sorted(system.model.layer_names) == sorted(k for k in expected if not (tied and k == "lm_head.weight"))
    for key in system.model.layer_names:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7], [1, 30, 31, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        got = system.model(ids, mask)
        want = reference_lm(fam, expected)(input_ids=ids, attention_mask=mask).logits
        theta0 = reference_lm(fam, fam["states"]["base"])(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - theta0).abs().max() > 1e-2  # the merge changes the outputs: the comparison can fail


def test_only_the_coefficients_learn_and_the_lm_stays_in_eval_mode(family):
    system = AdaMergingLM(pool_of(family))
    assert system.learnable_parameters() == [system.model.lambdas]
    assert set(system.model.state_dict()) == {"lambdas"}  # θ_0 and the directions are never saved
    assert system.model.lambdas.shape == (2, len(system.model.layer_names)) == (2, 21)
    system.train()
    assert not system.model.lm.training and all(not m.training for m in system.model.lm.modules())
    assert system.num_classes == {"math": 64, "code": 64} and system.method_label == "AdaMerging (layer-wise)"


def test_excluded_tensors_stay_at_the_base_and_task_wise_has_one_coefficient_per_task(family):
    pool = pool_of(family, exclude=[r"^model\.embed_tokens\.", r"norm\.weight$"])
    system = AdaMergingLM(pool, model=lambda p, t: CausalLMAdaMerging(p, t, granularity="task", init_lam=0.5))
    kept = [k for k in family["states"]["base"] if "embed_tokens" not in k and not k.endswith("norm.weight")]
    assert sorted(system.model.layer_names) == sorted(kept) and system.model.lambdas.shape == (2, 1)
    expected = merged_state(family, lambda key: [0.5, 0.5] if key in kept else None)
    ids, mask = torch.tensor([[1, 8, 9, 10]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        want = reference_lm(family, expected)(input_ids=ids).logits
        torch.testing.assert_close(system.model(ids, mask), want, rtol=1e-5, atol=1e-5)


# ---- the loss ----------------------------------------------------------------------------------------------
def test_the_loss_is_the_mean_next_token_entropy_over_each_prompts_own_positions(family):
    """Prompts of 6, 3 and 4 tokens (math) and 2 and 5 (code), each task right-padded to its longest, the two
    tasks padded to one length in the shared forward. Per-prompt means first: a mean pooled over the batch's
    tokens, or one that counts padding positions, gives another number (checked below)."""
    system = AdaMergingLM(pool_of(family))
    source = PromptSource(prompts_of(family), str(family["root"] / "base"))
    math = source.dataset("math", "test").tokens[[1, 5, 7]]
    code = source.dataset("code", "test").tokens[[1, 3]]
    ref = reference_lm(family, merged_state(family, lambda key: [0.3, 0.3]))
    batches = {"math": math, "code": code}
    ids = {t: [row[0][row[1].bool()].tolist() for row in b] for t, b in batches.items()}
    assert len({len(x) for x in ids["math"]}) > 1 and len({len(x) for x in ids["code"]}) > 1
    assert len(ids["code"][0]) != max(len(x) for x in ids["math"])  # the cross-task padding is exercised
    for positions in ("all", "last"):
        system.positions = positions
        losses = system.adaptation_losses(batches)
        for task in TASKS:
            want = written_out_entropy(ref, ids[task], positions)
            torch.testing.assert_close(losses[task].double(), want, rtol=1e-5, atol=1e-6)
    system.positions = "all"
    with torch.no_grad():  # the wrong averages really differ here
        logits = ref(input_ids=math[:, 0], attention_mask=math[:, 1]).logits.double()
        p = torch.softmax(logits, -1)
        h = -(p * torch.log(p)).sum(-1)
        pooled = h[math[:, 1].bool()].mean()
        with_padding = h.mean()
    right = written_out_entropy(ref, ids["math"])
    assert abs(pooled - right) > 1e-4 and abs(with_padding - right) > 1e-4
    changed = {t: b.clone() for t, b in batches.items()}
    for b in changed.values():  # every padded position gets another token id; the mask stays
        b[:, 0][b[:, 1] == 0] = 17
    assert bool((changed["math"][:, 0] != math[:, 0]).any())
    before, after = system.adaptation_losses(batches), system.adaptation_losses(changed)
    for task in TASKS:
        assert torch.equal(before[task], after[task]), task


def test_next_token_entropy_refuses_an_all_padding_prompt():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="prompt 1 of the batch has no tokens"):
        next_token_entropy(logits, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="positions must be 'all' or 'last', got 'first'"):
        next_token_entropy(logits, torch.ones(2, 3), "first")


def test_the_gradient_reaches_the_coefficients_and_matches_a_finite_difference(family):
    system = AdaMergingLM(pool_of(family))
    source = PromptSource(prompts_of(family), str(family["root"] / "base"))
    batches = {t: source.dataset(t, "test").tokens[:4] for t in TASKS}
    loss = sum(system.adaptation_losses(batches).values())
    loss.backward()
    grad = system.model.lambdas.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9
    layer = system.model.layer_names.index("model.layers.1.mlp.down_proj.weight")
    eps = 1e-2

    def loss_at(delta: float) -> float:
        with torch.no_grad():
            system.model.lambdas[1, layer] += delta
            value = sum(system.adaptation_losses(batches).values()).item()
            system.model.lambdas[1, layer] -= delta
        return value

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(grad[1, layer].item()) > 1e-4
    assert grad[1, layer].item() == pytest.approx(numeric, rel=2e-2, abs=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_task(family):
    system = AdaMergingLM(pool_of(family))
    bad = torch.stack([torch.tensor([[1, 64, 5]]), torch.ones(1, 3, dtype=torch.long)], dim=1)
    with pytest.raises(ValueError, match=r"task 'code': token id 64 is outside the model's vocabulary of 64"):
        system.adaptation_losses({"code": bad})
    with pytest.raises(ValueError, match="positions must be 'all' or 'last'"):
        AdaMergingLM(pool_of(family), positions="every")


def test_experts_with_another_vocabulary_are_refused(family, tmp_path):
    config = LlamaConfig(**{**TINY, "vocab_size": 66})
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "big"))
    pool = HFPool(family["root"] / "base", {"math": family["root"] / "math", "big": tmp_path / "big"},
                  vocab_source="base")
    with pytest.raises(MergeError, match=r"tensor 'model.embed_tokens.weight': the experts' vocabularies differ"):
        AdaMergingLM(pool)


# ---- evaluation, the CLI, export -----------------------------------------------------------------------------
def test_validation_reports_next_token_accuracy_and_entropy(family, tmp_path):
    system = AdaMergingLM(pool_of(family))
    dm = PromptDataModule(prompts_of(family), eval_batch_size=32)
    trainer = quiet_trainer(tmp_path)
    trainer.validate(system, dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ref = reference_lm(family, merged_state(family, lambda key: [0.3, 0.3]))
    for task in TASKS:
        rows = dm.dataset(task, "test").tokens
        ids = [row[0][row[1].bool()].tolist() for row in rows]
        hits = total = 0
        for x in ids:
            with torch.no_grad():
                pred = ref(input_ids=torch.tensor([x])).logits[0].argmax(-1)
            hits += int((pred[:-1] == torch.tensor(x[1:])).sum())
            total += len(x) - 1
        assert metrics[f"val/acc/{task}"] == pytest.approx(hits / total, abs=1e-6)
        assert metrics[f"val/entropy/{task}"] == pytest.approx(written_out_entropy(ref, ids).item(), rel=1e-5)


def cli_args(fam: dict, run: Path, *extra: str) -> list[str]:
    root = fam["root"]
    return ["--config", str(CONFIG), f"--model.init_args.pool.init_args.base={root / 'base'}",
            f"--model.init_args.pool.init_args.experts={{math: {root / 'math'}, code: {root / 'code'}}}",
            f"--data.init_args.prompts={{math: {root / 'math.txt'}, code: {root / 'code.jsonl'}}}",
            "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.callbacks=null",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={run}",
            *extra]


def test_two_steps_through_the_cli_export_a_folder_that_from_pretrained_loads(family, tmp_path):
    """The shipped config, two steps at lr 0.05 (so λ moves), then the exported model/ is loaded with
    from_pretrained and compared with θ_0 + Σ c τ written out from coefficients.json."""
    cli = main(["fit", *cli_args(family, tmp_path / "run", "--trainer.max_steps=2", "--trainer.enable_checkpointing=false",
                                 "--data.init_args.steps_per_epoch=2", "--model.init_args.optimizer.init_args.lr=0.05")])
    assert cli.model.progress_step == 2 and cli.model.tasks == list(TASKS)
    export = tmp_path / "run" / "export"
    assert (export / "metrics.json").exists() and (export / "learned.safetensors").exists()
    coef = json.loads((export / "coefficients.json").read_text())
    values = torch.tensor(coef["coefficients"])
    assert coef["tasks"] == list(TASKS) and values.shape == (2, 21)
    assert (values - 0.3).abs().max() > 0.01  # trained
    model = AutoModelForCausalLM.from_pretrained(str(export / "model")).eval()
    expected = merged_state(family, lambda key: values[:, coef["layers"].index(key)].tolist())
    got = model.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    ids, mask = torch.tensor([[1, 4, 17, 33, 50]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, cli.model.model(ids, mask), rtol=1e-5, atol=1e-5)
    assert "adamerging" in (export / "model" / "README.md").read_text()
    assert (export / "model" / "tokenizer.json").exists()
    pool, merged = cli.model.pool, dict(cli.model.model.merged_tensors())  # the pool's own export and rebuild
    again = AutoModelForCausalLM.from_pretrained(str(pool.export(merged, tmp_path / "via_pool"))).state_dict()
    assert all(torch.equal(again[k], got[k]) for k in got)
    with torch.no_grad():
        torch.testing.assert_close(pool.build_encoder(merged)(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_run_continues_exactly(family, tmp_path):
    pool = pool_of(family)

    def run(max_steps, ckpt_path=None, callbacks=(), positions="all"):
        L.seed_everything(0, verbose=False)
        system = AdaMergingLM(pool, optimizer=lambda p: torch.optim.Adam(p, lr=0.05), positions=positions)
        dm = PromptDataModule(prompts_of(family), batch_size=3, steps_per_epoch=4, seed=5)
        trainer = quiet_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0,
                                enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        trainer.fit(system, dm, ckpt_path=ckpt_path)
        return system.model.lambdas.detach().clone()

    full = run(4)
    first = run(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])
    assert not torch.allclose(first, full)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert set(checkpoint["state_dict"]) == {"model.lambdas"}  # kilobytes: λ only
    resumed = run(4, ckpt_path=last,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="positions"):
        run(4, ckpt_path=last, positions="last")


# ---- GPU strategy fragments ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_ddp_fragment_trains_two_cpu_ranks_to_identical_coefficients(family, tmp_path):
    """configs/llm/ddp.yaml on two CPU processes (gloo), its bf16-mixed precision kept: both ranks read their own
    prompts and end with the same λ, moved from its start. ``slow``: 37-47 s on this loaded 2-core machine (two
    interpreters import torch, Lightning and transformers one after the other); the default suite builds the
    fragment's strategy in-process below."""
    out = tmp_path / "dump"
    args = cli_args(family, tmp_path / "run", "--config", str(ROOT / "configs" / "llm" / "ddp.yaml"),
                    "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=2",
                    "--trainer.enable_checkpointing=false", "--data.init_args.steps_per_epoch=2",
                    "--model.init_args.optimizer.init_args.lr=0.05",
                    f"--trainer.callbacks=[{{class_path: probes.DumpLearned, init_args: {{out: {out}}}}}]")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(out / f"rank{i}.pt") for i in (0, 1)]
    assert [d["world_size"] for d in ranks] == [2, 2]
    a, b = ranks[0]["state"]["model.lambdas"], ranks[1]["state"]["model.lambdas"]
    assert torch.equal(a, b) and (a - 0.3).abs().max() > 0.01


class _ParseOnly(AdaMergeCLI):
    """The CLI up to building its classes, without the Trainer (FSDP needs a GPU to build one)."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate(self.config)
        self.strategy = self.config_init.trainer.strategy

    def after_instantiate_classes(self) -> None:
        pass


def test_the_ddp_fragment_parses_and_builds_its_strategy(family, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cli = _ParseOnly(args=cli_args(family, tmp_path / "run", "--config", str(ROOT / "configs" / "llm" / "ddp.yaml")),
                     run=False)
    assert cli.config.trainer.strategy == "ddp" and cli.config.trainer.precision == "bf16-mixed"
    trainer = L.Trainer(strategy=cli.strategy, accelerator="cpu", devices=2, precision=cli.config.trainer.precision,
                        logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision" and trainer.precision == "bf16-mixed"
    assert isinstance(cli.config_init.model, AdaMergingLM)


def test_the_fsdp_fragment_parses_and_builds_its_strategy(family, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cli = _ParseOnly(args=cli_args(family, tmp_path / "run", "--config", str(ROOT / "configs" / "llm" / "fsdp.yaml")),
                     run=False)
    strategy = cli.strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "NO_SHARD"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}
    assert cli.config.trainer.precision == "bf16-mixed" and cli.config.trainer.accelerator == "gpu"
    assert isinstance(cli.config_init.model, AdaMergingLM)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fsdp_fragment_trains_on_a_gpu_and_exports(family, tmp_path):
    devices = min(torch.cuda.device_count(), 2)
    args = cli_args(family, tmp_path / "run", "--config", str(ROOT / "configs" / "llm" / "fsdp.yaml"),
                    "--trainer.accelerator=gpu", f"--trainer.devices={devices}", "--trainer.max_steps=2",
                    "--trainer.enable_checkpointing=false", "--data.init_args.steps_per_epoch=2",
                    "--model.init_args.optimizer.init_args.lr=0.05")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    coef = torch.tensor(json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())["coefficients"])
    assert torch.isfinite(coef).all() and (coef - 0.3).abs().max() > 0.01
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "export" / "model"))
    assert set(model.state_dict()) == set(family["states"]["base"])
