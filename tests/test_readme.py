"""The README's examples stay true.

- Every lucidops function, class and method its Python blocks call exists and accepts the
  arguments shown (checked statically, so the message names the README line).
- Every block runs, in order, with the objects it takes from elsewhere (a peft model, point
  clouds) built small and its long runs shortened (EXAMPLES).
- Every package name it mentions, in prose too, exists.
- Every ``lucidops ...`` command line is one the CLI parses, with each flag shown.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import inspect
import io
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

import lucidops
from lucidops import cli

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(language: str) -> List[str]:
    """The README's ``language`` blocks, each preceded by blank lines up to its place in the
    file, so that line numbers in parse trees and tracebacks are the README's."""
    text = README.read_text()
    return ["\n" * text.count("\n", 0, m.start(2)) + m.group(2) for m in FENCE.finditer(text)
            if m.group(1) == language]


class _Unknown:
    """A value the checker knows nothing about (a model built elsewhere, a tensor)."""


UNKNOWN = _Unknown()


class _Instance:
    """Stands for an instance of a lucidops class: attribute lookups go to the class."""

    def __init__(self, cls: type) -> None:
        self.cls = cls


class _BoundMethod:
    """A lucidops method looked up on an instance stand-in: bound with a placeholder self."""

    def __init__(self, function: Any) -> None:
        self.function = function


def _is_lucidops(obj: Any) -> bool:
    if isinstance(obj, _Instance):
        return True
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
    return isinstance(module, str) and module.split(".")[0] == "lucidops"


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj))


