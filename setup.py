"""Build script: maps the top-level folders onto the `deeprecon` import package and
builds the fused NCC + ROI-L2 loss extension (cpp_ext/csrc) at install time.

`deeprecon` is a namespace package: `trainer/ -> deeprecon.trainer`,
`export/ -> deeprecon.export`, `runtime/ -> deeprecon.runtime`,
`cpp_ext/ -> deeprecon.cpp_ext`. Data files: the trainer's data split and the reference
model bundle, `runtime/models/reference/` (found by `deeprecon.runtime.bundle.
default_bundle_path`; no `__init__.py` there: it is data of `deeprecon.runtime`).

Two compiled libraries in deeprecon/cpp_ext, from one raw-pointer C++ core
(cpp_ext/csrc/core):
- `_ncc_core`: the core behind a C ABI (cpp_ext/csrc/capi), loaded with ctypes by
  `deeprecon.cpp_ext.numpy_ops`. It links neither libtorch nor Python and is built
  always, with or without torch (a C++ compiler is all it needs; where none works it
  is skipped with a warning, and numpy_ops says so when called).
- `_C`: the torch op (TORCH_LIBRARY), built whenever torch is importable at build time;
  its CUDA kernel too when torch has CUDA and nvcc is found (set DEEPRECON_NO_CUDA=1 to
  skip it).
Nothing is compiled at import time.
"""
import glob
import os
import sys

from setuptools import Extension, setup

PACKAGE_DIRS = {
    "deeprecon.trainer": "trainer",
    "deeprecon.export": "export",
    "deeprecon.runtime": "runtime",
    "deeprecon.cpp_ext": "cpp_ext",
}


def find_packages():
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                packages.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return sorted(packages)


CORE_SOURCES = sorted(glob.glob("cpp_ext/csrc/core/*.cpp"))


def ncc_core_extension():
    """`deeprecon.cpp_ext._ncc_core`: the raw-pointer core and its C ABI, a plain shared
    library for ctypes (no torch, no Python API: nothing of either is linked), built by
    the stock setuptools compiler. OpenMP on Linux; serial elsewhere."""
    sources = CORE_SOURCES + sorted(glob.glob("cpp_ext/csrc/capi/*.cpp"))
    if not sources:
        return []
    if sys.platform == "win32":
        cflags, lflags = ["/O2", "/std:c++17", "/openmp"], []
    else:
        cflags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
        lflags = []
        if sys.platform.startswith("linux"):
            cflags.append("-fopenmp")
            lflags.append("-fopenmp")
    return [Extension("deeprecon.cpp_ext._ncc_core", sources, language="c++",
                      extra_compile_args=cflags, extra_link_args=lflags, optional=True)]


def extensions():
    core = ncc_core_extension()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.stderr.write(
            "deeprecon-rt: torch is not installed at build time; the fused loss op "
            "(deeprecon.cpp_ext._C) is not built, only its torch-free library "
            "(deeprecon.cpp_ext._ncc_core, for numpy arrays). Install torch first and use "
            "`pip install --no-build-isolation`.\n")
        return core, {}
    sources = sorted(glob.glob("cpp_ext/csrc/*.cpp"))
    if not sources:
        return core, {}
    sources += CORE_SOURCES
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
    # torch >= 2.10), for the host compiler and for nvcc.
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    macros = []
    cuda_sources = sorted(glob.glob("cpp_ext/csrc/cuda/*.cu"))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and cuda_sources and os.environ.get("DEEPRECON_NO_CUDA") != "1")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
        macros.append(("WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "deeprecon.cpp_ext._C", sources + cuda_sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])
    else:
        ext = cpp_extension.CppExtension(
            "deeprecon.cpp_ext._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])
    # BuildExtension builds _ncc_core too: a plain Extension gets no torch include path
    # and no torch library from it (only a -D of its name), and its -std is kept.
    return core + [ext], {
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    packages=find_packages(),
    package_dir=PACKAGE_DIRS,
    include_package_data=False,  # C++/CUDA sources are built, not shipped
    package_data={
        "deeprecon.trainer": ["splits/*.json"],  # the committed data split
        # the shipped reference bundle (manifest.json, weights/*.safetensors,
        # programs/*.pt2, any ONNX graphs): every file of the folder, since a bundle
        # refuses to load with a listed file missing (runtime/bundle.py)
        "deeprecon.runtime": ["models/reference/*", "models/reference/**/*"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
