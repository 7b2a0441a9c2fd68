"""Pins for WEMoE's component (adamerge/components/wemoe.py): every refusal matched whole (each names its
option, task list, router index or source), the recorded configuration, the label's E-WEMoE rule, and what
``from_parts`` / ``set_*`` set on every block.

The data are chosen so that the near misses disagree: the tiny ViT has two blocks and three tasks, so a
router count of 3, a router with 2 outputs at index 1 (not 0), or a state with one router instead of two are
each a distinct error; ``float16`` is a dtype WEMoE accepts (a dtype check with AdaMerging's two choices
would refuse it) and ``float64`` one it refuses; chunk size 1 is the smallest accepted; the E-WEMoE label
needs both a shared router and ``keep < 1`` (each alone gives WEMoE); a hand-made two-block encoder with MLP
widths 4 and 6 cannot share a router; a pool without a ``name`` is recorded as ``"pool"``; a router state with
an extra key loads only with ``strict=False``, and ``assign=True`` takes the given tensors themselves."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pool
from torch import nn

from adamerge.components.wemoe import WEMoEError, WEMoEModel, assemble, build_router
from adamerge.components.wemoe_mlp import WeightEnsemblingMLP
from adamerge.merging.task_vectors import MergeError

TASKS = ["task0", "task1", "task2"]


@pytest.fixture(scope="module")
def pool():
    return make_tiny_pool(num_tasks=3, scale=0.2)


@pytest.fixture(scope="module")
def model(pool):
    return WEMoEModel(pool)


def test_bad_options_are_refused_by_name(pool):
    with pytest.raises(WEMoEError, match=r"^tv_dtype must be one of float32, bfloat16, float16, got 'float64'$"):
        WEMoEModel(pool, tv_dtype="float64")
    with pytest.raises(WEMoEError, match=r"^unknown impl 'fused': expected 'weights' or 'experts'$"):
        WEMoEModel(pool, impl="fused")
    with pytest.raises(WEMoEError, match=r"^chunk_size must be >= 1 or None, got 0$"):
        WEMoEModel(pool, chunk_size=0)
    half = WEMoEModel(pool, tv_dtype="float16", impl="experts", chunk_size=1, batch_reduce=0, eval_batch_reduce=1)
    assert half.config["tv_dtype"] == "float16" and half.mlps[0].tau_w_fc.dtype == torch.float16
    assert [m.impl for m in half.mlps] == ["experts", "experts"]
    assert [m.chunk_size for m in half.mlps] == [1, 1]
    assert half.batch_reduce is False and half.eval_batch_reduce is True
    half.set_chunk_size(2.0)
    assert [m.chunk_size for m in half.mlps] == [2, 2] and all(type(m.chunk_size) is int for m in half.mlps)
    half.set_chunk_size(None)
    assert [m.chunk_size for m in half.mlps] == [None, None]
    half.set_impl("weights")
    assert [m.impl for m in half.mlps] == ["weights", "weights"]


def test_the_recorded_configuration_label_and_identity(pool, model):
    assert model.tasks == TASKS and len(model.routers) == 2 and len(model.mlps) == 2
    assert model.config == {"init_lam": 0.3, "scaling_factor": 0.3, "router_hidden_layers": 1,
                            "shared_router": False, "keep": 1.0, "tv_dtype": "float32", "pool": "tiny",
                            "batch_first": True}
    assert model.identity() == {"router_hidden_layers": 1, "shared_router": False, "keep": 1.0, "init_lam": 0.3}
    assert model.batch_reduce is True and model.eval_batch_reduce is False
    assert [m.impl for m in model.mlps] == ["weights", "weights"] and [m.chunk_size for m in model.mlps] == [None] * 2
    assert model.label == "WEMoE"
    e = WEMoEModel(pool, shared_router=True, keep=0.5, router_hidden_layers=0, init_lam=0.25,
                   base_state=pool.pretrained_state())
    assert e.label == "E-WEMoE" and len(e.routers) == 1 and len(e.routers[0]) == 1
    assert torch.equal(e.routers[0][0].bias, torch.full((3,), 0.25))  # the last bias is init_lam
    assert e.config["scaling_factor"] is None and e.config["keep"] == 0.5 and e.config["init_lam"] == 0.25
    assert e.identity() == {"router_hidden_layers": 0, "shared_router": True, "keep": 0.5, "init_lam": 0.25}
    assert WEMoEModel(pool, shared_router=True).label == "WEMoE"  # a shared router over unpruned vectors
    assert WEMoEModel(pool, keep=0.5).label == "WEMoE"  # pruned vectors, one router per block


def test_set_batch_reduce_and_the_trainable_count(model):
    model.set_batch_reduce(1)
    assert [m.batch_reduce for m in model.mlps] == [True, True]
    model.set_batch_reduce(0)
    assert [m.batch_reduce for m in model.mlps] == [False, False]
    d, k = 32, 3
    assert model.trainable_parameter_count() == 2 * (d * d + d + d * k + k)
    model.routers[1][2].bias.requires_grad_(False)  # a frozen parameter is not trainable
    try:
        assert model.trainable_parameter_count() == 2 * (d * d + d + d * k + k) - k
    finally:
        model.routers[1][2].bias.requires_grad_(True)


def test_a_merged_state_that_does_not_fit_is_refused_by_name(pool):
    state = pool.pretrained_state()
    key = next(iter(state))
    del state[key]
    with pytest.raises(MergeError, match=rf"^merged_state is missing key '{key}' \(1 missing in all\)$"):
        WEMoEModel(pool, base_state=state)


def test_from_parts_checks_the_blocks_routers_and_outputs(pool, model):
    plain = pool.build_encoder()
    routers = nn.ModuleList([build_router(32, 3) for _ in range(2)])
    with pytest.raises(WEMoEError, match=r"^every block's mlp must be a WeightEnsemblingMLP$"):
        WEMoEModel.from_parts(plain, routers, TASKS, {})
    three = nn.ModuleList([build_router(32, 3) for _ in range(3)])
    with pytest.raises(WEMoEError, match=r"^got 3 routers for 2 blocks \(expected 1 or 2\)$"):
        WEMoEModel.from_parts(model.encoder, three, TASKS, {})
    wrong = nn.ModuleList([build_router(32, 3), build_router(32, 2)])
    with pytest.raises(WEMoEError, match=r"^router 1 has 2 outputs but there are 3 tasks \['task0', 'task1', 'task2'\]$"):
        WEMoEModel.from_parts(model.encoder, wrong, TASKS, {})
    config = {"shared_router": True}
    one = WEMoEModel.from_parts(model.encoder, nn.ModuleList([build_router(32, 3)]), tuple(TASKS), config)
    assert one.tasks == TASKS and one.config == config and one.config is not config
    assert one.batch_reduce is True and one.eval_batch_reduce is False
    assert all(isinstance(m, WeightEnsemblingMLP) for m in one.mlps) and one.encoder is model.encoder


def test_router_states_of_another_layout_or_task_count_are_refused(pool, model):
    linear = WEMoEModel(pool, router_hidden_layers=0)  # two one-Linear routers
    with pytest.raises(WEMoEError, match=(
            r"^state dict has 1 router\(s\) of a different layout; this model has 2 router\(s\) with 0 hidden "
            r"layer\(s\) \(router_hidden_layers / shared_router must match the run that wrote it\)$")):
        linear.load_state_dict(WEMoEModel(pool, shared_router=True, router_hidden_layers=0).state_dict())
    # two routers, as the model, but without the model's last layer routers.0.2.bias
    with pytest.raises(WEMoEError, match=r"^checkpoint has 2 router\(s\) of a different layout; this model has 2 "
                                         r"router\(s\) with 1 hidden layer\(s\)"):
        model.check_router_state(linear.state_dict())
    deep = WEMoEModel(pool, router_hidden_layers=2)  # the message counts hidden layers, not router modules
    with pytest.raises(WEMoEError, match=r"this model has 2 router\(s\) with 2 hidden layer\(s\)"):
        deep.check_router_state(model.state_dict())
    two = WEMoEModel(pool, tasks=["task0", "task2"]).state_dict()
    with pytest.raises(WEMoEError, match=(r"^run\.ckpt routers have 2 outputs \(tasks\) but this model merges 3: "
                                          r"\['task0', 'task1', 'task2'\]$")):
        model.check_router_state(two, source="run.ckpt")
    narrow = dict(model.state_dict())
    narrow["routers.1.0.weight"] = torch.zeros(32, 31)
    with pytest.raises(MergeError, match=(r"^run\.ckpt: shape mismatch at key 'routers\.1\.0\.weight': "
                                          r"expected \(32, 32\), got \(32, 31\)$")):
        model.check_router_state(narrow, source="run.ckpt")
    model.check_router_state(model.state_dict())  # its own state passes


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 2 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * width, width))


class _TwoWidths(nn.Module):
    """transformer.resblocks with MLP input widths 4 and 6 (no ``batch_first`` attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_Block(4), _Block(6)])


