"""rlvr: entropy-focused RL fine-tuning (forking-token GRPO) for Mixture-of-Experts language models."""

__version__ = "0.1.0"
