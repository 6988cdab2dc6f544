"""How one request picks its next token: logit processors (bias, penalties, banned n-grams, min_tokens),
then greedy or temperature / top-k / top-p / min-p sampling, and the log-probabilities reported to clients.

Log-probabilities are those of the model itself (log-softmax of the raw logits, in fp32), before any
processor or temperature, as vLLM reports them by default.

Example:
    >>> params = SamplingParams(max_tokens=8, temperature=0.7, top_k=40, repetition_penalty=1.1)
    >>> logits = process_logits(raw_logits[row], params, prompt_ids, generated, eos_ids)
    >>> token = choose_token(logits, params, generator)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

GREEDY_BELOW = 1e-4
"""Temperatures below this decode greedily."""


@dataclass
class SamplingParams:
    """How one request picks its tokens, when it stops, and what log-probabilities it reports."""

    max_tokens: int = 16
    temperature: float = 1.0
    """Below GREEDY_BELOW (e.g. 0) means greedy (argmax of the processed logits)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """Keep going past EOS until max_tokens (vLLM's extension; benchmarks use it)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the answer like EOS (not included in the text)."""
    min_tokens: int = 0
    """EOS, stop_token_ids and stop strings are ignored until this many tokens are generated."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens in the prompt or output (CTRL, transformers, vLLM)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (transformers' option; 0: off)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit (-100 bans, 100 forces)."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Report the prompt tokens' log-probabilities too (echo), with this many alternatives."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenLogprob:
    """One position's log-probability: the token there, its log-prob, and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def process_logits(
    logits: torch.Tensor, params: SamplingParams, prompt: Seq[int], generated: Seq[int], end_ids: set[int]
) -> torch.Tensor:
    """(V,) fp32 raw logits -> the logits this request samples from (a copy when anything applies)."""
    if not (params.logit_bias or params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
            or params.no_repeat_ngram_size or len(generated) < params.min_tokens):
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if params.repetition_penalty != 1.0:
        _repetition_penalty(logits, [*prompt, *generated], params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.no_repeat_ngram_size:
        banned = banned_ngram_tokens([*prompt, *generated], params.no_repeat_ngram_size)
        if banned:
            logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
    if len(generated) < params.min_tokens and end_ids:
        logits[torch.tensor(sorted(end_ids), device=logits.device)] = float("-inf")
    return logits


def _repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    if ids.numel():
        scores = logits[ids]
        logits[ids] = torch.where(scores > 0, scores / penalty, scores * penalty)


def banned_ngram_tokens(tokens: Seq[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `tokens` (transformers' no_repeat_ngram_size)."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from processed (V,) logits: argmax when greedy, else a filtered sample."""
    if params.greedy or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)  # dividing by a tinier temperature overflows
    if params.top_k and params.top_k < probs.numel():
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p * sorted_probs.sum()
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-prob of `token` in a (V,) log-softmax row, with the `top` most likely alternatives."""
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = logprobs.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt: Seq[int], top: int) -> list[TokenLogprob | None]:
    """(T, V) logits of a whole prompt -> per prompt token its log-prob given what precedes it; the first is None."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # row i predicts token i + 1
    return [None] + [token_logprob(logprobs[i], prompt[i + 1], top) for i in range(len(prompt) - 1)]
