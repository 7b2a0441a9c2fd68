"""Adding a method costs its own files only: a toy static method (one file) runs through
``merge_pool``, and a toy learnable method (one component file and one config) through ``adamerge
fit``, with nothing else edited."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_pool
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.merging import METHODS, merge_pool, register_method, registry

TOY_STATIC = '''"""Toy static merge: θ = θ_0 + λ · median_k τ_k (element-wise)."""
import torch

from adamerge.merging import register_method


@register_method("toy_median")
def toy_median(pretrained, task_vectors, lam: float = 1.0):
    out = dict(pretrained)
    for key, t0 in pretrained.items():
        if t0.is_floating_point():
            out[key] = t0 + lam * torch.stack([tau[key] for tau in task_vectors]).median(dim=0).values
    return out
'''

TOY_COMPONENT = '"""A toy learnable merge: θ = θ_0 + λ Σ_k τ_k with one learnable λ (task arithmetic, λ learned)."""\nimport torch\nfrom torch import nn\nfrom torch.func import functional_call\n\n\nclass ToyLambda(nn.Module):\n    """One λ for all task vectors.\n\n    Args:\n        pool: the model pool.\n        tasks: the tasks merged.\n        init_lam: initial λ.\n    """\n\n    label = "Toy lambda"\n\n    def __init__(self, pool, tasks, init_lam: float = 0.3) -> None:\n        super().__init__()\n        self.encoder = pool.build_encoder()\n        self.keys = [k for k, v in pool.pretrained_state().items() if v.is_floating_point()]\n        theta0 = pool.pretrained_state()\n        total = {k: torch.zeros_like(theta0[k]) for k in self.keys}\n        for _, tau in pool.task_vectors(tasks):\n            for k in self.keys:\n                total[k] += tau[k]\n        for i, k in enumerate(self.keys):\n            self.register_buffer(f"theta0_{i}", theta0[k], persistent=False)\n            self.register_buffer(f"tau_{i}", total[k], persistent=False)\n        self.lam = nn.Parameter(torch.tensor(float(init_lam)))\n\n    def merged_parameters(self):\n        return {k: getattr(self, f"theta0_{i}") + self.lam * getattr(self, f"tau_{i}") for i, k in enumerate(self.keys)}\n\n    def forward(self, images):\n        return functional_call(self.encoder, self.merged_parameters(), (images,))\n\n    def merged_state_dict(self):\n        with torch.no_grad():\n            merged = self.merged_parameters()\n        return {k: merged.get(k, v).detach().cpu().clone() for k, v in self.encoder.state_dict().items()}\n'


def _toy_config(tmp_path, cache) -> str:
    return textwrap.dedent(f"""\
        model:
          class_path: adamerge.systems.base.TestTimeSystem
          init_args:
            pool:
              class_path: adamerge.data.mini.MiniBenchmarkPool  # the data's benchmark (linked)
            model:
              class_path: toy_component.ToyLambda
              init_args: {{init_lam: 0.5}}
            optimizer:
              class_path: torch.optim.Adam
              init_args: {{lr: 0.01}}
            export_dir: {tmp_path / "run" / "export"}
        data:
          class_path: adamerge.data.datamodule.TestTimeDataModule
          init_args:
            source:
              class_path: adamerge.data.mini.MiniBenchmarkSource
              init_args: {{preset: tiny, seed: 0, cache_dir: {cache}}}
            batch_size: 4
            steps_per_epoch: 3
        trainer:
          accelerator: cpu
          max_steps: 3
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          limit_val_batches: 1
          default_root_dir: {tmp_path / "run"}
        """)


def test_a_toy_learnable_method_is_a_component_and_a_config(tmp_path, mini_tiny_cache, monkeypatch):
    (tmp_path / "toy_component.py").write_text(TOY_COMPONENT)
    (tmp_path / "toy.yaml").write_text(_toy_config(tmp_path, mini_tiny_cache))
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = main(["fit", "--config", str(tmp_path / "toy.yaml")])
    lam = float(cli.model.component.lam)
    assert cli.trainer.global_step == 3 and lam != 0.5  # trained
    assert [n for n, p in cli.model.named_parameters() if p.requires_grad] == ["model.lam"]
    export = tmp_path / "run" / "export"
    pool = cli.model.pool
    theta0, merged = pool.pretrained_state(), load_file(export / "merged.safetensors")
    taus = [tau for _, tau in pool.task_vectors()]
    for key, t0 in theta0.items():  # θ0 + λ Σ τ, computed here independently of the component
        want = t0 + lam * sum(tau[key] for tau in taus) if t0.is_floating_point() else t0
        torch.testing.assert_close(merged[f"visual.{key}"] if f"visual.{key}" in merged else merged[key], want)
    record = json.loads((export / "metrics.json").read_text())
    assert record["method"] == "Toy lambda" and set(record["accuracy"]) == set(pool.tasks)


def test_a_toy_static_method_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "toy_static.py").write_text(TOY_STATIC)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("toy_static")
        pool = make_tiny_pool()
        merged = merge_pool(pool, "toy_median", lam=0.5)
        taus = [tau for _, tau in pool.task_vectors()]
        for key, t0 in pool.pretrained_state().items():  # the median written out here
            if t0.is_floating_point():
                stacked = torch.stack([tau[key] for tau in taus])
                want = t0 + 0.5 * stacked.sort(dim=0).values[(len(taus) - 1) // 2]
                torch.testing.assert_close(merged[key], want)
        with pytest.raises(ValueError, match="'toy_median' is registered twice"):
            register_method("toy_median")(lambda pretrained, task_vectors: dict(pretrained))
    finally:  # leave the registry as it was
        METHODS.pop("toy_median", None)
        registry._ORIGINS.pop("toy_median", None)
        sys.modules.pop("toy_static", None)
