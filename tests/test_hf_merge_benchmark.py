"""benchmarks/hf_merge_memory.py: a --small run end to end (no mergekit venv), its inputs and its numbers.

The record's figures are checked against what the test computes itself from the folders the run
built: the memory target from the safetensors headers, the task-arithmetic merge from the tensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_merge_memory.py"
MKVENV = Path("/tmp/mkvenv")
K = 4


def _script():
    spec = importlib.util.spec_from_file_location("hf_merge_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp: Path, *extra: str) -> dict:
    out = tmp / "record.json"
    cmd = [sys.executable, str(SCRIPT), "--small", "--work", str(tmp / "work"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a file, not a dict)
    return dict(sorted(out.items(), key=lambda kv: list(index).index(kv[0])))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hfmm")
    # a venv path that does not exist: the run must go on without mergekit, as on CI
    return _run(tmp, "--methods", "task_arithmetic", "--mergekit_venv", str(tmp / "no_venv"))


def test_the_small_run_merges_both_ways_and_skips_mergekit_with_a_note(record):
    assert [r["run"] for r in record["runs"]] == ["adamerge task_arithmetic out-of-core",
                                                  "adamerge task_arithmetic in-memory"]
    assert all(r["returncode"] == 0 and "error" not in r for r in record["runs"])
    assert "mergekit skipped" in record["mergekit"]["note"] and record["mergekit"]["venv"].endswith("no_venv")
    assert record["out_of_core_equals_in_memory"] == {"task_arithmetic": True}
    assert record["runs"][0]["command"].startswith("adamerge merge --base ")
    ooc, mem = (r["command"] for r in record["runs"])
    assert "--in_memory true" in mem and "--in_memory" not in ooc
    assert len(record["load_average_before"]) == 3 and record["machine"]["cores"] >= 1


def test_the_target_is_one_model_plus_k_plus_2_largest_tensors_read_from_the_files(record):
    base = Path(record["config"]["work"]) / "models" / "base"
    sizes = {}
    for shard in base.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                t = f.get_tensor(k)
                sizes[k] = t.numel() * t.element_size()
    model, largest = sum(sizes.values()), max(sizes.values())
    assert record["model"]["model_bytes"] == model and record["model"]["largest_bytes"] == largest
    assert record["model"]["largest_tensor"] == "model.embed_tokens.weight"  # vocab 1000 × 64 beats the MLP
    assert record["target_bf16_bytes"] == model + (K + 2) * largest
    assert record["target_f32_tensors_bytes"] == model + (K + 2) * 2 * largest


def test_each_run_has_its_own_peak_time_and_ratio(record):
    for r in record["runs"]:
        assert 0 < r["rss_after_imports_kib"] <= r["peak_rss_kib"]
        assert 0 < r["merge_s"] < r["wall_s"]
        target = record["target_bf16_bytes"]
        assert r["peak_over_target_bf16"] == pytest.approx(r["peak_rss_kib"] * 1024 / target)
    ooc, mem = record["runs"]
    ratios = record["ratios"]
    assert ratios["task_arithmetic: adamerge out-of-core / in-memory, time"] == pytest.approx(
        ooc["merge_s"] / mem["merge_s"])
    assert ratios["task_arithmetic: adamerge out-of-core / in-memory, peak RSS"] == pytest.approx(
        ooc["peak_rss_kib"] / mem["peak_rss_kib"])


def test_the_merge_is_task_arithmetic_of_the_built_folders(record):
    """θ_0 + 0.3·Σ_k τ_k in float32, summed in task order, as bf16: what both tools compute. The
    experts' noise (1e-3) is ~8 bf16 spacings of a 0.02-sized weight, so λ = 1, a mean or a wrong
    base would change most entries."""
    models = Path(record["config"]["work"]) / "models"
    base = _tensors(models / "base")
    experts = [_tensors(models / f"expert{k}") for k in range(K)]
    merged = _tensors(Path(record["runs"][0]["out"]))
    assert list(merged) == list(base) and "lm_head.weight" not in merged  # tied embedding, as Qwen2-0.5B
    for key, theta0 in base.items():
        total = experts[0][key].float() - theta0.float()
        for e in experts[1:]:
            total += e[key].float() - theta0.float()
        expected = (theta0.float() + 0.3 * total).to(torch.bfloat16)
        assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], expected), key
    config = json.loads((Path(record["runs"][0]["out"]) / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["model_type"] == "qwen2"


def test_each_expert_leaves_the_norms_and_every_k_plus_1_th_tensor_untouched(record):
    models = Path(record["config"]["work"]) / "models"
    base = _tensors(models / "base")
    for k in range(K):
        expert = _tensors(models / f"expert{k}")
        for i, (key, theta0) in enumerate(base.items()):
            if key.endswith("norm.weight") or i % (K + 1) == k:
                assert torch.equal(expert[key], theta0), (k, key)
            else:  # noise 1e-3 moves most bf16 entries of a 0.02-std weight
                assert (expert[key] != theta0).float().mean() > 0.5, (k, key)


def test_the_tensor_names_and_shapes_are_transformers_qwen2():
    transformers = pytest.importorskip("transformers")
    hf = _script()
    for shape in (hf.SMALL, hf.QWEN2_05B):
        config = hf.qwen2_config(shape)
        cfg = transformers.Qwen2Config(**{k: v for k, v in config.items() if k != "architectures"})
        with torch.device("meta"):
            model = transformers.Qwen2ForCausalLM(cfg)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        assert dict(hf.qwen2_tensors(config)) == state
    # Qwen2-0.5B's published size: 494M parameters (0.49B), the embedding shared with the output
    assert sum(math.prod(s) for _, s in hf.qwen2_tensors(hf.qwen2_config(hf.QWEN2_05B))) == 494_032_768


def test_compare_counts_differences_in_entries_and_bf16_spacings(tmp_path):
    hf = _script()
    a = torch.linspace(-2, 3, 15, dtype=torch.bfloat16).reshape(3, 5)  # non-square, magnitudes from 0.x to 3
    b = a.clone()
    b[0, 0] = -2.015625  # one bf16 spacing (2^-6) away from -2
    b[2, 4] = 3.25  # 0.25 away from 3: sixteen spacings (2^-6 at magnitude 2..4)
    for name, t, extra in (("a", a, {}), ("b", b, {"only.b": torch.zeros(2, dtype=torch.bfloat16)})):
        (tmp_path / name).mkdir()
        save_file({"w": t, **extra}, str(tmp_path / name / "model.safetensors"))
    c = hf.compare(tmp_path / "a", tmp_path / "b")
    assert c["differing"] == 2 and c["entries"] == 15 and c["fraction_differing"] == pytest.approx(2 / 15)
    assert c["max_abs_diff"] == pytest.approx(0.25) and c["max_diff_bf16_spacings"] == pytest.approx(16)
    assert c["only_in_second"] == ["only.b"] and not c["identical"]
    assert hf.compare(tmp_path / "a", tmp_path / "a")["identical"]


@pytest.mark.slow
@pytest.mark.skipif(not (MKVENV / "bin" / "mergekit-yaml").is_file(), reason="no /tmp/mkvenv")
def test_mergekit_task_arithmetic_matches_and_its_per_tensor_ties_differs(tmp_path):
    record = _run(tmp_path, "--methods", "task_arithmetic", "ties", "--mergekit_venv", str(MKVENV))
    comps = record["comparisons"]
    ta, ties = comps["task_arithmetic: adamerge vs mergekit"], comps["ties: adamerge vs mergekit"]
    assert ta["only_in_first"] == ta["only_in_second"] == [] and ta["max_diff_bf16_spacings"] <= 1
    assert ties["fraction_differing"] > 0.01  # per-tensor trimming keeps other entries than whole-model
    assert record["out_of_core_equals_in_memory"] == {"task_arithmetic": True, "ties": True}
    assert {r["run"] for r in record["runs"]} >= {"mergekit task_arithmetic", "mergekit ties"}


def _speed_script():
    path = SCRIPT.with_name("hf_merge_speed.py")
    spec = importlib.util.spec_from_file_location("hf_merge_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_the_speed_summary_takes_medians_of_times_and_of_per_round_ratios():
    """Three rounds where the median of the ratios (1.0, from round 2) is not the ratio of the medians
    (2.5 / 4 = 0.625): a summary that divided medians, or took means, would say otherwise."""
    speed = _speed_script()
    times = [(1.0, 4.0), (3.0, 3.0), (2.5, 1.0)]  # (adamerge, mergekit) merge seconds per round
    rounds = [[{"method": "ties", "tool": "adamerge", "merge_s": a, "wall_s": a + 1},
               {"method": "ties", "tool": "mergekit", "merge_s": m, "wall_s": m + 1}] for a, m in times]
    got = speed.summary(rounds, ["ties"])["ties"]
    assert got["adamerge"]["median_merge_s"] == 2.5 and got["mergekit"]["median_merge_s"] == 3.0
    assert got["adamerge_over_mergekit_merge_s"] == {"median": 1.0, "min": 0.25, "max": 2.5}
    assert got["adamerge_over_mergekit_wall_s"]["median"] == 4.0 / 4.0


def test_the_speed_run_without_mergekit_times_adamerge_alone(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT.with_name("hf_merge_speed.py")), "--small", "--work", str(tmp_path / "w"),
           "--rounds", "2", "--methods", "task_arithmetic", "--mergekit_venv", str(tmp_path / "none"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    assert "mergekit skipped" in record["mergekit"]["note"] and len(record["rounds"]) == 2
    ta = record["summary"]["task_arithmetic"]
    assert set(ta) == {"adamerge"}  # no ratio without mergekit
    times = sorted(r[0]["merge_s"] for r in record["rounds"])
    assert ta["adamerge"]["median_merge_s"] == pytest.approx(sum(times) / 2)
