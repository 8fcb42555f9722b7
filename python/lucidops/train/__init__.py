"""Training tools: distillation of Gaussian point encoders, fine-tuning, unlearning.

- :func:`distill` (``distillation.py``): one stage, a student encoder regressed onto a
  teacher's per-point activations at uniform points in the clouds' cubes (``cubes.py``);
- :func:`distill_pointnet` (``pointnet_recipe.py``): the paper's three-stage recipe for a
  PointNet teacher, ending with :func:`finetune` (``finetuning.py``);
- :func:`gradient_difference` (``unlearning.py``): bounded-LoRA unlearning.

``loop.py`` holds what the loops share (checks, optimizers, DDP, progress).
"""

from ..nn.gaussian_pointnet import GaussianPointNet, GaussianTNet
from .cubes import cloud_cubes, sample_cube_points
from .distillation import cast_args_to, distill
from .finetuning import finetune
from .loop import OPTIMIZERS, DistillResult
from .pointnet_recipe import DistilledPointNet, PointNetDistillResult, distill_pointnet, tnet_point_features
from .unlearning import gradient_difference, mlp_lora_parameters, sequence_loss

__all__ = [
    "distill", "distill_pointnet", "finetune", "DistillResult", "PointNetDistillResult", "DistilledPointNet",
    "GaussianTNet", "GaussianPointNet", "tnet_point_features", "cloud_cubes", "sample_cube_points", "OPTIMIZERS",
    "gradient_difference", "mlp_lora_parameters", "sequence_loss", "cast_args_to",
]
