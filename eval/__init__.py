"""Evaluation: perplexity, lm-eval tasks, reports and benchmarks."""