class CallChecker(ast.NodeVisitor):
    """Resolves each call of a block to a lucidops object where it can, and binds the call's
    arguments to that object's signature. Names carry over from block to block, as a reader
    carries them down the README."""

    def __init__(self) -> None:
        self.names: Dict[str, Any] = {"lucidops": lucidops}
        self.problems: List[str] = []
        self.checked: List[str] = []

    def problem(self, message: str) -> None:
        if message not in self.problems:  # an assignment resolves its call twice
            self.problems.append(message)

    # ---------------------------------------------------------------- resolving
    def resolve(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Name):
            return self.names.get(node.id, UNKNOWN)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is UNKNOWN or not _is_lucidops(base):
                return UNKNOWN
            owner = base.cls if isinstance(base, _Instance) else base
            if not hasattr(owner, node.attr):
                self.problem(f"README.md:{node.lineno}: {_name(owner)} has no attribute {node.attr!r}")
                return UNKNOWN
            if not isinstance(base, _Instance):  # a module's or a class's own attribute
                return getattr(owner, node.attr)
            found = inspect.getattr_static(owner, node.attr)
            if isinstance(found, (staticmethod, classmethod)):
                return getattr(owner, node.attr)
            return _BoundMethod(found) if inspect.isfunction(found) else UNKNOWN  # properties, data
        if isinstance(node, ast.Call):
            return self.result_of(node)
        return UNKNOWN

    def result_of(self, call: ast.Call) -> Any:
        """What a call returns, as far as annotations tell: an instance stand-in of a lucidops class."""
        target = self.resolve(call.func)
        if inspect.isclass(target) and _is_lucidops(target):
            return _Instance(target)
        function = target.function if isinstance(target, _BoundMethod) else target
        if callable(function) and _is_lucidops(function):
            try:
                returned = typing.get_type_hints(function).get("return")
            except Exception:
                return UNKNOWN
            if inspect.isclass(returned) and _is_lucidops(returned):
                return _Instance(returned)
        return UNKNOWN

    # ---------------------------------------------------------------- visiting
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            module = importlib.import_module(alias.name)
            self.names[alias.asname or alias.name.split(".")[0]] = module if alias.asname else \
                importlib.import_module(alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = importlib.import_module(node.module or "")
        for alias in node.names:
            if not hasattr(module, alias.name):
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    self.problem(f"README.md:{node.lineno}: cannot import {alias.name} from {node.module}")
                    continue
            self.names[alias.asname or alias.name] = getattr(module, alias.name)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        value = self.result_of(node.value) if isinstance(node.value, ast.Call) else self.resolve(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.names[target.id] = value

    def visit_withitem(self, node: ast.withitem) -> None:
        self.generic_visit(node)
        if isinstance(node.optional_vars, ast.Name):
            self.names[node.optional_vars.id] = UNKNOWN

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        target = self.resolve(node.func)
        if isinstance(target, _Instance):  # calling a module runs its forward
            method = "forward" if issubclass(target.cls, torch.nn.Module) else "__call__"
            target = _BoundMethod(getattr(target.cls, method))
        if target is UNKNOWN or not _is_lucidops(target.function if isinstance(target, _BoundMethod) else target):
            return
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        args = [UNKNOWN] * len(node.args)
        kwargs = {k.arg: UNKNOWN for k in node.keywords}
        try:
            if isinstance(target, _BoundMethod):
                inspect.signature(target.function).bind(UNKNOWN, *args, **kwargs)
            else:
                inspect.signature(target).bind(*args, **kwargs)
        except TypeError as err:
            self.problem(f"README.md:{node.lineno}: {ast.unparse(node)}: {err}")
        self.checked.append(ast.unparse(node.func))


def check(blocks: List[str]) -> CallChecker:
    checker = CallChecker()
    for block in blocks:
        checker.visit(ast.parse(block))
    return checker


# ---------------------------------------------------------------- the README's Python


def test_every_lucidops_call_in_the_readme_exists_and_takes_its_arguments():
    blocks = code_blocks("python")
    assert len(blocks) >= 6
    checker = check(blocks)
    assert not checker.problems, "\n".join(checker.problems)
    # The check has substance: the calls of every family are among those bound.
    for call in ("lucidops.ops.sinc", "lucidops.nn.GaussianPointEncoder", "lucidops.train.distill",
                 "lucidops.patch.apply", "handle.revert", "lucidops.patch.leaner", "layer.merge",
                 "layer.quantize_", "lucidops.ops.sine_lora_linear", "lucidops.patch.peft_lora",
                 "lucidops.train.gradient_difference", "lucidops.profile.compare", "conditioning.token_gray"):
        assert call in checker.checked, call
    assert len(checker.checked) >= 35


@pytest.mark.parametrize("snippet, problem", [
    ("lucidops.ops.sinc(x, sigmaa=0.5)", "unexpected keyword argument 'sigmaa'"),
    ("lucidops.ops.gaussian_mixtures(p, m, c, w)", "has no attribute 'gaussian_mixtures'"),
    ("layer = lucidops.nn.SineLoRALinear(base, rank=4, omega=1.0, alpha=1)\nlayer.merge_all()",
     "has no attribute 'merge_all'"),
    ("layer = lucidops.nn.SineLoRALinear(base, rank=4, omega=1.0, alpha=1)\nlayer.quantize_(bitz=4)",
     "unexpected keyword argument 'bitz'"),
    ("h = lucidops.patch.apply(model)\nh.revert(model)", "too many positional arguments"),
    ("from lucidops import nope", "cannot import nope"),
])
def test_the_readme_check_catches_a_stale_example(snippet, problem):
    problems = check([snippet]).problems
    assert len(problems) == 1 and problem in problems[0], problems


# A dotted name into the package, in prose or code, with or without the leading "lucidops."
# (the README writes `train.distill_pointnet` once `lucidops.train` is introduced).
DOTTED = re.compile(r"(?<![\w.])(?:lucidops\.)?(?:backends|conditioning|data|demos|init|models|nn|ops|optim|patch|"
                    r"profile|quant|reference|train|triton_kernels)(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = (".py", ".cu", ".cpp", ".h", ".md", ".json", ".png", ".sh", ".pt", ".txt", ".log")


def lookup(name: str) -> Any:
    """What ``name`` (``lucidops.`` optional) names in the package, or None."""
    parts = name.removeprefix("lucidops.").split(".")
    obj: Any = lucidops
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            try:
                importlib.import_module("lucidops." + ".".join(parts[:i + 1]))
            except ImportError:
                return None
        obj = getattr(obj, part)
    return obj


def test_every_package_name_the_readme_mentions_exists():
    names = {n for n in DOTTED.findall(README.read_text()) if not n.endswith(FILE_SUFFIXES)}
    assert len(names) >= 50 and "train.distill_pointnet" in names
    assert [n for n in sorted(names) if lookup(n) is None] == []
    assert lookup("train.distill_pointnets") is None and lookup("lucidops.nn.NoSuchModule") is None


INLINE_CALL = re.compile(r"`((?:lucidops\.)?[a-z_]+\.[\w.]+\([^`\n]*\))`")


def _inline_call(span: str) -> ast.Call:
    """A call written in prose, as a signature or with alternatives, made parseable:
    ``f(a, *, b="x"|"y", c=)`` -> ``f(a, b="x", c=None)``."""
    text = re.sub(r'("[^"]*")(?:\|"[^"]*")+', r"\1", span)
    text = re.sub(r"=\s*(?=[,)])", "=None", text).replace(", *,", ",")
    return ast.parse(text, mode="eval").body


def inline_call_problems(text: str) -> List[str]:
    """Calls of package functions in the prose whose keywords the function does not take, or
    with more positional arguments than it has (``...`` stands for any)."""
    problems = []
    for span in INLINE_CALL.findall(re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
        name = span.split("(")[0]
        if not DOTTED.fullmatch(name) and not name.startswith("lucidops."):
            continue
        obj = lookup(name)
        if obj is None:
            problems.append(f"{span}: {name} does not exist")
            continue
        params = inspect.signature(obj).parameters.values()
        call = _inline_call(span)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        problems += [f"{span}: no keyword {k.arg!r}" for k in call.keywords if not takes_any and k.arg not in names]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        open_ended = any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in call.args) or \
            any(p.kind is p.VAR_POSITIONAL for p in params)
        if not open_ended and len(call.args) > len(positional):
            problems.append(f"{span}: {len(call.args)} positional arguments, it takes {len(positional)}")
    return problems


def test_calls_written_in_the_readme_prose_match_the_signatures():
    text = README.read_text()
    assert len(INLINE_CALL.findall(text)) >= 10
    assert inline_call_problems(text) == []
    stale = "`lucidops.ops.attention(q, k, v, causal=True, dropout=0.1)` and `lucidops.ops.attention(q, k, v, mask)`"
    assert inline_call_problems(stale) == ["lucidops.ops.attention(q, k, v, causal=True, dropout=0.1): no keyword 'dropout'",
                                           "lucidops.ops.attention(q, k, v, mask): 4 positional arguments, it takes 3"]


# ---------------------------------------------------------------- the README's command lines


def _cli_help(words: List[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        cli.main([*words, "--help"])
    assert exited.value.code == 0, f"lucidops {' '.join(words)}: {err.getvalue()}"
    return out.getvalue()


def readme_commands() -> List[Tuple[List[str], List[str]]]:
    """(subcommand words, flags shown) of every ``lucidops ...`` line in a bash/console block."""
    found = []
    lines = "\n".join(code_blocks("bash")).replace("\\\n", " ").splitlines()
    lines += [line[2:] for line in "\n".join(code_blocks("console")).splitlines() if line.startswith("$ ")]
    for line in lines:
        line = line.split("#")[0].strip()
        if not line.startswith("lucidops "):
            continue
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
        sub = [w for w in words[:2] if not w.startswith("-") and w.isidentifier()]
        if sub and sub[0] == "demo":
            sub = sub[:2]
        else:
            sub = sub[:1]
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        found.append((sub, flags))
    return found


def test_every_readme_command_and_flag_exists():
    commands = readme_commands()
    assert {"bench", "profile", "demo"} == {sub[0] for sub, _ in commands}
    assert sum(len(flags) for _, flags in commands) >= 20
    for sub, flags in commands:
        text = _cli_help(sub)
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", text), f"lucidops {' '.join(sub)} has no {flag}"


def test_the_command_check_catches_a_stale_flag_or_command():
    assert "--full" in _cli_help(["bench"]) and "--fulll" not in _cli_help(["bench"])
    with pytest.raises(AssertionError, match="lucidops nosuch"):
        _cli_help(["nosuch"])


# ---------------------------------------------------------------- running every example

def _peft_model():
    from test_peft_lora import make_model

    return make_model()


def _modelnet_folder(root: Path) -> None:
    import numpy as np
    from test_modelnet import _write

    folder = root / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write(folder, "ply_data_train0.h5", rng.uniform(-1, 1, (3, 1024, 3)), np.array([0, 1, 2]))
    (folder / "shape_names.txt").write_text("".join(f"class{i}\n" for i in range(40)))
    (folder / "train_files.txt").write_text("ply_data_train0.h5\n")
    (folder / "test_files.txt").write_text("")


def _distillation_block(root: Path) -> Dict[str, Any]:
    _modelnet_folder(root)
    return dict(pointnet=lucidops.models.PointNet(10).eval(), model=lucidops.models.PointNet(10).eval())


# The README's blocks use objects built elsewhere. For each block (found by a line of it) the
# test builds those objects small and shrinks the long runs; a README edit that drops the line
# fails here, pointing at what to update. The blocks run in order in one namespace, as read.
EXAMPLES = {
    "handle = lucidops.patch.apply(peft_model": (
        lambda root: dict(peft_model=_peft_model(), pointnet=lucidops.models.PointNet(10).eval(),
                          model=torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())),
        {"point_encoders=True": "point_encoders={'distill_kwargs': {'steps': 2}}"}),
    "print(lucidops.profile.report(model, x, backward=True))": (
        lambda root: {}, {"backward=True)": "backward=True, repeat=1, warmup=0)",
                          'png="compare.png")': 'png="compare.png", repeat=1, warmup=0)'}),
    "feat = enc(points)": (lambda root: dict(points=torch.rand(2, 64, 3) * 2 - 1), {}),
    "result = lucidops.train.distill(pointnet, student": (
        _distillation_block,
        {"steps=3000": "steps=2", "point_encoders(model)": "point_encoders(model, distill_kwargs={'steps': 2})",
         "SyntheticShapes(64)": "SyntheticShapes(4, num_points=64)"}),
    "with torch.autocast(device, dtype=torch.bfloat16)": (
        lambda root: dict(images=torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])),
        {'"vit_small_patch16_224", pretrained=False)': '"vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)'}),
    "handle = lucidops.patch.timm_vit(vit)": (lambda root: dict(images=torch.randn(1, 3, 224, 224)), {}),
    "layer = lucidops.nn.SineLoRALinear": (
        lambda root: dict(A=torch.randn(4, 64), B=torch.randn(32, 4), W=torch.randn(32, 64), x=torch.randn(3, 64),
                          peft_model=_peft_model(), forget_ids=torch.randint(0, 64, (4, 8)),
                          retain_ids=torch.randint(0, 64, (4, 8))),
        {"steps=100": "steps=2"}),
    "adapter_input=u)": (
        lambda root: dict(A=torch.randn(4, 64), B=torch.randn(32, 4), W=torch.randn(32, 64), x=torch.randn(3, 64)), {}),
    "handle = lucidops.patch.sdpa_calls(eva)": (
        lambda root: {}, {'"eva02_tiny_patch14_224", pretrained=False)': '"eva02_tiny_patch14_224", pretrained=False, '
                                                                      'img_size=56, depth=2)',
                          "torch.randn(1, 3, 224, 224))\nhandle.calls": "torch.randn(1, 3, 56, 56))\nhandle.calls"}),
    "gray = conditioning.token_gray(x": (lambda root: dict(x=torch.randn(2, 16, 32)), {}),
    "per_sample = vmap(grad(loss)": (lambda root: dict(inputs=torch.randn(8, 64), targets=torch.randn(8, 32)), {}),
}


def _free_names(block: str) -> set:
    tree = ast.parse(block)
    bound = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    bound |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return used - bound - set(dir(builtins))


def test_every_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write compare.png and read a ModelNet40 folder
    namespace: Dict[str, Any] = {}
    unused = set(EXAMPLES)
    for block in code_blocks("python"):
        if _free_names(block):
            keys = [key for key in EXAMPLES if key in block]
            assert len(keys) == 1, f"no setup in EXAMPLES for the README block:\n{block.strip()}"
            unused.discard(keys[0])
            setup, shrink = EXAMPLES[keys[0]]
            namespace.update(setup(tmp_path))
            for long, short in shrink.items():
                assert long in block, f"{long!r} is no longer in the README block"
                block = block.replace(long, short)
        exec(compile(block, "README.md", "exec"), namespace)
    assert not unused, f"README blocks gone: {unused}"
