"""The one freeze rule of the components: a frozen tensor is a non-persistent buffer.

Inside a component (AdaMerging's θ_0 encoder, WEMoE's upscaled encoder, Surgery's merged encoder) every
weight that does not learn is turned into a *non-persistent buffer* by :func:`freeze_as_buffers`:

* it is not a parameter, so no optimizer, ``requires_grad`` filter or DDP gradient bucket sees it;
* it is not saved: ``state_dict()`` and Lightning checkpoints hold only what learns (kilobytes for
  AdaMerging's coefficients);
* it still moves and casts with the module (``.to(device)``, ``.half()``, ``.double()``).

So ``parameters()`` *is* the set of learnable tensors and ``state_dict()`` the set of saved ones: one
rule decides both (litgpt ``lora.py::mark_only_lora_as_trainable`` with ``lora_filter``). The systems
keep DDP off buffers (``_ddp_params_and_buffers_to_ignore``), so frozen weights are never broadcast.
The model pool (:mod:`adamerge.models.pool`) lives outside any LightningModule and simply calls torch's
``module.requires_grad_(False)``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["freeze_as_buffers"]


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter (and buffer) of ``module`` into a frozen, non-persistent buffer, in place.

    Afterwards ``module.parameters()`` is empty, ``module.state_dict()`` is empty, ``named_buffers()``
    holds the former state dict's tensors under the same names, and ``.to()`` still moves them. Use it
    on a copy: the caller's module is changed.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:  # a None slot (``bias=False``) stays a None parameter
                del sub._parameters[name]
                sub.register_buffer(name, p.detach().requires_grad_(False), persistent=False)
        sub._non_persistent_buffers_set.update(sub._buffers.keys())
    return module
