"""The once-per-extension "runs on the next backend" warning points at the user's line.

A fixed stacklevel counted frames through the custom-op and autograd machinery, whose depth
differs by op and path: the warning named lucidops/ops/activations.py or torch's internals,
so a user could not tell which of their calls fell back (or filter it by module)."""

import warnings

import pytest
import torch

import lucidops
from lucidops import _ext, backends


@pytest.fixture
def fresh_warning(monkeypatch):
    """Forget that the cpu extension's warning was given in this process."""
    monkeypatch.setattr(backends, "_warned", set())


def _only_fallback_warning(caught):
    (warning,) = [w for w in caught if "uses the next backend" in str(w.message)]
    return warning


def test_passed_over_extension_warns_at_the_callers_line(fresh_warning, monkeypatch):
    real = backends.backend_problem
    monkeypatch.setattr(backends, "backend_problem",
                        lambda name, device_type: "no C++ compiler found (test)" if name == "cpp" else
                        real(name, device_type))
    x = torch.randn(5, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lucidops.ops.sinc(x)  # the line the warning must name
        line = __import__("inspect").currentframe().f_lineno - 1
    assert backends.last_used("sinc") == "reference"
    warning = _only_fallback_warning(caught)
    assert (warning.filename, warning.lineno) == (__file__, line)
    y.sum().backward()  # the backward falls back too, without a second warning
    assert x.grad is not None


def test_extension_failing_in_dispatch_warns_at_the_callers_line(fresh_warning, monkeypatch):
    entry = backends._OPS["attention"]

    def broken(*args):  # as _ext.load fails: not loaded, the failure recorded (select moves on), raised
        err = _ext.ExtensionUnavailable("cpu", "the build failed (test)")
        monkeypatch.delitem(_ext._loaded, "cpu", raising=False)
        monkeypatch.setitem(_ext._failed, "cpu", err)
        raise err

    monkeypatch.setitem(entry.impls, "cpp", broken)
    q = torch.randn(1, 2, 3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lucidops.ops.attention(q, q, q)  # the line the warning must name
        line = __import__("inspect").currentframe().f_lineno - 1
    assert backends.last_used("attention") != "cpp"
    warning = _only_fallback_warning(caught)
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_a_failure_that_status_does_not_record_raises_instead_of_looping(fresh_warning, monkeypatch):
    """dispatch() retries selection after an extension fails, trusting status() to record it;
    where it did not (here: the extension is already loaded), it chose the same backend
    forever and grew without bound (24 GB, when this file's previous test ran after others)."""
    import lucidops.ops.attention  # noqa: F401  (registers the op)

    entry = backends._OPS["attention"]
    monkeypatch.setitem(_ext._loaded, "cpu", object())  # status("cpu") says usable whatever fails

    def broken(*args):
        raise _ext.ExtensionUnavailable("cpu", "failed after loading (test)")

    monkeypatch.setitem(entry.impls, "cpp", broken)
    q = torch.randn(1, 2, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(lucidops.BackendUnavailable, match="failed and is still selected"):
            lucidops.ops.attention(q, q, q)


def test_a_forced_backend_failing_in_dispatch_raises_instead_of_falling_back(fresh_warning, monkeypatch):
    """use_backend("cpp") and the extension fails to load inside dispatch: BackendUnavailable at
    once, not the automatic mode's "uses the next backend instead" warning first."""
    entry = backends._OPS["attention"]

    def broken(*args):
        err = _ext.ExtensionUnavailable("cpu", "the build failed (test)")
        monkeypatch.delitem(_ext._loaded, "cpu", raising=False)
        monkeypatch.setitem(_ext._failed, "cpu", err)
        raise err

    monkeypatch.setitem(entry.impls, "cpp", broken)
    monkeypatch.setattr(backends, "_last_used", {})
    q = torch.randn(1, 2, 3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lucidops.use_backend("cpp"), pytest.raises(backends.BackendUnavailable, match="forced"):
            lucidops.ops.attention(q, q, q)
    assert backends.last_used("attention") is None
    # Nothing ran on the next backend, so no warning may say it did.
    assert not [w for w in caught if "uses the next backend" in str(w.message)]
