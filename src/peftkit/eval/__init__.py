"""Evaluation: metrics (ROUGE, BLEU, exact match), system comparisons, forgetting, sweeps and reports."""
