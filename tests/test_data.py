"""Data: sources and their errors, templates and THE formatting function, loss masks, truncation
reports, splits, mixtures, and packing that keeps examples apart."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import build_model
from peftkit.config import config_from_dict, load_config
from peftkit.data.batching import IGNORE_INDEX, block_causal_mask, collate, pack_examples, packed_example
from peftkit.data.datasets import TaskData, load_task, load_tasks, split_by_ratio, tokenize_task_rows
from peftkit.data.sources import read_rows
from peftkit.data.templates import PromptFormat
from peftkit.errors import ConfigError, DataError
from peftkit.generate import encode_prompts
from peftkit.train import loss as loss_module
from peftkit.train.loss import token_losses

SHAPES = {
    "prompt_response": [{"abstract": f"Paper {i} studies things.", "summary": f"Result {i}."} for i in range(10)],
    "text": [{"text": f"This paper studies problem {i}."} for i in range(10)],
    "messages": [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
                 for i in range(10)],
}


def data_cfg(train, **kw):
    raw = {"dataset": None, "train": str(train), "prompt": "abstract", "response": "summary", "val_ratio": 0.2, "test_ratio": 0.2, **kw}
    return config_from_dict({"data": raw}).data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- sources --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_loads_from_jsonl_and_from_a_datasets_folder(tmp_path, shape, tokenizer):
    from datasets import Dataset

    rows = SHAPES[shape]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    folder = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(folder))
    tasks = [load_task(data_cfg(src), seed=0) for src in (jsonl, folder)]
    assert [t.shape for t in tasks] == [shape, shape]
    assert tasks[0].train == tasks[1].train and tasks[0].counts == {"train": 6, "validation": 2, "test": 2}
    examples, _ = tokenize_task_rows(tasks[1].train, tokenizer, tasks[1], 128)
    assert len(examples) == 6 and all(any(l != IGNORE_INDEX for l in e["labels"]) for e in examples)


def test_json_csv_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = SHAPES["prompt_response"]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("abstract,summary\n" + "".join(f'"{r["abstract"]}","{r["summary"]}"\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("json", "csv", "parquet"):
        assert read_rows(tmp_path / f"d.{suffix}") == rows, suffix


def test_column_mapping_renames_file_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "Paper text.", "tldr": "Short."}] * 5)
    task = load_task(data_cfg(path, columns={"abstract": "body", "summary": "tldr"}, val_ratio=0, test_ratio=0), seed=0)
    assert task.train[0]["abstract"] == "Paper text." and task.train[0]["summary"] == "Short."


@pytest.mark.parametrize("content,expected", [
    ('{"abstract": "a", "summary": "b"}\n{"abstract": "a"\n', ["d.jsonl", "row 2"]),
    ('{"abstract": "a", "summary": "b"}\n{"abstract": "a", "tldr": "b"}\n', ["d.jsonl", "row 2", "'summary'"]),
    ('{"abstract": "a", "summary": "b"}\n{"abstract": "", "summary": "b"}\n', ["d.jsonl", "row 2", "'abstract'", "empty"]),
    ("", ["d.jsonl", "empty"]),
])
def test_bad_data_names_file_row_and_column(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_task(data_cfg(path, val_ratio=0, test_ratio=0), seed=0)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_mapped_column_missing_and_bad_messages_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "summary": "y"}, {"summary": "y"}])
    with pytest.raises(DataError, match=r"d.jsonl: row 2 has no column 'body'"):
        read_rows(path, {"abstract": "body"})
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(DataError, match=r"c.jsonl \(train\): row 1, column 'messages': no assistant turn"):
        load_task(data_cfg(chat, val_ratio=0, test_ratio=0), seed=0)


# -- templates, THE formatting function, EOS -----------------------------------------------------
def test_phrasings_are_sampled_per_example_with_the_seed(tokenizer, rows):
    fmt = PromptFormat.resolve("summarize_outcome", "abstract", True, None)
    task = TaskData(rows, [], [], fmt, response="summary")
    first, _ = tokenize_task_rows(rows, tokenizer, task, 256, seed=1)
    again, _ = tokenize_task_rows(rows, tokenizer, task, 256, seed=1)
    other, _ = tokenize_task_rows(rows, tokenizer, task, 256, seed=2)
    assert first == again and first != other
    starts = {tokenizer.decode(e["input_ids"][:12]) for e in first}
    assert len(starts) == 3, "all three phrasings were used"


@pytest.mark.parametrize("chat", [True, False])
def test_training_prompt_ids_are_byte_identical_to_generation(tokenizer, rows, chat):
    fmt = PromptFormat.resolve("summarize_outcome", "abstract", chat, "Be brief." if chat else None)
    task = TaskData(rows, [], [], fmt, response="summary")
    train, _ = tokenize_task_rows(rows, tokenizer, task, 256, sample_phrasings=False)
    generated = encode_prompts(tokenizer, fmt, rows)
    for example, prompt in zip(train, generated):
        n_prompt = example["labels"].index(next(l for l in example["labels"] if l != IGNORE_INDEX))
        assert example["input_ids"][:n_prompt] == prompt
        assert example["input_ids"][-1] == tokenizer.eos_token_id and example["labels"][-1] == tokenizer.eos_token_id


def test_eos_label_survives_collation_when_pad_is_eos(tokenizer, rows):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    task = TaskData(rows, [], [], PromptFormat(["{abstract}"]), response="summary")
    examples, _ = tokenize_task_rows(rows[:4], tokenizer, task, 256)
    examples[0]["input_ids"] += [5, 6, 7]  # make the others shorter than the batch, so they get padded
    examples[0]["labels"] += [5, 6, 7]
    batch = collate(examples, tokenizer.pad_token_id)
    for i, e in enumerate(examples[1:], 1):
        n = len(e["input_ids"])
        assert batch["labels"][i, n - 1] == tokenizer.eos_token_id, "the EOS label is kept"
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and batch["attention_mask"][i, n:].sum() == 0
        assert (batch["input_ids"][i, n - 1 :] == tokenizer.eos_token_id).all(), "pad ids equal EOS ids here"


# -- loss masks and truncation -------------------------------------------------------------------
def test_loss_on_response_only_unless_train_on_prompt(tokenizer, rows):
    task = TaskData(rows, [], [], PromptFormat(["Summarize: {abstract}"]), response="summary")
    masked, _ = tokenize_task_rows(rows[:1], tokenizer, task, 256)
    full, _ = tokenize_task_rows(rows[:1], tokenizer, task, 256, train_on_prompt=True)
    target = tokenizer(rows[0]["summary"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # chat: no space
    labelled = [l for l in masked[0]["labels"] if l != IGNORE_INDEX]
    assert labelled == target and masked[0]["labels"][: -len(target)] == [IGNORE_INDEX] * (len(masked[0]["labels"]) - len(target))
    assert full[0]["labels"] == full[0]["input_ids"]


def test_truncation_that_loses_the_response_is_counted_and_logged(tokenizer, caplog):
    rows = [{"abstract": "Short.", "summary": "word " * 60}, {"abstract": "Short.", "summary": "Fine."}]
    task = TaskData(rows, [], [], PromptFormat(["{abstract}"]), response="summary", name="t")
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        examples, stats = tokenize_task_rows(rows, tokenizer, task, max_length=32)
    assert len(examples) == 1 and stats.dropped == 1
    assert "1 example(s) had no target tokens within max_length=32" in caplog.text
    text_task = TaskData([{"text": "word " * 60}], [], [], PromptFormat(), shape="text", name="lm")
    _, text_stats = tokenize_task_rows(text_task.train, tokenizer, text_task, max_length=16)
    assert text_stats.truncated_responses == 1


# -- splits and mixtures --------------------------------------------------------------------------
def test_ratio_splits_are_seeded_and_disjoint():
    rows = [{"i": i} for i in range(50)]
    keep, held = split_by_ratio(rows, 0.2, seed=3)
    assert len(held) == 10 and len(keep) == 40 and not {r["i"] for r in keep} & {r["i"] for r in held}
    assert split_by_ratio(rows, 0.2, seed=3) == (keep, held) and split_by_ratio(rows, 0.2, seed=4)[1] != held


def test_mixture_keeps_each_template_and_weights_examples(tmp_path, tokenizer, caplog):
    from peftkit.train.data import build_train_data

    a = write_jsonl(tmp_path / "a.jsonl", SHAPES["prompt_response"])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(20)])
    cfg = config_from_dict({"data": {"dataset": None, "val_ratio": 0.0, "test_ratio": 0.0, "mixture": [
        {"train": str(a), "prompt": "abstract", "response": "summary", "template": "Summarize: {abstract}", "weight": 2.0},
        {"train": str(b), "prompt": "question", "response": "answer", "template": "Answer: {question}", "weight": 0.5},
    ]}})
    tasks = load_tasks(cfg.data, seed=0)
    assert [t.format.templates for t in tasks] == [["Summarize: {abstract}"], ["Answer: {question}"]]
    with caplog.at_level(logging.INFO, logger="peftkit"):
        data = build_train_data(cfg, tasks, tokenizer, seq2seq=False)
    counts = {name: sum(e["task"] == name for e in data.units) for name in ("a", "b")}
    assert counts == {"a": 20, "b": 10}
    assert "data a: train 10, validation 0, test 0 rows; 20 training examples per epoch (weight 2)" in caplog.text
    b_prompts = [tokenizer.decode(e["input_ids"]) for e in data.units if e["task"] == "b"]
    assert all("Answer: Q" in p for p in b_prompts)


def test_mixture_of_builtin_tasks_from_config():
    cfg = load_config(None, ["data.mixture=[{dataset: aclsum/outcome}, {dataset: aclsum/challenge, weight: 0.5}]"])
    tasks = load_tasks(cfg.data, seed=0)
    assert [t.name for t in tasks] == ["aclsum/outcome", "aclsum/challenge"]
    assert "outcome" in tasks[0].format.templates[0].lower() and "challenge" in tasks[1].format.templates[0].lower()


# -- packing --------------------------------------------------------------------------------------
def random_examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 12, 5, 9, 14, 3):
        ids = torch.randint(3, 390, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def per_example_loss(losses: torch.Tensor, order: list[int], examples: list[dict]) -> dict[int, float]:
    out, at = {}, 0
    for i in order:
        n = sum(l != IGNORE_INDEX for l in examples[i]["labels"][1:])
        out[i] = float(losses[at : at + n].detach().sum())
        at += n
    return out


def test_pack_examples_fills_within_capacity():
    lengths = [7, 12, 5, 9, 14, 3]
    packs = pack_examples(lengths, capacity=20, seed=0)
    assert sorted(i for p in packs for i in p) == list(range(6))
    assert all(sum(lengths[i] for i in p) <= 20 for p in packs) and len(packs) == 3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("selective", [True, False])
def test_packed_loss_equals_unpacked_per_example(attention, selective, monkeypatch):
    if not selective:
        monkeypatch.setattr(loss_module, "supports_selective_logits", lambda model: False)
    model = build_model("llama", 400)
    model.config._attn_implementation = attention
    examples = random_examples()
    unpacked = per_example_loss(token_losses(model, collate(examples, 2)), list(range(len(examples))), examples)
    packs = pack_examples([len(e["input_ids"]) for e in examples], capacity=20, seed=0)
    batch = collate([packed_example([examples[i] for i in p]) for p in packs], 2)
    packed = per_example_loss(token_losses(model, batch), [i for p in packs for i in p], examples)
    for i in unpacked:
        assert abs(packed[i] - unpacked[i]) < 1e-5, (i, packed[i], unpacked[i])
    # the control: restarting position ids alone lets later examples see earlier ones
    leaky = dict(batch)
    del leaky["segment_ids"]
    leaky_losses = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    exact = model(**loss_module.model_inputs(batch, torch.float32)).logits
    assert (leaky_losses - exact).abs().max() > 1e-3


def test_block_causal_mask_shape_and_isolation():
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]), torch.float32)
    allowed = mask[0, 0] == 0
    assert mask.shape == (1, 1, 5, 5)
    assert allowed.tolist() == [
        [True, False, False, False, False], [True, True, False, False, False], [False, False, True, False, False],
        [False, False, True, True, False], [False, False, False, False, True],
    ]


def test_packing_is_refused_for_methods_that_cannot_use_it():
    for method in ("prompt_tuning", "prefix_tuning"):
        with pytest.raises(ConfigError, match="data.packing: method"):
            load_config(None, [f"method={method}", "data.packing=true"])
    assert load_config(None, ["data.packing=true"]).data.packing
