"""LoRA beyond generation: sentence embeddings (contrastive loss, retrieval metrics) and classification
(LoRA + a trained head) on a tiny BERT; the built-in MiniLM; the CLI's `task=` runs and `eval`.
(Encoder-task config mistakes are ConfigErrors, which the CLI turns into exit 2: tests/test_cli.py.)"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import yaml
from conftest import build_tokenizer
from test_cli import peftkit

from peftkit.config import config_from_dict, load_config
from peftkit.data.sources import ACLSUM_ASPECTS
from peftkit.errors import ConfigError
from peftkit.train import run_training
from peftkit.tasks.classification import classification_metrics
from peftkit.tasks.data import aclsum_split
from peftkit.tasks.embedding import (
    contrastive_loss,
    distinct_passages,
    gold_ranks,
    pool,
    retrieval_metrics,
)
from peftkit.tasks.evaluate import evaluate_encoder_adapters, load_encoder_adapter

TOPICS = ["summarization", "translation", "benchmarks", "accuracy", "baselines", "parallel", "recall", "outside",
          "abstract", "method", "model", "problem", "results", "cold", "data", "margin"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT (hidden 64, 2 layers) with the suite's BPE tokenizer, saved as a local folder."""
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        initializer_range=0.2)  # BERT's 0.02 gives nearly input-independent [CLS] states at this size
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encoder_config(bert_dir, data, out, task, **train):
    """A RunConfig dict for a tiny encoder run; the rows are also the validation and test split (memorisation)."""
    return {
        "model": str(bert_dir), "task": task,
        "data": {"dataset": None, "train": str(data), "validation": str(data), "test": str(data), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 6, "batch_size": 8, "lr": 1e-2, "seed": 0, "save_every": 0, "warmup_ratio": 0.0, **train},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"query": t, "passage": f"This paper studies {t} with a new method."} for t in TOPICS]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    rows = [{"text": f"It is {'very cold' if i % 2 else 'warm'} outside near the {t}.", "label": "cold" if i % 2 else "warm"}
            for i, t in enumerate(TOPICS)]
    return write_jsonl(tmp_path_factory.mktemp("labels") / "labels.jsonl", rows)


@pytest.fixture(scope="module")
def embedding_run(bert_dir, pairs_file, tmp_path_factory):
    # fp32: `eval` must reproduce the run's scores exactly, and `auto` trains in bf16 on bf16-native hosts
    cfg = config_from_dict(encoder_config(bert_dir, pairs_file, tmp_path_factory.mktemp("emb") / "run", "embedding",
                                          precision="fp32"))
    return cfg, run_training(cfg)


# -- metrics and loss ---------------------------------------------------------------------------
def test_retrieval_metrics_follow_their_definitions():
    scores = retrieval_metrics(torch.tensor([1, 3, 12]), ks=[1, 10])
    assert scores["recall@1"] == round(1 / 3, 4) and scores["recall@10"] == round(2 / 3, 4)
    assert scores["mrr"] == round((1 + 1 / 3 + 1 / 12) / 3, 4)
    assert scores["ndcg@10"] == round((1 + 1 / math.log2(4)) / 3, 4)  # rank 12 is past the cut-off


def test_gold_ranks_match_a_sort():
    g = torch.Generator().manual_seed(0)
    queries, passages = torch.randn(20, 8, generator=g), torch.randn(7, 8, generator=g)
    gold = torch.randint(0, 7, (20,), generator=g)
    order = (queries @ passages.T).argsort(dim=1, descending=True)
    expected = (order == gold[:, None]).float().argmax(1) + 1
    assert torch.equal(gold_ranks(queries, passages, gold), expected)


def test_contrastive_loss_counts_a_shared_passage_once():
    rows = [{"query": "a", "passage": "P1", "passage_id": "1"}, {"query": "b", "passage": "P1", "passage_id": "1"},
            {"query": "c", "passage": "P2", "passage_id": "2"}]
    texts, targets = distinct_passages(rows)
    assert texts == ["P1", "P2"] and targets.tolist() == [0, 0, 1]
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=-1)
    by_hand = -torch.stack([torch.log_softmax(20 * q[i] @ p.T, 0)[targets[i]] for i in range(3)]).mean()
    torch.testing.assert_close(contrastive_loss(q, p, targets, scale=20.0), by_hand)


def test_mean_pooling_ignores_padding_and_is_unit_length():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    vector = pool(hidden, torch.tensor([[1, 1, 0]]), "mean")
    torch.testing.assert_close(vector, torch.nn.functional.normalize(torch.tensor([[2.0, 2.0]]), dim=-1))


def test_classification_metrics():
    scores = classification_metrics(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), num_classes=3)
    assert scores["accuracy"] == 0.5
    f1 = [2 * 1 / (2 + 1 + 0), 2 * 1 / (2 + 0 + 2), 0.0]  # class 2 was predicted once, never right
    assert scores["macro_f1"] == round(sum(f1) / 3, 4)