def _taus(width: int, k: int = 2) -> dict:
    return {"fc": (torch.zeros(k, 2 * width, width), torch.zeros(k, 2 * width)),
            "proj": (torch.zeros(k, width, 2 * width), torch.zeros(k, width))}


def test_assemble_shares_a_router_only_across_one_width():
    config = {"init_lam": 0.5, "router_hidden_layers": 0, "shared_router": True}
    taus = {"transformer.resblocks.0": _taus(4), "transformer.resblocks.1": _taus(6)}
    with pytest.raises(WEMoEError, match=r"^a shared router needs one MLP input width across blocks, got \[4, 6\]$"):
        assemble(_TwoWidths(), taus, ["a", "b"], config)
    per_block = assemble(_TwoWidths(), taus, ["a", "b"], {**config, "shared_router": False})
    assert [r[0].in_features for r in per_block.routers] == [4, 6]
    assert [r[0].out_features for r in per_block.routers] == [2, 2]
    assert torch.equal(per_block.routers[1][0].bias, torch.full((2,), 0.5))
    assert per_block.config["batch_first"] is False and [m.batch_first for m in per_block.mlps] == [False, False]
    assert [m.router is r for m, r in zip(per_block.mlps, per_block.routers)] == [True, True]


class _Nameless:
    """The tiny pool's interface without a ``name``."""

    def __init__(self, pool) -> None:
        self._pool = pool
        self.tasks, self.encoder = pool.tasks, pool.encoder

    def check_tasks(self, tasks):
        return self._pool.check_tasks(tasks)

    def pretrained_state(self):
        return self._pool.pretrained_state()

    def task_vectors(self, tasks=None):
        return self._pool.task_vectors(tasks)

    def build_encoder(self, state=None):
        return self._pool.build_encoder(state)


def test_a_pool_without_a_name_is_recorded_as_pool(pool):
    assert WEMoEModel(_Nameless(pool), tasks=["task1"]).config["pool"] == "pool"


def test_load_state_dict_passes_strict_and_assign_on(pool):
    model = WEMoEModel(pool, router_hidden_layers=0)
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"extra\""):
        model.load_state_dict({**state, "extra": torch.zeros(1)})
    result = model.load_state_dict({**state, "extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and result.missing_keys == []
    assert torch.equal(model.routers[1][0].weight, torch.full((3, 32), 0.5))
    assert model.routers[1][0].weight.data_ptr() != state["routers.1.0.weight"].data_ptr()  # copied by default
    model.load_state_dict(state, assign=True)
    assert model.routers[1][0].weight.data_ptr() == state["routers.1.0.weight"].data_ptr()
