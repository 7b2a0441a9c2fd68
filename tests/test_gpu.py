"""Adaptation steps on a CUDA device agree with the same steps on the CPU (``gpu``; skipped without CUDA).

Each method's training step (the system's ``training_step``, backward, its optimizer's step) runs
three times on the tiny pool from the same initialisation and batches, once on the CPU and once on
``cuda``; losses and the first step's gradients must agree (TF32 off, so float32 means float32).
AdaMerging in bfloat16 (autocast, bfloat16 task vectors: the GPU suite's fastest setting) must stay
close to the float32 CPU run. Run with ``python -m pytest -m gpu`` or ``bash benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pool

from adamerge.components.adamerging import AdaMergingModel
from adamerge.components.surgery import SurgeryModel
from adamerge.models.pool import ModelPool
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.surgery import Surgery
from adamerge.systems.wemoe import WEMoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
SYSTEMS = {
    "adamerging": lambda pool, tv_dtype="float32": AdaMerging(
        pool, model=partial(AdaMergingModel, granularity="layer", tv_dtype=tv_dtype)
    ),
    "wemoe": lambda pool: WEMoE(pool),
    "surgery_v2": lambda pool: Surgery(pool, model=partial(SurgeryModel, version="v2", rank=4), export_merged=False),
}


def soft_pool() -> ModelPool:
    """The tiny pool with logit scale 10, so the entropy is far from saturated and gradients are not tiny."""
    p = make_tiny_pool()
    return ModelPool(p.encoder, {t: p.expert_state(t) for t in p.tasks}, p.heads, 10.0, name="tiny")


@contextlib.contextmanager
def exact_float32():
    """No TF32 in CUDA matmuls nor in cuDNN convolutions (the patch embedding)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def adapt(method: str, device: torch.device, steps: int = 3, autocast: torch.dtype | None = None, **kwargs):
    """(loss of every step, gradients of the learnable parameters at the first step) on ``device``."""
    pool = soft_pool()
    torch.manual_seed(0)  # the same routers / aligners on both devices (built on the CPU, then moved)
    system = SYSTEMS[method](pool, **kwargs).to(device).train()
    system.log = lambda *args, **kw: None  # no trainer to log to
    optimizer = system.configure_optimizers()
    g = torch.Generator().manual_seed(1)
    images = {t: torch.randn(4, 3, 16, 16, generator=g).to(device) for t in pool.tasks}
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    losses, grads = [], None
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with ctx:
            loss = system.training_step(images, i)
        loss.backward()
        if grads is None:
            grads = [p.grad.detach().float().cpu().clone() for p in system.learnable_parameters()]
        optimizer.step()
        losses.append(loss.item())
    assert all(p.device.type == device.type for p in system.learnable_parameters())
    return torch.tensor(losses), grads


@pytest.mark.parametrize("method", sorted(SYSTEMS))
def test_adaptation_steps_on_cuda_match_the_cpu(method):
    with exact_float32():
        cpu_losses, cpu_grads = adapt(method, torch.device("cpu"))
        gpu_losses, gpu_grads = adapt(method, DEVICE)
    torch.testing.assert_close(gpu_losses, cpu_losses, rtol=1e-4, atol=1e-6)
    assert len(gpu_grads) == len(cpu_grads)
    scale = max(g.abs().max().item() for g in cpu_grads)
    assert scale > 0, "no gradient reached the learnable parameters"
    for gpu, cpu in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4 * scale)


