"""Metrics against the libraries they wrap (rouge-score, sacrebleu) and the source documents' examples."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftkit.eval.metrics import (
    bleu_score,
    bootstrap_ci,
    exact_match,
    exact_match_per_example,
    first_line,
    normalize_answer,
    rouge_per_example,
    rouge_scores,
    text_metrics,
)

PREDICTION, REFERENCE = "It is very cold outside", "It is cold outside"

PREDICTIONS = [
    "The model improves accuracy by 3 points on two benchmarks.",
    "Results show large gains in translation quality.",
    "We find that pretraining helps low-resource parsing.",
    "nothing in common here",
]
REFERENCES = [
    "The proposed model improves accuracy on both benchmarks.",
    "Experiments show gains in BLEU for translation.",
    "Pretraining improves parsing in low-resource languages.",
    "The summaries are judged more fluent by humans.",
]


def test_rouge_source_example():
    scores = rouge_scores([PREDICTION], [REFERENCE])
    assert scores["rouge1"]["recall"] == 1.0
    assert scores["rouge1"]["precision"] == pytest.approx(0.8)
    assert scores["rouge1"]["f1"] == pytest.approx(0.889, abs=5e-4)
    assert scores["rouge2"]["f1"] == pytest.approx(0.571, abs=5e-4)
    # The source document's ROUGE-L example is wrong: the LCS "It is cold outside" has 4 words.
    assert scores["rougeL"]["f1"] == pytest.approx(0.889, abs=5e-4)
    assert scores["rougeL"]["recall"] == 1.0


@pytest.mark.parametrize("stemmer", [True, False])
def test_rouge_matches_rouge_score_library(stemmer):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stemmer)
    rows = rouge_per_example(PREDICTIONS, REFERENCES, stemmer=stemmer)
    corpus = rouge_scores(PREDICTIONS, REFERENCES, stemmer=stemmer)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = [scorer.score(r, p)[name] for p, r in zip(PREDICTIONS, REFERENCES)]
        assert [row[name]["precision"] for row in rows] == [s.precision for s in expected]
        assert [row[name]["recall"] for row in rows] == [s.recall for s in expected]
        assert corpus[name]["f1"] == pytest.approx(np.mean([s.fmeasure for s in expected]))


def test_stemming_changes_scores():
    with_stem = rouge_scores(["the models improved"], ["the model improves"], stemmer=True)
    without = rouge_scores(["the models improved"], ["the model improves"], stemmer=False)
    assert with_stem["rouge1"]["f1"] == pytest.approx(1.0)
    assert without["rouge1"]["f1"] == pytest.approx(1 / 3)


def test_rouge_lsum_splits_sentences_on_newlines():
    prediction, reference = "cold outside\nit is", "it is\ncold outside"
    scores = rouge_scores([prediction], [reference])
    assert scores["rougeLsum"]["f1"] == pytest.approx(1.0)
    assert scores["rougeL"]["f1"] == pytest.approx(0.5)


def test_bleu_matches_sacrebleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
    result = bleu_score(PREDICTIONS, REFERENCES)
    assert result["bleu"] == pytest.approx(expected.score)
    assert result["precisions"] == pytest.approx(expected.precisions)
    assert result["brevity_penalty"] == pytest.approx(expected.bp)
    assert (result["hyp_len"], result["ref_len"]) == (expected.sys_len, expected.ref_len)


def test_bleu_source_example_on_0_100_scale():
    result = bleu_score([PREDICTION], [REFERENCE])
    assert result["bleu"] == pytest.approx(sacrebleu.sentence_bleu(PREDICTION, [REFERENCE]).score)
    assert result["precisions"][:2] == pytest.approx([80.0, 50.0])
    assert result["brevity_penalty"] == 1.0  # the hypothesis is longer than the reference


def test_bleu_brevity_penalty_for_short_output():
    result = bleu_score(["It is cold"], ["It is very cold outside today"])
    assert result["brevity_penalty"] == pytest.approx(np.exp(1 - 6 / 3))


def test_exact_match_normalises_case_punctuation_and_articles():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match_per_example(["The Eiffel Tower.", "Paris"], ["eiffel tower", "London"]) == [1.0, 0.0]
    assert exact_match(["yes", "no", "maybe", "no"], ["yes", "no", "no", "yes"]) == 0.5


def test_first_line():
    assert first_line("\n\n  Gains of 3 BLEU.  \nQuestion: next") == "Gains of 3 BLEU."
    assert first_line("   \n") == ""


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).random(200)
    low, high = bootstrap_ci(values, seed=3)
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert (low, high) != bootstrap_ci(values, seed=4)
    assert low < values.mean() < high
    # The percentile interval of the mean shrinks like 1/sqrt(n): about 2 * 1.96 * std / sqrt(n) wide.
    assert high - low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(values.size), rel=0.15)


def test_bootstrap_of_a_constant_is_a_point():
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)


def test_text_metrics_bundle():
    metrics = text_metrics(PREDICTIONS, REFERENCES, seed=0)
    assert metrics["rougeL"]["value"] == pytest.approx(rouge_scores(PREDICTIONS, REFERENCES)["rougeL"]["f1"])
    assert metrics["rougeL"]["ci_low"] <= metrics["rougeL"]["value"] <= metrics["rougeL"]["ci_high"]
    assert metrics["bleu"]["value"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert metrics["bleu"]["precision_1"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).precisions[0])
    assert metrics["exact_match"]["value"] == 0.0


def test_mismatched_or_empty_corpus_is_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        bleu_score([], [])
