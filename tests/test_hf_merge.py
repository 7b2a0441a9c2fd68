"""Issue #16: Hugging Face models merged out of core through ``adamerge merge``.

Tiny random models built here with ``transformers`` (a 2-layer Llama, a Qwen2-VL with a 1-block vision
tower), PEFT LoRA adapters on them, saved in small shards. Every registered method is run through the
command, reloaded with ``from_pretrained`` and compared with :func:`merge_pool` on state dicts built
independently here (transformers' own ``state_dict()``, PEFT's ``merge_and_unload()`` for adapters).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adamerge.console import entry  # noqa: E402
from adamerge.merging.dispatch import merge_pool  # noqa: E402
from adamerge.merging.registry import METHODS, PER_TENSOR, STREAMING  # noqa: E402
from adamerge.merging.task_vectors import task_vector  # noqa: E402
from adamerge.merging.ties import ties_threshold  # noqa: E402
from adamerge.merging.ties_stream import stream_thresholds  # noqa: E402
from adamerge.models.hf_pool import HFPool  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
# options that keep the slow methods quick on a tiny model without changing what they compute
FAST = {"optmerge": {"iters": 5}, "wudi": {"iters": 5}}


def _llama(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _finetune(base, seed: int, scale: float, skip: str = "norm"):
    """A copy of ``base`` with seeded noise on every weight but those named ``skip``; the scale differs
    per layer so that one task vector's magnitudes differ across tensors (per-tensor TIES ≠ TIES)."""
    m = _llama(0)
    m.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, p) in enumerate(m.named_parameters()):
            if skip not in name:
                p.add_(scale * (1 + i % 3) * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    base = _llama(0)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    states = {}
    for i, task in enumerate(("math", "code")):
        m = _finetune(base, 10 + i, 0.02)
        m.save_pretrained(root / task, max_shard_size="30KB")
        states[task] = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                          rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    torch.manual_seed(7)
    lora = peft.get_peft_model(_llama(0), cfg)
    lora.save_pretrained(root / "chat")
    states["chat"] = {k: v.clone() for k, v in lora.merge_and_unload().state_dict().items()}
    # the pool visits tensors in the files' order; DARE's masks are drawn in key order, so the reference
    # dicts take the same order
    order = HFPool(root / "base", {"math": root / "math"}).keys()
    base_state = base.state_dict()
    return root, {k: base_state[k].clone() for k in order}, {t: {k: s[k] for k in order} for t, s in states.items()}


class _InMemory:
    """The same weights as a plain in-memory pool (θ_0 and task vectors from transformers' state dicts)."""

    def __init__(self, base: dict, experts: dict) -> None:
        self.base, self.experts = base, experts

    def pretrained_state(self):
        return {k: v.clone() for k, v in self.base.items()}

    def task_vectors(self, tasks=None):
        for t in tasks or list(self.experts):
            yield t, task_vector(self.experts[t], self.base)


def _merge(root: Path, out: Path, method: str, *extra: str, experts=("math", "code", "chat")) -> Path:
    args = ["merge", "--base", str(root / "base"), "--method", method, "--out", str(out), "--progress", "false",
            *[f"--experts.{t}={root / t}" for t in experts], *extra]
    entry(args)
    return out


def _loaded(folder: Path) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_through_the_command_equals_the_in_memory_merge(method, models, tmp_path):
    root, base, states = models
    extra = [f"--options.{k}={v}" for k, v in FAST.get(method, {}).items()]
    if method not in PER_TENSOR and method not in STREAMING:
        extra.append("--in_memory=true")
    out = _merge(root, tmp_path / "out", method, "--max_shard_size=40KB", *extra)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    want = merge_pool(_InMemory(base, states), method, **FAST.get(method, {}))
    got = _loaded(out)
    assert set(got) == set(base)
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{method}: {k}")
    card = (out / "README.md").read_text()
    assert f"`{method}`" in card and "LoRA adapter" in card and "full fine-tune" in card


def test_out_of_core_ties_is_the_whole_model_ties_not_a_per_tensor_one(models, tmp_path):
    root, base, states = models
    pool = HFPool(root / "base", {t: root / t for t in states})
    mem = _InMemory(base, states)
    # the thresholds over the whole model, found by two histogram passes, are the in-memory ones bit for bit
    taus = [tau for _, tau in mem.task_vectors()]
    for keep in (0.2, 0.013, 1.0):
        assert stream_thresholds(pool, pool.tasks, keep) == [ties_threshold(t, keep) for t in taus]
    out = _merge(root, tmp_path / "ties", "ties", "--options.keep=0.1", "--options.merge=mean")
    got, want = _loaded(out), merge_pool(mem, "ties", keep=0.1, merge="mean")
    per_tensor = {}
    for k in base:  # what a per-tensor trim (mergekit's ties) would give: must differ, or the test shows nothing
        per_tensor.update(merge_pool(_InMemory({k: base[k]}, {t: {k: s[k]} for t, s in states.items()}), "ties",
                                     keep=0.1, merge="mean"))
    assert all(torch.equal(got[k], want[k]) for k in base)
    assert sum(not torch.equal(per_tensor[k], want[k]) for k in base) >= len(base) // 2


def test_lora_task_vector_is_peft_s_merged_weights(models):
    root, base, states = models
    pool = HFPool(root / "base", {"chat": root / "chat"})
    adapted = set(pool.experts["chat"].adapted())
    assert {k for k in base if "down_proj" in k or "q_proj" in k or "v_proj" in k} == adapted
    for k in base:
        want = states["chat"][k] - base[k]
        torch.testing.assert_close(pool.task_vector_tensor("chat", k), want, rtol=0, atol=1e-6)
        if k not in adapted:
            assert torch.equal(pool.task_vector_tensor("chat", k), torch.zeros_like(want))


def test_adapters_that_are_not_w_plus_sba_are_refused(models, tmp_path):
    root, _, _ = models
    for option, value in (("use_dora", True), ("lora_bias", True)):
        folder = tmp_path / option
        shutil.copytree(root / "chat", folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg[option] = value
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=rf"{option}=True .* is not supported"):
            HFPool(root / "base", {"chat": folder})


def test_vocabulary_mismatch_is_refused_or_merged_on_the_shared_rows(models, tmp_path):
    root, base, states = models
    big = _finetune(_llama(0), 30, 0.02)
    big.resize_token_embeddings(70, mean_resizing=False)
    with torch.no_grad():
        big.get_input_embeddings().weight[64:] = torch.randn(6, 32)
        big.get_output_embeddings().weight[64:] = torch.randn(6, 32)
    big.save_pretrained(tmp_path / "big", max_shard_size="30KB")
    (tmp_path / "big" / "tokenizer_config.json").write_text('{"marker": "big"}')
    big_state = big.state_dict()
    with pytest.raises(SystemExit) as e:
        _merge(root, tmp_path / "x", "task_arithmetic", experts=("math",), *[f"--experts.big={tmp_path / 'big'}"])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"expert 'big': tensor 'model.embed_tokens.weight' has shape \(70, 32\) "
                                         r"but the base \(64, 32\)"):
        HFPool(root / "base", {"math": root / "math", "big": tmp_path / "big"})
    shared = {k: (v[:64] if v.shape[0] == 70 else v) for k, v in big_state.items()}
    want = merge_pool(_InMemory(base, {"math": states["math"], "big": shared}), "task_arithmetic")
    for source, rows in (("base", 64), ("big", 70)):
        out = _merge(root, tmp_path / f"out_{source}", "task_arithmetic", f"--experts.big={tmp_path / 'big'}",
                     f"--vocab_source={source}", experts=("math",))
        got = _loaded(out)
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == rows and got["model.embed_tokens.weight"].shape == (rows, 32)
        for k in base:
            torch.testing.assert_close(got[k][:64], want[k], rtol=0, atol=1e-6)
        if source == "big":  # the rows only the vocabulary source has are its own, and so is its tokenizer
            assert torch.equal(got["lm_head.weight"][64:], big_state["lm_head.weight"][64:])
            assert json.loads((out / "tokenizer_config.json").read_text()) == {"marker": "big"}


