"""QLoRA: LoRA (the `lora:` section) on a base whose linear layers are stored in 4/8-bit (the `quant:` section).

The adapter is a plain LoRA adapter (peft_type LORA), so it loads as one; `quant.py` holds the
quantization, and the adapter's peftkit.json records it so merging can compare against the
quantized model the adapter was trained on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import lora
from .base import Capabilities, Method
from .quant import QuantConfig, quantize_base


def prepare_base(model: nn.Module, run: Any) -> None:
    """Quantize the frozen base before LoRA wraps its layers."""
    quantize_base(model, run.quant, next(model.parameters()).device)


METHOD = Method(
    "qlora", "LoRA on a 4-bit NF4 / FP4 or 8-bit quantized frozen base (bitsandbytes)",
    Capabilities(mergeable=True, packable=True, row_routable=True, quantizable_base=True, added_tokens=True),
    sections={"quant": QuantConfig}, section="lora", config_cls=lora.LoraConfig, attach=lora.attach,
    to_peft_config=lora.to_peft_config, from_peft_config=lora.from_peft_config, peft_type="LORA",
    to_file_state=lora.to_file_state, from_file_state=lora.from_file_state, prepare_base=prepare_base,
)
