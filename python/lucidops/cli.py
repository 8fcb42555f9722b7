"""The ``lucidops`` command.

    lucidops info                 backends available here per op, and why not
    lucidops bench [options]      benchmark the op families against their baselines
    lucidops build [cpu|cuda]     build the C++/CUDA extensions now (else on first use)
    lucidops aot [--family F ...] [--jobs N] [--json PATH]
                                  compile every Triton kernel for sm_80/sm_90 (no GPU needed),
                                  check its shared memory, list its registers and spills
    lucidops profile --model NAME [--patch] [--backward] [--png out.png] ...
                                  params, FLOPs, memory, latency of a timm or lucidops model
                                  (with --patch: against its lucidops-patched copy)
    lucidops demo gpe|unlearn [options]
                                  end-to-end demos: train, measure, print a table, write a PNG
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from lucidops import __version__, _optional

if TYPE_CHECKING:
    from lucidops.profile import ProfileComparison, ProfileReport


def _versions() -> List[str]:
    import torch

    lines = [f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})")
    else:
        lines.append("GPU: none visible to torch")
    return lines


def info(build: bool = False) -> str:
    """The text ``lucidops info`` prints."""
    import lucidops  # registers every op
    from lucidops import _ext, backends
    from lucidops.ops import _attention_cpp

    if build:
        for kind in ("cpu", "cuda"):
            _ext.status(kind, build_if_needed=True)
    out = [f"lucidops {lucidops.__version__}"] + _versions()
    try:
        forced = backends.forced_backend()
        out.append(f"forced backend: {forced or 'none (automatic)'}")
    except ValueError as err:  # a bad LUCIDOPS_BACKEND: say so here, it is what info is run to find
        forced = None
        out.append(f"forced backend: invalid, every op call will raise: {err}")
    out.append(f"Triton interpreter: {'on' if backends.triton_interpreting() else 'off'}")
    # Read from the imported extension only: info builds nothing unless asked (--build).
    width = _attention_cpp.vector_bytes(load=build)
    if width:
        narrow = "" if width >= 64 else ("; without AVX-512, attention's CPU default is aten for float32 heads "
                                         "of 64 and more with 1024 keys or more, outside forwards of 8 queries "
                                         "or fewer")
        out.append(f"C++ CPU kernels: built for {width}-byte vectors{narrow}")
    else:
        out.append("C++ CPU kernels: vector width not known until they are loaded (lucidops info --build)")
    for name, entry in sorted(backends.registered_ops().items()):
        if name.endswith("_backward"):
            continue
        out.append(f"\n{name}")
        for device, table in backends.availability(name, ["cpu", "cuda"]).items():
            chosen = None
            for b in entry.preference.get(device, ()):
                if b in table and table[b] is None:
                    chosen = b
                    break
            line = f"  {device}: default -> {chosen or 'reference'}"
            if forced is not None:
                line += (f" (now forced: {forced})" if forced in table
                         else f" (forced {forced} is not one of its backends)")
            out.append(line)
            for b, problem in table.items():
                out.append(f"    {b:<9} {'available' if problem is None else 'unavailable: ' + problem}")
        for backend, note in entry.notes.items():
            out.append(f"  note ({backend}): {note}")
    return "\n".join(out)


# lucidops' own models by name: name -> (constructor, input kind)
POINT_MODELS = ("pointnet", "pointnet_vanilla", "gaussian_pointnet")


class ProfileError(ValueError):
    """Bad ``lucidops profile`` arguments (printed as ``error: ...``, exit status 2)."""


def _make_model(name: str, img_size: Optional[int], num_heads: Optional[int] = None
                ) -> Tuple[Any, str, Optional[int]]:
    """(model, "points" or "image", image size) for a lucidops or timm model name; never downloads.

    ``num_heads`` rebuilds a timm transformer with that many heads per block (the many-head
    variants of methods.md section 2)."""
    import lucidops.models as models

    if num_heads is not None and name in POINT_MODELS:
        raise ProfileError(f"--num-heads applies to timm transformers, not {name}")
    if img_size is not None and name in POINT_MODELS:
        raise ProfileError(f"--img-size applies to timm models, not {name} (it takes --points)")

    if name == "pointnet":
        return models.PointNet(), "points", None
    if name == "pointnet_vanilla":
        return models.PointNet(feature_transform=False, input_transform=False), "points", None
    if name == "gaussian_pointnet":
        cls = getattr(models, "GaussianPointNet", None)
        if cls is None:
            raise ProfileError("gaussian_pointnet is not available in this version of lucidops.models")
        return cls(), "points", None
    try:
        import timm
    except ImportError as err:
        raise ProfileError(f"unknown model {name!r}: not one of {', '.join(POINT_MODELS)}, and timm is not "
                           "installed for timm models (pip install timm)") from err
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ProfileError(f"unknown model {name!r}: neither a lucidops model ({', '.join(POINT_MODELS)}) nor a "
                           f"timm model{hint}")
    kwargs: Dict[str, Any] = {"pretrained": False}
    if num_heads is not None:
        kwargs["num_heads"] = num_heads

    def create(**extra: Any) -> Any:
        try:
            return timm.create_model(name, **kwargs, **extra)
        except (TypeError, AssertionError) as err:  # timm asserts that the width divides into heads
            if num_heads is None:
                raise
            raise ProfileError(f"--num-heads {num_heads}: {name} cannot be built with it ({err})") from err

    if img_size is not None:
        try:
            model = create(img_size=img_size)
        except TypeError:  # CNNs take any input size but no img_size argument
            model = create()
        return model, "image", img_size
    model = create()
    size = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    return model, "image", size


def _check_runs_at(model: Any, size: int) -> None:
    """One image through ``model``: a size the model cannot take (smaller than its patch or
    its downsampling) is a usage error, not a traceback from inside the profile."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ProfileError(f"--img-size {size}: the model cannot run on {size}x{size} images "
                           f"({type(err).__name__}: {first_line})") from err


