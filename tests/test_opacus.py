"""Differentially private training with Opacus: its per-sample gradients through lucidops
modules. Opacus computes them with its own hooks for the layers it knows (the Linears inside
ManyHeadAttention) and with torch.func (vmap of grad) for the others (the LoRA, Gaussian
encoder and learnable sinc modules), which works since the ops run under torch.func
(tests/test_functorch.py)."""

import copy

import pytest
import torch
from torch import nn

import lucidops

opacus = pytest.importorskip("opacus")


class SmallNet(nn.Module):
    """Every trainable lucidops module family, in one model."""

    def __init__(self):
        super().__init__()
        self.attn = lucidops.nn.ManyHeadAttention(32, 8, qkv_bias=True)
        self.lora = lucidops.nn.SineLoRALinear(nn.Linear(32, 16), rank=4, omega=5.0, alpha=4.0)
        self.encoder = lucidops.nn.GaussianPointEncoder(4, 16)
        self.act = lucidops.nn.Sinc(0.5, learnable=True)
        nn.init.normal_(self.lora.lora_B, std=0.1)

    def forward(self, tokens, points):
        return self.act(self.lora(self.attn(tokens)).mean(1) + self.encoder(points))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_equal_a_loop_of_eager_autograd():
    model = SmallNet().double()
    plain = copy.deepcopy(model)
    private = opacus.GradSampleModule(model, loss_reduction="sum")
    tokens, points = torch.randn(5, 7, 32).double(), (torch.rand(5, 20, 3) * 2 - 1).double()
    private(tokens, points).square().sum().backward()
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        if not p.requires_grad:
            continue
        loop = torch.stack([torch.autograd.grad(plain(tokens[i:i + 1], points[i:i + 1]).square().sum(), q)[0]
                            for i in range(5)])
        torch.testing.assert_close(p.grad_sample, loop, msg=name)
        checked += 1
    assert checked == 11  # qkv and proj (weight, bias), lora_A/B, means, factor, mixer (weight, bias), sigma


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off",
                            "ignore:Optimal order is the largest alpha")
def test_a_dp_sgd_step_with_the_privacy_engine():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = SmallNet()
    data = torch.utils.data.TensorDataset(torch.randn(16, 7, 32), torch.rand(16, 20, 3) * 2 - 1)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                            noise_multiplier=1.0, max_grad_norm=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for tokens, points in loader:
        optimizer.zero_grad()
        model(tokens, points).square().mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(p.detach(), before[name]), name
