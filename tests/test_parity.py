"""docs/parity.md is the truth about defaults: every table row's value is what the code or config holds.

A row's "set in" cell names where the value lives: ``module:callable:argument`` (a code default),
``module:callable@preset:argument`` (a registered static-merge preset) or ``path.yaml:dotted.key`` (a
shipped config). The "ours" cell is a Python literal. Change a default, a preset or a config without
its row (or the row without the code) and this fails, naming the row.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "docs" / "parity.md"


def _rows() -> list[dict[str, str]]:
    rows, header = [], None
    for line in PARITY.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(cells[0]) <= set("-: "):
            rows.append(dict(zip(header, cells)))
    return rows


ROWS = [r for r in _rows() if r.get("set in", "—") not in ("—", "")]


def _literal(cell: str):
    return ast.literal_eval(cell.strip("`"))


def _code_default(where: str):
    module, name, arg = where.split(":")
    target, _, preset = name.partition("@")
    obj = getattr(importlib.import_module(module), target)
    if preset:
        from adamerge.merging.registry import _ORIGINS, DIRECTION_PRESETS, DIRECTIONS, PRESETS

        origin = f"{obj.__module__}.{obj.__qualname__}"
        merges = [m for m, o in _ORIGINS.items() if o == origin]
        if merges:
            return PRESETS[merges[0]][preset][arg]
        [method] = [m for m, fn in DIRECTIONS.items() if getattr(fn, "__wrapped__", fn) is obj]  # a directions fn
        return DIRECTION_PRESETS[method][preset][arg]
    default = inspect.signature(obj).parameters[arg].default
    assert default is not inspect.Parameter.empty, f"{where}: no default"
    return default


def _config_value(where: str):
    path, key = where.rsplit(":", 1)
    node = yaml.safe_load((ROOT / path).read_text())
    for part in key.split("."):
        node = node[part]
    return node


def _value(where: str):
    return _config_value(where) if ".yaml:" in where else _code_default(where)


def test_the_table_has_rows_for_every_method():
    methods = {r["method"].split(" (")[0] for r in ROWS}
    assert {"Task arithmetic", "TIES", "PCB", "OPCM", "AdaMerging", "AdaMerging++", "Surgery", "WEMoE",
            "E-WEMoE"} <= methods


def _check(row: dict[str, str]) -> None:
    want, got = _literal(row["ours"]), _value(row["set in"].strip("`"))
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        assert math.isclose(got, want, rel_tol=1e-9), f"{row['method']} {row['parameter']}: docs {want}, code {got}"
    else:
        assert got == want, f"{row['method']} {row['parameter']}: docs {want!r}, {row['set in']} holds {got!r}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['method']}.{r['parameter']}")
def test_each_row_is_what_the_code_or_config_holds(row):
    _check(row)


@pytest.mark.parametrize("model,keep", [("ViT-B-32-quickgelu", 0.2583), ("ViT-B-16-quickgelu", 0.2594),
                                        ("ViT-L-14-quickgelu", 0.2254)])
def test_adamerging_plusplus_official_keep_is_20_percent_of_the_task_vectors_image_encoder(model, keep):
    """The official trim keeps 20 % of the whole task_vectors ImageEncoder (CLIP without its text
    transformer: token / positional embedding, ln_final, text_projection, logit_scale stay, τ = 0 there),
    so the visual weights keep 0.2 · (visual + leftovers) / visual of theirs (parity.md's values)."""
    import open_clip
    from open_clip.model import CLIP

    with torch.device("meta"):  # shapes only
        state = CLIP(**open_clip.get_model_config(model)).state_dict()
    visual = sum(v.numel() for k, v in state.items() if k.startswith("visual."))
    leftovers = sum(v.numel() for k, v in state.items() if not k.startswith(("visual.", "transformer.")))
    assert round(0.2 * (visual + leftovers) / visual, 4) == keep
    assert f"{keep}" in PARITY.read_text()


def test_a_row_that_disagrees_with_the_code_or_config_is_caught():
    """The check can fail: doctored rows (TIES merge 'mean', a config's max_steps) do not match."""
    tie = next(r for r in ROWS if r["method"] == "TIES" and r["parameter"] == "merge")
    with pytest.raises(AssertionError, match="TIES merge: docs 'mean'"):
        _check({**tie, "ours": "`'mean'`"})
    steps = next(r for r in ROWS if ".yaml:trainer.max_steps" in r["set in"])
    with pytest.raises(AssertionError, match="docs 7"):
        _check({**steps, "ours": "`7`"})
