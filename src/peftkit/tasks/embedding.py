"""Sentence embeddings: pooling, the in-batch contrastive loss, and retrieval metrics.

The loss is sentence-transformers' MultipleNegativesRankingLoss: for B queries and the batch's
distinct passages P, scores = scale * cos(q_i, p_j) (B, P) and cross-entropy picks each query's
own passage. Several queries of one paper share its passage, so passages are de-duplicated by id
first: a second copy of the right abstract would otherwise count as a negative.

Retrieval: each query ranks every passage of the split's corpus (its distinct passages); with one
relevant passage per query, recall@k = P(rank <= k), MRR = mean 1/rank, nDCG@10 = mean 1/log2(rank+1)
over ranks <= 10 (the ideal DCG is 1).

Example:
    >>> vectors = encode_texts(model, tokenizer, ["a query", "a passage"], pooling="mean", max_length=256)
    >>> retrieval_metrics(torch.tensor([1, 3, 12]), ks=[1, 10])
    {'recall@1': 0.3333, 'recall@10': 0.6667, 'mrr': 0.4722, 'ndcg@10': 0.5}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H) unit vectors: mask-weighted mean, or the first token ([CLS])."""
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): padding contributes nothing
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(vectors.float(), dim=-1)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A padded, truncated batch of `texts` on `device`."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)


def embed(model: nn.Module, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """Unit sentence vectors (B, H) of a tokenized batch, in the graph (for training)."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return pool(hidden, batch["attention_mask"], pooling)


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str = "mean", max_length: int = 256,
    batch_size: int = 32, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unit sentence vectors (N, H) of `texts`, in batches, without gradients."""
    device = torch.device(device)
    parts = [embed(model, tokenize(tokenizer, texts[i : i + batch_size], max_length, device), pooling).cpu()
             for i in range(0, len(texts), batch_size)]
    return torch.cat(parts)


def contrastive_loss(queries: torch.Tensor, passages: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean in-batch-negatives cross-entropy: `queries` (B, H) against distinct `passages` (P, H), unit vectors;
    `targets` (B,) is the index of each query's passage."""
    scores = scale * queries @ passages.T  # (B, P) scaled cosine similarities
    return F.cross_entropy(scores, targets)


def distinct_passages(rows: Sequence[dict[str, Any]]) -> tuple[list[str], torch.Tensor]:
    """(distinct passage texts in first-seen order, index of each row's passage among them)."""
    index: dict[str, int] = {}
    texts: list[str] = []
    for row in rows:
        if row["passage_id"] not in index:
            index[row["passage_id"]] = len(texts)
            texts.append(row["passage"])
    return texts, torch.tensor([index[row["passage_id"]] for row in rows])


def gold_ranks(query_vectors: torch.Tensor, passage_vectors: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's gold passage among all passages (ties count against it)."""
    scores = query_vectors @ passage_vectors.T  # (Q, P)
    gold_scores = scores.gather(1, gold[:, None])  # (Q, 1)
    return (scores >= gold_scores).sum(1)


def retrieval_metrics(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k, MRR and nDCG@10 from the gold passage's rank of each query (one relevant passage each)."""
    ranks = ranks.double()
    out = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out["mrr"] = float((1 / ranks).mean())
    out["ndcg@10"] = float(torch.where(ranks <= 10, 1 / torch.log2(ranks + 1), torch.zeros_like(ranks)).mean())
    return {k: round(v, 4) for k, v in out.items()}


def evaluate_retrieval(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], pooling: str, max_length: int,
    ks: Sequence[int], batch_size: int = 32, device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Retrieve each row's passage among the split's distinct passages; the metrics, plus the counts."""
    passages, gold = distinct_passages(rows)
    queries = encode_texts(model, tokenizer, [r["query"] for r in rows], pooling, max_length, batch_size, device)
    corpus = encode_texts(model, tokenizer, passages, pooling, max_length, batch_size, device)
    scores = retrieval_metrics(gold_ranks(queries, corpus, gold), ks)
    return {**scores, "queries": len(rows), "passages": len(passages)}