def test_a_vision_language_model_keeps_its_vision_tower_by_name(tmp_path):
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_channels=3)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=1, eos_token_id=2)
    cls = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    experts = {}
    for i in range(2):
        m = cls(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        m.save_pretrained(tmp_path / f"e{i}", max_shard_size="30KB")
        experts[f"e{i}"] = m.state_dict()
    entry(["merge", "--base", str(tmp_path / "base"), "--method", "task_arithmetic", "--options.lam=0.5",
           "--experts.e0", str(tmp_path / "e0"), "--experts.e1", str(tmp_path / "e1"), "--exclude", "[visual\\.]",
           "--out", str(tmp_path / "out"), "--progress=false"])
    got = cls.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    b = base.state_dict()
    assert any("visual" in k for k in b) and any("language_model" in k for k in b)
    for k in b:
        if "visual" in k:
            assert torch.equal(got[k], b[k]), k
        else:
            want = b[k] + 0.5 * ((experts["e0"][k] - b[k]) + (experts["e1"][k] - b[k]))
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)


def test_existing_output_is_refused_and_a_failed_merge_leaves_nothing(models, tmp_path, capsys):
    root, base, states = models
    out = _merge(root, tmp_path / "out", "task_arithmetic", "--dtype=bfloat16")
    first = sorted(p.name for p in out.iterdir())
    assert _loaded(out)["lm_head.weight"].dtype == torch.float32  # loaded as asked; stored:
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        _merge(root, out, "ties")
    assert "exists: refusing to overwrite it" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an argument the method does not take: nothing half-written
        _merge(root, out, "ties", "--overwrite=true", "--options.kep=0.3")
    assert sorted(p.name for p in out.iterdir()) == first
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    _merge(root, out, "ties", "--overwrite=true")
    assert "`ties`" in (out / "README.md").read_text()


