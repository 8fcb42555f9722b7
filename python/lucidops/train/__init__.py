"""Training tools: distillation, unlearning."""

from .unlearning import gradient_difference, mlp_lora_parameters, sequence_loss

__all__ = ["gradient_difference", "mlp_lora_parameters", "sequence_loss"]

from .distill import (  # noqa: E402
    DistilledPointNet, DistillResult, GaussianTNet, PointNetDistillResult, distill, distill_pointnet, finetune,
)

__all__ += ["distill", "distill_pointnet", "finetune", "DistillResult", "PointNetDistillResult",
            "DistilledPointNet", "GaussianTNet"]
from .distill import GaussianPointNet  # noqa: E402,F401
__all__ += ["GaussianPointNet"]
