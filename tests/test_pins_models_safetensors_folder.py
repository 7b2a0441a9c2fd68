"""Pins of adamerge.models.safetensors_folder (issue #17): sizes, the folder's weight files and their errors, the
header reader, and the sharded writer, on files written here.

Data chosen so that near misses disagree: each unit of ``parse_size`` with its own factor and a count that is
not 1 (``1 << 30`` against ``2 << 30`` or ``1 << 31``; ``10**9`` against ``10 * 9``), unit names that end
in another's (``GiB`` ends in ``B``, so the longer units must be tried first), lower case and spaces; a
``True`` (an int to Python, no size); shards whose index lists them out of order and twice (read sorted,
once); a weight map that is a list (no ``.values()``) and an index that is a list (no ``["weight_map"]``);
headers too long, cut short and not UTF-8; a writer whose limit is met exactly (no flush) and passed by one
byte (flush); a tensor that needs a gradient and one that is not contiguous (safetensors refuses both).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adamerge.models.hub as hub_module
from adamerge.models.safetensors_folder import (
    INDEX,
    SIDE_FILES,
    FolderError,
    SafetensorsFolder,
    ShardedWriter,
    _header,
    parse_size,
    resolve_folder,
)


# ---- parse_size -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (12, 12), (1, 1), ("1B", 1), ("12", 12), ("3GiB", 3 << 30), ("3MiB", 3 << 20), ("3KiB", 3 << 10), ("3GB", 3 * 10**9),
    ("3MB", 3 * 10**6), ("3KB", 3000), ("3B", 3), (" 1.5 kib ", 1536), ("2gb", 2 * 10**9), ("0.5mib", 1 << 19),
])
def test_parse_size_units(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("lots", "max shard size 'lots' is not a size (e.g. 5GB, 500MB, 20KB)"),
    (True, "max shard size True is not a size (e.g. 5GB, 500MB, 20KB)"),
    ("GB", "max shard size 'GB' is not a size (e.g. 5GB, 500MB, 20KB)"),
    (0, "max shard size must be positive, got 0"),
    ("0.4B", "max shard size must be positive, got '0.4B'"),
    (-3, "max shard size must be positive, got -3"),
])
def test_parse_size_refuses(value, message):
    with pytest.raises(FolderError) as info:
        parse_size(value)
    assert str(info.value) == message


# ---- resolve_folder ---------------------------------------------------------------------------------------
def test_resolve_folder_local_file_missing_and_hub(tmp_path, monkeypatch):
    assert resolve_folder(tmp_path, "L") == tmp_path
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(FolderError) as info:
        resolve_folder(tmp_path / "w.safetensors", "L")
    assert str(info.value) == (f"L: {tmp_path / 'w.safetensors'} is a file; name the model's folder "
                               "(config.json + safetensors)")
    with pytest.raises(FolderError) as info:
        resolve_folder(tmp_path / "a" / "b" / "c", "L")
    assert str(info.value) == f"L: no folder {tmp_path / 'a' / 'b' / 'c'} (and it is no Hub id org/name)"
    calls = []
    monkeypatch.setattr(hub_module, "hub_snapshot", lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert resolve_folder("org/name@v1", "L") == tmp_path
    assert calls == [("org/name@v1", {"allow_patterns": ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                          "*.tiktoken", "README.md"], "label": "L"})]


# ---- _header ----------------------------------------------------------------------------------------------
def _raw(path: Path, header: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)
    return path


def test_header_reads_names_and_drops_the_metadata(tmp_path):
    save_file({"b": torch.zeros(2, 3), "a": torch.ones(1, dtype=torch.int8)}, str(tmp_path / "m.safetensors"),
              metadata={"format": "pt"})
    header = _header(tmp_path / "m.safetensors")
    assert sorted(header) == ["a", "b"]
    assert (header["b"]["dtype"], header["b"]["shape"], header["a"]["dtype"]) == ("F32", [2, 3], "I8")


@pytest.mark.parametrize(("header", "length", "why"), [
    (b"{}", 100_000_001, "ValueError: header length beyond 100 MB"),
    (b"{\"a\":", None, "JSONDecodeError: Expecting value: line 1 column 6 (char 5)"),
    (b"{\"\x80\": 1}", None,
     "UnicodeDecodeError: 'utf-8' codec can't decode byte 0x80 in position 2: invalid start byte"),
])
def test_header_unreadable(tmp_path, header, length, why):
    path = _raw(tmp_path / "bad.safetensors", header, length)
    with pytest.raises(FolderError) as info:
        _header(path)
    assert str(info.value) == f"{path}: not a readable safetensors file ({why})"


def test_header_cut_short_and_missing(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(FolderError, match=r"short.safetensors: not a readable safetensors file \(error: "):
        _header(tmp_path / "short.safetensors")
    with pytest.raises(FolderError, match=r"absent.safetensors: not a readable safetensors file \(FileNotFoundError"):
        _header(tmp_path / "absent.safetensors")
    # the length is unsigned: 2**63 + 2 read as signed would be negative, pass the check and read the rest
    path = _raw(tmp_path / "huge.safetensors", b"{}", 2**63 + 2)
    with pytest.raises(FolderError, match=r"huge.safetensors: not a readable safetensors file \(ValueError: header "):
        _header(path)
    # exactly 100 MB is allowed: the length check is on the declared length, the JSON then fails on its own
    path = _raw(tmp_path / "big.safetensors", b"{}", 100_000_000)
    assert _header(path) == {}


# ---- SafetensorsFolder: which files are the weights -------------------------------------------------------
def _folder(tmp_path: Path, shards: dict[str, dict], index: object = None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    if index is not None:
        (folder / INDEX).write_text(json.dumps(index), encoding="utf-8")
    return folder


def _error(*args, **kwargs) -> str:
    with pytest.raises(FolderError) as info:
        SafetensorsFolder(*args, **kwargs)
    return str(info.value)


def test_an_index_lists_its_shards_sorted_and_once(tmp_path):
    """The index maps three keys to two shards, the later-named shard first: both are read, in name order, and
    the keys come shard by shard in each header's order (safetensors sorts a header's keys)."""
    folder = _folder(tmp_path, {"s-2.safetensors": {"z": torch.zeros(1), "c": torch.zeros(2)},
                                "s-1.safetensors": {"b": torch.ones(3, 2, dtype=torch.float16)}},
                     {"weight_map": {"z": "s-2.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"}})
    (folder / "stray.safetensors").write_bytes(b"not read: the index names the weights")
    m = SafetensorsFolder(folder, "LBL")
    assert m.keys() == ["b", "c", "z"]
    assert (m.shape("b"), m.dtype("b"), m.nbytes("b")) == ((3, 2), torch.float16, 12)
    assert "c" in m and "q" not in m and 3 not in m
    assert repr(m) == f"SafetensorsFolder({str(folder)!r}, 3 tensors)"
    assert (m.label, m.source, m.path) == ("LBL", str(folder), folder)


@pytest.mark.parametrize(("index", "why"), [
    ([1, 2], "TypeError: list indices must be integers or slices, not str"),
    ({"weights": {}}, "KeyError: 'weight_map'"),
    ({"weight_map": ["a"]}, "AttributeError: 'list' object has no attribute 'values'"),
])
def test_an_unreadable_index(tmp_path, index, why):
    folder = _folder(tmp_path, {}, index)
    assert _error(folder, "LBL") == f"LBL: {folder / INDEX} is no readable weight index ({why})"


def test_an_index_that_is_not_json_and_a_missing_shard(tmp_path):
    folder = _folder(tmp_path, {"s-1.safetensors": {"a": torch.zeros(1)}},
                     {"weight_map": {"a": "s-1.safetensors", "b": "s-0.safetensors", "c": "s-9.safetensors"}})
    assert _error(folder, "LBL") == f"LBL: shard s-0.safetensors listed in {folder / INDEX} is missing"
    (folder / INDEX).write_text("{", encoding="utf-8")
    assert _error(folder, "LBL").startswith(f"LBL: {folder / INDEX} is no readable weight index (JSONDecodeError: ")


def test_weights_named_single_file_and_ambiguity(tmp_path):
    folder = _folder(tmp_path, {"a.safetensors": {"a": torch.zeros(1)}, "b.safetensors": {"b": torch.zeros(2)}},
                     {"weight_map": {"a": "a.safetensors"}})
    # weights= wins over the index
    assert SafetensorsFolder(folder, "L", weights="b.safetensors").keys() == ["b"]
    assert _error(folder, "L", weights="c.safetensors") == f"L: {folder} has no c.safetensors"
    (folder / INDEX).unlink()
    assert _error(folder, "L") == (f"L: {folder} holds 2 .safetensors files and no {INDEX}: which are the weights "
                                   "is ambiguous")
    (folder / "a.safetensors").unlink()
    assert SafetensorsFolder(folder, "L").keys() == ["b"]


def test_no_weights_names_the_pickle_it_will_not_read(tmp_path):
    folder = _folder(tmp_path, {})
    assert _error(folder, "L") == f"L: {folder} holds no .safetensors weights"
    (folder / "adapter_model.bin").write_bytes(b"x")
    (folder / "pytorch_model.bin.index.json").write_text("{}")
    assert _error(folder, "L") == (f"L: {folder} holds no .safetensors weights (it has pytorch_model.bin.index.json: "
                                   "pickled weights are not read; convert them to safetensors with transformers' "
                                   "save_pretrained(safe_serialization=True))")


def test_an_unsupported_dtype_is_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "q": {"dtype": "C64", "shape": [1], "data_offsets": [4, 12]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    assert _error(folder, "L") == "L: model.safetensors: tensor 'q' has unsupported dtype 'C64'"


# ---- SafetensorsFolder: reading ---------------------------------------------------------------------------
def test_get_rows_unknown_keys_config_and_side_files(tmp_path):
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    folder = _folder(tmp_path, {"model.safetensors": {"w": w, "i": torch.tensor([7], dtype=torch.int64)}})
    m = SafetensorsFolder(folder, "L")
    assert torch.equal(m.get("w"), w) and m.get("i").dtype == torch.int64
    assert torch.equal(m.get("w", rows=slice(1, 3)), w[1:3])
    for read in (m.get, m.shape, m.dtype, m.nbytes):
        with pytest.raises(FolderError) as info:
            read("nope")
        assert str(info.value) == f"L: {folder} has no tensor 'nope'"
    assert m.config() is None and m.side_files() == []
    (folder / "tokenizer.json").write_text("{}")
    (folder / "config.json").write_text('{"vocab_size": 3}', encoding="utf-8")
    (folder / "notes.txt").write_text("not a side file")
    assert m.config() == {"vocab_size": 3}
    assert m.side_files() == [folder / "config.json", folder / "tokenizer.json"]  # SIDE_FILES' order
    assert SIDE_FILES.index("config.json") < SIDE_FILES.index("tokenizer.json")
    (folder / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(FolderError) as info:
        m.config()
    assert str(info.value) == (f"L: {folder / 'config.json'} is not readable JSON (Expecting property name enclosed "
                               "in double quotes: line 1 column 2 (char 1))")


# ---- ShardedWriter ----------------------------------------------------------------------------------------
def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=100, metadata={"method": "ties"})
    grad = torch.ones(2, 3, requires_grad=True)  # safetensors refuses a tensor that needs a gradient
    writer.add("g", grad * 2)
    writer.add("t", torch.arange(6.0).reshape(2, 3).t())  # not contiguous: safetensors refuses that too
    assert writer.close() == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert _metadata(tmp_path / "model.safetensors") == {"format": "pt", "method": "ties"}
    m = SafetensorsFolder(tmp_path, "L")
    assert torch.equal(m.get("t"), torch.arange(6.0).reshape(2, 3).t())
    assert torch.equal(m.get("g"), torch.full((2, 3), 2.0))
    assert writer.total_bytes == 48


def test_an_empty_writer_writes_one_empty_shard(tmp_path):
    assert ShardedWriter(tmp_path, 10).close() == [tmp_path / "model.safetensors"]
    assert SafetensorsFolder(tmp_path, "L").keys() == []


def test_shards_split_where_the_limit_is_passed_and_the_index_names_them(tmp_path):
    """Limit 16 bytes: a (8 B) + b (8 B) fill a shard exactly (no flush); c (4 B) would pass it (flush); d (20 B,
    larger than the limit) gets a shard of its own; e follows in a fourth."""
    writer = ShardedWriter(tmp_path, max_shard_bytes=16, metadata={"format": "np"})
    sizes = {"a": 2, "b": 2, "c": 1, "d": 5, "e": 1}
    for key, n in sizes.items():
        writer.add(key, torch.full((n,), float(n)))
    with pytest.raises(FolderError, match=r"^tensor 'e' written twice$"):
        writer.add("e", torch.zeros(1))
    with pytest.raises(FolderError, match=r"^tensor 'a' written twice$"):
        writer.add("a", torch.zeros(1))
    paths = writer.close()
    names = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert paths == [tmp_path / n for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, INDEX])
    index = json.loads((tmp_path / INDEX).read_text(encoding="utf-8"))
    assert index == {"metadata": {"total_size": 44}, "weight_map": {
        "a": names[0], "b": names[0], "c": names[1], "d": names[2], "e": names[3]}}
    # written as transformers writes it: two-space indent and a final newline
    assert (tmp_path / INDEX).read_text(encoding="utf-8") == json.dumps(index, indent=2) + "\n"
    assert _metadata(tmp_path / names[0]) == {"format": "pt"}  # "format": "pt" always, whatever the caller says
    assert SafetensorsFolder(tmp_path, "L").keys() == list(sizes)


def test_make_room_flushes_only_what_is_pending_and_would_overflow(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=8)
    writer.make_room(100)  # nothing pending: nothing to write
    assert list(tmp_path.iterdir()) == []
    writer.add("a", torch.zeros(1))
    writer.make_room(4)  # 4 + 4 = 8: still fits
    assert list(tmp_path.iterdir()) == []
    writer.make_room(5)
    assert [p.name for p in tmp_path.iterdir()] == [".shard-00000.safetensors"]
    writer.add("b", torch.zeros(1))
    writer.add("c", torch.zeros(1))  # after a flush the count starts again at 0: 4 + 4 = 8 fills the shard
    assert [p.name for p in writer.close()] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert SafetensorsFolder(tmp_path, "L").keys() == ["a", "b", "c"]
    index = json.loads((tmp_path / INDEX).read_text(encoding="utf-8"))
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}


def test_config_is_read_as_utf8_whatever_the_locale(tmp_path, c_locale):
    folder = _folder(tmp_path, {"model.safetensors": {"w": torch.zeros(1)}})
    (folder / "config.json").write_text('{"name": "café"}', encoding="utf-8")
    assert SafetensorsFolder(folder, "L").config() == {"name": "café"}


def test_the_index_is_read_as_utf8_whatever_the_locale_and_the_default_label(tmp_path, c_locale):
    folder = _folder(tmp_path, {"s-1.safetensors": {"é": torch.zeros(1)}}, None)
    (folder / INDEX).write_text(json.dumps({"weight_map": {"é": "s-1.safetensors"}}, ensure_ascii=False),
                                encoding="utf-8")
    assert SafetensorsFolder(folder).keys() == ["é"]
    with pytest.raises(FolderError) as info:
        SafetensorsFolder(folder).get("nope")
    assert str(info.value) == f"model: {folder} has no tensor 'nope'"  # the default label
