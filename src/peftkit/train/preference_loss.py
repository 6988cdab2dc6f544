"""Preference losses (DPO, IPO, ORPO) on per-pair sequence log-probabilities of the answer tokens.

Pure functions of tensors: the preference objective (train/preference.py) computes each answer's
summed log-probability and its token count, under the trained model and (for DPO) the reference,
and these turn them into one loss per pair plus the rewards behind the metrics. The formulas are
TRL's (tests/test_preference.py checks them against `trl` to 1e-5 in fp32):

- DPO, `loss: sigmoid`: -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), with c, r the SUMMED
  log-probabilities of the chosen and rejected answers (Rafailov et al. 2023);
- DPO, `loss: ipo`: ((c - c_ref) / n_c - (r - r_ref) / n_r - 1 / (2 beta))^2, log-ratios
  averaged per answer token as TRL does (Azar et al. 2023, Eq. 17);
- ORPO: -mean_c - lambda * log sigmoid(log odds(mean_c) - log odds(mean_r)), with mean_c, mean_r
  the length-normalised (per token) log-probabilities and odds(p) = p / (1 - p) (Hong et al. 2024).
  No reference model. TRL averages the NLL term over the chosen TOKENS of its batch; here it is
  averaged per pair (each pair weighs the same), which is the same for one pair or equal lengths.

`sft_weight` adds `sft_weight * (-mean_c)` (the chosen answer's per-token NLL) to either loss.

Example:
    >>> scores = PairScores(chosen, rejected, n_chosen, n_rejected, ref_chosen, ref_rejected)
    >>> losses, chosen_reward, rejected_reward = pair_losses(PreferenceSettings("dpo", beta=0.1), scores)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo")
"""`preference.loss` choices for DPO."""


@dataclass(frozen=True)
class PreferenceSettings:
    """The `objective` and `preference:` section: what the pair loss is."""

    objective: str
    """dpo | orpo"""
    beta: float = 0.1
    """DPO's temperature on the log-ratios (IPO: the regularisation tau)."""
    loss: str = "sigmoid"
    """DPO's loss on the log-ratio margin: sigmoid (DPO) | ipo."""
    orpo_lambda: float = 0.1
    """ORPO's weight of the odds-ratio term against the chosen answer's NLL."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen answer (per token, per pair)."""

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"


@dataclass
class PairScores:
    """Per-pair answer log-probabilities (each a (pairs,) tensor)."""

    chosen: torch.Tensor
    """Summed log-probability of each chosen answer's tokens under the trained model."""
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    """Answer tokens of each chosen answer (the length normaliser)."""
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    """The same sums under the reference model (DPO only)."""
    ref_rejected: torch.Tensor | None = None

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def dpo_losses(scores: PairScores, beta: float, loss: str = "sigmoid") -> torch.Tensor:
    """DPO's (or IPO's) loss of each pair; needs the reference sums."""
    chosen_ratio = scores.chosen - scores.ref_chosen
    rejected_ratio = scores.rejected - scores.ref_rejected
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss == "ipo":
        margin = chosen_ratio / scores.chosen_tokens.clamp(min=1) - rejected_ratio / scores.rejected_tokens.clamp(min=1)
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}; choose one of {', '.join(LOSSES)}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)) of per-token log-probabilities, odds(p) = p / (1 - p)."""
    return (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))


def orpo_losses(scores: PairScores, orpo_lambda: float) -> torch.Tensor:
    """ORPO's loss of each pair: the chosen answer's per-token NLL minus lambda * log sigmoid(log odds ratio)."""
    chosen_mean, rejected_mean = scores.chosen_mean.float(), scores.rejected_mean.float()
    return -chosen_mean - orpo_lambda * F.logsigmoid(log_odds_ratio(chosen_mean, rejected_mean))


def rewards(settings: PreferenceSettings, scores: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) implicit rewards, detached: DPO beta * log-ratio to the reference; ORPO (as TRL logs it)
    lambda * per-token log-probability. The reward margin is their difference; accuracy, how often it is positive."""
    with torch.no_grad():
        if settings.objective == "dpo":
            return settings.beta * (scores.chosen - scores.ref_chosen), settings.beta * (scores.rejected - scores.ref_rejected)
        return settings.orpo_lambda * scores.chosen_mean, settings.orpo_lambda * scores.rejected_mean


def pair_losses(settings: PreferenceSettings, scores: PairScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair, in the graph; chosen rewards; rejected rewards) for `settings.objective`."""
    if settings.objective == "dpo":
        losses = dpo_losses(scores, settings.beta, settings.loss)
    elif settings.objective == "orpo":
        losses = orpo_losses(scores, settings.orpo_lambda)
    else:
        raise ValueError(f"unknown preference objective {settings.objective!r}; choose dpo or orpo")
    if settings.sft_weight:
        losses = losses + settings.sft_weight * -scores.chosen_mean
    return (losses, *rewards(settings, scores))
