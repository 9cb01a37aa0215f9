"""Evaluation: perplexity, divergence to a reference, multiple-choice accuracy, memory."""