def test_bf16_adamerging_on_cuda_stays_close_to_float32():
    cpu_losses, cpu_grads = adapt("adamerging", torch.device("cpu"))
    bf16_losses, bf16_grads = adapt("adamerging", DEVICE, autocast=torch.bfloat16, tv_dtype="bfloat16")
    assert torch.isfinite(bf16_losses).all()
    torch.testing.assert_close(bf16_losses, cpu_losses, rtol=3e-2, atol=1e-3)
    cosine = F.cosine_similarity(bf16_grads[0].flatten(), cpu_grads[0].flatten(), dim=0)
    assert cosine > 0.95, f"bfloat16 λ gradient points elsewhere (cosine {cosine:.3f})"


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
@pytest.mark.parametrize(("home", "compute"), [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", None)])
def test_iso_merges_return_to_the_inputs_device_from_the_compute_device(method, home, compute):
    """`device=` moves the SVDs, not the result: each merged tensor comes back where the task vectors are and
    equals the CPU merge (the only check of the round trip: on a CPU-only machine both devices are one)."""
    import importlib

    iso = importlib.import_module("adamerge.merging.iso")
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    want = getattr(iso, method)(pre, taus)
    moved = lambda s: {k: v.to(home) for k, v in s.items()}
    got = getattr(iso, method)(moved(pre), [moved(t) for t in taus], device=compute)
    for key, value in got.items():
        assert value.device.type == home, key
        torch.testing.assert_close(value.cpu(), want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["random", "zero", "rank0"])
def test_tsv_weight_pieces_stay_on_the_inputs_device(case):
    """TSV-M's per-weight merge and per-task parts are computed and returned on the task vectors' device,
    also when nothing is kept (zeros made there) and with the column blocks indexed there."""
    from adamerge.merging.tsv import tsv_merge_weight, tsv_weight_parts

    g = torch.Generator().manual_seed(0)
    shape, count = ((2, 3), 3) if case == "rank0" else ((5, 4), 2)
    taus = [torch.zeros(shape) if case == "zero" else torch.randn(shape, generator=g) for _ in range(count)]
    on_gpu = [t.to(DEVICE) for t in taus]
    merged, parts = tsv_merge_weight(on_gpu), tsv_weight_parts(on_gpu)
    assert merged.device.type == "cuda" and all(p.device.type == "cuda" for p in parts)
    torch.testing.assert_close(merged.cpu(), tsv_merge_weight(taus), rtol=1e-4, atol=1e-5)
    for got, want in zip(parts, tsv_weight_parts(taus)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_consensus_ta_counts_claims_on_the_task_vectors_device():
    """Consensus TA's per-entry claim counts live where the task vectors are; the merge equals the CPU one."""
    from adamerge.merging.consensus import consensus_ta

    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 4, generator=g)}
    taus = [{"w": torch.randn(6, 4, generator=g)} for _ in range(3)]
    got = consensus_ta({k: v.to(DEVICE) for k, v in pre.items()}, [{k: v.to(DEVICE) for k, v in t.items()} for t in taus])
    assert got["w"].device.type == "cuda"
    torch.testing.assert_close(got["w"].cpu(), consensus_ta(pre, taus)["w"])


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_in_memory_ties_on_the_gpu_equals_the_cpu(merge):
    """TIES in memory with everything on the GPU: its thresholds, elected signs and disjoint merge work on
    buffers made on the task vectors' device (the chunked passes), and the result equals the CPU one."""
    from adamerge.merging.ties import ties_merge

    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(9, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    want = ties_merge(pre, taus, keep=0.3, merge=merge)
    got = ties_merge({k: v.to(DEVICE) for k, v in pre.items()},
                     [{k: v.to(DEVICE) for k, v in t.items()} for t in taus], keep=0.3, merge=merge)
    for key, value in got.items():
        assert value.device.type == "cuda", key
        torch.testing.assert_close(value.cpu(), want[key], rtol=1e-5, atol=1e-6)


def test_sharded_writer_takes_gpu_tensors_home(tmp_path):
    """A merge computed on the GPU is written as it comes: the writer moves each tensor to the CPU first."""
    from adamerge.models.safetensors_folder import SafetensorsFolder, ShardedWriter

    w = torch.arange(6.0).reshape(2, 3)
    writer = ShardedWriter(tmp_path, max_shard_bytes=1 << 20)
    writer.add("w", w.to(DEVICE))
    assert writer.close() == [tmp_path / "model.safetensors"]
    assert torch.equal(SafetensorsFolder(tmp_path, "L").get("w"), w)


def test_fisher_merge_brings_cpu_fishers_to_the_experts_device():
    """Experts on the GPU, their Fishers on the CPU (as a Fisher file loads): each Fisher goes to its expert's
    device, and the merge there equals the all-CPU one."""
    from adamerge.merging.fisher import fisher_merge

    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, 3, generator=g)} for _ in range(2)]
    fishers = [{"w": torch.rand(4, 3, generator=g) + 0.1} for _ in range(2)]
    got = fisher_merge([{k: v.to(DEVICE) for k, v in s.items()} for s in states], fishers)
    assert got["w"].device.type == "cuda"
    torch.testing.assert_close(got["w"].cpu(), fisher_merge(states, fishers)["w"])


