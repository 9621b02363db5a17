"""Experiments and image tools: the demo, its base model, sampling, evaluation, synthetic datasets."""
