"""The adapter contract through the TRAINING LOSS: for every (method, architecture) pair of the contract
suite (tests/test_contract.py) that has a token loss, the loss the trainer computes (fused linear
cross-entropy over the labelled positions; one padding-free row where the method packs and the
architecture supports it) equals the cross-entropy of the model's own `.logits` over a padded batch,
in value and in every trainable parameter's gradient. fp32 throughout (the tiny models are built in fp32).

ViT and Whisper are in the contract suite for `.logits` only: no training objective reads pixels or audio.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from test_contract import METHOD_CASES, PAIRS, VOCAB, base_model, randomize_adapter

from peftkit import attach
from peftkit.config import LoraConfig
from peftkit.data.batching import IGNORE_INDEX, collate
from peftkit.methods.registry import method_for_config
from peftkit.train.attention import padding_free
from peftkit.train.loss import supports_selective_logits
from peftkit.train.objectives import ObjectiveForward
from peftkit.train.step import accumulate_gradients
from peftkit.train.tokens import TokenBatches

TOKEN_KINDS = ("llama", "gpt2", "t5")
LOSS_PAIRS = [(method, kind) for method, kind in PAIRS if kind in TOKEN_KINDS]
FP32 = {"rtol": 1e-5, "atol": 1e-6}
PAD_ID = 0


def examples(seed: int = 0, count: int = 4) -> list[dict[str, list[int]]]:
    """Prompt/response examples of unequal lengths, loss on the response only."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(5, 14)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        prompt = rng.randint(1, n - 2)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def seq2seq_examples(seed: int = 0, count: int = 4) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 12))],
             "labels": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 7))]} for _ in range(count)]


def reference_loss(model, batch: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    """Summed cross-entropy of the model's own logits on a padded batch (the plain path, computed here)."""
    if seq2seq:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        labels = batch["labels"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def loss_and_grads(adapted, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adapted.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_loss_and_grads(fast, plain) -> None:
    (fast_loss, fast_grads), (plain_loss, plain_grads) = fast, plain
    torch.testing.assert_close(fast_loss, plain_loss, **FP32)
    assert fast_grads.keys() == plain_grads.keys() and plain_grads, "the same parameters get gradients"
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], **FP32, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("method", "kind"), LOSS_PAIRS)
def test_training_loss_equals_the_logits_loss(method, kind):
    """The trainer's loss (fused cross-entropy where the architecture allows it) == CE of `.logits`."""
    factory = METHOD_CASES[method][0]
    adapted = attach(base_model(method, kind), factory())
    randomize_adapter(adapted)
    seq2seq = kind == "t5"
    batch = collate(seq2seq_examples() if seq2seq else examples(), PAD_ID, seq2seq)
    objective = TokenBatches(PAD_ID, seq2seq)
    fast = loss_and_grads(adapted, lambda: objective.loss(adapted, batch)[0])
    plain = loss_and_grads(adapted, lambda: reference_loss(adapted, batch, seq2seq))
    assert_same_loss_and_grads(fast, plain)


PADDING_FREE_PAIRS = [(method, kind) for method, kind in LOSS_PAIRS  # the architectures table: padding-free on Llama here
                      if kind == "llama" and method_for_config(METHOD_CASES[method][0]()).capabilities.padding_free]


@pytest.mark.parametrize(("method", "kind"), PADDING_FREE_PAIRS)
def test_padding_free_step_equals_the_logits_loss(method, kind):
    """One optimizer step's loss and gradients: one padding-free row (per-example attention) == padded `.logits`."""
    factory = METHOD_CASES[method][0]
    adapted = attach(base_model(method, kind), factory())
    randomize_adapter(adapted)
    rows = examples(seed=1, count=5)
    batch = collate(rows, PAD_ID)
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    plain = loss_and_grads(adapted, lambda: reference_loss(adapted, batch, False) / count)
    adapted.zero_grad(set_to_none=True)
    with padding_free(adapted.model) as active:
        assert active
        result = accumulate_gradients(ObjectiveForward(TokenBatches(PAD_ID, flat=True), adapted), rows, None)
    fast = (torch.tensor(result.loss), {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad and p.grad is not None})
    assert result.count == count
    assert_same_loss_and_grads(fast, (plain[0].float(), plain[1]))


def test_the_fused_path_is_what_the_llama_and_gpt2_cases_exercise():
    """Guard against the suite silently testing the plain path against itself."""
    for kind in ("llama", "gpt2"):
        assert supports_selective_logits(attach(base_model("lora", kind), LoraConfig(r=2)))
