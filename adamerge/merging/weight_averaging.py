"""Weight averaging ("model soup" of experts).

    θ = (1/K) Σ_k θ_k

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, arXiv 2203.05482. The baseline row "Weight Averaging"
of the AdaMerging / Surgery tables. Equivalent to task arithmetic with λ = 1/K.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from adamerge.merging._common import check_taus
from adamerge.merging.registry import TaskVectorSource, register_method, streamed_sum
from adamerge.merging.task_vectors import StateDict, add_task_vector, linear_combination

__all__ = ["weight_average", "weight_average_pool"]


def weight_average(states: Sequence[StateDict]) -> dict[str, Tensor]:
    """Mean of the experts' state dicts (float keys in float32, returned in their dtype).

    Args:
        states: the experts θ_1..θ_K, all with the same keys and shapes and finite weights.
            Non-float tensors (position ids) are copied from the first state dict.
    """
    states = check_taus(states, what="state dict")
    return linear_combination(states, [1.0 / len(states)] * len(states))


@register_method("weight_average", per_tensor=True, pool_level=True, label="WA")
def weight_average_pool(pool: TaskVectorSource, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Weight averaging: θ_0 + (1/K) Σ_k τ_k, the mean of the experts, from a running sum."""
    total, count = streamed_sum(pool, tasks)
    return add_task_vector(pool.pretrained_state(), total, 1.0 / count)
