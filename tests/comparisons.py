"""How the tests compare a result with its float64 reference: one rule for every op family."""

import math

import torch


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected||, in float64 on the CPU (the plain norm of the difference
    where ``expected`` is all zeros). A NaN anywhere in ``out`` fails at once."""
    out, expected = out.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = expected.norm()
    return ((out - expected).norm() / denom).item() if denom > 0 else (out - expected).norm().item()


def max_abs_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest elementwise difference (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    return (out.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def within(out: torch.Tensor, expected: torch.Tensor, tol: float, atol: float = 0.0) -> bool:
    """Within ``tol`` relative error, or within ``atol`` in every element: where terms cancel
    (one output, one key per query) no floating-point sum has a small relative error, while a
    wrong index or bound errs by the size of the O(1) inputs."""
    return rel_err(out, expected) < tol or max_abs_err(out, expected) <= atol


def assert_close(name: str, out, expected: torch.Tensor, tol: float, atol: float = 0.0) -> None:
    """:func:`within`, with the shapes checked and both errors in the message."""
    assert out is not None and out.shape == expected.shape, name
    assert within(out, expected, tol, atol), \
        f"{name}: relative {rel_err(out, expected):.2e}, max {max_abs_err(out, expected):.2e}"


def spacings(exact, dtype, floor):
    """The spacing of ``dtype`` at |exact| (at ``floor`` below it), in float64."""
    magnitude = exact.abs().clamp_min(floor).to(dtype)
    return (torch.nextafter(magnitude, torch.tensor(math.inf, dtype=dtype)) - magnitude).double()
