"""Small instances of every lucidops module family with inputs, for the tests that run
modules whole: export and dynamic compile, checkpointing, vmap, meta-device FLOP counts."""

from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch.export import Dim

import lucidops


def small_modules() -> Dict[str, Tuple[nn.Module, Tensor, Tensor, Dict[int, Dim]]]:
    """name -> (module, in train mode as built; an example input; an input of other sizes;
    the input's dynamic dims for torch.export). Built afresh, from a fixed seed, per call."""
    torch.manual_seed(0)
    batch, tokens, points = Dim("batch"), Dim("tokens"), Dim("points")
    sine = lucidops.nn.SineLoRALinear(nn.Linear(32, 16), rank=4, omega=2.0, alpha=4)
    bounded = lucidops.nn.BoundedLoRALinear(nn.Linear(32, 16), rank=4, fn="tanh", omega=2.0, alpha=4,
                                            placement="output")
    quantized = lucidops.nn.SineLoRALinear(nn.Linear(64, 16), rank=4, omega=2.0, alpha=4)
    for layer in (sine, bounded, quantized):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)  # B starts at zero: make the adapter count
    quantized.quantize_(bits=4, group_size=16)
    cloud = lambda *shape: torch.rand(*shape, 3) * 2 - 1  # noqa: E731
    return {
        "attention": (lucidops.nn.ManyHeadAttention(32, 8), torch.randn(2, 5, 32), torch.randn(3, 11, 32),
                      {0: batch, 1: tokens}),
        "sine_lora": (sine, torch.randn(2, 3, 32), torch.randn(4, 7, 32), {0: batch, 1: tokens}),
        "bounded_lora_output": (bounded, torch.randn(3, 32), torch.randn(9, 32), {0: batch}),
        "quantized_sine_lora": (quantized, torch.randn(3, 64), torch.randn(6, 64), {0: batch}),
        "gaussian_encoder_max": (lucidops.nn.GaussianPointEncoder(4, 16), cloud(2, 20), cloud(3, 33),
                                 {0: batch, 1: points}),
        "gaussian_encoder_none": (lucidops.nn.GaussianPointEncoder(4, 16, reduce="none"), cloud(2, 20), cloud(5, 9),
                                  {0: batch, 1: points}),
        "gaussian_pointnet": (lucidops.nn.GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=16,
                                                           tnet_gaussians=3), cloud(2, 20), cloud(4, 25),
                              {0: batch, 1: points}),
        "sinc": (nn.Sequential(nn.Linear(8, 8), lucidops.nn.Sinc(sigma=0.5)), torch.randn(2, 8), torch.randn(5, 8),
                 {0: batch}),
        "learnable_sinc": (lucidops.nn.Sinc(sigma=0.5, learnable=True), torch.randn(4, 8), torch.randn(6, 8),
                           {0: batch}),
    }
