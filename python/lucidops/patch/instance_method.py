"""Per-instance methods that survive ``copy.deepcopy`` and ``torch.save(model)``.

Patches that keep a module and swap its ``forward`` put a bound function in the instance's
``__dict__``. A ``types.MethodType`` there deep-copies correctly, but pickles as
``getattr(module, function.__name__)``, a name the module does not have, so
``torch.save(model)`` of a patched model failed; a closure over the module cannot be pickled
at all, and a deep copy of one keeps calling the original module. :class:`InstanceMethod`
pickles as (function, module): module-level functions pickle by name, and the module by the
usual recursion, so a copy or a reloaded model calls the function on itself.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

__all__ = ["InstanceMethod", "current_forward"]


class InstanceMethod:
    """``function`` bound to ``module`` as a method: ``InstanceMethod(f, m)(x)`` is ``f(m, x)``.
    ``function`` must be a module-level function for the pickle to find it."""

    def __init__(self, function: Callable[..., Any], module: nn.Module):
        self.__func__ = function
        self.__self__ = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (InstanceMethod, (self.__func__, self.__self__))

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's signature without ``self``, as a bound method reports it (some
        libraries inspect a module's ``forward``)."""
        signature = inspect.signature(self.__func__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<lucidops instance method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def current_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward ``module`` runs now, in a form that deep-copies and pickles with it: its
    instance-level forward if a patch set one, else its class's bound to it."""
    own = module.__dict__.get("forward")
    return own if own is not None else InstanceMethod(type(module).forward, module)
