"""Fisher merging's weighted average (adamerge.merging.fisher) against entry-by-entry sums written out here."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.merging.fisher import fisher_merge, fisher_norm
from adamerge.merging.task_vectors import MergeError


def _experts(seed: int = 0):
    """Three experts of a [4, 6] weight and a [4] bias, with Fishers of very different overall scales
    (normalisation changes the result; the first one near the floor) and a third of their entries at
    5e-7 (the floor binds, and max-flooring gives 1e-6 where adding the floor gives 1.5e-6)."""
    g = torch.Generator().manual_seed(seed)
    states, fishers = [], []
    for i, scale in enumerate((1e-6, 1e-2, 1.0)):
        states.append({"w": torch.randn(4, 6, generator=g), "b": torch.randn(4, generator=g), "step": torch.tensor(i)})
        f = {"w": torch.rand(4, 6, generator=g) * scale, "b": torch.rand(4, generator=g) * scale}
        for v in f.values():
            v.view(-1)[::3] = 5e-7
        fishers.append(f)
    return states, fishers


def _by_hand(states, fishers, normalize, floor, smoothing, coefficients=None):
    k = len(states)
    coef = list(coefficients or [1.0 / k] * k)
    if normalize:
        norms = [math.sqrt(sum(float((v.double() ** 2).sum()) for v in f.values())) for f in fishers]
        coef = [c / n for c, n in zip(coef, norms)]
    out = {}
    for key in fishers[0]:
        shape = states[0][key].shape
        flat = torch.empty(shape.numel(), dtype=torch.float64)
        for e in range(shape.numel()):
            num = den = 0.0
            for c, s, f in zip(coef, states, fishers):
                fe = float(f[key].reshape(-1)[e])
                fe = max(fe, floor) if smoothing == "floor" else fe + floor
                num += c * fe * float(s[key].reshape(-1)[e])
                den += c * fe
            flat[e] = num / den
        out[key] = flat.view(shape).float()
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("smoothing", ["floor", "add"])
def test_fisher_weighted_average_entry_by_entry(normalize, smoothing):
    states, fishers = _experts()
    merged = fisher_merge(states, fishers, normalize=normalize, floor=1e-6, smoothing=smoothing)
    expected = _by_hand(states, fishers, normalize, 1e-6, smoothing)
    for key in ("w", "b"):
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["step"], torch.tensor(0))  # non-float: the first expert's


def test_the_options_change_the_result_on_this_data():
    states, fishers = _experts()
    runs = {(n, s): fisher_merge(states, fishers, normalize=n, smoothing=s)["w"]
            for n in (True, False) for s in ("floor", "add")}
    for s in ("floor", "add"):
        assert (runs[True, s] - runs[False, s]).abs().max() > 1e-2
    assert (runs[True, "floor"] - runs[True, "add"]).abs().max() > 1e-2


def test_coefficients_and_a_uniform_fisher_give_the_weighted_average():
    states, _ = _experts(seed=1)
    ones = [{"w": torch.ones(4, 6), "b": torch.ones(4)} for _ in states]
    merged = fisher_merge(states, ones, coefficients=[0.2, 0.3, 0.5], normalize=False)
    torch.testing.assert_close(merged["w"], 0.2 * states[0]["w"] + 0.3 * states[1]["w"] + 0.5 * states[2]["w"])


def test_keys_without_a_fisher_are_averaged_and_inputs_left_alone():
    states, fishers = _experts(seed=2)
    only_w = [{"w": f["w"]} for f in fishers]
    before = [{k: v.clone() for k, v in f.items()} for f in only_w]
    merged = fisher_merge(states, only_w)
    torch.testing.assert_close(merged["b"], torch.stack([s["b"] for s in states]).mean(0))
    assert all(torch.equal(f["w"], b["w"]) for f, b in zip(only_w, before))
    assert fisher_norm(only_w[0]) == pytest.approx(float(only_w[0]["w"].double().norm()))


def test_errors_name_the_expert_and_key():
    states, fishers = _experts()
    names = ["a", "b", "c"]
    with pytest.raises(MergeError, match="Fisher of expert 'b': key 'w' has negative entries"):
        fisher_merge(states, [fishers[0], {**fishers[1], "w": -fishers[1]["w"]}, fishers[2]], names=names)
    with pytest.raises(MergeError, match="Fisher of expert 'c': key 'w' has shape"):
        fisher_merge(states, [fishers[0], fishers[1], {**fishers[2], "w": fishers[2]["w"][:2]}], names=names)
    with pytest.raises(MergeError, match="Fisher of expert 'b': has no key 'b', unlike that of expert 'a'"):
        fisher_merge(states, [fishers[0], {"w": fishers[1]["w"]}, fishers[2]], names=names)
    with pytest.raises(MergeError, match="key 'step' is not a float key"):
        fisher_merge(states, [{**f, "step": torch.ones(())} for f in fishers], names=names)
    with pytest.raises(MergeError, match="the Fisher of expert 'a' is zero everywhere"):
        fisher_merge(states, [{k: torch.zeros_like(v) for k, v in fishers[0].items()}, *fishers[1:]], names=names)
    with pytest.raises(MergeError, match="smoothing must be one of floor, add"):
        fisher_merge(states, fishers, smoothing="max")
    with pytest.raises(MergeError, match="coefficients must be 3 finite numbers"):
        fisher_merge(states, fishers, coefficients=[1.0, 1.0])
    nan = {**fishers[0], "b": torch.full((4,), float("nan"))}
    with pytest.raises(MergeError, match="Fisher of expert 'a': key 'b' contains NaN"):
        fisher_merge(states, [nan, *fishers[1:]], names=names)
