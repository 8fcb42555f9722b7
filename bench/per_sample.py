"""Per-sample gradients (``torch.func.vmap(grad(loss))``), the recipe of differentially
private training and influence functions, through lucidops modules and their plain-PyTorch
counterparts with the same weights.

Cases (float32; the short run shrinks them):

- attention: a ViT-Ti-wide block of 24 heads of dim 8 (``ManyHeadAttention`` against timm's
  ``Attention``, which calls SDPA), 16 examples of 65 tokens.
- sine LoRA: 1024 x 1024, rank 16, omega 200 (``SineLoRALinear`` against the naive module
  that builds sin(omega B A) in PyTorch), 16 examples of 32 tokens, gradients of A and B.
- Gaussian encoder: G = 32, K = 256 (``GaussianPointEncoder`` against the dense PyTorch
  encoder of the paper's code, phi materialised), 16 clouds of 512 points.

Each runs under ``vmap(grad(...))`` and as a Python loop of eager autograd, one example at
a time. Rows report the time, the speed-up against PyTorch's module under vmap and in a
loop, and the largest relative error of the per-sample gradients against the PyTorch module
in float64 (the dense float32 encoder's is ~1e-3: a near-tie in its max goes to another
point than in float64).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import lucidops
from lucidops.nn.gaussian_mixture import precision_from_factor

from .gaussian_mixture import _eager_dense
from .timing import measure_interleaved_ms, report_failure


def _vmapped(module: nn.Module, inputs: Tensor) -> Callable[[], Dict[str, Tensor]]:
    """Per-sample gradients of the trainable parameters by vmap(grad(...)); loss = sum of squares."""
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}

    def loss(p, example):
        return functional_call(module, p, (example[None],)).square().sum()

    return lambda: vmap(grad(loss), in_dims=(None, 0))(params, inputs)


def _looped(module: nn.Module, inputs: Tensor) -> Callable[[], Dict[str, Tensor]]:
    """The same gradients by eager autograd, one example at a time."""
    named = [(k, v) for k, v in module.named_parameters() if v.requires_grad]

    def run():
        grads = [torch.autograd.grad(module(example[None]).square().sum(), [v for _, v in named])
                 for example in inputs]
        return {k: torch.stack([g[i] for g in grads]) for i, (k, _) in enumerate(named)}

    return run


class NaiveSineLoRA(nn.Module):
    """The authors' formulation: the full-rank update sin(omega B A) built in PyTorch."""

    def __init__(self, layer: lucidops.nn.SineLoRALinear):
        super().__init__()
        self.base = layer.base
        self.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        self.lora_B = nn.Parameter(layer.lora_B.detach().clone())
        self.omega, self.scale = layer.omega, layer.alpha / layer.rank / layer.gain

    def forward(self, x: Tensor) -> Tensor:
        update = torch.sin(self.omega * self.lora_B @ self.lora_A)
        return nn.functional.linear(x, self.base.weight + self.scale * update, self.base.bias)


class DenseGaussianEncoder(nn.Module):
    """The paper's dense encoder (phi materialised, a Linear, a max), sharing an encoder's
    parameters under the same names."""

    def __init__(self, encoder: lucidops.nn.GaussianPointEncoder):
        super().__init__()
        self.means, self.factor, self.mixer = encoder.means, encoder.factor, encoder.mixer

    def forward(self, points: Tensor) -> Tensor:
        return _eager_dense(points, self.means, precision_from_factor(self.factor), self.mixer.weight,
                            self.mixer.bias)


def _cases(quick: bool) -> List[Tuple[str, nn.Module, nn.Module, Tensor]]:
    """(case, lucidops module, the PyTorch module with the same weights, examples); the
    attention case needs timm (not a lucidops dependency) and is left out without it."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    batch = 4 if quick else 16
    cases: List[Tuple[str, nn.Module, nn.Module, Tensor]] = []
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:
        print("per_sample: the attention case needs timm (pip install timm); skipped")
    else:
        dim, heads, tokens = (48, 6, 17) if quick else (192, 24, 65)
        timm_attention = Attention(dim, num_heads=heads, qkv_bias=True)
        ours_attention = lucidops.nn.ManyHeadAttention(dim, heads, qkv_bias=True)
        ours_attention.load_state_dict(timm_attention.state_dict())
        cases.append((f"attention dim {dim}, {heads} heads of {dim // heads}, {batch} x {tokens} tokens",
                      ours_attention, timm_attention, torch.randn(batch, tokens, dim, generator=gen)))

    width, rank, lora_tokens = (128, 8, 8) if quick else (1024, 16, 32)
    sine = lucidops.nn.SineLoRALinear(nn.Linear(width, width), rank=rank, omega=200.0, alpha=float(rank))
    nn.init.normal_(sine.lora_B, std=0.01, generator=gen)  # B starts at zero: make the update count

    gaussians, channels, points = (8, 32, 64) if quick else (32, 256, 512)
    encoder = lucidops.nn.GaussianPointEncoder(gaussians, channels)
    return cases + [
        (f"sine LoRA {width}x{width} r={rank}, {batch} x {lora_tokens} tokens", sine, NaiveSineLoRA(sine),
         torch.randn(batch, lora_tokens, width, generator=gen)),
        (f"Gaussian encoder G={gaussians} K={channels}, {batch} clouds x {points} points", encoder,
         DenseGaussianEncoder(encoder), torch.rand(batch, points, 3, generator=gen) * 2 - 1),
    ]


def run(device: str, quick: bool = False) -> List[Dict]:
    rows: List[Dict] = []
    for case, ours, theirs, inputs in _cases(quick):
        ours, theirs, inputs = ours.to(device), theirs.to(device), inputs.to(device)
        impls = {"lucidops vmap(grad)": _vmapped(ours, inputs), "pytorch vmap(grad)": _vmapped(theirs, inputs),
                 "lucidops loop": _looped(ours, inputs), "pytorch loop": _looped(theirs, inputs)}
        # The reference: the PyTorch module in float64, example by example.
        want = _looped(copy.deepcopy(theirs).double(), inputs.double())()
        errors = {}
        for name, impl in list(impls.items()):
            try:
                got = impl()
            except Exception as exc:  # reported and left out, as in the other families; the others still run
                report_failure(f"{case}: {name}", exc)
                del impls[name]
                continue
            errors[name] = max(float((got[k].double() - want[k]).norm() / want[k].norm()) for k in want)
        times = measure_interleaved_ms(impls, device, rounds=3 if quick else 7)
        for name, ms in times.items():
            row = dict(family="per_sample", case=case, mode="per-sample grads", impl=name, ms=ms,
                       rel_err_vs_fp64=errors[name])
            for base, key in (("pytorch vmap(grad)", "speedup_vs_pytorch_vmap"),
                              ("pytorch loop", "speedup_vs_pytorch_loop")):
                if base in times:
                    row[key] = times[base] / ms
            rows.append(row)
    return rows


if __name__ == "__main__":  # python -m bench.per_sample [--quick]
    import sys

    for r in run("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv):
        print(r)