def _patch(model: Any, kind: str) -> Any:
    """Patch ``model`` (a deep copy) in place with lucidops.patch.apply."""
    from lucidops.patch import apply as patch_apply

    kwargs: Dict[str, Any] = {"point_encoders": True} if kind == "points" else {}
    try:
        handle = patch_apply(model, **kwargs)
    except (NotImplementedError, ValueError) as err:  # e.g. a point model without a PointNet encoder
        raise ProfileError(f"--patch: {err}") from err
    if handle.nothing_patched:
        raise ProfileError("--patch: lucidops.patch.apply found nothing to patch in this model")
    return model


def profile_command(args: argparse.Namespace) -> int:
    """``lucidops profile``: print one report, or a comparison with ``--patch``."""
    import copy

    import torch

    from lucidops import profile

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[profile] {message}", file=sys.stderr, flush=True)

    try:
        for value, flag, low in ((args.batch, "--batch", 1), (args.img_size, "--img-size", 1),
                                 (args.points, "--points", 1), (args.repeat, "--repeat", 1),
                                 (args.num_heads, "--num-heads", 1), (args.warmup, "--warmup", 0),
                                 (args.depth, "--depth", 0)):
            if value is not None and value < low:
                raise ProfileError(f"{flag} must be >= {low}, got {value}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ProfileError("--device cuda but CUDA is not available here")
        # Said before the model is built (seconds and GBs for a large timm model).
        if args.points is not None and args.model not in POINT_MODELS:
            raise ProfileError(f"--points applies to point models ({', '.join(POINT_MODELS)}), not {args.model}")
        if args.png and not args.patch:
            raise ProfileError("--png plots a comparison: use it with --patch")
        # The demos' check: a folder (or a name ending in a separator) or an unwritable place is
        # refused now, before minutes of profiling; a folder that does not exist yet is made.
        problem = profile.png_path_problem(args.png) if args.png else None
        if problem is not None:
            raise ProfileError(f"--png: {problem}")
        no_plotting = _optional.missing("matplotlib", "--png") if args.png else None
        if no_plotting:
            raise ProfileError(no_plotting)
        progress(f"building {args.model}")
        model, kind, size = _make_model(args.model, args.img_size, args.num_heads)
        model.eval()  # dropout off; BatchNorm uses running statistics (any batch size works)
        gen = torch.Generator().manual_seed(0)
        if kind == "points":
            inputs = torch.rand(args.batch, args.points or 1024, 3, generator=gen) * 2 - 1
        else:
            assert size is not None  # _make_model gives image models their input size
            inputs = torch.randn(args.batch, 3, size, size, generator=gen)
            if args.img_size is not None:
                _check_runs_at(model, size)
        dtype = getattr(torch, args.dtype)
        model.to(dtype)
        inputs = inputs.to(dtype)
        name = args.model if dtype == torch.float32 else f"{args.model} [{args.dtype}]"
        options = dict(backward=args.backward, device=args.device, repeat=args.repeat, warmup=args.warmup,
                       depth=1 if args.depth is None else args.depth, progress=progress)
        result: Union[ProfileComparison, ProfileReport]
        if args.patch:
            patched = _patch(copy.deepcopy(model), kind)
            # The chart is drawn after the table is printed: a failed save then loses no result.
            result = profile.compare(model, patched, inputs, names=(name, f"{name} (patched)"), **options)
        else:
            result = profile.report(model, inputs, name=name, **options)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result)
    if isinstance(result, profile.ProfileComparison) and args.depth is not None:
        # The comparison shows totals; an explicit --depth asks for each side's breakdown too.
        for side in (result.original, result.patched):
            print(f"\n{side}")
    if args.png:
        assert isinstance(result, profile.ProfileComparison)  # --png without --patch was refused
        try:
            result.plot(args.png)
        except OSError as err:  # checked up front; the disk can still fill up or the folder vanish
            print(f"error: --png: could not write {args.png!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.png}")
    return 0


