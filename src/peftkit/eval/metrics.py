"""Text metrics, computed by the libraries everyone cites: rouge-score for ROUGE, sacrebleu for BLEU.

Nothing here re-implements a metric: the functions only call the reference library, average
over a corpus and attach a seeded bootstrap confidence interval, so a peftkit number is the
number a paper would report.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot score an empty corpus")


def first_line(text: str) -> str:
    """The first non-blank line of a generation, stripped: how summaries are scored.

    >>> first_line("\\n A result.\\nQ: next question")
    'A result.'
    """
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def rouge_per_example(
    predictions: Sequence[str], references: Sequence[str], stemmer: bool = True
) -> list[dict[str, dict[str, float]]]:
    """ROUGE-1/2/L/Lsum precision, recall and F1 for each (prediction, reference) pair.

    ROUGE-Lsum splits both texts into sentences on newlines, as rouge-score does.

    >>> rouge_per_example(["It is very cold outside"], ["It is cold outside"])[0]["rouge1"]["recall"]
    1.0
    """
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score's order: (target, prediction)
        rows.append(
            {
                name: {"precision": s.precision, "recall": s.recall, "f1": s.fmeasure}
                for name, s in scores.items()
            }
        )
    return rows


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], stemmer: bool = True
) -> dict[str, dict[str, float]]:
    """Corpus ROUGE: the mean over examples of each type's precision, recall and F1.

    >>> s = rouge_scores(["It is very cold outside"], ["It is cold outside"])
    >>> round(s["rouge1"]["f1"], 3), round(s["rouge2"]["f1"], 3), round(s["rougeL"]["f1"], 3)
    (0.889, 0.571, 0.889)
    """
    rows = rouge_per_example(predictions, references, stemmer)
    return {
        name: {
            part: float(np.mean([row[name][part] for row in rows]))
            for part in ("precision", "recall", "f1")
        }
        for name in ROUGE_TYPES
    }


def bleu_score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | list[float]]:
    """Corpus BLEU from sacrebleu (0-100 scale) with its 1-4-gram precisions and brevity penalty.

    >>> round(bleu_score(["It is very cold outside"], ["It is cold outside"])["bleu"], 2)
    30.21
    """
    _check_pairs(predictions, references)
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {
        "bleu": float(result.score),
        "precisions": [float(p) for p in result.precisions],
        "brevity_penalty": float(result.bp),
        "length_ratio": float(result.sys_len / result.ref_len) if result.ref_len else 0.0,
        "hyp_len": int(result.sys_len),
        "ref_len": int(result.ref_len),
    }


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD's normalisation).

    >>> normalize_answer("  The Cold,  outside! ")
    'cold outside'
    """
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_per_example(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the normalised prediction equals the normalised reference, else 0.0.

    >>> exact_match_per_example(["The answer.", "no"], ["answer", "yes"])
    [1.0, 0.0]
    """
    _check_pairs(predictions, references)
    return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that match their reference after normalisation.

    >>> exact_match(["The answer.", "no"], ["answer", "yes"])
    0.5
    """
    return float(np.mean(exact_match_per_example(predictions, references)))


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values`; the same seed gives the same interval.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    stemmer: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Every generation metric for one system: ROUGE F1s and exact match with 95% intervals, and BLEU.

    Each entry holds `value` (the corpus score) and, for per-example means, `ci_low`/`ci_high`.

    >>> m = text_metrics(["It is very cold outside"], ["It is cold outside"])
    >>> round(m["rouge1"]["value"], 3), m["exact_match"]["value"]
    (0.889, 0.0)
    """
    rows = rouge_per_example(predictions, references, stemmer)
    per_example = {name: [row[name]["f1"] for row in rows] for name in ROUGE_TYPES}
    per_example["exact_match"] = exact_match_per_example(predictions, references)
    metrics: dict[str, dict[str, float]] = {}
    for name, values in per_example.items():
        low, high = bootstrap_ci(values, seed=seed)
        metrics[name] = {"value": float(np.mean(values)), "ci_low": low, "ci_high": high}
    bleu = bleu_score(predictions, references)
    metrics["bleu"] = {"value": bleu["bleu"], "brevity_penalty": bleu["brevity_penalty"]}
    metrics["bleu"].update({f"precision_{n}": p for n, p in enumerate(bleu["precisions"], start=1)})
    return metrics
