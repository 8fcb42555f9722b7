"""The one handle every ``lucidops.patch`` function returns: what was replaced, and how to undo it.

    handle = lucidops.patch.apply(model)       # or timm_vit / peft_lora / skipless / ...
    print(handle)                               # | path | before | after | table
    handle.revert()                             # the original modules / forwards, bit for bit
    with lucidops.patch.apply(model): ...       # reverts on exit

A handle holds a list of :class:`Replacement` records. Patch functions (including ones
written outside this module) record through three methods:

* ``handle.swap_child(root, path, new_module)``: replace the submodule at ``path`` of
  ``root`` (setattr on its parent) and record the undo (setattr of the original back).
* ``handle.set_instance_attrs(path, module, {"forward": fn, ...}, after="...")``: set
  instance attributes on ``module`` (for instance-forward swaps, which keep the module,
  its parameters and its state-dict keys) and record the undo (the previous instance
  attributes back, or none).
* ``handle.record(path, before, after, undo)``: anything else; ``undo`` is a zero-argument
  callable.

``revert()`` runs the undos in reverse order, each until it has restored its change once
(records are shared by merged handles, so reverting a family handle and then the merged one
is safe; a change a later patch still covers stays recorded until that patch is reverted).
"""

from __future__ import annotations

import functools
import itertools
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._caller import user_stacklevel

Described = Union[nn.Module, type, str]


def describe(obj: Described) -> str:
    """A readable name for a module, a class or a free-text description (kept as is).

    Classes are named by the shortest already-imported public module path that exports
    them (``torch.nn.GELU`` rather than ``torch.nn.modules.activation.GELU``); nothing is
    imported to find it.
    """
    if isinstance(obj, str):
        return obj
    cls = obj if isinstance(obj, type) else type(obj)
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        mod = sys.modules.get(prefix)
        if mod is not None and getattr(mod, cls.__qualname__, None) is cls:
            return f"{prefix}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(eq=False)
class Replacement:
    """One reversible change.

    Attributes:
        path: qualified module name in the patched model ("" for the root).
        before: description of what was there (a type name).
        after: description of what is there now (a type name, or for instance-forward
            swaps the layer's type plus what the forward became).
        undo: zero-argument callable that puts ``before`` back (returns False if it could not).
        original: the original module (module swaps) or the patched module (attribute swaps).
        replacement: the new module (module swaps), else None.
        parent, name: the parent module and attribute name of a module swap, else None.
        reverted: set once ``undo`` has run and restored ``before``.
    """

    path: str
    before: str
    after: str
    undo: Callable[[], Optional[bool]] = field(repr=False)
    original: Any = field(default=None, repr=False)
    replacement: Any = field(default=None, repr=False)
    parent: Optional[nn.Module] = field(default=None, repr=False)
    name: Optional[str] = None
    reverted: bool = False

    def revert(self) -> None:
        """Run the undo (once). An undo that returns False could not restore ``before``
        (e.g. the slot holds a later patch's module): the record stays in place, so a
        ``revert()`` after the later patch's finishes the job."""
        if not self.reverted:
            if self.undo() is not False:
                self.reverted = True