def test_wudi_returns_each_merged_tensor_to_theta0s_device():
    """θ_0 on the CPU, task vectors on the GPU: the optimised and the averaged keys come back to θ_0's device
    (add_task_vector adds them there) and equal the all-CPU merge."""
    from adamerge.merging.wudi import wudi_merge

    g = torch.Generator().manual_seed(0)
    pre = {"head.weight": torch.randn(4, 3, generator=g), "head.bias": torch.randn(4, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    want = wudi_merge(pre, taus, variant="fusionbench", lr=1e-2, iters=5)
    got = wudi_merge(pre, [{k: v.to(DEVICE) for k, v in t.items()} for t in taus], variant="fusionbench", lr=1e-2,
                     iters=5)
    for key, value in got.items():
        assert value.device.type == "cpu", key
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5)


def test_a_task_conditioned_merge_loads_onto_theta0s_device_and_builds_there(tmp_path):
    """A conditioned merge saved from the CPU and loaded against a θ_0 on the GPU: τ_uni and every mask go to
    θ_0's device, and model k is built there, equal to the CPU one."""
    from adamerge.merging.conditioned import TaskConditionedMerge

    pre = {"w": torch.tensor([1.0, 2.0, 3.0]), "ids": torch.tensor([7])}
    masks = [{"w": torch.tensor([True, False, True])}, {"w": torch.tensor([False, True, True])}]
    merge = TaskConditionedMerge(pre, {"w": torch.tensor([0.5, -1.0, 2.0])}, masks, [1.0, 3.0])
    merge.save(tmp_path / "m.safetensors")
    back = TaskConditionedMerge.load(tmp_path / "m.safetensors", {k: v.to(DEVICE) for k, v in pre.items()})
    assert back.vector["w"].device.type == "cuda" and all(m["w"].device.type == "cuda" for m in back.masks)
    built = back.state_for(1)
    assert built["w"].device.type == "cuda"
    torch.testing.assert_close(built["w"].cpu(), merge.state_for(1)["w"])


def test_optmerge_returns_each_merged_tensor_to_theta0s_device():
    """θ_0 on the CPU, task vectors on the GPU (and the reverse): the optimised and the averaged keys come back
    to θ_0's device, where add_task_vector adds them, and equal the all-CPU merge."""
    from adamerge.merging.optmerge import optmerge

    g = torch.Generator().manual_seed(0)
    pre = {"head.weight": torch.randn(5, 4, generator=g), "head.bias": torch.randn(5, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    want = optmerge(pre, taus, iters=3)
    on_gpu = [{k: v.to(DEVICE) for k, v in t.items()} for t in taus]
    for home, vectors, device in ((pre, on_gpu, None), ({k: v.to(DEVICE) for k, v in pre.items()}, taus, "cuda")):
        got = optmerge(home, vectors, iters=3, device=device)
        for key, value in got.items():
            assert value.device == home[key].device, key
            torch.testing.assert_close(value.cpu(), want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compute", [None, "cpu"])
def test_wudi_weight_optimises_where_asked(compute):
    """wudi_weight runs (and leaves its result) on `device`, by default on the first task vector's device."""
    from adamerge.merging.wudi import wudi_weight

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 4, generator=g) for _ in range(3)]
    got = wudi_weight([t.to(DEVICE) for t in ts], lr=1e-2, iters=5, device=compute)
    assert got.device.type == (compute or "cuda")
    torch.testing.assert_close(got.cpu(), wudi_weight(ts, lr=1e-2, iters=5), rtol=1e-4, atol=1e-5)


def test_regmean_solves_on_the_grams_device_and_returns_to_the_states():
    """regmean_solve works where the Gram matrices are (CPU weights are moved there); regmean_merge returns
    each merged weight to the experts' device."""
    from adamerge.merging.regmean import regmean_merge, regmean_solve

    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(2, 3, generator=g)} for _ in range(2)]
    xs = [torch.randn(9, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [{"w": x.T @ x} for x in xs]
    want = regmean_merge(states, grams)["w"]
    solved = regmean_solve([s["w"] for s in states], [gr["w"].to(DEVICE) for gr in grams])
    assert solved.device.type == "cuda"
    torch.testing.assert_close(solved.cpu(), want)
    merged = regmean_merge(states, [{"w": gr["w"].to(DEVICE)} for gr in grams])["w"]
    assert merged.device.type == "cpu"
    torch.testing.assert_close(merged, want)


def test_adarank_low_rank_delta_is_built_on_the_factors_device():
    """AdaRank moved to the GPU: _LowRankDelta writes its chunks into an output on U's device (a CPU output
    would be refused by bmm), and the merged weights and the λ / mask-logit gradients equal the CPU ones."""
    from adamerge.components.adarank import AdaRankModel

    pool = make_tiny_pool(2)
    cpu = AdaRankModel(pool)
    gpu = AdaRankModel(pool).to(DEVICE)
    merged = gpu.merged_parameters()
    want = cpu.merged_parameters()
    for key, value in merged.items():
        assert value.device.type == "cuda", key
        torch.testing.assert_close(value.cpu(), want[key], rtol=1e-5, atol=1e-6)
    sum(v.square().sum() for v in merged.values()).backward()
    sum(v.square().sum() for v in want.values()).backward()
    torch.testing.assert_close(gpu.lambdas.grad.cpu(), cpu.lambdas.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.mask_logits.grad.cpu(), cpu.mask_logits.grad, rtol=1e-4, atol=1e-5)


def test_out_of_core_iso_c_and_ties_thresholds_on_a_gpu(monkeypatch):
    """Iso-C out of core takes each SVD on `device` and returns θ to the stream's device; the TIES thresholds
    of a stream on the GPU (histograms gathered on the CPU) equal the CPU ones."""
    from test_pins_streams import SHAPES, Stream

    from adamerge.merging import iso_stream
    from adamerge.merging.ties_stream import stream_thresholds

    seen = []
    real = iso_stream.svd
    monkeypatch.setattr(iso_stream, "svd", lambda m: seen.append(m.device.type) or real(m))
    s = Stream(SHAPES)
    want = dict(iso_stream.iso_c_stream(s, s.tasks, lam=0.7))
    got = dict(iso_stream.iso_c_stream(s, s.tasks, lam=0.7, device="cuda"))
    assert seen == ["cpu", "cuda"]
    for key, value in got.items():
        assert value.device.type == "cpu", key
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-5)
    on_gpu = Stream(SHAPES)
    on_gpu.base = {k: v.to(DEVICE) for k, v in s.base.items()}
    on_gpu.taus = {t: {k: v.to(DEVICE) for k, v in d.items()} for t, d in s.taus.items()}
    assert stream_thresholds(on_gpu, ["a", "c"], 0.3) == stream_thresholds(s, ["a", "c"], 0.3)


def test_out_of_core_tsv_m_svds_on_device_and_returns_home(monkeypatch):
    """TSV-M out of core: each task's SVD on ``device`` (else where the stream is), θ back on the stream's
    device, the zero τ of a below-rank matrix (2×9 with three tasks) made there too."""
    from test_pins_streams import Stream

    from adamerge.merging import tsv_stream

    seen = []
    real = tsv_stream.task_components
    monkeypatch.setattr(tsv_stream, "task_components", lambda m, k: seen.append(m.device.type) or real(m, k))
    shapes = {"w": (5, 7), "z": (2, 9), "b": (7,)}
    s = Stream(shapes)
    want = dict(tsv_stream.tsv_stream(s, s.tasks, lam=0.7))
    assert seen == ["cpu"] * 3
    seen.clear()
    got = dict(tsv_stream.tsv_stream(s, s.tasks, lam=0.7, device="cuda"))
    assert seen == ["cuda"] * 3
    on_gpu = Stream(shapes)
    on_gpu.base = {k: v.to(DEVICE) for k, v in s.base.items()}
    on_gpu.taus = {t: {k: v.to(DEVICE) for k, v in d.items()} for t, d in s.taus.items()}
    seen.clear()
    home = dict(tsv_stream.tsv_stream(on_gpu, on_gpu.tasks, lam=0.7))
    assert seen == ["cuda"] * 3
    for key in shapes:
        assert got[key].device.type == "cpu" and home[key].device.type == "cuda", key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(home[key].cpu(), want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_causal_lm_entropy_of_gpu_logits_is_computed_and_left_there(positions):
    """The next-token entropy of logits and a mask on the GPU (padding on both sides) equals the CPU's and stays
    on the GPU: position and batch indices and the per-prompt sums are made on the inputs' device."""
    from adamerge.components.causal_lm import next_token_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    want = next_token_entropy(logits, mask, positions)
    got = next_token_entropy(logits.to(DEVICE), mask.to(DEVICE), positions)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
