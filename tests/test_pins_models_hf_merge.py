"""Pins of adamerge.models.hf_merge (issue #17): merge_hf / write_folder on model folders written here.

The base has float32, bfloat16 and int64 tensors and two 10-row vocabulary tables; experts ``math`` and
``code`` are full fine-tunes, ``big`` has a 12-row vocabulary (and its own tokenizer), ``chat`` is a LoRA
adapter. Expected weights are computed here: task arithmetic as θ_0 + λ Σ τ from the tensors written, the
other methods with :func:`merge_pool` on plain state dicts (not through the pool or the stream).

Why the data disagree with the plausible wrong versions:
- λ=0.5 (the default is 0.3) and a task subset in another order (``code``, ``math``): dropped arguments or
  tasks change every merged weight; the ``paper`` TIES preset changes them too (checked);
- PCB has no out-of-core version: refused without ``in_memory``, merged in memory with it;
- the output folder is compared file by file: names, config.json text, README.md text, manifest entries,
  the safetensors header metadata, each tensor's dtype (bfloat16 kept, int64 never converted, all floats
  converted with ``dtype``);
- configs with and without ``torch_dtype``, ``text_config`` with the old, another, or no vocabulary size, and
  none at all: ``_config`` is pinned case by case;
- model-card arguments are given unsorted and with a non-JSON value; a vocab_source with no mismatch gets no
  vocabulary line;
- the merged tensors are produced by a generator that counts the shards already on disk when each is asked
  for: the pending shard is written before a tensor that will not fit is computed, with sizes in the output
  dtype and the output vocabulary (an estimate too small or too large moves a shard boundary);
- the progress bar is read back from stderr (label and unit); README.md is written as UTF-8 under the C locale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adamerge.merging.dispatch import METHODS, merge_pool
from adamerge.merging.task_vectors import MergeError
from adamerge.models.hf_merge import (
    DTYPES,
    OutputExistsError,
    _config,
    check_target,
    merge_hf,
    model_card,
    write_folder,
)
from adamerge.models.hf_pool import HFPool
from adamerge.models.safetensors_folder import SafetensorsFolder

SHAPES = {"embed.weight": ((10, 4), torch.float32), "layers.0.weight": ((6, 4), torch.float32),
          "layers.1.weight": ((6, 4), torch.bfloat16), "pos": ((5,), torch.int64),
          "lm_head.weight": ((10, 4), torch.float32)}
BASE_CONFIG = {"vocab_size": 10, "torch_dtype": "float32", "text_config": {"vocab_size": 10, "hidden": 4}}


def _state(seed: int, rows: int = 10, base: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in SHAPES.items():
        if dtype == torch.int64:
            out[k] = torch.arange(5)
            continue
        shape = (rows, 4) if k in ("embed.weight", "lm_head.weight") else shape
        t = torch.randn(shape, generator=g)
        if base is not None:
            b = base[k].float()
            if k in ("embed.weight", "lm_head.weight"):  # zero-padded to the expert's vocabulary
                b = torch.cat([b, torch.zeros(rows - len(b), 4)])
            t = b + 0.1 * t
        out[k] = t.to(dtype)
    return out


def _write(folder: Path, tensors: dict, files: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfm")
    base = _state(0)
    states = {"math": _state(1, base=base), "code": _state(2, base=base), "big": _state(3, 12, base)}
    _write(root / "base", base, {"config.json": BASE_CONFIG, "tokenizer_config.json": {"who": "base"}})
    for t in ("math", "code"):
        _write(root / t, states[t], {})
    _write(root / "big", states["big"], {"tokenizer_config.json": {"who": "big"}, "config.json": {"vocab_size": 12}})
    a, b = torch.randn(2, 4, generator=torch.Generator().manual_seed(9)), torch.randn(6, 2)
    (root / "chat").mkdir()
    save_file({"base_model.model.layers.0.lora_A.weight": a, "base_model.model.layers.0.lora_B.weight": b},
              str(root / "chat" / "adapter_model.safetensors"))
    (root / "chat" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    states["chat"] = dict(base, **{"layers.0.weight": base["layers.0.weight"] + b @ a})
    return root, base, states


def _pool(zoo, *tasks, **kw) -> HFPool:
    root = zoo[0]
    return HFPool(root / "base", {t: root / t for t in tasks}, **kw)


class _InMemory:
    """θ_0 and experts as float32 state dicts over the float keys (the reference for merge_pool)."""

    def __init__(self, base: dict, experts: dict) -> None:
        self.keys = [k for k in base if base[k].is_floating_point()]
        self.base = {k: base[k].float() for k in self.keys}
        self.experts = {t: {k: s[k].float() for k in self.keys} for t, s in experts.items()}

    def pretrained_state(self):
        return {k: v.clone() for k, v in self.base.items()}

    def task_vectors(self, tasks=None):
        for t in tasks or list(self.experts):
            yield t, {k: self.experts[t][k] - self.base[k] for k in self.keys}


def _read(folder: Path) -> dict:
    f = SafetensorsFolder(folder)
    return {k: f.get(k) for k in f.keys()}  # noqa: SIM118


def _card(source, method, args, merged, total, rows, vocab=None):
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- adamerge", f"- {method}",
             f"base_model: {source}", "---", "", f"# Merged with adamerge: `{method}`", "",
             f"- base model: `{source}`", f"- method: `{method}` ({args[0]}), arguments: `{args[1]}`",
             f"- merged tensors: {merged} of {total}; the others are the base's", ""]
    if vocab:
        lines += [f"- vocabulary: shared rows merged, the rest and the tokenizer from `{vocab}`", ""]
    return "\n".join([*lines, "| task | expert | kind |", "|---|---|---|", *rows]) + "\n"


def test_task_arithmetic_writes_the_whole_folder(zoo, tmp_path):
    root, base, s = zoo
    pool = _pool(zoo, "math", "chat", "code")
    out = merge_hf(pool, "task_arithmetic", tmp_path / "out", tasks=["code", "chat"], lam=0.5, max_shard_size=200,
                   progress=False)
    assert out == tmp_path / "out"
    got = _read(out)
    assert sorted(got) == sorted(base)
    for k, b in base.items():
        assert got[k].dtype == b.dtype, k
        if not b.is_floating_point():
            assert torch.equal(got[k], b)
            continue
        want = b.float() + 0.5 * ((s["code"][k].float() - b.float()) + (s["chat"][k].float() - b.float()))
        torch.testing.assert_close(got[k].float(), want.to(b.dtype).float(), rtol=0.01, atol=1e-5, msg=k)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "model.safetensors.index.json", "config.json",
                                                            "tokenizer_config.json", "README.md", "manifest.json"])
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "adamerge_method": "task_arithmetic"}
    assert (out / "config.json").read_text() == json.dumps(BASE_CONFIG, indent=2) + "\n"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"who": "base"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k not in ("files", "written")} == {
        "method": "task_arithmetic", "preset": None, "arguments": {"lam": 0.5}, "tasks": ["code", "chat"],
        "mode": "out of core, per tensor", "base": str(root / "base")}
    rows = [f"| code | `{root / 'code'}` | full fine-tune |", f"| chat | `{root / 'chat'}` | LoRA adapter |"]
    assert (out / "README.md").read_text() == _card(root / "base", "task_arithmetic",
                                                    ("out of core, per tensor", '{"lam": 0.5}'), 4, 5, rows)


@pytest.mark.parametrize(("method", "kwargs", "in_memory", "mode"), [
    ("pcb", {}, True, "in memory"), ("task_arithmetic", {"lam": 0.5}, True, "in memory"),
    ("ties", {"preset": "paper"}, False, "out of core, exact passes"),
    ("ties", {"preset": "paper"}, True, "in memory")])
def test_other_methods_presets_and_modes(zoo, tmp_path, method, kwargs, in_memory, mode):
    _, base, s = zoo
    pool = _pool(zoo, "math", "code", "chat")
    out = merge_hf(pool, method, tmp_path / "o", tasks=["chat", "math"], in_memory=in_memory, progress=False, **kwargs)
    mem = _InMemory(base, {t: s[t] for t in ("chat", "math")})
    want = merge_pool(mem, method, **kwargs)
    if method == "ties":
        assert not torch.allclose(merge_pool(mem, "ties")["layers.0.weight"], want["layers.0.weight"])
    got = _read(out)
    for k in mem.keys:
        torch.testing.assert_close(got[k].float(), want[k].to(base[k].dtype).float(), rtol=0.01, atol=1e-5, msg=k)
    manifest = json.loads((out / "manifest.json").read_text())
    preset = kwargs.get("preset")
    assert manifest["mode"] == mode and manifest["preset"] == preset and manifest["tasks"] == ["chat", "math"]
    assert manifest["arguments"] == {k: v for k, v in kwargs.items() if k != "preset"}
    assert f"- method: `{method}` ({mode}), arguments: `{json.dumps(kwargs)}`" in (out / "README.md").read_text()


def test_bfloat16_output_and_its_config(zoo, tmp_path):
    _, base, _ = zoo
    out = merge_hf(_pool(zoo, "math"), "task_arithmetic", tmp_path / "o", dtype="bfloat16", progress=False)
    got = _read(out)
    assert {k: v.dtype for k, v in got.items()} == {k: torch.int64 if k == "pos" else torch.bfloat16 for k in base}
    config = json.loads((out / "config.json").read_text())
    assert config == dict(BASE_CONFIG, dtype="bfloat16", torch_dtype="bfloat16")
    assert DTYPES == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def test_another_vocabulary_takes_the_source_s_rows_tokenizer_and_size(zoo, tmp_path):
    root, base, s = zoo
    pool = _pool(zoo, "math", "big", vocab_source="big")
    out = merge_hf(pool, "task_arithmetic", tmp_path / "o", max_shard_size="1KB", progress=False)
    got = _read(out)
    for k in ("embed.weight", "lm_head.weight"):
        want = base[k] + 0.3 * ((s["math"][k] - base[k]) + (s["big"][k][:10] - base[k]))
        torch.testing.assert_close(got[k][:10], want, rtol=0, atol=1e-6)
        assert torch.equal(got[k][10:], s["big"][k][10:])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 12 and config["text_config"] == {"vocab_size": 12, "hidden": 4}
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"who": "big"}
    rows = [f"| math | `{root / 'math'}` | full fine-tune |", f"| big | `{root / 'big'}` | full fine-tune |"]
    assert (out / "README.md").read_text() == _card(root / "base", "task_arithmetic",
                                                    ("out of core, per tensor", "{}"), 4, 5, rows, vocab="big")


class _Stub:
    def __init__(self, config, rows) -> None:
        self.base = self
        self._config, self._rows = config, rows

    def config(self):
        return None if self._config is None else json.loads(json.dumps(self._config))

    def vocab_rows(self):
        return self._rows


@pytest.mark.parametrize(("config", "rows", "dtype", "want"), [
    (None, {"e": 12}, torch.float16, None),
    ({"vocab_size": 10, "x": 1}, {}, None, {"vocab_size": 10, "x": 1}),
    ({"vocab_size": 10}, {"e": 12, "h": 11}, torch.float16, {"vocab_size": 12, "dtype": "float16"}),
    ({"vocab_size": 10, "text_config": {"vocab_size": 10}}, {"e": 12}, None,
     {"vocab_size": 12, "text_config": {"vocab_size": 12}}),
    ({"vocab_size": 10, "text_config": {"vocab_size": 7}}, {"e": 12}, None,
     {"vocab_size": 12, "text_config": {"vocab_size": 7}}),
    ({"text_config": {"vocab_size": 7}}, {"e": 12}, None, {"vocab_size": 12, "text_config": {"vocab_size": 12}}),
    ({"vocab_size": 10, "text_config": {"hidden": 4}}, {"e": 12}, None, {"vocab_size": 12, "text_config": {"hidden": 4}}),
    ({"vocab_size": 10, "text_config": [1]}, {"e": 12}, None, {"vocab_size": 12, "text_config": [1]}),
    ({"torch_dtype": "float32"}, {}, torch.bfloat16, {"torch_dtype": "bfloat16", "dtype": "bfloat16"}),
])
def test_config_updates(config, rows, dtype, want):
    assert _config(_Stub(config, rows), dtype) == want


def test_model_card_arguments_are_sorted_and_stringified(zoo):
    root, _, _ = zoo
    pool = _pool(zoo, "math", "chat", vocab_source="base")
    card = model_card(pool, "ties", ["chat"], "paper", {"lam": 0.5, "keep": Path("a/b")}, "M")
    assert card == _card(root / "base", "ties", ("M", '{"keep": "a/b", "lam": 0.5, "preset": "paper"}'), 4, 5,
                         [f"| chat | `{root / 'chat'}` | LoRA adapter |"])
    assert "- method: `ties` (M), arguments: `{}`" in model_card(pool, "ties", ["math"], None, {}, "M")


def test_refusals(zoo, tmp_path):
    pool = _pool(zoo, "math")
    known = ", ".join(sorted(METHODS))
    with pytest.raises(MergeError, match="^" + re.escape(f"unknown merging method 'nope'; known methods: {known}") + "$"):
        merge_hf(pool, "nope", tmp_path / "o")
    with pytest.raises(MergeError, match="^" + re.escape(
            "merging method 'pcb' needs the whole model in memory (a whole-model statistic, no out-of-core version): "
            "pass --in_memory to merge it so") + "$"):
        merge_hf(pool, "pcb", tmp_path / "o")
    (tmp_path / "o").mkdir()
    bad = "^" + re.escape("unknown dtype 'int8': use one of float32, float16, bfloat16") + "$"
    with pytest.raises(MergeError, match=bad):  # named before the existing output or the task list
        merge_hf(pool, "task_arithmetic", tmp_path / "o", tasks=["zzz"], dtype="int8")
    with pytest.raises(MergeError, match=bad):
        write_folder(pool, iter([]), tmp_path / "new", "card", {}, dtype="int8")
    assert not (tmp_path / "new").exists()
    exists = "^" + re.escape(f"{tmp_path / 'o'} exists: refusing to overwrite it (pass --overwrite to replace it)") + "$"
    with pytest.raises(OutputExistsError, match=exists):
        merge_hf(pool, "task_arithmetic", tmp_path / "o")
    with pytest.raises(OutputExistsError, match=exists):
        write_folder(pool, iter([]), tmp_path / "o", "card", {})
    with pytest.raises(OutputExistsError, match=exists):
        check_target(str(tmp_path / "o"), False)
    assert check_target(str(tmp_path / "p"), False) == tmp_path / "p" and check_target(tmp_path / "o", True) == tmp_path / "o"
    merge_hf(pool, "task_arithmetic", tmp_path / "o", overwrite=True, progress=False)
    assert (tmp_path / "o" / "README.md").is_file()
    with pytest.raises(MergeError, match="^" + re.escape(
            "internal: merge yielded 'layers.0.weight' where 'embed.weight' was expected") + "$"):
        write_folder(pool, iter([("layers.0.weight", torch.zeros(6, 4))]), tmp_path / "q", "card", {}, progress=False)


def test_progress_bars_name_the_merge_and_count_tensors(zoo, tmp_path, capsys):
    pool = _pool(zoo, "math")
    merge_hf(pool, "task_arithmetic", tmp_path / "a")
    err = capsys.readouterr().err
    assert "adamerge merge task_arithmetic: 100%" in err and re.search(r"[\d.]+(tensor/s|s/tensor)\]", err)
    merge_hf(pool, "task_arithmetic", tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""
    merged = ((k, pool.pretrained_tensor(k).clone()) for k in pool.merge_keys())
    write_folder(pool, merged, tmp_path / "c", "card", {"method": Path("m")})
    err = capsys.readouterr().err
    assert "adamerge export: 100%" in err and re.search(r"[\d.]+(tensor/s|s/tensor)\]", err)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["method"] == "m"
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["adamerge_method"] == "m"


@pytest.mark.parametrize(("dtype", "limit", "source"), [(None, 200, None), ("bfloat16", 100, None),
                                                         ("float16", 150, "big"), (None, 230, "big")])
def test_the_pending_shard_is_written_before_a_tensor_that_will_not_fit(zoo, tmp_path, dtype, limit, source):
    _, _, _ = zoo
    pool = _pool(zoo, "math", *(["big"] if source else []), vocab_source=source)
    rows, to = pool.vocab_rows(), DTYPES.get(dtype)
    shards, pending, want = 0, 0, {}
    for key in pool.keys():  # noqa: SIM118 (the documented protocol, with each output tensor's size)
        shape, stored = list(pool.base.shape(key)), pool.base.dtype(key)
        shape[0] = rows.get(key, shape[0])
        size = torch.Size(shape).numel() * (to if to is not None and stored.is_floating_point else stored).itemsize
        if pending and pending + size > limit:
            shards, pending = shards + 1, 0
        want[key], pending = shards, pending + size
    seen = {}

    def merged():
        for key in pool.merge_keys():
            seen[key] = len(list(tmp_path.glob(".out.tmp-*/.shard-*")))
            yield key, pool.pretrained_tensor(key).clone()

    write_folder(pool, merged(), tmp_path / "out", "card", {}, dtype=dtype, max_shard_size=limit, progress=False)
    assert seen == {k: want[k] for k in pool.merge_keys()}
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == shards + 1


def test_the_model_card_is_utf8_whatever_the_locale(zoo, tmp_path, c_locale):
    root = zoo[0]
    pool = HFPool(root / "base", {"thé": root / "math"})
    merge_hf(pool, "task_arithmetic", tmp_path / "o", progress=False)
    assert "| thé |" in (tmp_path / "o" / "README.md").read_text(encoding="utf-8")


def test_a_base_without_config_writes_none(zoo, tmp_path):
    root, base, _ = zoo
    _write(tmp_path / "b", base, {})
    pool = HFPool(tmp_path / "b", {"math": root / "math"})
    out = merge_hf(pool, "weight_average", tmp_path / "o", dtype="float16", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json", "model.safetensors"]
