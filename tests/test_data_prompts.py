"""Unlabeled prompts per task: file formats, tokenization (right padding, truncation), packed batches, the
base model's tokenizer bound by default. The tokenizer is a tiny word-level one built here (64 ids)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adamerge.data.prompts import (
    PromptDataModule,
    PromptError,
    PromptSource,
    pack_prompts,
    read_prompts,
    unpack_prompts,
)

WORDS = [f"w{i}" for i in range(60)]
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}


def write_tokenizer(folder: Path, pad: bool = True, words: list[str] | None = None) -> Path:
    """A word-level fast tokenizer of 64 ids (4 specials, 60 words) that prepends ``<s>``, saved into ``folder``
    as transformers saves one (``AutoTokenizer.from_pretrained(folder)`` loads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(words or WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **({"pad_token": "<pad>"} if pad else {}))
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


PROMPTS = ["w1 w2 w3", "w4  w5", "w6 \t w7 w8 w9 w10", "w11"]


def test_every_file_format_gives_the_same_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("w1 w2 w3\n\nw4  w5\n   \nw6 \t w7 w8 w9 w10\r\nw11")  # blank lines skipped
    (tmp_path / "p.jsonl").write_text("\n".join([json.dumps({"prompt": PROMPTS[0], "text": "not this"}),
                                                 json.dumps({"text": PROMPTS[1]}), json.dumps(PROMPTS[2]), "",
                                                 json.dumps({"prompt": PROMPTS[3], "id": 3})]))
    (tmp_path / "p.json").write_text(json.dumps([{"text": PROMPTS[0]}, PROMPTS[1], {"prompt": PROMPTS[2]}, PROMPTS[3]]))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"question": p, "prompt": "no"}) for p in PROMPTS))
    for name in ("p.txt", "p.jsonl", "p.json"):
        assert read_prompts(tmp_path / name) == PROMPTS, name
    assert read_prompts(tmp_path / "q.jsonl", field="question") == PROMPTS


@pytest.mark.parametrize("name, text, field, message", [
    ("a.jsonl", '{"prompt": "w1"}\n{"question": "w2"}\n', None, r"a.jsonl line 2: the record has no text field 'prompt' or 'text'"),
    ("b.jsonl", '{"prompt": "w1"}\n{oops\n', None, r"b.jsonl line 2: not JSON"),
    ("c.jsonl", '{"prompt": "w1"}\n', "question", r"c.jsonl line 1: the record has no text field 'question'"),
    ("d.json", '{"prompt": "w1"}', None, r"d.json: expected a JSON list of prompts, got dict"),
    ("e.csv", "w1\n", None, r"e.csv: unknown prompt file type '.csv'"),
    ("f.txt", "\n  \n", None, r"f.txt holds no prompts"),
    ("g.jsonl", '{"prompt": "w1"}\n{"prompt": "  "}\n', None, r"g.jsonl: prompt 1 is empty"),
    ("h.jsonl", '[1, 2]\n', None, r"h.jsonl line 1: expected a string or an object with the prompt, got list"),
])
def test_bad_prompt_files_are_refused_naming_file_and_line(tmp_path, name, text, field, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptError, match=message):
        read_prompts(tmp_path / name, field=field)


def test_missing_files_are_refused_naming_the_task(tmp_path, tokenizer_dir):
    with pytest.raises(PromptError, match=r"task 'code': no prompt file or folder .*nope.txt"):
        PromptSource({"code": str(tmp_path / "nope.txt")}, str(tokenizer_dir))
    with pytest.raises(PromptError, match="max_length must be at least 1, got 0"):
        PromptSource({"a": str(tokenizer_dir)}, max_length=0)
    with pytest.raises(PromptError, match="no prompts"):
        PromptSource({})


def test_items_are_right_padded_ids_and_mask_truncated_to_max_length(tmp_path, tokenizer_dir):
    """Prompts of 4, 3, 6 and 2 tokens (with <s>) and max_length 5: the third is cut to its first 5 tokens, the
    batch is 5 wide and the others are padded on the right. Padding on the left, to max_length or with the
    mask of another row would each disagree with the per-prompt tokenization below."""
    from transformers import AutoTokenizer

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    dataset = PromptSource({"t": str(tmp_path / "p.txt")}, str(tokenizer_dir), max_length=5).dataset("t", "test")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = [tok(p)["input_ids"][:5] for p in PROMPTS]  # one prompt at a time, no padding
    assert [len(e) for e in expected] == [4, 3, 5, 2] and len(tok("w6 w7 w8 w9 w10")["input_ids"]) == 6
    assert len(dataset) == 4 and dataset.texts == PROMPTS
    for i, want in enumerate(expected):
        ids, mask = dataset[i]
        assert ids.shape == (5,) and ids.dtype == torch.long
        assert ids[: len(want)].tolist() == want and ids[len(want):].tolist() == [3] * (5 - len(want))  # <pad> = 3
        assert mask.tolist() == [1] * len(want) + [0] * (5 - len(want))


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    folder = write_tokenizer(tmp_path / "tok", pad=False)
    (tmp_path / "p.txt").write_text("w1 w2 w3\nw4\n")
    ids, mask = PromptSource({"t": str(tmp_path / "p.txt")}, str(folder)).dataset("t", "test")[1]
    assert ids.tolist() == [1, 8, 2, 2] and mask.tolist() == [1, 1, 0, 0]  # <s> w4 </s> </s>


