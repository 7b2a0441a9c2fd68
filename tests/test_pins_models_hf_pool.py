"""Pins of adamerge.models.hf_pool (issue #17): HFPool over model folders written here with safetensors.

The base holds every kind of tensor a real model has: float32, float16, float64 and bfloat16 weights, an int64
buffer, a 3-D weight, a zero-width one and two vocabulary-sized tables (10 rows). Experts: ``math`` (a full
fine-tune), ``small`` (vocabulary 9) and ``big`` (vocabulary 12), each with its own noise on every float tensor
(so reading the wrong model's tensor shows), ``big`` with its own tokenizer and config, and ``chat`` (a LoRA
adapter of one linear layer, its delta recomputed here as s·B·A).

Why the data disagree with the plausible wrong versions:
- small (9) is listed before big (12): the shared rows are the minimum over all experts (9), not the last pair's
  (10), and neither a width (4) nor the base's 10;
- the tensor before the vocabulary tables in file order has equal shapes, so a loop that stops at the first
  equal shape misses the mismatch; a 1-D base tensor against a scalar expert one is a shape error, not a
  vocabulary one; a same-rank mismatch in the trailing dimension is named as such;
- ``include`` / ``exclude`` are searched (not matched) in the name and are combined;
- row blocks are asked with byte limits on both sides of a block boundary (96 = the whole 6×4 float32 tensor,
  95, 40, 10) and of a 3-D tensor (rows are its first dimension, a row is 3·2 floats); a zero-width tensor
  with a negative limit must still not divide by zero;
- tensors are read on the ``meta`` device (a device that is dropped gives a CPU tensor) and in float32 from
  float16 / bfloat16 storage (a dropped dtype keeps the stored one);
- the cached θ_0 tensor is the same object when asked twice, another when the rows differ, and a failed read
  leaves a cache that the next read recovers from;
- ``finish`` appends the vocabulary source's own extra rows converted to the merged tensor's dtype, returns the
  merged tensor itself when there is nothing to append, and copies unmerged tensors from the right model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from adamerge.models.hf_pool import HFPool
from adamerge.models.safetensors_folder import FolderError

SHAPES = {"a.first": ((3,), torch.float32), "embed.weight": ((10, 4), torch.float32),
          "layers.0.weight": ((6, 4), torch.float32), "layers.1.weight": ((6, 4), torch.float16),
          "conv.w": ((4, 3, 2), torch.float32), "visual.w": ((3, 4), torch.float64), "norm": ((4,), torch.bfloat16),
          "pos": ((5,), torch.int64), "lm_head.weight": ((10, 4), torch.float32), "zero.w": ((5, 0), torch.float32)}
VOCAB = ("embed.weight", "lm_head.weight")


def _write(folder, tensors: dict, files: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    for name, content in (files or {}).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def _model(seed: int, rows: int = 10, base: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in SHAPES.items():
        if k == "pos":
            out[k] = torch.arange(5)
            continue
        shape = (rows, *shape[1:]) if k in VOCAB else shape
        noise = torch.randn(shape, generator=g)
        if base is not None:  # a fine-tune: the base (its rows, zero-padded) plus noise
            b = base[k].float()
            if k in VOCAB:
                b = torch.cat([b, torch.zeros(max(rows - 10, 0), *shape[1:])])[:rows]
            noise = b + 0.1 * noise
        out[k] = noise.to(dtype)
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = _model(0)
    states = {"base": base, "math": _model(1, 10, base), "small": _model(2, 9, base), "big": _model(3, 12, base)}
    _write(root / "base", base, {"config.json": {"vocab_size": 10}, "tokenizer_config.json": {"who": "base"},
                                 "generation_config.json": {"who": "base"}})
    _write(root / "math", states["math"], {"config.json": {"who": "math"}})
    _write(root / "small", states["small"])
    _write(root / "big", states["big"], {"config.json": {"vocab_size": 12}, "tokenizer_config.json": {"who": "big"}})
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    (root / "chat").mkdir()
    save_file({"base_model.model.layers.0.lora_A.weight": a, "base_model.model.layers.0.lora_B.weight": b},
              str(root / "chat" / "adapter_model.safetensors"))
    (root / "chat" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3}))
    states["chat"] = dict(base, **{"layers.0.weight": base["layers.0.weight"] + 1.5 * b @ a})
    return root, states


def _pool(zoo, *tasks, **kw) -> HFPool:
    root, _ = zoo
    return HFPool(root / "base", {t: root / t for t in tasks}, **kw)


def _refused(match: str):
    return pytest.raises(FolderError, match="^" + re.escape(match) + "$")


def test_keys_tasks_and_which_tensors_are_merged(zoo):
    pool = _pool(zoo, "math", "chat")
    assert sorted(pool.keys()) == sorted(SHAPES) and pool.tasks == ["math", "chat"]
    assert sorted(pool.merge_keys()) == sorted(set(SHAPES) - {"pos"})  # every float dtype, not the int buffer
    assert type(pool.experts["chat"]).__name__ == "LoraExpert" and type(pool.experts["math"]).__name__ == "SafetensorsFolder"
    assert pool.experts["chat"].label == "expert 'chat'" and pool.base.label == "base model"
    assert pool.device == torch.device("cpu") and pool.vocab_source is None and pool.rows == {}
    assert pool.vocab_rows() == {}
    inc = _pool(zoo, "math", include=["layers", "^visual"], exclude=[r"1\."])
    assert sorted(inc.merge_keys()) == ["layers.0.weight", "visual.w"]
    exc = _pool(zoo, "math", exclude=["w$", "norm"])
    assert sorted(exc.merge_keys()) == ["a.first", "embed.weight", "layers.0.weight", "layers.1.weight", "lm_head.weight"]
    keys = exc.merge_keys()
    keys.append("x")  # a copy
    assert "x" not in exc.merge_keys()


def test_check_tasks(zoo):
    pool = _pool(zoo, "math", "chat")
    assert pool.check_tasks() == ["math", "chat"] and pool.check_tasks(["chat"]) == ["chat"]
    assert pool.check_tasks(("chat", "math")) == ["chat", "math"]
    with pytest.raises(ValueError, match=r"task 'code' has no expert in the pool \(pool tasks: \['math', 'chat'\]\)"):
        pool.check_tasks(["code"])


def test_tensors_and_task_vectors_are_float32_and_cut_to_the_shared_rows(zoo):
    _, s = zoo
    pool = _pool(zoo, "small", "big", "math", "chat", vocab_source="big")
    assert pool.rows == {"embed.weight": 9, "lm_head.weight": 9}
    for key in ("embed.weight", "layers.1.weight", "norm", "layers.0.weight"):
        n = 9 if key in VOCAB else None
        base = s["base"][key].float()[:n]
        got = pool.pretrained_tensor(key)
        assert got.dtype == torch.float32 and torch.equal(got, base), key
        for task in ("small", "big", "math", "chat"):
            want = s[task][key].float()[:n]
            e = pool.expert_tensor(task, key)
            assert e.dtype == torch.float32
            torch.testing.assert_close(e, want, rtol=0, atol=1e-6)
            torch.testing.assert_close(pool.task_vector_tensor(task, key), want - base, rtol=0, atol=1e-6)
    rows = slice(2, 5)
    for key in ("embed.weight", "layers.0.weight"):
        base = s["base"][key][rows]
        assert torch.equal(pool.pretrained_tensor(key, rows), base)
        torch.testing.assert_close(pool.task_vector_tensor("big", key, rows), s["big"][key][rows] - base, rtol=0, atol=1e-6)
        torch.testing.assert_close(pool.expert_tensor("chat", key, rows), s["chat"][key][rows], rtol=0, atol=1e-6)
    state = pool.pretrained_state()
    assert list(state) == pool.merge_keys()
    for k, v in state.items():
        assert v.dtype == torch.float32 and torch.equal(v, s["base"][k].float()[: 9 if k in VOCAB else None]), k
    tvs = list(pool.task_vectors(["chat", "math"]))
    assert [t for t, _ in tvs] == ["chat", "math"]
    for task, tv in tvs:
        assert list(tv) == pool.merge_keys()
        for k, v in tv.items():
            n = 9 if k in VOCAB else None
            torch.testing.assert_close(v, s[task][k].float()[:n] - s["base"][k].float()[:n], rtol=0, atol=1e-6)
    assert [t for t, _ in pool.task_vectors()] == ["small", "big", "math", "chat"]


def test_tensors_go_to_the_device(zoo):
    pool = _pool(zoo, "math", device="meta")
    assert pool.device == torch.device("meta")
    for t in (pool.pretrained_tensor("layers.1.weight"), pool.expert_tensor("math", "layers.1.weight", slice(0, 2)),
              pool.task_vector_tensor("math", "norm"), *pool.pretrained_state().values(),
              *next(pool.task_vectors())[1].values()):
        assert t.device.type == "meta" and t.dtype == torch.float32


def test_the_last_base_tensor_read_is_kept(zoo):
    _, s = zoo
    pool = _pool(zoo, "math")
    a = pool.pretrained_tensor("layers.0.weight")
    assert pool.pretrained_tensor("layers.0.weight") is a
    b = pool.pretrained_tensor("layers.0.weight", slice(0, 2))
    assert b is not a and torch.equal(b, s["base"]["layers.0.weight"][:2])
    assert torch.equal(pool.pretrained_tensor("layers.0.weight", slice(2, 4)), s["base"]["layers.0.weight"][2:4])
    assert pool.pretrained_tensor("layers.0.weight", slice(2, 4)) is pool.pretrained_tensor("layers.0.weight", slice(2, 4))
    assert torch.equal(pool.pretrained_tensor("visual.w"), s["base"]["visual.w"].float())
    with pytest.raises(FolderError, match="has no tensor 'nope'"):
        pool.pretrained_tensor("nope")
    assert torch.equal(pool.pretrained_tensor("visual.w"), s["base"]["visual.w"].float())


@pytest.mark.parametrize(("key", "max_bytes", "want"), [
    ("layers.0.weight", 96, None), ("layers.0.weight", 95, [(0, 5), (5, 6)]), ("layers.0.weight", 40, [(0, 2), (2, 4), (4, 6)]),
    ("layers.0.weight", 10, [(i, i + 1) for i in range(6)]), ("norm", 1, None),
    ("conv.w", 50, [(0, 2), (2, 4)]), ("conv.w", 96, None), ("conv.w", 95, [(0, 3), (3, 4)]),
    ("embed.weight", 64, [(0, 4), (4, 8), (8, 9)]), ("zero.w", -1, None), ("zero.w", 0, None)])
def test_row_blocks(zoo, key, max_bytes, want):
    pool = _pool(zoo, "small", "big", vocab_source="base")
    got = pool.row_blocks(key, max_bytes)
    assert (got if got is None else [(b.start, b.stop) for b in got]) == want
    assert pool.row_blocks("layers.0.weight") is None  # 32 MiB by default


def test_finish_appends_the_vocabulary_source_s_rows(zoo):
    _, s = zoo
    for source, pool_tasks in (("big", ("small", "big")), ("base", ("small", "big")), (None, ("math",))):
        pool = _pool(zoo, *pool_tasks, vocab_source=source)
        model = s[source or "base"]
        for key in SHAPES:
            if key in pool.rows:
                merged = torch.full((9, 4), 7.0, dtype=torch.bfloat16)
                got = pool.finish(key, merged)
                assert got.dtype == torch.bfloat16 and torch.equal(got[:9], merged)
                assert torch.equal(got[9:], model[key][9:].to(torch.bfloat16)) and len(got) == len(model[key])
                assert torch.equal(pool.finish(key, None), model[key])
            else:  # unmerged and merged non-vocabulary tensors: θ_0's, or the merge as it is
                assert torch.equal(pool.finish(key, None), s["base"][key]) and pool.finish(key, None).dtype == SHAPES[key][1]
                m = torch.ones(3)
                assert pool.finish(key, m) is m
        assert pool.vocab_rows() == {k: len(model[k]) for k in pool.rows}
    pool = _pool(zoo, "small", "big", vocab_source="small")  # nothing to append: the merged tensor itself
    merged = torch.zeros(9, 4)
    assert pool.finish("embed.weight", merged) is merged and pool.vocab_rows() == {k: 9 for k in VOCAB}


def test_side_files_take_the_tokenizer_of_the_vocabulary_source(zoo):
    root, _ = zoo
    for source, tok in ((None, "base"), ("base", "base"), ("big", "big")):
        tasks = ("math",) if source is None else ("small", "big")
        files = {p.name: p for p in _pool(zoo, *tasks, vocab_source=source).side_files()}
        assert files == {"config.json": root / "base" / "config.json",
                         "tokenizer_config.json": root / tok / "tokenizer_config.json",
                         "generation_config.json": root / "base" / "generation_config.json"}, source
    files = {p.name: p for p in _pool(zoo, "small", "math", vocab_source="math").side_files()}
    assert files["config.json"] == root / "base" / "config.json"


def test_bad_arguments_are_refused_by_name(zoo, tmp_path):
    root, _ = zoo
    with _refused("no experts: a merge needs at least one expert"):
        HFPool(root / "base", {})
    with _refused(f"base model: no folder {tmp_path / 'nope'} (and it is no Hub id org/name)"):
        HFPool(tmp_path / "nope", {"math": root / "math"})
    with _refused(f"expert 'code': no folder {tmp_path / 'nope'} (and it is no Hub id org/name)"):
        HFPool(root / "base", {"code": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with _refused(f"expert 'code': {tmp_path / 'empty'} holds no .safetensors weights"):
        HFPool(root / "base", {"code": tmp_path / "empty"})
    bad = tmp_path / "lora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    with _refused(f"expert 'chat': {bad} has no adapter_model.safetensors"):
        HFPool(root / "base", {"chat": bad})
    for what in ("include", "exclude"):
        with _refused(f"{what} pattern '(' is not a regular expression (missing ), unterminated subpattern at "
                      "position 0)"):
            HFPool(root / "base", {"math": root / "math"}, **{what: ["x", "("]})
    with _refused("vocab_source 'code' is neither 'base' nor a task (math, small)"):
        _pool(zoo, "math", "small", vocab_source="code")


def _variant(root, tmp_path, name, change: dict, drop=()):
    _, s = root
    tensors = {k: v for k, v in s["math"].items() if k not in drop}
    tensors.update(change)
    return _write(tmp_path / name, tensors)


def test_experts_that_do_not_fit_the_base_are_refused_by_name(zoo, tmp_path):
    root, _ = zoo
    base = f"{root / 'base'}"
    x = _variant(zoo, tmp_path, "x", {}, drop=("norm", "conv.w"))
    with _refused(f"expert 'x' ({x}) lacks tensor 'conv.w': is it a fine-tune of {base}?"):
        HFPool(root / "base", {"math": root / "math", "x": x})
    y = _variant(zoo, tmp_path, "y", {"extra.b": torch.ones(1), "extra.a": torch.ones(1)})
    with _refused(f"expert 'y' ({y}) has tensor 'extra.a' the base lacks: is it a fine-tune of {base}?"):
        HFPool(root / "base", {"y": y})
    z = _variant(zoo, tmp_path, "z", {"extra.a": torch.ones(1)}, drop=("norm",))
    with _refused(f"expert 'z' ({z}) lacks tensor 'norm': is it a fine-tune of {base}?"):
        HFPool(root / "base", {"z": z})
    w = _variant(zoo, tmp_path, "w", {"layers.0.weight": torch.ones(6, 5)})
    with _refused("expert 'w': tensor 'layers.0.weight' has shape (6, 5) but the base (6, 4)"):
        HFPool(root / "base", {"w": w}, vocab_source="base")
    with _refused("expert 'w': tensor 'layers.0.weight' has shape (6, 5) but the base (6, 4)"):
        HFPool(root / "base", {"w": w})
    v = _variant(zoo, tmp_path, "v", {"norm": torch.tensor(1.0, dtype=torch.bfloat16)})
    with _refused("expert 'v': tensor 'norm' has shape () but the base (4,)"):
        HFPool(root / "base", {"v": v})
    u = _variant(zoo, tmp_path, "u", {"norm": torch.ones(1, 4, dtype=torch.bfloat16)})
    with _refused("expert 'u': tensor 'norm' has shape (1, 4) but the base (4,)"):
        HFPool(root / "base", {"u": u})


def test_another_vocabulary_is_refused_without_a_vocab_source(zoo):
    root, _ = zoo
    pool = _pool(zoo, "math")
    first = pool.base.keys().index("embed.weight")
    assert first > 0 and pool.base.keys()[0] not in VOCAB  # an equal-shaped tensor comes first
    with _refused("expert 'big': tensor 'embed.weight' has shape (12, 4) but the base (10, 4): the vocabularies differ. "
                  "Pass vocab_source=base (merge the shared rows, keep the base's vocabulary and tokenizer) or "
                  "vocab_source=<task> (the other rows and the tokenizer from that expert)"):
        HFPool(root / "base", {"math": root / "math", "big": root / "big"})
    assert _pool(zoo, "big", vocab_source="base").rows == {"embed.weight": 10, "lm_head.weight": 10}
    assert _pool(zoo, "big", "small", vocab_source="big").rows == {"embed.weight": 9, "lm_head.weight": 9}
