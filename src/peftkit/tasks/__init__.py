"""LoRA beyond text generation: sentence embeddings (contrastive, retrieval metrics) and sequence
classification (LoRA + a trained head) on encoders such as the built-in all-MiniLM-L6-v2."""

from .evaluate import before_after, evaluate_encoder_adapters
from .train import EncoderResult, run_encoder_training

__all__ = ["EncoderResult", "before_after", "evaluate_encoder_adapters", "run_encoder_training"]
