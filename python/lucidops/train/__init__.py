"""Training tools: distillation, unlearning."""

__all__ = []
