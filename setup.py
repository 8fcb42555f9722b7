"""Install lucidops.

Layout: the package lives in python/lucidops, the Triton kernels in triton_kernels/
(installed as lucidops.triton_kernels), the benchmarks in bench/ (installed as
lucidops.bench so that `lucidops bench` works from any install), and the C++/CUDA
sources in csrc/ (shipped as package data lucidops.csrc for the lazy builder).

Extensions build lazily on first use. `LUCIDOPS_BUILD_EXT=1 pip install
--no-build-isolation .` builds them at install time instead (torch must be importable
by the build, hence no build isolation).
"""

import os
import sys

from setuptools import find_packages, setup

# Every package under python/ (lucidops and its subpackages), plus the three folders
# that the fixed top-level layout keeps outside it.
PACKAGES = find_packages(where="python") + ["lucidops.triton_kernels", "lucidops.bench", "lucidops.csrc"]

PACKAGE_DIR = {
    "": "python",
    "lucidops.triton_kernels": "triton_kernels",
    "lucidops.bench": "bench",
    "lucidops.csrc": "csrc",
}

PACKAGE_DATA = {
    "lucidops": ["py.typed"],  # PEP 561: type checkers read the package's own annotations
    "lucidops.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"],
    # gpu_check.sh, and the distilled Gaussians the culling-on-trained-Gaussians rows need
    "lucidops.bench": ["*.sh", "*.pt"],
}


def _extensions():
    """Ahead-of-time extension builds, only when LUCIDOPS_BUILD_EXT=1."""
    if os.environ.get("LUCIDOPS_BUILD_EXT", "0") != "1":
        return [], {}
    import importlib.util

    try:
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pip's default build isolation hides the installed torch
        sys.exit(f"LUCIDOPS_BUILD_EXT=1 needs torch importable by the build: pip install --no-build-isolation . ({exc})")

    root = os.path.dirname(os.path.abspath(__file__))
    # Load the build spec by path: importing the lucidops package here would import torch's
    # whole op registry and the Triton kernels, which the build does not need.
    loader = importlib.util.spec_from_file_location("_lucidops_ext_sources", os.path.join(root, "python", "lucidops", "_ext_sources.py"))
    _ext_sources = importlib.util.module_from_spec(loader)
    sys.modules[loader.name] = _ext_sources  # dataclasses look their module up there
    loader.loader.exec_module(_ext_sources)
    _ext_sources.use_real_cuda_home(cpp_extension)
    exts = []
    cuda_archs = []
    cpu = _ext_sources.spec("cpu", root=os.path.join(root, "csrc"))
    exts.append(
        CppExtension(
            "lucidops._C_cpu",
            sources=cpu.sources,
            extra_compile_args={"cxx": cpu.cflags},
            extra_link_args=cpu.ldflags,
        )
    )
    if cpp_extension.CUDA_HOME is not None:
        cuda = _ext_sources.spec("cuda", root=os.path.join(root, "csrc"))
        cuda_archs = cuda.archs
        exts.append(
            CUDAExtension(
                "lucidops._C_cuda",
                sources=cuda.sources,
                extra_compile_args={"cxx": cuda.cflags, "nvcc": cuda.cuda_cflags},
                include_dirs=cuda.include_dirs,
                extra_link_args=cuda.ldflags,
            )
        )
    return exts, {"build_ext": _recording_archs(BuildExtension, cuda_archs, _ext_sources.ARCHS_FILE,
                                                cpu.cpu_features, _ext_sources.CPU_FEATURES_FILE)}


def _recording_archs(base, archs, archs_file, cpu_features=(), cpu_features_file=None):
    """build_ext that also writes the CUDA extension's arch list next to it: SOURCE_HASH leaves
    the archs out (they differ between a GPU-less build host and the GPU that runs it), and the
    loader uses the module only where this list covers the visible GPUs. Likewise the CPU
    features a -march=native CPU module needs: the loader skips it on a CPU without them."""
    records = {"lucidops._C_cuda": (archs_file, ";".join(archs))}
    if cpu_features_file:
        # None: a portable build, whose folder must lose the record a native build left there
        # (else the loader would refuse the portable module on the CPUs it was built for).
        records["lucidops._C_cpu"] = (cpu_features_file, " ".join(cpu_features) if cpu_features else None)

    class BuildExt(base):
        def _write_record(self, name, folder):
            filename, text = records[name]
            path = os.path.join(folder, filename)
            if text is None:
                if os.path.exists(path):
                    os.remove(path)
                return
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        def build_extension(self, ext):
            super().build_extension(ext)
            if ext.name in records:
                self._write_record(ext.name, os.path.dirname(self.get_ext_fullpath(ext.name)))

        def copy_extensions_to_source(self):
            # An editable install copies the modules into the source tree: the records go too.
            super().copy_extensions_to_source()
            for ext in self.extensions:
                if ext.name in records:
                    self._write_record(ext.name, self.get_finalized_command("build_py").get_package_dir("lucidops"))

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    name="lucidops",
    version="0.1.0",
    description="Fused Triton and CUDA/C++ kernels for explicit, well-conditioned network designs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        # Triton ships with torch's Linux x86_64 wheels; elsewhere the triton backend
        # simply reports itself unavailable.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "pybind11>=2.12",
        "ninja>=1.11",
        "fvcore>=0.1.5",
        "numpy",
        "scipy>=1.8",  # scipy.fft: token_gray's DCT on the CPU
        "tqdm",
    ],
    extras_require={
        # timm, peft and transformers: the patch tests build real models from configs.
        # matplotlib: the PNG plots of `lucidops bench` and `lucidops.profile.compare`.
        "plot": ["matplotlib>=3.5"],
        # h5py: the ModelNet40 (ply_hdf5_2048) loader.
        "data": ["h5py>=3.0"],
        # peft: lucidops.patch.peft_lora and `lucidops demo unlearn` (with matplotlib for its PNG).
        "peft": ["peft>=0.13", "transformers>=4.45", "matplotlib>=3.5"],
        "dev": ["pytest>=8", "hypothesis>=6", "pytest-timeout", "timm>=1.0", "peft>=0.13", "transformers>=4.45",
                "matplotlib>=3.5", "h5py>=3.0",
                "opacus>=1.5",  # tests/test_opacus.py: DP-SGD's per-sample gradients through the ops
                "mypy==2.4.1"],  # pinned: a newer mypy finds new errors (tests/test_types.py)
    },
    entry_points={"console_scripts": ["lucidops=lucidops.cli:main"]},
    zip_safe=False,
)
