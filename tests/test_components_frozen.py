"""The components' one freeze rule: frozen tensors are non-persistent buffers (not trained, not saved, moved)."""

from __future__ import annotations

import torch
from torch import nn

from adamerge.components.frozen import freeze_as_buffers


def test_freeze_as_buffers_leaves_no_parameters():
    lin = freeze_as_buffers(nn.Linear(3, 2, bias=False))
    assert list(lin.parameters()) == [] and lin.state_dict() == {} and lin.bias is None
    assert lin(torch.randn(1, 3)).shape == (1, 2)


def test_frozen_tensors_keep_their_names_values_and_move_with_the_module():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    freeze_as_buffers(module)
    buffers = dict(module.named_buffers())
    assert set(buffers) == set(before) and module.state_dict() == {}
    assert all(torch.equal(buffers[k], v) and not buffers[k].requires_grad for k, v in before.items())
    module.double()
    assert module[0].weight.dtype == torch.float64 and module[1].running_mean.dtype == torch.float64
    assert module[1].num_batches_tracked.dtype == torch.int64  # integer buffers keep their dtype


def test_only_the_learnable_part_of_a_component_trains_and_is_saved():
    class Component(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = freeze_as_buffers(nn.Linear(3, 3))
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * self.encoder(x)

    c = Component()
    assert [n for n, _ in c.named_parameters()] == ["scale"] == list(c.state_dict())
    c(torch.randn(2, 3)).sum().backward()
    assert c.scale.grad is not None and c.encoder.weight.grad is None
