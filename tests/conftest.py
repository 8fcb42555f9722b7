"""Test setup: Triton's interpreter on machines without a GPU, devices and backends.

TRITON_INTERPRET must be set before lucidops' Triton kernels are imported (Triton decides
at decoration time), hence here, before anything imports lucidops.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import aot_in_background  # noqa: E402
import lucidops  # noqa: E402
from failure_log import pytest_collectreport, pytest_runtest_logreport  # noqa: E402,F401 (LUCIDOPS_FAILURE_LOG)
from interpreter_rounding import patch_interpreter_bf16_rounding  # noqa: E402

# The interpreter truncates float32 -> bfloat16; GPUs round to nearest (see the module).
INTERPRETER_BF16_PATCHED = lucidops.backends.triton_interpreting() and patch_interpreter_bf16_rounding()

# Base of every test's seed; set it to draw other inputs (a failure then names its seed).
TEST_SEED = int(os.environ.get("LUCIDOPS_TEST_SEED", "0"))

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Every backend that can run on each device in this test session.
BACKENDS_BY_DEVICE = {
    "cpu": ["reference", "cpp"] + (["triton"] if lucidops.backends.triton_interpreting() else []),
    "cuda": ["reference", "triton", "cuda"],
}


# The Triton kernels run on a GPU, or on the CPU under the interpreter; tests that call
# them directly skip otherwise.
needs_triton = pytest.mark.skipif(not lucidops.backends.triton_interpreting() and not HAS_CUDA,
                                  reason="needs the Triton interpreter or a GPU")
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def backend_device_params(op=None):
    """(backend, device) params of this session; with ``op``, only the backends that op
    implements (the lora ops have no cuda backend: forcing it raises BackendUnavailable, on
    a GPU in 156 lora cases, likely the ~140 failures of the first GPU run)."""
    implemented = lucidops.backends.registered_ops()[op].impls if op is not None else None
    params = []
    for device in ("cpu", "cuda"):
        for backend in BACKENDS_BY_DEVICE[device]:
            if implemented is not None and backend not in implemented:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def pytest_report_header(config):
    return [f"lucidops: LUCIDOPS_TEST_SEED={TEST_SEED}; Triton interpreter "
            f"{'on' if lucidops.backends.triton_interpreting() else 'off'}"
            f"{', bf16 casts patched to round to nearest' if INTERPRETER_BF16_PATCHED else ''}"]


@pytest.fixture(autouse=True)
def seeded_torch(request):
    """torch's global generator seeded from the test's id and LUCIDOPS_TEST_SEED.

    torch seeds that generator randomly at start-up, so inputs drawn from it differed on
    every run and a failure could not be reproduced. Each test still gets its own inputs."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED
    torch.manual_seed(seed)
    return seed


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # The test that waits for the background compile goes last, so every other test overlaps it.
    items.sort(key=lambda item: item.nodeid.endswith(aot_in_background.COMPILE_TEST))


def pytest_collection_finish(session):
    # The six-minute ahead-of-time compile runs beside the other tests (see aot_in_background).
    # Not under pytest-xdist: every worker collects every test (each would start one), and the
    # worker that runs the test starts it then.
    if hasattr(session.config, "workerinput"):
        return
    aot_in_background.start_early([item.nodeid for item in session.items], session.config.option.collectonly,
                                  session.config._tmp_path_factory.mktemp)


def pytest_sessionfinish(session):
    aot_in_background.stop_all()


@pytest.fixture
def poison_allocator():
    """Fill and free a NaN block of the given size first, so that a kernel which leaves an
    element unwritten returns NaN there instead of a lucky zero."""

    def poison(numel: int, device: str, dtype=torch.float32):
        block = torch.full((max(int(numel), 1),), float("nan"), dtype=dtype, device=device)
        del block

    return poison


@pytest.fixture
def cpp_attention_default(monkeypatch):
    """The attention op's CPU default as on an AVX-512 build: lucidops' cpp kernel for every
    dtype and head dim. On an AVX2 build aten comes first for float32 heads of 64 and more with
    1024 keys or more (tests/test_attention.py checks that rule); model-level tests take this
    so that they run lucidops' kernel inside the model whatever the machine."""
    from lucidops.ops import _attention_cpp

    monkeypatch.setattr(_attention_cpp, "_vector_bytes", 64)
