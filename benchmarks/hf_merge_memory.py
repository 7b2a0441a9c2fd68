"""Peak RSS and time of `adamerge merge` on a Qwen2-0.5B-sized model: out of core, whole-model, mergekit.

    python3 benchmarks/hf_merge_memory.py            # writes benchmarks/results/hf_merge_qwen2_0.5b.json
    python3 benchmarks/hf_merge_memory.py --small --work /tmp/hfmm_small     # a smoke run, seconds

θ_0 is a random Qwen2 with Qwen2-0.5B's shapes (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV heads,
vocabulary 151936, embedding tied to the output as in the real one: no ``lm_head`` tensor), bf16. Expert
k of K = 4 is θ_0 + ``--noise``·N(0, 1) (seed k + 1) except on the norm weights and every tensor whose
index i has i mod (K + 1) = k, where τ_k is exactly zero (expert 0 leaves the embedding alone). They
are written once into ``--work`` as HF folders (sharded safetensors + config.json), tensor by tensor
with one shard in memory, and reused by later runs with the same settings.

Each merge runs in a fresh process (``--worker``): it imports the tool, reads its resident set (what
the imports cost), merges, and reports ``VmHWM`` (the peak) and the largest ``RssAnon`` / ``RssFile``
a thread saw every 20 ms (file pages: safetensors mappings, libraries); ``VmHWM`` is the exec'd
program's own, where ``ru_maxrss`` would carry the pre-exec copy of this script's. The inputs are
read before every run so that each finds them in the page cache. Runs, for each of ``--methods``:
``adamerge merge`` out of core and with ``--in_memory`` (θ_0 and the task vectors whole, in float32,
as FusionBench holds them), and for task arithmetic and TIES mergekit (``--mergekit_venv``; skipped
with a note when it is absent), set to match adamerge (``MERGEKIT_NOTES``; where it cannot, e.g.
its TIES trims per tensor, the outputs are compared and the record says by how much).

Target (issue #16): peak RSS ≤ one model + (K + 2) × the largest tensor, in the model's dtype (bf16);
adamerge computes in float32, so the record also gives it with the tensor term in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
             "max_position_embeddings": 131072, "max_window_layers": 24, "sliding_window": 131072,
             "rope_theta": 1000000.0}
SMALL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512, "max_window_layers": 2,
         "sliding_window": 512, "rope_theta": 1000000.0}
MERGEKIT_METHODS = ("task_arithmetic", "ties")
GIB = 2**30
ENGINE = ("adamerge/merge_cli.py", "adamerge/models/", "adamerge/merging/")
MERGEKIT_NOTES = {  # mergekit 0.1.5's code, file by file, against adamerge's settings
    "weights_lambda": "weight 1.0 per expert, shared `lambda` = λ: θ_0 + λ·Σ_k τ_k as adamerge "
                      "(merge_methods/generalized_task_arithmetic.py::merge_group)",
    "normalize": "`normalize: false` (a sum): mergekit's ties defaults to true (the disjoint mean), "
                 "adamerge's TIES to merge='sum' (merge_methods/registry.py)",
    "density": "`density` = keep, but per tensor: the int(density·numel) largest |τ| of each tensor "
               "(sparsify.py::magnitude); adamerge keeps the ⌊d·keep⌋ largest of the whole model",
    "sign_ties": "where Σ_k trimmed τ_k = 0 mergekit elects +1 (get_mask: `>= 0`), adamerge the whole "
                 "model's majority sign",
    "dtype": "`dtype: float32`: mergekit casts each tensor to float32 on load (io/tasks.py::LoadTensor), "
             "as adamerge computes; by default it computes in the stored bf16. `out_dtype: bfloat16`",
    "embedding_lm_head": "lm_head is optional, tied to embed_tokens (architectures/qwen2.json): absent from "
                         "the inputs, mergekit skips it (plan.py::plan_tensor) and adamerge writes the "
                         "base's keys; embed_tokens is merged as any tensor by both (no tokenizer settings)",
    "lazy_unpickle": "not passed: it applies to pickled .bin files; safetensors are read with safe_open "
                     "either way (io/loader.py::TensorLoader.get)",
    "out_shard_size": "counted in parameters: --shard_size / 2 for bf16",
}


# ---- the models ----------------------------------------------------------------------------------
def qwen2_config(shape: dict) -> dict:
    """config.json of a Qwen2ForCausalLM with ``shape``'s sizes (the rest as Qwen/Qwen2-0.5B's)."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02,
            "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, **shape}


