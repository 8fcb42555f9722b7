"""Training tools: distillation, unlearning."""

from .unlearning import gradient_difference, mlp_lora_parameters, sequence_loss

__all__ = ["gradient_difference", "mlp_lora_parameters", "sequence_loss"]
