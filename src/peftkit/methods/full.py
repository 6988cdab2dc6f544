"""Full fine-tuning: every base parameter trains; the run writes a whole transformers model folder.

The baseline the parameter-efficient methods are measured against. No adapter, no config section.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Capabilities, Method


def prepare_base(model: nn.Module, run: Any) -> None:
    """Make every parameter trainable (AdaptedModel froze them)."""
    for param in model.parameters():
        param.requires_grad_(True)


METHOD = Method(
    "full", "Full fine-tuning of every weight (the baseline); saves a whole model folder",
    Capabilities(mergeable=False, packable=True, added_tokens=True), prepare_base=prepare_base,
)
