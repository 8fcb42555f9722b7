"""The Triton kernels against the float64 reference on shapes hypothesis draws.

The same idea as test_cpp_random_shapes.py, around the Triton kernels' own tiles: the
mixture's 32-point tiles, 64- and 32-channel blocks, 32/128-wide Gaussian tiles and 64-row
phi blocks; attention's packed heads and query/key blocks for every head dim; lora's 16-wide
rank blocks, 16-128 tiles and its large-M path. Under the interpreter (no GPU) an example takes
seconds, so CI draws a few per op; on a GPU the same tests run the compiled kernels.
"""

import math
import os

import torch
from hypothesis import given, settings, strategies as st

from conftest import TRITON_DEVICE, needs_triton
from test_attention import check_against_float64_reference
from test_cpp_random_shapes import AWKWARD, check_bounded_lora_linear, check_gaussian_mixture

pytestmark = needs_triton


def examples(n):
    """An interpreted example runs for 1-10 s, so CI draws a few; by hand,
    LUCIDOPS_EXAMPLES_SCALE=k draws k times as many."""
    return settings(max_examples=n * int(os.environ.get("LUCIDOPS_EXAMPLES_SCALE", "1")), deadline=None)


ATTENTION_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@examples(6)
@given(lead=st.lists(st.integers(1, 3), max_size=2), n=AWKWARD, gaussians=st.one_of(AWKWARD, st.integers(127, 300)),
       channels=AWKWARD, reduce=st.sampled_from(["max", "none"]), cull=st.sampled_from([None, 0.05, 0.3]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gaussian_mixture(lead, n, gaussians, channels, reduce, cull, with_bias, seed):
    # The interpreter takes about 2.5 s per million (cloud, point, Gaussian, channel) products:
    # one example of 9 clouds x 129 x 300 x 129 ran 105 s. A larger one keeps two clouds, and 33
    # points if still larger (the tiles are 32 points), so that one example stays seconds.
    if math.prod(lead) * n * gaussians * channels > 2_000_000:
        lead = [2]
        if 2 * n * gaussians * channels > 2_000_000:
            n = 33
    check_gaussian_mixture("triton", TRITON_DEVICE, lead, n, gaussians, channels, torch.float32, reduce, cull,
                           with_bias, seed)


@examples(6)
@given(b=st.integers(1, 2), h=st.integers(1, 9), nq=AWKWARD, nk=AWKWARD,
       d=st.one_of(AWKWARD.filter(lambda v: 4 <= v <= 128), st.integers(4, 128)), causal=st.booleans(),
       mask=st.sampled_from([None, "random", "first_key_off", "batch0_off"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), dropout_p=st.sampled_from([0.0, 0.3]))
def test_attention(b, h, nq, nk, d, causal, mask, dtype, dropout_p):
    if math.prod((b, h, max(nq, nk), d)) > 40_000:
        nq = nk = 33  # the interpreter's time grows with every program; keep one example to seconds
    check_against_float64_reference("triton", (b, h, nq, nk, d, causal, mask, dtype), TRITON_DEVICE,
                                    atol=ATTENTION_ATOL[dtype], dropout_p=dropout_p)


@examples(20)
@given(lead=st.lists(st.integers(1, 3), max_size=2), m=AWKWARD, k_in=AWKWARD, n_out=AWKWARD,
       rank=st.sampled_from([1, 2, 4, 7, 16, 17, 33]), fn=st.sampled_from(["sin", "tanh"]),
       placement=st.sampled_from(["weight", "output"]), train_base=st.booleans(), with_bias=st.booleans(),
       omega=st.sampled_from([0.5, 2.0, 30.0]), seed=st.integers(0, 2**16))
def test_bounded_lora_linear(lead, m, k_in, n_out, rank, fn, placement, train_base, with_bias, omega, seed):
    check_bounded_lora_linear("triton", TRITON_DEVICE, lead, m, k_in, n_out, rank, fn, placement, train_base,
                              with_bias, omega, seed)
