"""Tiny served setups for the serving tests: a base folder and LoRA adapters with non-zero B on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch

from conftest import build_model
from peftkit import AdaptedModel, LoraConfig

TEMPLATE = "Summarize:\n\n{abstract}"
# name -> (rank, target modules, seed): different ranks and targets, so stacking must pad and skip
ADAPTERS = {
    "outcome": (4, ["q_proj", "v_proj"], 1),
    "challenge": (8, ["q_proj", "v_proj", "o_proj"], 2),
    "approach": (2, ["v_proj", "up_proj"], 3),
}
PROMPTS = [
    "This paper studies problem one.",
    "We propose a method.",
    "Results show that our model outperforms strong baselines on three benchmarks by a large margin.",
    "It is cold outside.",
    "Experiments demonstrate consistent gains.",
    "We",
    "This paper studies the problem of low-resource machine translation.",
    "Summarize the outcome",
]


def save_adapter(
    folder: Path, vocab: int, rank: int, targets: Sequence[str], seed: int, kind: str = "llama",
    template: str = TEMPLATE, modules_to_save: Sequence[str] = (), use_dora: bool = False,
) -> Path:
    """An adapter on the seed-0 tiny base with random (non-zero) weights, saved with its prompt format."""
    adapted = AdaptedModel(build_model(kind, vocab))
    config = LoraConfig(
        r=rank, alpha=2 * rank, dropout=0.0, target_modules=list(targets), modules_to_save=list(modules_to_save), use_dora=use_dora
    )
    adapted.add_adapter("default", config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    metadata = {"prompt_format": {"templates": [template], "chat": True, "system_prompt": None}}
    return adapted.save_adapter(folder, metadata=metadata)


def save_all(root: Path, vocab: int) -> dict[str, Path]:
    return {name: save_adapter(root / name, vocab, r, t, s) for name, (r, t, s) in ADAPTERS.items()}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; on a shared CPU two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
