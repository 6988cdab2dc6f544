"""The optimizer named by `train.optimizer`: torch AdamW, or bitsandbytes' 8-bit / paged AdamW.

Paged optimizers page their states to CPU memory when the GPU runs short; they need CUDA. On other
devices `paged_adamw_32bit` becomes torch AdamW (the same 32-bit states) and `paged_adamw_8bit`
becomes bitsandbytes' unpaged 8-bit AdamW, each with a logged note. 8-bit AdamW (states stored in
8 bits, block-wise) runs on CPU with bitsandbytes >= 0.45.

Example:
    >>> optimizer = build_optimizer(params, cfg.train, torch.device("cpu"))
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from ..config import TrainConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

def effective_optimizer(name: str, device: torch.device) -> str:
    """The optimizer that runs on `device` for the requested `name` (paged ones need CUDA)."""
    if name.startswith("paged_") and device.type != "cuda":
        fallback = "adamw" if name == "paged_adamw_32bit" else "adamw_8bit"
        log.info("train.optimizer %s pages its states through CUDA memory; on %s using %s instead (same update)",
                 name, device.type, fallback)
        return fallback
    return name


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `params` with the run's lr and weight decay, in the requested (or fallback) flavour."""
    name = effective_optimizer(train.optimizer, device)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer {train.optimizer} needs bitsandbytes: pip install 'peftkit[quant]'") from None
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return classes[name](params, lr=train.lr, weight_decay=train.weight_decay)