def _add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a timm model name (created without pretrained weights) or one of {', '.join(POINT_MODELS)}")
    p.add_argument("--patch", action="store_true", help="compare against a copy patched by lucidops.patch.apply")
    p.add_argument("--batch", type=int, default=1, help="batch size of the random input (default 1)")
    p.add_argument("--img-size", type=int, default=None, help="image size for timm models (default: the model's)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="timm transformers: build with this many heads per block (default: the model's)")
    p.add_argument("--points", type=int, default=None, help="points per cloud for point models (default 1024)")
    p.add_argument("--backward", action="store_true", help="profile forward + backward, not the forward alone")
    p.add_argument("--png", default=None,
                   help="with --patch: write a bar chart of the ratios here, making its folder (needs matplotlib)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the model's parameters and the input (default float32; bfloat16 is the usual "
                        "reduced precision for CPU inference)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs; the latency is their median (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--depth", type=int, default=None,
                   help="deepest module level in the breakdown (default 1); with --patch, given explicitly, "
                        "each model's report and breakdown follow the comparison")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lucidops", description="fused kernels for explicit, well-conditioned networks")
    parser.add_argument("--version", action="version", version=f"lucidops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="backends available here per op, and why not")
    p_info.add_argument("--build", action="store_true", help="build missing extensions first, to report real status")
    p_bench = sub.add_parser("bench", help="benchmark the op families against their baselines")
    p_build = sub.add_parser("build", help="build the extensions now")
    # Checked after parsing: Python 3.11's argparse tests an empty nargs="*" against choices.
    p_build.add_argument("kinds", nargs="*", metavar="{cpu,cuda}", help="which extensions (default: both)")
    aot_parser = sub.add_parser("aot", help="compile every Triton kernel ahead of time for sm_80 and sm_90")
    from lucidops.triton_kernels import aot

    aot.add_arguments(aot_parser)
    _add_profile_arguments(sub.add_parser("profile", help="params, FLOPs, memory and latency of a model"))
    from lucidops import demos

    p_demo = sub.add_parser("demo", help="end-to-end demos (train, measure, table, PNG)")
    demo_sub = p_demo.add_subparsers(dest="demo", required=True)
    for name, module in demos.available().items():
        module.add_arguments(demo_sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION))

    from lucidops.bench import runner

    runner.add_arguments(p_bench)
    args = parser.parse_args(argv)
    problem = _environment_problem(args.command)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(args, p_build, aot, runner, demos)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 as a shell reports SIGINT
        print(f"\nlucidops {args.command}: interrupted", file=sys.stderr)
        return 130


def _environment_problem(command: str) -> Optional[str]:
    """A bad LUCIDOPS_DISABLE_EXT (every command that runs ops), or LUCIDOPS_BACKEND (bench,
    profile, demo; info reports it in its table), found before any work: bench and the demos
    met them minutes in, after training the first models."""
    from lucidops import _ext, backends

    try:
        if command in ("info", "bench", "profile", "demo"):
            _ext.disabled_by_env()
        if command in ("bench", "profile", "demo"):
            backends.forced_backend()
    except ValueError as err:
        return str(err)
    return None


def _run(args, p_build, aot, runner, demos) -> int:
    if args.command == "info":
        print(info(build=args.build))
        return 0
    if args.command == "bench":
        return runner.run(args)
    if args.command == "build":
        from lucidops import _ext, _ext_sources

        status = 0
        unknown = [kind for kind in args.kinds if kind not in ("cpu", "cuda")]
        if unknown:
            p_build.error(f"unknown extension {unknown[0]!r} (choose from 'cpu', 'cuda')")
        for kind in args.kinds or ["cpu", "cuda"]:
            try:
                spec = _ext_sources.spec(kind)
            except ValueError as err:  # a bad TORCH_CUDA_ARCH_LIST
                print(f"error: {kind}: {err}", file=sys.stderr)
                status = 1
                continue
            # The ops load a matching ahead-of-time module first: a cache build would go unused.
            prebuilt = _ext._prebuilt(kind, spec)
            if prebuilt is not None:
                print(f"{kind}: ok (prebuilt: {prebuilt.__file__})")
                continue
            skipped = _ext._skipped_prebuilt.get(kind)  # an installed build this CPU cannot run
            try:
                module = _ext.build(kind)  # builds without a GPU too (nvcc is enough)
                print(f"{kind}: ok ({module.__file__})" + (f"; {skipped}" if skipped else ""))
            except _ext.ExtensionUnavailable as err:
                print(f"error: {kind}: {err}" + (f"; {skipped}" if skipped else ""), file=sys.stderr)
                status = 1
        return status
    if args.command == "aot":
        return aot.main(["--arch", *map(str, args.arch), "--family", *args.family, "--jobs", str(args.jobs)]
                        + (["--json", args.json] if args.json else []), prog="lucidops aot")
    if args.command == "profile":
        return profile_command(args)
    if args.command == "demo":
        return demos.load(args.demo).run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