def test_pack_and_unpack_are_inverse_and_refuse_other_shapes():
    ids, mask = torch.randint(0, 64, (3, 7)), (torch.rand(3, 7) > 0.5).long()
    packed = pack_prompts(ids, mask)
    assert packed.shape == (3, 2, 7)
    got_ids, got_mask = unpack_prompts(packed)
    assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask)
    with pytest.raises(ValueError, match=r"a prompt batch is a LongTensor \[B, 2, T\] \(ids, mask\), got \(3, 7\)"):
        unpack_prompts(ids)
    with pytest.raises(ValueError, match="differ"):
        pack_prompts(ids, mask[:, :5])


def test_the_datamodule_yields_one_packed_batch_per_task(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("\n".join(f"w{i} w{i + 1}" for i in range(10)))  # 3 tokens each
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"w{i} w{i} w{i} w{i}"}) for i in range(6)))
    dm = PromptDataModule({"a": str(tmp_path / "a.txt"), "b": str(tmp_path / "b.jsonl")}, str(tokenizer_dir),
                          batch_size=3, eval_batch_size=4, steps_per_epoch=5)
    assert dm.tasks == ["a", "b"] and dm.num_classes == {"a": None, "b": None}
    dm.trainer = None
    loader = dm.train_dataloader()
    iter(loader)
    batches = [batch for batch, _, _ in loader]
    assert len(batches) == 5
    rows = {t: {tuple(x.flatten().tolist()) for x in dm.dataset(t, "test").tokens} for t in ("a", "b")}
    for batch in batches:
        assert set(batch) == {"a", "b"}
        assert batch["a"].shape == (3, 2, 3) and batch["b"].shape == (3, 2, 5)
        for t in ("a", "b"):  # every row is one of the task's prompts, tokenized
            assert all(tuple(x.flatten().tolist()) in rows[t] for x in batch[t])
    first = [tuple(x[0].tolist()) for b in batches[:4] for x in b["a"]]
    assert len(set(first)) == 10  # the first pass over task a's 10 prompts (12 draws) shows each of them
    evals = dm.val_dataloader()
    assert [len(loader.dataset) for loader in evals] == [10, 6]
    assert torch.equal(next(iter(evals[1])), dm.dataset("b", "test").tokens[:4])  # in order


def test_the_base_models_tokenizer_is_bound_and_another_vocabulary_refused(tmp_path, tokenizer_dir):
    (tmp_path / "p.txt").write_text("w1 w2\n")
    unset = PromptSource({"t": str(tmp_path / "p.txt")})
    with pytest.raises(PromptError, match="no tokenizer"):
        unset.dataset("t", "test")
    unset.bind_tokenizer(tokenizer_dir)
    assert unset.dataset("t", "test")[0][0].tolist() == [1, 5, 6]
    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    PromptSource({"t": str(tmp_path / "p.txt")}, str(copy)).bind_tokenizer(tokenizer_dir)  # same vocabulary: fine
    other = write_tokenizer(tmp_path / "other", words=list(reversed(WORDS)))
    with pytest.raises(PromptError, match=r"the prompts' tokenizer .*other has another vocabulary than the base model's"):
        PromptSource({"t": str(tmp_path / "p.txt")}, str(other)).bind_tokenizer(tokenizer_dir)


def test_a_datasets_folder_serves_its_splits(tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "test": datasets.Dataset.from_dict({"text": ["w1 w2", "w3"]}),
        "validation": datasets.Dataset.from_dict({"text": ["w4 w5 w6"]}),
    }).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"prompt": ["w7"], "text": ["no"]}).save_to_disk(str(tmp_path / "one"))
    assert read_prompts(tmp_path / "dd", "test") == ["w1 w2", "w3"]
    assert read_prompts(tmp_path / "dd", "val") == ["w4 w5 w6"]  # "val" finds "validation"
    assert read_prompts(tmp_path / "one", "train") == ["w7"]  # a Dataset serves every split, "prompt" first
    with pytest.raises(PromptError, match=r"no split 'train' \(its splits: \['test', 'validation'\]\)"):
        read_prompts(tmp_path / "dd", "train")
    source = PromptSource({"t": str(tmp_path / "dd")}, str(tokenizer_dir))
    assert len(source.dataset("t", "test")) == 2 and len(source.dataset("t", "val")) == 1