class PatchHandle:
    """What a patch function changed in ``model``; ``revert()`` undoes it.

    ``len(handle)`` and ``handle.replaced`` count the replacements still in place;
    ``handle.nothing_patched`` is True when there are none; ``str(handle)`` is
    :meth:`table`. A context manager that reverts on exit. ``parts`` maps a family name
    ("attention", "lora", ...) to its own handle when handles were merged by
    :meth:`merge`; ``settings`` holds the arguments a patch was applied with (to
    re-apply it, e.g. after loading a checkpoint); ``notes`` explains skipped families.
    """

    def __init__(self, model: Optional[nn.Module] = None, *, settings: Optional[Dict[str, Any]] = None):
        self.model = model
        self.settings: Dict[str, Any] = dict(settings or {})
        self.parts: Dict[str, "PatchHandle"] = {}
        self.notes: List[str] = []
        self._records: List[Replacement] = []

    # ------------------------------------------------------------------ recording
    def record(self, path: str, before: Described, after: Described, undo: Callable[[], Optional[bool]], *,
               original: Any = None, replacement: Any = None, parent: Optional[nn.Module] = None,
               name: Optional[str] = None) -> Replacement:
        """Record a change already made. ``before``/``after``: a module, a class or a
        description string; ``undo``: zero-argument callable restoring ``before``, which
        returns False when it could not (the change then stays recorded, to revert later)."""
        if not isinstance(path, str):
            raise TypeError(f"path must be a str (a qualified module name, '' for the root), got {path!r}")
        if not callable(undo):
            raise TypeError(f"undo must be a zero-argument callable, got {type(undo).__name__}")
        rec = Replacement(path, describe(before), describe(after), undo, original=original,
                          replacement=replacement, parent=parent, name=name)
        self._records.append(rec)
        return rec

    def swap_child(self, root: nn.Module, path: str, new_module: nn.Module, *,
                   after: Optional[str] = None) -> Replacement:
        """Replace the submodule ``path`` of ``root`` by ``new_module`` and record it.

        ``new_module`` takes the original's train/eval mode through its own ``train()``; the
        submodules it shares with the original are left alone (their ``train()`` is not run). It
        shares the original's forward and backward hooks (the same hook tables: a hook
        registered on either, before or while patched, fires on whichever is in the model, and
        its handle removes it; a full backward hook registered on the replacement while patched
        fires on the original after). The undo puts the original module object back (identity
        preserved) first, then carries over what the model did to the replacement while
        patched: a move, a dtype change or a change of ``requires_grad`` (see ``_Placement`` for
        where each is read; a tensorless replacement reads its nearest ancestor, so a change to
        a sibling can reach it), applied to the original's tensors the replacement does not
        share through ``Module._apply`` as ``.to()`` runs; then a switch of the replacement's own
        train/eval flag, through the original's ``train()`` with shared submodules left alone
        (a submodule's own switch inside the replacement is not carried). A slot that holds the
        original again (put back by hand) counts as reverted. If the slot holds another module
        (a later patch replaced it), the undo warns and leaves the slot and this record as they
        are: revert the later handle first, then this one again. ``after``
        overrides the description of the new module. The root itself (path "") cannot be swapped.
        """
        if not isinstance(new_module, nn.Module):
            raise TypeError(f"new_module must be an nn.Module, got {type(new_module).__name__}")
        if path == "":
            raise ValueError("swap_child cannot replace the root module itself (path '')")
        parent, child = parent_slot(root, path)
        original = getattr(parent, child)
        if not isinstance(original, nn.Module):
            raise ValueError(f"{path!r} is not a submodule of the model")
        # A drop-in runs in the mode of what it replaces; a submodule it shares keeps its own
        # (a frozen BatchNorm or dropout switched off stays so).
        _set_mode(new_module, original.training, _shared_modules(original, new_module))
        children_then = _shared_children(original, new_module)
        replacement_hooks = _share_hooks(original, new_module)
        # The ancestors that hold the slot, nearest first, as objects: a later patch higher up
        # may replace them in the model, but they still tell where the model put the slot.
        parts = path.split(".")[:-1]
        ancestors = [root.get_submodule(".".join(parts[:end])) for end in range(len(parts), -1, -1)]
        setattr(parent, child, new_module)
        _PENDING_SWAPS.add(new_module)
        mode_then = new_module.training
        placement = _Placement(new_module, original, ancestors)
        placement_then = placement.read()

        def undo() -> Optional[bool]:
            held = getattr(parent, child, None)
            if held is original:  # put back already (by hand): nothing left to undo
                _PENDING_SWAPS.discard(new_module)
                return None
            if held is not new_module:
                warnings.warn(f"lucidops.patch: {path!r} was replaced again after patching; left as it is (revert "
                              "the later patch's handle first, then this one again)",
                              RuntimeWarning, stacklevel=user_stacklevel())
                return False  # keep the record: a later revert() puts the original back
            # Read before the original is back in the ancestors' tensors, then put it back
            # first: whatever fails below, the model holds it again.
            placement_now = placement.read()
            setattr(parent, child, original)
            _PENDING_SWAPS.discard(new_module)
            # Full backward hooks: the tables are shared, but the flag saying the hooks are "full"
            # is a plain attribute, set only on the module the hook was registered on.
            flag = new_module.__dict__.get("_is_full_backward_hook")
            if flag is not None:
                original.__dict__["_is_full_backward_hook"] = flag
            new_module.__dict__.update(replacement_hooks)  # the shared hooks stay with the original
            # The move first: a train() override that raises must not leave the original's
            # tensors behind the model's.
            _carry_placement(placement_then, placement_now, original, new_module)
            _carry_children(children_then, original, new_module)
            if new_module.training != mode_then:  # the model's train()/eval() reached only the replacement
                _set_mode(original, new_module.training, _shared_modules(original, new_module))
            return None

        return self.record(path, original, new_module if after is None else after, undo, original=original,
                           replacement=new_module, parent=parent, name=child)

    def set_instance_attrs(self, path: str, module: nn.Module, attrs: Mapping[str, Any], *,
                           after: str, submodules: Optional[Mapping[str, nn.Module]] = None,
                           hidden: Iterable[str] = ()) -> Replacement:
        """Set instance attributes (e.g. ``forward``) on ``module``, optionally register new
        ``submodules`` on it (what the new attributes compute with), unregister the ``hidden``
        submodules (what they no longer use), and record it all as one replacement.

        Attribute values go straight into ``module.__dict__`` (not parameters, buffers or
        submodules), so the module keeps its other parameters and state-dict keys. The undo
        restores each attribute's previous instance value, or removes it if it had none,
        removes each added submodule, but only where they still hold what was set here, and
        registers the hidden ones again, with what the model did meanwhile to the module's
        tensors (device, dtype, requires_grad) and mode (train/eval). An attribute restored
        by another route counts as undone; one set again by a later patch makes the undo warn
        and change nothing (the record stays: revert the later handle first), as swap_child.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        missing = object()
        previous = {k: module.__dict__.get(k, missing) for k in attrs}
        new = dict(attrs)
        added = dict(submodules or {})
        # Held in a ModuleDict (which leaves them as they are) so the placement code can move them.
        order_then = list(module._modules)
        stashed = nn.ModuleDict({name: child for name in hidden
                                 if (child := module._modules.get(name)) is not None})
        for name in stashed:
            del module._modules[name]
        for name, child in added.items():
            module.add_module(name, child)
        module.__dict__.update(new)
        # Only with hidden modules: they have to follow what the model does while patched.
        placement = _Placement(module, stashed, []) if len(stashed) else None
        placement_then, mode_then = (placement.read() if placement else None), module.training

        def undo() -> Optional[bool]:
            # An attribute holding neither what was set here nor what it held before was set
            # again by a later patch: undoing the rest under it (its marker, its hidden modules)
            # broke that patch's forward, and reverting it then put this one's back for good.
            taken = [k for k, value in new.items()
                     if module.__dict__.get(k, missing) is not value
                     and module.__dict__.get(k, missing) is not previous[k]]
            if taken:
                warnings.warn(f"lucidops.patch: {', '.join(taken)} of {path!r} was set again after patching; left as "
                              "it is (revert the later patch's handle first, then this one again)",
                              RuntimeWarning, stacklevel=user_stacklevel())
                return False  # keep the record, as swap_child does
            if placement is not None and placement_then is not None:
                # What .to() / requires_grad_() / train() did to the module reached only what it holds.
                _carry_placement(placement_then, placement.read(), stashed, module)
                for name, child in stashed.items():
                    if name in module._modules or name in module.__dict__:
                        continue  # the name was taken while patched: leave the user's
                    module.add_module(name, child)
                    if module.training != mode_then:
                        child.train(module.training)
            for k, value in new.items():
                if module.__dict__.get(k, missing) is not value:
                    continue  # restored since by another route (undo_skipless): nothing to do
                if previous[k] is missing:
                    del module.__dict__[k]
                else:
                    module.__dict__[k] = previous[k]
            for name, child in added.items():
                if module._modules.get(name) is child:
                    del module._modules[name]
            if len(stashed):
                # Back in their places: parameters(), state_dict() and an optimizer's state
                # (matched by position) follow the registration order.
                order = [n for n in order_then if n in module._modules]
                order += [n for n in module._modules if n not in order_then]
                reordered = {n: module._modules[n] for n in order}
                module._modules.clear()
                module._modules.update(reordered)
            return None

        replacement = next(iter(added.values()), None)
        return self.record(path, module, after, undo, original=module, replacement=replacement)

    def merge(self, other: "PatchHandle", name: Optional[str] = None) -> "PatchHandle":
        """Append ``other``'s replacements (shared records: reverting either handle
        reverts them once). ``name`` files ``other`` under ``parts``. Returns self."""
        if not isinstance(other, PatchHandle):
            raise TypeError(f"can only merge a PatchHandle, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge a handle into itself")
        self._records.extend(other._records)
        self.notes.extend(other.notes)
        if name is not None:
            self.parts[name] = other
        return self

    def warn(self, source: str, note: str) -> None:
        """Keep ``note`` in :attr:`notes` and raise it as a ``RuntimeWarning`` attributed to
        the user's line (the first frame outside lucidops: a direct call of the patch function
        ``source`` or ``lucidops.patch.apply``). A patch that leaves part of the model as it
        was must say so both now and in the handle, for later inspection."""
        self.notes.append(note)
        warnings.warn(f"lucidops.patch.{source}: {note}", RuntimeWarning, stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ undo
    def revert(self) -> Optional[nn.Module]:
        """Undo every replacement in reverse order; a second call does nothing, except retry a
        replacement whose slot a later patch held the first time (see :meth:`swap_child`).
        Returns the model.

        Every undo runs even if one fails; the first error is raised afterwards.
        """
        error: Optional[BaseException] = None
        for rec in reversed(self._records):
            try:
                rec.revert()
            except Exception as err:  # keep undoing the rest, report the first failure
                rec.reverted = True
                if error is None:
                    error = err
        if error is not None:
            raise error
        return self.model

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.revert()

    # ------------------------------------------------------------------ inspection
    @property
    def replaced(self) -> List[Replacement]:
        """The replacements still in place, in the order they were made."""
        return [r for r in self._records if not r.reverted]

    @property
    def nothing_patched(self) -> bool:
        """True when nothing is (any longer) replaced."""
        return not self.replaced

    @property
    def paths(self) -> List[str]:
        """Qualified module names of the replacements still in place."""
        return [r.path for r in self.replaced]

    @property
    def swapped(self) -> list:
        """(parent, name, original) of each module swap still in place (kept for code
        written against the earlier ``timm_vit`` handle)."""
        return [(r.parent, r.name, r.original) for r in self.replaced if r.parent is not None]

    def __len__(self) -> int:
        return len(self.replaced)

    def __iter__(self):
        return iter(self.replaced)

    def table(self) -> str:
        """A Markdown table ``| path | before | after |`` of the replacements in place
        (``nothing patched`` when there are none)."""
        rows = self.replaced
        if not rows:
            lines = ["nothing patched"]
            done = sum(r.reverted for r in self._records)
            if done:
                lines[0] += f" (reverted {done} replacement{'s' * (done != 1)})"
        else:
            lines = ["| path | before | after |", "|---|---|---|"]
            lines += [f"| {r.path or '(root)'} | {r.before} | {r.after} |" for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        model = type(self.model).__name__ if self.model is not None else None
        return f"{type(self).__name__}(model={model}, replaced={len(self)})"


def name_list(names: List[str], shown: int = 4) -> str:
    """The first ``shown`` of ``names`` comma-separated, then " ..." if there are more."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def parent_slot(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule at dotted ``path`` under ``root``."""
    parent_path, _, child = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), child