# -- data and config ----------------------------------------------------------------------------
def test_aclsum_builtins():
    pairs = aclsum_split("embedding", "aclsum/aspects", "test")
    assert len(pairs) == 3 * len({r["passage_id"] for r in pairs})  # three summary sentences per paper
    assert {tuple(sorted(r)) for r in pairs} == {("passage", "passage_id", "query")}
    one = aclsum_split("embedding", "aclsum/outcome", "test")
    first = ACLSUM_ASPECTS.index("outcome")  # rows go paper by paper, aspect by aspect
    assert [r["query"] for r in one] == [r["query"] for r in pairs[first::3]]
    labelled = aclsum_split("classification", "aclsum/aspects", "train")
    counts = {label: sum(r["label"] == label for r in labelled) for label in ("challenge", "approach", "outcome")}
    assert len(set(counts.values())) == 1 and sum(counts.values()) == len(labelled)


def test_encoder_task_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="aclsum/aspects") as info:
        load_config(None, ["task=classification", "method=prompt_tuning", "train.micro_batch_size=2"])
    message = str(info.value)
    assert "method lora" in message and "micro_batch_size" in message
    with pytest.raises(ConfigError, match="did you mean 'embedding'"):
        load_config(None, ["task=embeding"])
    assert load_config(None, ["task=embedding"]).data.dataset == "aclsum/outcome"  # outcome sentence -> abstract


# -- training -----------------------------------------------------------------------------------
def test_embedding_training_improves_retrieval_and_writes_the_run(embedding_run):
    _, result = embedding_run
    assert result.test["adapter"]["mrr"] > result.test["base"]["mrr"]
    assert result.test["adapter"]["passages"] == len(TOPICS)
    run = result.output_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "val_mrr" in r] and any("adapter_mrr" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())  # the encoder objective's report plus the loop's precision
    assert summary["precision"] == {"device": "cpu", "dtype": "fp32", "reason": "precision: fp32 in config"} and "adapter" in summary
    raw = json.loads((run / "adapter/adapter_config.json").read_text())
    assert raw["task_type"] == "FEATURE_EXTRACTION" and json.loads((run / "adapter/peftkit.json").read_text())["task"] == "embedding"


def test_embedding_adapter_loads_in_peft_and_back(embedding_run, bert_dir):
    from transformers import AutoModel, AutoTokenizer

    _, result = embedding_run
    ours, _ = load_encoder_adapter(result.adapter_dir)
    batch = AutoTokenizer.from_pretrained(bert_dir)(["a new method"], return_tensors="pt")
    with torch.no_grad():
        expected = ours(**batch).last_hidden_state
        theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(bert_dir), str(result.adapter_dir)).eval()
        torch.testing.assert_close(theirs(**batch).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            assert not torch.allclose(ours(**batch).last_hidden_state, expected)
    scores = evaluate_encoder_adapters([str(result.adapter_dir)], split="test")
    assert scores["systems"]["run"] == result.test["adapter"] and scores["systems"]["base"] == result.test["base"]


def test_classification_trains_the_head_and_peft_loads_it(bert_dir, labelled_file, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = config_from_dict(encoder_config(bert_dir, labelled_file, tmp_path / "run", "classification"))
    result = run_training(cfg)
    assert result.test["adapter"]["accuracy"] > result.test["base"]["accuracy"]
    raw = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["modules_to_save"] == ["classifier"]
    ours, _ = load_encoder_adapter(result.adapter_dir)
    batch = AutoTokenizer.from_pretrained(bert_dir)(["It is very cold outside."], return_tensors="pt")
    torch.manual_seed(1)  # PEFT replaces the fresh head with the saved one, whatever its initialisation
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_resume_continues_bit_identically(bert_dir, pairs_file, tmp_path):
    raw = encoder_config(bert_dir, pairs_file, tmp_path / "once", "embedding", max_steps=4, schedule="constant")
    whole = run_training(config_from_dict(raw))
    raw_b = {**raw, "output_dir": str(tmp_path / "twice"), "train": {**raw["train"], "save_every": 2}}
    run_training(config_from_dict({**raw_b, "train": {**raw_b["train"], "max_steps": 2}}))
    resumed = run_training(config_from_dict(raw_b), resume=True)
    assert (whole.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()


# -- the built-in encoder and the CLI -----------------------------------------------------------
def test_builtin_minilm_embeds_paraphrases_closer():
    from peftkit.models import load_encoder
    from peftkit.tasks.embedding import encode_texts

    model, tokenizer = load_encoder("all-minilm-l6-v2")
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    vectors = encode_texts(model.eval(), tokenizer, ["We translate medical terms.", "Translation of medical terminology.",
                                                     "The weather is cold today."])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_cli_trains_and_evaluates_a_classifier(bert_dir, labelled_file, tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(encoder_config(bert_dir, labelled_file, tmp_path / "run", "classification")))
    result = peftkit("train", str(tmp_path / "cfg.yaml"), "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "accuracy" in result.stdout and "macro_f1" in result.stdout
    evaluated = peftkit("eval", "--adapter", str(tmp_path / "run/adapter"), "--out", str(tmp_path / "eval"))  # same split
    assert evaluated.returncode == 0, evaluated.stderr + evaluated.stdout
    scores = json.loads((tmp_path / "eval/results.json").read_text())
    assert scores["task"] == "classification" and set(scores["systems"]) == {"base", "run"}
    assert scores["systems"]["run"] == json.loads((tmp_path / "run/summary.json").read_text())["adapter"]