def test_a_config_file_and_a_base_from_an_offline_hub_cache(models, tmp_path):
    from hubcache import cache_repo, run_offline

    root, base, states = models
    home = tmp_path / "home"
    files = {p.name: p.read_bytes() for p in (root / "base").iterdir() if p.is_file()}
    cache_repo(home / "hub", "adamerge-test/tiny-llama", files)
    (tmp_path / "merge.yaml").write_text(
        f"base: adamerge-test/tiny-llama\nexperts:\n  math: {root / 'math'}\n  chat: {root / 'chat'}\n"
        f"method: ties\npreset: paper\noptions:\n  lam: 0.5\nout: {tmp_path / 'out'}\nprogress: false\n")
    out = run_offline(home, f"""
        from adamerge.console import entry
        entry(["merge", "--config", {str(tmp_path / 'merge.yaml')!r}])
        out["files"] = sorted(p.name for p in __import__("pathlib").Path({str(tmp_path / 'out')!r}).iterdir())
    """)
    assert "model.safetensors" in out["files"]
    want = merge_pool(_InMemory(base, {t: states[t] for t in ("math", "chat")}), "ties", preset="paper", lam=0.5)
    got = _loaded(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in base)


def test_open_clip_towers_merge_through_the_same_command(tmp_path):
    import open_clip
    from conftest import make_tiny_clip
    from safetensors.torch import save_file

    clip = make_tiny_clip(0)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2,
                                           "head_width": 16, "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tinymerge.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tinymerge.json")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    visual = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    experts = {}
    for i, task in enumerate(("mnist", "svhn")):
        g = torch.Generator().manual_seed(i)
        experts[task] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in visual.items()}
        save_file(experts[task], tmp_path / f"{task}.safetensors")
    entry(["merge", "--model_name", "tinymerge", "--base", str(tmp_path / "clip.safetensors"), "--method", "tsv_m",
           "--experts.mnist", str(tmp_path / "mnist.safetensors"), "--experts.svhn", str(tmp_path / "svhn.safetensors"),
           "--out", str(tmp_path / "merged.safetensors")])
    loaded = open_clip.create_model("tinymerge", pretrained=str(tmp_path / "merged.safetensors"))
    want = merge_pool(_InMemory(visual, experts), "tsv_m")
    for k, v in loaded.visual.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(loaded.transformer.parameters(), clip.transformer.parameters()))