# The tables of the hooks that run around a module's call (state-dict hooks stay each module's own).
_CALL_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                     "_backward_pre_hooks", "_is_full_backward_hook")


def _share_hooks(original: nn.Module, replacement: nn.Module) -> Dict[str, Any]:
    """Give ``replacement`` ``original``'s hook tables (the same objects: feature-extraction hooks
    on ``blocks.3.attn`` keep firing after a swap); returns the replacement's own, to restore."""
    own = {name: replacement.__dict__[name] for name in _CALL_HOOK_TABLES if name in replacement.__dict__}
    replacement.__dict__.update({name: original.__dict__[name] for name in own if name in original.__dict__})
    return own


def _set_mode(module: nn.Module, mode: bool, keep: Iterable[nn.Module]) -> None:
    """``module.train(mode)`` through its own ``train()`` (an override that keeps a BatchNorm
    frozen still runs), with the modules of ``keep`` left alone entirely: their ``train()`` is
    not called (an override may do more than set the flag, e.g. merge LoRA weights on eval)."""
    guarded = []
    for m in keep:
        guarded.append((m, m.__dict__.get("train", _MISSING)))
        m.__dict__["train"] = lambda mode=True, _m=m: _m  # what module.train() calls on its children
    try:
        module.train(mode)
    finally:
        for m, previous in guarded:
            if previous is _MISSING:
                del m.__dict__["train"]
            else:
                m.__dict__["train"] = previous


