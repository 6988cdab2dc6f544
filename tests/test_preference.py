"""Preference tuning (#19): DPO / IPO / ORPO losses and gradients equal TRL's (fp32, 1e-5)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model

from peftkit.train.preference_loss import PairScores, PreferenceSettings, pair_losses

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

TOL = 1e-5


def toy_pairs(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, completion_mask) of 3 pairs, rows [chosen..., rejected...] as TRL batches them; same prompt per pair."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 6, 5)]
    answers = [[torch.randint(3, vocab, (n,), generator=g) for n in lengths] for lengths in ((3, 5), (4, 2), (6, 6))]
    for side in (0, 1):
        for prompt, pair in zip(prompts, answers):
            rows.append(torch.cat([prompt, pair[side]]))
            masks.append(torch.cat([torch.zeros(len(prompt)), torch.ones(len(pair[side]))]).long())
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=2) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in masks])
    return ids, mask


def per_token_logps(model: torch.nn.Module, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """(rows, T-1) log-probability of each next token, zero outside the answers (TRL's `log_probs`)."""
    attention = (ids != 2) | (completion == 1) | (torch.arange(ids.shape[1]) < 4)
    logits = model(input_ids=ids, attention_mask=attention.long()).logits[:, :-1].float()
    taken = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return taken * completion[:, 1:]


def trl_dpo_loss(beta: float, loss_type: str, logps: torch.Tensor, ref_logps: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on precomputed per-token log-probs (the model returns them as its fused head would)."""
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    n = logps.shape[0] // 2
    ref = ref_logps.sum(1)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


def scores_of(logps: torch.Tensor, completion: torch.Tensor, ref_logps: torch.Tensor | None = None) -> PairScores:
    n = logps.shape[0] // 2
    sums, tokens = logps.sum(1), completion[:, 1:].sum(1)
    ref = ref_logps.sum(1) if ref_logps is not None else None
    return PairScores(sums[:n], sums[n:], tokens[:n], tokens[n:], None if ref is None else ref[:n], None if ref is None else ref[n:])


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def assert_close_grads(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert any(float(g.abs().max()) > 1e-6 for g in ours)  # the check is not vacuous


@pytest.fixture()
def tiny():
    torch.set_default_dtype(torch.float32)
    policy = build_model("llama", 64, seed=0).float()
    reference = build_model("llama", 64, seed=1).float()
    return policy, reference


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_and_gradients_equal_trl(tiny, loss_type, beta):
    policy, reference = tiny
    ids, completion = toy_pairs(64)
    with torch.no_grad():
        ref_logps = per_token_logps(reference, ids, completion)
    logps = per_token_logps(policy, ids, completion)
    theirs = trl_dpo_loss(beta, loss_type, logps, ref_logps, completion)
    losses, chosen_reward, rejected_reward = pair_losses(PreferenceSettings("dpo", beta=beta, loss=loss_type),
                                                         scores_of(logps, completion, ref_logps))
    ours = losses.mean()
    assert abs(ours.item() - theirs.item()) < TOL and ours.item() > 0
    assert_close_grads(grads(policy, ours), grads(policy, theirs))
    if loss_type == "sigmoid":  # TRL's implicit rewards: beta * log-ratio
        sums, ref = logps.sum(1).detach(), ref_logps.sum(1)
        torch.testing.assert_close(chosen_reward, beta * (sums[:3] - ref[:3]))
        torch.testing.assert_close(rejected_reward, beta * (sums[3:] - ref[3:]))


def trl_orpo_loss(orpo_lambda: float, logps: torch.Tensor, completion: torch.Tensor, pair: int) -> torch.Tensor:
    """TRL's ORPO loss of one pair: its chosen NLL (cross-entropy over the chosen answer's tokens) minus lambda times
    the mean of `odds_ratio_loss` on the per-token averaged log-probs."""
    n = logps.shape[0] // 2
    tokens = completion[:, 1:].sum(1)
    mean = logps.sum(1) / tokens
    trainer = SimpleNamespace(beta=orpo_lambda, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, mean[pair : pair + 1], mean[n + pair : n + pair + 1])
    nll = -logps[pair].sum() / tokens[pair]  # nn.CrossEntropyLoss over the chosen labels (mean over tokens)
    return nll - ratio_losses.mean()


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_loss_and_gradients_equal_trl(tiny, orpo_lambda):
    policy, _ = tiny
    ids, completion = toy_pairs(64, seed=3)
    logps = per_token_logps(policy, ids, completion)
    losses, *_ = pair_losses(PreferenceSettings("orpo", orpo_lambda=orpo_lambda), scores_of(logps, completion))
    for pair in range(3):  # TRL's NLL is a token mean over its batch: per pair, the two agree exactly
        theirs = trl_orpo_loss(orpo_lambda, logps, completion, pair)
        assert abs(losses[pair].item() - theirs.item()) < TOL
        assert_close_grads(grads(policy, losses[pair]), grads(policy, theirs))


def test_orpo_odds_ratio_term_equals_trl_on_extreme_log_probs():
    chosen = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    rejected = torch.tensor([-2.0, -1e-3, -0.7, -0.69, -0.01, -1.0], dtype=torch.float64)
    ones = torch.ones(6)
    losses, *_ = pair_losses(PreferenceSettings("orpo", orpo_lambda=0.5), PairScores(chosen, rejected, ones, ones))
    trainer = SimpleNamespace(beta=0.5, accelerator=SimpleNamespace(device="cpu"))
    ratio, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    torch.testing.assert_close(losses, (-chosen - ratio).float(), atol=TOL, rtol=TOL)
    assert torch.isfinite(losses).all()


def test_sft_weight_adds_the_chosen_answers_per_token_nll():
    chosen, rejected = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -9.0])
    tokens = torch.tensor([3, 4])
    scores = PairScores(chosen, rejected, tokens, tokens, torch.tensor([-5.0, -2.5]), torch.tensor([-3.0, -8.0]))
    plain, *_ = pair_losses(PreferenceSettings("dpo", beta=0.1), scores)
    weighted, *_ = pair_losses(PreferenceSettings("dpo", beta=0.1, sft_weight=0.5), scores)
    torch.testing.assert_close(weighted - plain, 0.5 * torch.tensor([2.0, 0.5]))