def test_missing_tensor_and_wrong_shape_are_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, _ = models
    bad = tmp_path / "bad"
    shutil.copytree(root / "math", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard)
    del index["weight_map"]["model.norm.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"expert 'bad' .* lacks tensor 'model.norm.weight'"):
        HFPool(root / "base", {"bad": bad})
    tensors = load_file(bad / index["weight_map"]["model.layers.0.mlp.up_proj.weight"])
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 31)
    save_file(tensors, bad / index["weight_map"]["model.layers.0.mlp.up_proj.weight"])
    shutil.copy(root / "math" / "model.safetensors.index.json", bad)
    os.unlink(shard)
    shutil.copy(root / "math" / shard.name, shard)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(48, 31\) but the base "
                                         r"\(48, 32\)"):
        HFPool(root / "base", {"bad": bad})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "tsv_m"])
def test_merging_on_the_gpu_writes_what_the_cpu_writes(method, models, tmp_path):
    root, _, _ = models
    cpu = _loaded(_merge(root, tmp_path / "cpu", method))
    gpu = _loaded(_merge(root, tmp_path / "gpu", method, "--device=cuda"))
    for k, v in cpu.items():
        torch.testing.assert_close(gpu[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_qwen2_with_tied_embeddings_and_qkv_biases(tmp_path):
    """Qwen2 has biases on q/k/v and ties lm_head to the embedding (the file holds it once)."""
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    experts = {}
    for i in range(3):
        m = transformers.Qwen2ForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        m.save_pretrained(tmp_path / f"e{i}", max_shard_size="30KB")
        experts[f"e{i}"] = m.state_dict()
    pool = HFPool(tmp_path / "base", {t: tmp_path / t for t in experts})
    assert "lm_head.weight" not in pool.keys() and any(k.endswith("q_proj.bias") for k in pool.keys())
    order = pool.keys()
    mem = _InMemory({k: base.state_dict()[k] for k in order}, {t: {k: s[k] for k in order} for t, s in experts.items()})
    for method in ("ties", "tsv_m"):
        entry(["merge", "--base", str(tmp_path / "base"), "--method", method, "--out", str(tmp_path / method),
               "--progress=false", *[f"--experts.{t}={tmp_path / t}" for t in experts]])
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=torch.float32)
        got, want = model.state_dict(), merge_pool(mem, method)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        for k in order:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{method}: {k}")


# makes transformers and peft look uninstalled: not importable, and no package metadata (torchmetrics asks)
_BLOCK = """
import importlib.metadata as md, sys
BLOCKED = ("transformers", "peft")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
def hide(fn):
    def wrapped(name):
        if name.lower() in BLOCKED:
            raise md.PackageNotFoundError(name)
        return fn(name)
    return wrapped
md.distribution, md.version = hide(md.distribution), hide(md.version)
"""


def test_merging_hf_folders_needs_neither_transformers_nor_peft(models, tmp_path):
    """The engine reads safetensors and adapter_config.json itself: with both packages unimportable, an
    out-of-core merge of full and LoRA experts still runs and writes the same files; and the command
    does not import Lightning (its memory and start-up time count against the merge)."""
    import subprocess
    import sys

    root, _, _ = models
    _merge(root, tmp_path / "with", "ties")
    script = (_BLOCK + "from adamerge.console import entry\n"
              f"entry(['merge', '--base', {str(root / 'base')!r}, '--method', 'ties', '--out', {str(tmp_path / 'without')!r},"
              " '--progress=false'," + ",".join(f"'--experts.{t}={root / t}'" for t in ("math", "code", "chat")) + "])\n"
              "assert not {'transformers', 'peft', 'lightning'} & set(sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "with").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "without").glob("*.safetensors"))
    from safetensors.torch import load_file

    for name in shards:
        a, b = load_file(tmp_path / "with" / name), load_file(tmp_path / "without" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average", "ties", "iso_c", "tsv_m"])
def test_large_tensors_merged_in_row_blocks_give_the_same_merge(method, models, tmp_path, monkeypatch):
    """Elementwise merges, and Iso-C's sum of task vectors, read big tensors a block of rows at a time
    (32 MiB in float32 by default), full fine-tunes and LoRA adapters alike (B's rows, or A's columns
    for a transposed delta); with blocks of 1 KiB every 2-D tensor of the tiny model is split, and the
    merge must not change."""
    root, _, _ = models
    experts = ("math", "code", "chat")
    whole = _loaded(_merge(root, tmp_path / "whole", method, experts=experts))
    original = HFPool.row_blocks
    split = []

    def small(self, key, max_bytes=1024):
        blocks = original(self, key, max_bytes)
        split.append(blocks is not None and len(blocks) > 1)
        return blocks

    monkeypatch.setattr(HFPool, "row_blocks", small)
    blocked = _loaded(_merge(root, tmp_path / "blocked", method, experts=experts))
    assert any(split)
    lora = set(HFPool(root / "base", {"chat": root / "chat"}).experts["chat"].adapted())
    for k, v in whole.items():
        if k in lora:  # B[rows] @ A is not always (B @ A)[rows] to the last bit: BLAS blocks the product
            torch.testing.assert_close(blocked[k], v, rtol=0, atol=1e-6, msg=k)
        else:  # full fine-tunes: the same sums in the same order
            assert torch.equal(blocked[k], v), k


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
@pytest.mark.parametrize("block_bytes", [None, 1024])
def test_streaming_svd_merges_are_the_in_memory_merges_bit_for_bit(method, block_bytes, models, monkeypatch):
    """The streaming versions of Iso-C (Δ summed in row blocks, one SVD) and TSV-M (one τ and its
    SVD at a time, then the stacks), each writing θ_0 + α τ over τ's buffer, compute what the
    whole-model merge computes, in the same order: equal to the last bit."""
    from adamerge.merging.dispatch import merge_stream

    root, _, _ = models
    if block_bytes is not None:
        original = HFPool.row_blocks
        monkeypatch.setattr(HFPool, "row_blocks", lambda self, key, max_bytes=block_bytes: original(self, key, max_bytes))
    pool = HFPool(root / "base", {"math": root / "math", "code": root / "code"})
    want = merge_pool(pool, method, lam=0.7)
    got = dict(merge_stream(pool, method, lam=0.7))
    assert list(got) == pool.merge_keys() and len(got) == len(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_lora_rows_of_embedding_and_linear_adapters_are_peft_s(models, tmp_path):
    """A LoRA adapter of the embedding stores its delta transposed ((B·A)ᵀ, rows = A's columns); reading
    a block of rows of it, or of a linear layer's (B's rows), gives those rows of PEFT's merged weights."""
    root, base, _ = models
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False)
    torch.manual_seed(3)
    lora = peft.get_peft_model(_llama(0), cfg)
    lora.save_pretrained(tmp_path / "emb")
    merged = lora.merge_and_unload().state_dict()
    pool = HFPool(root / "base", {"emb": tmp_path / "emb"})
    assert set(pool.experts["emb"].adapted()) == {"model.embed_tokens.weight", "lm_head.weight"}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        want = merged[key] - base[key]
        assert want.abs().max() > 1e-3  # the adapter does change the weight
        for rows in (slice(0, 5), slice(17, 40), slice(60, 64)):
            torch.testing.assert_close(pool.task_vector_tensor("emb", key, rows), want[rows], rtol=0, atol=1e-6,
                                       msg=f"{key} {rows}")


def test_the_writer_writes_the_pending_shard_before_a_tensor_that_will_not_fit_is_computed(tmp_path):
    """``make_room`` (called by the merge with the next tensor's size before computing it) writes the
    pending shard early, so it is not held in memory meanwhile; the shards are the ones ``add`` alone writes."""
    from safetensors.torch import load_file

    from adamerge.models.safetensors_folder import ShardedWriter

    # 40, 40, 120, 20, 160 bytes with shards of at most 100: [t0 t1] [t2] [t3] [t4]
    tensors = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate((10, 10, 30, 5, 40))}
    on_disk_before = {"t0": 0, "t1": 0, "t2": 1, "t3": 2, "t4": 3}  # shards written when t_i's room is made
    layouts = []
    for early in (False, True):
        folder = tmp_path / str(early)
        folder.mkdir()
        w = ShardedWriter(folder, max_shard_bytes=100)
        for key, t in tensors.items():
            if early:
                w.make_room(t.numel() * 4)
                assert len(list(folder.glob(".shard-*"))) == on_disk_before[key], key
            w.add(key, t)
        paths = w.close()
        layouts.append([(p.name, sorted(load_file(p))) for p in paths])
        for p in paths:
            for k, v in load_file(p).items():
                assert torch.equal(v, tensors[k])
    assert layouts[0] == layouts[1]
    assert [keys for _, keys in layouts[0]] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


class _DictStream:
    """θ_0 and experts as in-memory state dicts behind the TensorStream protocol (any key names)."""

    def __init__(self, base, experts):
        self.base, self.experts = base, experts

    def check_tasks(self, tasks):
        return list(tasks or self.experts)

    def merge_keys(self):
        return list(self.base)

    def pretrained_tensor(self, key, rows=None):
        return self.base[key].clone() if rows is None else self.base[key][rows].clone()

    def task_vector_tensor(self, task, key, rows=None):
        t = self.experts[task][key] - self.base[key]
        return t if rows is None else t[rows].clone()

    def pretrained_state(self):
        return {k: v.clone() for k, v in self.base.items()}

    def task_vectors(self, tasks=None):
        for t in self.check_tasks(tasks):
            yield t, {k: self.experts[t][k] - self.base[k] for k in self.base}


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
@pytest.mark.parametrize("split_qkv", [True, False])
def test_streaming_svd_merges_split_a_fused_qkv_as_the_in_memory_merges_do(method, split_qkv):
    """open_clip's fused in_proj_weight [3d, d] is three matrices with split_qkv (one SVD each) and one
    [3d, d] matrix without; the streaming versions take the same choice as iso_c / tsv_merge (a wrong
    one changes every entry: the flat spectrum or the rank budget is per matrix)."""
    from adamerge.merging.dispatch import merge_stream

    g = torch.Generator().manual_seed(0)
    shapes = {"attn.in_proj_weight": (12, 4), "attn.in_proj_bias": (12,), "mlp.c_fc.weight": (6, 5),
              "ln.weight": (5,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "abc"}
    stream = _DictStream(base, experts)
    want = merge_pool(stream, method, lam=0.6, split_qkv=split_qkv)
    got = dict(merge_stream(stream, method, lam=0.6, split_qkv=split_qkv))
    for k in shapes:
        assert torch.equal(got[k], want[k]), k
    other = merge_pool(stream, method, lam=0.6, split_qkv=not split_qkv)
    assert not torch.allclose(other["attn.in_proj_weight"], got["attn.in_proj_weight"], atol=1e-4)