_MISSING = object()
# The modules swap_child put into a model and has not yet taken out again (any handle's):
# _carry_children leaves them alone, their own record's undo puts the original back.
_PENDING_SWAPS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _shared_modules(original: nn.Module, replacement: nn.Module) -> List[nn.Module]:
    """The submodules of ``original`` that ``replacement`` holds too (itself excluded)."""
    own = {id(m) for m in replacement.modules()}
    return [m for m in original.modules() if m is not original and id(m) in own]


def _shared_children(original: nn.Module, replacement: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """The direct children ``replacement`` shares with ``original``: its name for each ->
    (the original's name for it, the module)."""
    names = {id(module): name for name, module in original.named_children()}
    return {name: (names[id(module)], module) for name, module in replacement.named_children() if id(module) in names}


def _carry_children(shared_then: Dict[str, Tuple[str, nn.Module]], original: nn.Module,
                    replacement: nn.Module) -> None:
    """Give the original the children the user put in place of shared ones while patched: a
    layer set by hand, or peft's LoRA layer wrapping a shared Linear (get_peft_model on the
    patched model), was dropped from the model by the undo, its adapter weights with it."""
    for name, (original_name, module) in shared_then.items():
        now = replacement._modules.get(name, module)
        # One a patch put there that is still pending goes back with that patch's revert.
        if now is not module and now not in _PENDING_SWAPS:
            setattr(original, original_name, now)


def _tensors(module: nn.Module) -> List[Tensor]:
    return list(itertools.chain(module.parameters(), module.buffers()))


class _Placement:
    """Where the model keeps a swapped-in module, read at patch time and again at the undo from
    the same sources: device and float dtype of the replacement's own tensors (those it does
    not share with the original: shared ones say nothing about the original's other parts),
    else of the shared ones, else of the nearest ancestor's that has some (the ancestors found
    at patch time, so a later patch higher up does not hide them); requires_grad the same way,
    from the first source whose parameters were not all frozen at patch time (a replacement
    frozen by design, or a shared head, cannot show a freeze of the model)."""

    def __init__(self, replacement: nn.Module, original: nn.Module, ancestors: List[nn.Module]):
        def own() -> List[Tensor]:
            shared = {id(t) for t in _tensors(original)}
            return [t for t in _tensors(replacement) if id(t) not in shared]

        def shared() -> List[Tensor]:
            ids = {id(t) for t in _tensors(original)}
            return [t for t in _tensors(replacement) if id(t) in ids]

        self.sources = [own, shared] + [functools.partial(_tensors, a) for a in ancestors]
        tensors = [source() for source in self.sources]
        self.device_from = next((i for i, ts in enumerate(tensors) if ts), None)
        self.dtype_from = next((i for i, ts in enumerate(tensors) if any(t.is_floating_point() for t in ts)), None)
        params = [[t for t in ts if isinstance(t, nn.Parameter)] for ts in tensors]
        self.grad_from = next((i for i, ps in enumerate(params) if any(p.requires_grad for p in ps)),
                              next((i for i, ps in enumerate(params) if ps), None))

    def read(self) -> Tuple[Any, Any, Optional[bool]]:
        """(device, float dtype, requires_grad or None when mixed) as the sources show them now."""
        def tensors(index: Optional[int]) -> List[Tensor]:
            return self.sources[index]() if index is not None else []

        on_device = tensors(self.device_from)
        floats = [t for t in tensors(self.dtype_from) if t.is_floating_point()]
        grads = {t.requires_grad for t in tensors(self.grad_from) if isinstance(t, nn.Parameter)}
        return (on_device[0].device if on_device else None, floats[0].dtype if floats else None,
                grads.pop() if len(grads) == 1 else None)


def _carry_placement(before: Tuple[Any, Any, Optional[bool]], now: Tuple[Any, Any, Optional[bool]],
                     original: nn.Module, replacement: nn.Module) -> None:
    """Do to ``original``'s tensors that ``replacement`` does not share what the model did to the
    replacement between ``before`` and ``now`` (device, dtype, requires_grad): a move, a dtype
    change, a freeze. Nothing changed: nothing is touched (mixed dtypes, frozen parts kept)."""
    device, dtype, requires_grad = (new if new != old else None for old, new in zip(before, now))
    if device is None and dtype is None and requires_grad is None:
        return
    shared = {id(t) for t in _tensors(replacement)}
    if device is not None or dtype is not None:
        materialised = []

        def convert(t: Tensor) -> Tensor:
            if id(t) in shared:
                return t  # the model moved it already
            target_dtype = dtype if t.is_floating_point() else None
            if t.is_meta and device is not None and torch.device(device).type != "meta":
                # Deferred initialisation (built on meta, to_empty() while patched): the original's
                # own tensors have no values to copy; they get memory, as to_empty() gives.
                materialised.append(t)
                return torch.empty_like(t, device=device, dtype=target_dtype)
            return t.to(device=device, dtype=target_dtype)

        # Module._apply, as .to() itself runs: the Parameter objects stay (or are replaced where
        # the tensor types differ, e.g. to "meta"), gradients follow, _apply overrides run.
        original._apply(convert)
        if materialised:
            warnings.warn(f"lucidops.patch: {type(original).__name__} was put back with {len(materialised)} "
                          "uninitialised tensors: it was on the meta device when patched and the model was "
                          "materialised (to_empty) while patched; load its weights again", RuntimeWarning,
                          stacklevel=user_stacklevel())
    if requires_grad is not None:
        for param in original.parameters():
            if id(param) not in shared and (param.is_floating_point() or param.is_complex()):
                param.requires_grad_(requires_grad)


def child_slots(model: nn.Module, predicate: Callable[[str, nn.Module], bool]) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every submodule slot (not the root) whose module passes
    ``predicate(name, module)``, one entry per distinct (parent, attribute) slot: a module
    registered at two places is listed at both, a shared parent's child only once."""
    seen = set()
    out = []
    for parent_name, parent in model.named_modules(remove_duplicate=True):
        for child_name, child in parent.named_children():
            if (id(parent), child_name) in seen:
                continue
            seen.add((id(parent), child_name))
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if predicate(path, child):
                out.append((path, child))
    return out


def merge_handles(model: Optional[nn.Module], handles: Iterable[Any]) -> PatchHandle:
    """One handle combining ``handles`` (a mapping name -> handle, or handles)."""
    out = PatchHandle(model)
    items = handles.items() if isinstance(handles, Mapping) else ((None, h) for h in handles)
    for name, h in items:
        out.merge(h, name)
    return out