def qwen2_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor of a Qwen2ForCausalLM (tied: no ``lm_head.weight``)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, inter)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, h))]
    out.append(("model.norm.weight", (h,)))
    return out if config.get("tie_word_embeddings", True) else [*out, ("lm_head.weight", (vocab, h))]


def _folder(path: Path):
    """A model folder read one tensor at a time (imported here: a mergekit worker never needs it)."""
    from adamerge.models.safetensors_folder import SafetensorsFolder

    return SafetensorsFolder(path)


def _write_model(folder: Path, config: dict, tensors, shard_bytes: int) -> None:
    """Write ``(name, tensor)`` pairs as a sharded HF folder, one shard in memory at a time."""
    from adamerge.models.safetensors_folder import ShardedWriter

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedWriter(tmp, shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def untouched(index: int, name: str, expert: int, experts: int) -> bool:
    """Whether expert ``expert`` leaves tensor number ``index`` at θ_0 (its τ exactly zero)."""
    return name.endswith("norm.weight") or index % (experts + 1) == expert


def _base_tensors(names):
    import torch

    g = torch.Generator().manual_seed(0)
    for name, shape in names:
        norm = name.endswith("norm.weight")
        yield name, (torch.ones(shape) if norm else 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def _expert_tensors(names, base, expert: int, experts: int, noise: float):
    import torch

    g = torch.Generator().manual_seed(expert + 1)
    for i, (name, shape) in enumerate(names):
        theta0 = base.get(name)
        if untouched(i, name, expert, experts):
            yield name, theta0
            continue
        out, row = torch.empty_like(theta0), max(1, theta0[0].numel() if theta0.dim() > 1 else theta0.numel())
        step = max(1, (1 << 24) // row)  # blocks of rows: no float32 copy of a whole embedding
        for a in range(0, shape[0], step):
            block = theta0[a:a + step].float()
            out[a:a + step] = (block + noise * torch.randn(block.shape, generator=g)).to(out.dtype)
        yield name, out


def build(work: Path, shape: dict, experts: int, noise: float, shard_bytes: int) -> dict:
    """θ_0 and the experts under ``work/models`` (reused when built with the same settings)."""
    settings = {"shape": shape, "experts": experts, "noise": noise, "shard_bytes": shard_bytes, "version": 1}
    root, start = work / "models", time.perf_counter()
    paths = {"base": root / "base", **{f"e{k}": root / f"expert{k}" for k in range(experts)}}
    stamp = root / "settings.json"
    done = all(map(Path.is_dir, paths.values())) and stamp.is_file()
    if done and json.loads(stamp.read_text()) == settings:
        return {"paths": paths, "built_s": None}
    shutil.rmtree(root, ignore_errors=True)
    config = qwen2_config(shape)
    names = qwen2_tensors(config)
    _write_model(paths["base"], config, _base_tensors(names), shard_bytes)
    for k in range(experts):
        tensors = _expert_tensors(names, _folder(paths["base"]), k, experts, noise)
        _write_model(paths[f"e{k}"], config, tensors, shard_bytes)
    stamp.write_text(json.dumps(settings))
    return {"paths": paths, "built_s": time.perf_counter() - start}


def model_sizes(folder: Path) -> dict:
    """Bytes of the model and of its largest tensor, from the safetensors headers."""
    model = _folder(folder)
    sizes = {key: model.nbytes(key) for key in model.keys()}  # noqa: SIM118 (a folder, not a dict)
    largest = max(sizes, key=sizes.get)
    return {"tensors": len(sizes), "model_bytes": sum(sizes.values()), "largest_tensor": largest,
            "largest_bytes": sizes[largest], "params": sum(sizes.values()) // 2}


# ---- one merge in its own process ----------------------------------------------------------------
def _status() -> dict[str, int]:
    """KiB fields of /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


def _sample(stop: threading.Event, seen: dict) -> None:
    while not stop.wait(0.02):
        s = _status()
        seen["anon"], seen["file"] = max(seen["anon"], s["RssAnon"]), max(seen["file"], s["RssFile"])


def worker(tool: str, args: list[str]) -> None:
    """Import ``tool``, merge with ``args`` as its command line, print one ``RESULT {json}`` line."""
    start = time.perf_counter()
    if tool == "adamerge":  # what `adamerge merge ARGS` runs after the console's dispatch
        from adamerge.merge_cli import main as run
    else:
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        def run(a):
            mergekit_yaml.main(args=a, standalone_mode=False)
    import torch

    imported, after_imports = time.perf_counter(), _status()
    seen, stop = {"anon": 0, "file": 0}, threading.Event()
    sampler = threading.Thread(target=_sample, args=(stop, seen), daemon=True)
    sampler.start()
    run(args)
    done = time.perf_counter()
    stop.set()
    sampler.join()
    end = _status()
    print("RESULT " + json.dumps({
        "import_s": imported - start, "merge_s": done - imported, "threads": torch.get_num_threads(),
        "rss_after_imports_kib": after_imports["VmRSS"], "peak_rss_kib": end["VmHWM"],
        "max_rss_anon_kib": max(seen["anon"], end["RssAnon"]),
        "max_rss_file_kib": max(seen["file"], end["RssFile"])}))


def _warm(folders) -> None:
    for folder in folders:
        for f in sorted(Path(folder).iterdir()):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_one(plan: dict, inputs) -> dict:
    """Run one merge in a fresh process; its numbers, or why it failed."""
    _warm(inputs)
    cmd = [plan["python"], str(Path(__file__).resolve()), "--worker", plan["tool"], *plan["args"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load0, start = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    row = {"run": plan["label"], "method": plan["method"], "mode": plan["mode"], "tool": plan["tool"],
           "command": plan["shell"], "worker": cmd, "out": str(plan["out"]), "returncode": proc.returncode,
           "wall_s": time.perf_counter() - start, "load_before": load0, "load_after": os.getloadavg(),
           **({"config_file": plan["config"]} if "config" in plan else {})}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**row, "error": (proc.stderr or proc.stdout)[-3000:]}
    row.update(json.loads(lines[-1][len("RESULT "):]))
    row["peak_gib"], row["imports_gib"] = row["peak_rss_kib"] / 2**20, row["rss_after_imports_kib"] / 2**20
    row["merge_peak_gib"] = row["peak_gib"] - row["imports_gib"]
    return row


# ---- the commands --------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """Bytes from ``500MB``, ``100KB``, ``2GB`` or a plain number."""
    text, units = text.strip().upper(), {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    unit = next((u for u in units if text.endswith(u)), "")
    return int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))


def method_options(method: str, lam: float, keep: float) -> dict:
    """adamerge's options, written out so that mergekit's can match them (others: the defaults)."""
    options = {"ties": {"keep": keep, "merge": "sum", "lam": lam}, "task_arithmetic": {"lam": lam}}
    return options.get(method, {})


def adamerge_args(paths: dict, method: str, options: dict, out: Path, shard: str,
                  in_memory: bool) -> list[str]:
    args = ["--base", str(paths["base"])]
    args += [a for n, p in paths.items() if n != "base" for a in (f"--experts.{n}", str(p))]
    args += ["--method", method, *[a for k, v in options.items() for a in (f"--options.{k}", str(v))]]
    args += ["--out", str(out), "--dtype", "bfloat16", "--max_shard_size", shard, "--progress", "false"]
    return args + (["--in_memory", "true"] if in_memory else [])


def mergekit_config(paths: dict, method: str, lam: float, keep: float) -> dict:
    """mergekit's YAML (written as JSON) for adamerge's ``method`` with the same λ and keep."""
    per_model = {"weight": 1.0, **({"density": keep} if method == "ties" else {})}
    models = [{"model": str(p), "parameters": dict(per_model)} for n, p in paths.items() if n != "base"]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models,
            "parameters": {"normalize": False, "lambda": lam}, "dtype": "float32", "out_dtype": "bfloat16"}


def make_plan(args, paths: dict, mergekit_python: str | None) -> list[dict]:
    """Every run: label, interpreter, tool, its arguments, the equivalent shell command, output folder."""
    plan, work = [], args.work
    for method in args.methods:
        for mode in ("out_of_core", "in_memory"):
            out = work / "out" / f"adamerge_{method}_{mode}"
            options = method_options(method, args.lam, args.keep)
            a = adamerge_args(paths, method, options, out, args.shard_size, mode == "in_memory")
            plan.append({"label": f"adamerge {method} {mode.replace('_', '-')}", "method": method,
                         "mode": mode, "python": sys.executable, "tool": "adamerge", "args": a, "out": out,
                         "shell": "adamerge merge " + shlex.join(a)})
        if method in MERGEKIT_METHODS and mergekit_python:
            cfg, out = work / f"mergekit_{method}.yml", work / "out" / f"mergekit_{method}"
            config = mergekit_config(paths, method, args.lam, args.keep)
            cfg.write_text(json.dumps(config, indent=2))
            a = [str(cfg), str(out), "--out-shard-size", str(parse_size(args.shard_size) // 2), "--quiet"]
            plan.append({"label": f"mergekit {method}", "method": method, "mode": "mergekit",
                         "tool": "mergekit", "python": mergekit_python, "args": a, "out": out,
                         "shell": "mergekit-yaml " + shlex.join(a), "config": config})
    return plan


def _mem_available() -> int:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return next(int(ln.split()[1]) * 1024 for ln in meminfo if ln.startswith("MemAvailable:"))


def run_all(plan: list[dict], paths: dict, sizes: dict, experts: int) -> list[dict]:
    rows = []
    for p in plan:
        shutil.rmtree(p["out"], ignore_errors=True)
        # whole model in float32: θ_0, the sum and one τ (task arithmetic), or all K τ and 2 working copies
        need = 2 * sizes["model_bytes"] * (3 if p["method"] == "task_arithmetic" else experts + 3)
        if p["mode"] == "in_memory" and need > _mem_available():
            rows.append({"run": p["label"], "skipped": f"needs ~{need / GIB:.1f} GiB, "
                                                      f"{_mem_available() / GIB:.1f} GiB available"})
            continue
        print(f"running {p['label']} ...", flush=True)
        rows.append(run_one(p, paths.values()))
        if "error" in rows[-1]:
            print(f"  failed (exit {rows[-1]['returncode']}): {rows[-1]['error'][-500:]}", file=sys.stderr)
    return rows


# ---- comparing and reporting ---------------------------------------------------------------------
def compare(a: Path, b: Path) -> dict:
    """How two model folders differ, one tensor pair in memory at a time: whether they are identical
    (keys, dtypes, bits), the fraction of entries that differ, the largest |difference| and the largest
    difference in bf16 spacings at that entry (2^(⌊log2 max(|x|, |y|)⌋ − 7))."""
    import torch

    fa, fb = _folder(a), _folder(b)
    out = {"only_in_first": sorted(set(fa.keys()) - set(fb.keys())),
           "only_in_second": sorted(set(fb.keys()) - set(fa.keys())),
           "entries": 0, "differing": 0, "max_abs_diff": 0.0, "max_diff_bf16_spacings": 0.0,
           "worst_tensor": None, "same_dtypes": True}
    for key in (k for k in fa.keys() if k in fb):  # noqa: SIM118 (a folder, not a dict)
        x, y = fa.get(key), fb.get(key)
        if x.shape != y.shape:
            raise ValueError(f"{key}: shape {tuple(x.shape)} in {a} but {tuple(y.shape)} in {b}")
        out["same_dtypes"] &= x.dtype == y.dtype
        x, y = x.float(), y.float()
        diff = (x - y).abs()
        out["entries"] += x.numel()
        out["differing"] += int((diff > 0).sum())
        worst = float(diff.max()) if diff.numel() else 0.0
        if worst > out["max_abs_diff"]:
            out["max_abs_diff"], out["worst_tensor"] = worst, key
        if worst > 0:
            mag = torch.maximum(x.abs(), y.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
            spacings = float((diff / torch.exp2(torch.floor(torch.log2(mag)) - 7)).max())
            out["max_diff_bf16_spacings"] = max(out["max_diff_bf16_spacings"], spacings)
    out["fraction_differing"] = out["differing"] / max(1, out["entries"])
    out["identical"] = out["same_dtypes"] and not (out["only_in_first"] or out["only_in_second"]
                                                   or out["differing"])
    return out


def comparisons(rows: list[dict], methods: list[str]) -> dict:
    """Out of core vs in memory (must be identical) and adamerge vs mergekit, per method."""
    ok, out = {r["run"]: r for r in rows if "peak_rss_kib" in r}, {}
    for m in methods:
        ooc, mem, mk = (ok.get(f"{t} {m}{s}") for t, s in
                        (("adamerge", " out-of-core"), ("adamerge", " in-memory"), ("mergekit", "")))
        for other, name in ((mem, "out-of-core vs in-memory"), (mk, "adamerge vs mergekit")):
            if ooc and other:
                out[f"{m}: {name}"] = compare(Path(ooc["out"]), Path(other["out"]))
    return out


def summarize(rows: list[dict], sizes: dict, experts: int) -> dict:
    """The targets, each run's peak over them, and the ratios of adamerge out of core to the others
    (times are the merge's, imports excluded; "wall" includes them)."""
    model, largest = sizes["model_bytes"], sizes["largest_bytes"]
    t16, t32 = model + (experts + 2) * largest, model + (experts + 2) * 2 * largest
    by, ratios = {r["run"]: r for r in rows if "peak_rss_kib" in r}, {}
    for r in by.values():
        peak = r["peak_rss_kib"] * 1024
        r.update(peak_over_target_bf16=peak / t16, peak_over_target_f32_tensors=peak / t32,
                 merge_peak_over_target_bf16=(peak - r["rss_after_imports_kib"] * 1024) / t16,
                 meets_target_bf16=peak <= t16)
        ooc = by.get(f"adamerge {r['method']} out-of-core")
        if ooc is None or r is ooc:
            continue
        name = f"{r['method']}: adamerge out-of-core / {r['mode'].replace('_', '-')}"
        own = [x["peak_rss_kib"] - x["rss_after_imports_kib"] for x in (ooc, r)]
        ratios.update({f"{name}, time": ooc["merge_s"] / r["merge_s"],
                       f"{name}, wall": ooc["wall_s"] / r["wall_s"],
                       f"{name}, peak RSS": ooc["peak_rss_kib"] / r["peak_rss_kib"],
                       f"{name}, peak over imports": own[0] / max(1, own[1])})
    return {"target_bf16_bytes": t16, "target_f32_tensors_bytes": t32, "ratios": ratios}


def print_report(rows: list[dict], sizes: dict, summary: dict, comps: dict, experts: int) -> None:
    print(f"\nQwen2 ({sizes['params'] / 1e6:.0f}M params, {sizes['model_bytes'] / GIB:.2f} GiB bf16; "
          f"largest {sizes['largest_tensor']} {sizes['largest_bytes'] / GIB:.3f} GiB), K = {experts}; "
          f"target = model + (K+2) × largest = {summary['target_bf16_bytes'] / GIB:.2f} GiB in bf16 "
          f"({summary['target_f32_tensors_bytes'] / GIB:.2f} with the tensors in float32)")
    head = f"{'run':34} {'merge s':>8} {'wall s':>7} {'imports':>7} {'peak':>6} {'own pk':>6} {'anon':>6} " \
           f"{'file':>5} {'÷tgt':>5}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "peak_rss_kib" not in r:
            print(f"{r['run']:34} {r.get('skipped') or 'failed: exit ' + str(r.get('returncode'))}")
            continue
        anon, file = r["max_rss_anon_kib"] / 2**20, r["max_rss_file_kib"] / 2**20
        print(f"{r['run']:34} {r['merge_s']:8.1f} {r['wall_s']:7.1f} {r['imports_gib']:7.2f} "
              f"{r['peak_gib']:6.2f} {r['merge_peak_gib']:6.2f} {anon:6.2f} {file:5.2f} "
              f"{r['peak_over_target_bf16']:5.2f}")
    print("GiB. peak: VmHWM; own pk: peak − RSS after imports; anon / file: largest RssAnon / RssFile seen; "
          "÷tgt: peak ÷ the bf16 target")
    for k, v in summary["ratios"].items():
        print(f"  {k}: {v:.2f}")
    for name, c in comps.items():
        what = "identical" if c["identical"] else (
            f"{100 * c['fraction_differing']:.3f}% of entries differ, max |Δ| {c['max_abs_diff']:.3g} "
            f"({c['max_diff_bf16_spacings']:.1f} bf16 spacings, {c['worst_tensor']}); only in one: "
            f"{c['only_in_first'] + c['only_in_second']}")
        print(f"  {name}: {what}")


def _git() -> dict:
    """The commit the run measured and the engine files that differed from it (others edit the tree)."""
    def git(*a: str) -> str:
        root = str(Path(__file__).resolve().parents[1])
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=False).stdout

    return {"commit": git("rev-parse", "HEAD").strip(),
            "engine_modified": git("status", "--porcelain", *ENGINE).splitlines()}


def _machine() -> dict:
    import safetensors
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES")
            * os.sysconf("SC_PAGE_SIZE") / GIB, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "safetensors": safetensors.__version__}


def _mergekit(venv: Path) -> tuple[str | None, dict]:
    """(its python, what the record says) for a venv with mergekit-yaml; (None, a note) without."""
    python = venv / "bin" / "python"
    if not (python.is_file() and (venv / "bin" / "mergekit-yaml").is_file()):
        return None, {"venv": str(venv), "note": f"mergekit skipped: no mergekit-yaml in {venv}/bin"}
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    version = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False).stdout
    return str(python), {"venv": str(venv), "version": version.strip(), "settings": MERGEKIT_NOTES}


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/hf_merge_memory"), help="models (reused), outputs")
    p.add_argument("--small", action="store_true", help="a tiny Qwen2 (2 layers, hidden 64): a smoke run")
    p.add_argument("--experts", type=int, default=4, help="number of experts K")
    p.add_argument("--noise", type=float, default=1e-3, help="std of the experts' perturbation of θ_0")
    p.add_argument("--shard_size", default=None, help="input and output shards (500MB; --small: 100KB)")
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "iso_c"],
                   help="adamerge methods (mergekit runs task_arithmetic and ties among them)")
    p.add_argument("--lam", type=float, default=0.3, help="λ of task arithmetic and TIES (both tools)")
    p.add_argument("--keep", type=float, default=0.2, help="TIES keep ratio (mergekit's density)")
    p.add_argument("--mergekit_venv", type=Path, default=Path("/tmp/mkvenv"), help="venv with mergekit-yaml")
    p.add_argument("--out", type=Path, default=None, help="JSON record (default: results/; --small: --work)")
    args = p.parse_args(argv)
    args.shard_size = args.shard_size or ("100KB" if args.small else "500MB")
    out = args.out or (args.work / "hf_merge_small.json" if args.small
                       else Path(__file__).resolve().parent / "results" / "hf_merge_qwen2_0.5b.json")
    load_start, start, git_start = os.getloadavg(), time.perf_counter(), _git()
    shape = SMALL if args.small else QWEN2_05B
    built = build(args.work, shape, args.experts, args.noise, parse_size(args.shard_size))
    fresh = built["built_s"] is not None  # then nothing else has run here: the peak so far is the build's
    build_note = {"seconds": built["built_s"], "peak_rss_gib": _status()["VmHWM"] / 2**20 if fresh else None,
                  "note": None if fresh else "models reused from --work"}
    paths, sizes = built["paths"], model_sizes(built["paths"]["base"])
    mk_python, mergekit = _mergekit(args.mergekit_venv)
    if mk_python is None:
        print(mergekit["note"])
    rows = run_all(make_plan(args, paths, mk_python), paths, sizes, args.experts)
    comps = comparisons(rows, args.methods)
    summary = summarize(rows, sizes, args.experts)
    print_report(rows, sizes, summary, comps, args.experts)
    record = {
        "benchmark": "hf_merge_memory", "small": args.small, "machine": _machine(), "mergekit": mergekit,
        "git_before": git_start, "git_after": _git(), "load_average_before": load_start,
        "load_average_after": os.getloadavg(), "seconds": time.perf_counter() - start, "build": build_note,
        "config": {"shape": shape, "experts": args.experts, "noise": args.noise,
                   "shard_size": args.shard_size, "methods": args.methods, "lam": args.lam, "keep": args.keep,
                   "work": str(args.work)},
        "model": sizes, **summary, "runs": rows, "comparisons": comps,
        "out_of_core_equals_in_memory": {m: c["identical"] for m in args.methods
                                         if (c := comps.get(f"{m}: out-of-core vs in-memory"))},
    }
    return write_record(out, record)


def write_record(out: Path, record: dict) -> dict:
    """Write ``record`` as JSON to ``out`` (folders made) and say so; returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
