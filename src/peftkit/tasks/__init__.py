"""LoRA beyond text generation: sentence embeddings (contrastive, retrieval metrics) and sequence
classification (LoRA + a trained head) on encoders such as the built-in all-MiniLM-L6-v2.

These modules define the tasks (rows, losses, metrics, before / after scores); they train through
the one training loop (`peftkit.train.run_training`, objectives in train/encoders.py)."""

from .evaluate import before_after, evaluate_encoder_adapters

__all__ = ["before_after", "evaluate_encoder_adapters"]
