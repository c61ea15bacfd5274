"""Build fastres and its compiled extension fastres._C against the installed torch.

    pip install --no-build-isolation .

The CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources (csrc/cuda/*.cu)
are built when torch has CUDA and a CUDA toolkit is found; FASTRES_CUDA=auto|0|1 overrides
(1 fails loudly when it cannot). No GPU is needed to compile. TORCH_CUDA_ARCH_LIST defaults to
Hopper ("9.0+PTX"). No network or git calls happen here.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "fastres needs PyTorch installed first: pip install torch==2.14.1 torchvision==0.29.1, "
        "then pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
# One version: fastres/_version.py (read, not imported: the package needs torch to import).
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(ROOT, "fastres", "_version.py")).read()).group(1)


def _find_cuda_home() -> str | None:
    """CUDA_HOME, else /usr/local/cuda, else the toolkit around nvcc on PATH.

    torch's own guess follows the nvcc wrapper to /usr/local on some machines and then cannot
    link -lcudart, so /usr/local/cuda is tried before asking torch.
    """
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _want_cuda() -> tuple[bool, str]:
    mode = os.environ.get("FASTRES_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTRES_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTRES_CUDA=0"
    reasons = []
    if not torch.version.cuda:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        reasons.append("no CUDA sources in csrc/cuda")
    if reasons:
        if mode == "1":
            sys.exit("FASTRES_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch caches its guess at import time
    return True, cuda_home


DNNL_HEADER = "/usr/include/oneapi/dnnl/dnnl.hpp"


def _want_dnnl() -> tuple[bool, str]:
    """fastres' own oneDNN primitives for the CPU convolutions (csrc/cpu/dnnl_conv.cpp): built
    against the system's oneDNN (Debian's libdnnl-dev, which scripts/setup_env.sh installs) when
    its header is found; without it the CPU ops reach oneDNN through ATen's ops.
    FASTRES_DNNL=auto|0|1 (1 fails loudly when the header is missing)."""
    mode = os.environ.get("FASTRES_DNNL", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTRES_DNNL must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTRES_DNNL=0"
    why = None
    if not os.path.exists(DNNL_HEADER):
        why = f"no {DNNL_HEADER} (apt-get install libdnnl-dev)"
    else:
        # csrc/cpu/dnnl_conv.cpp is written against oneDNN 2.x's API (operation descriptors),
        # which 3.x removed.
        ver = os.path.join(os.path.dirname(DNNL_HEADER), "dnnl_version.h")
        m = re.search(r"#define DNNL_VERSION_MAJOR (\d+)", open(ver).read()) \
            if os.path.exists(ver) else None
        if m is None or m.group(1) != "2":
            why = f"oneDNN {m.group(1) if m else '?'}.x headers; fastres' own primitives need 2.x"
    if why:
        if mode == "1":
            sys.exit(f"FASTRES_DNNL=1 but the own oneDNN primitives cannot be built: {why}")
        return False, why
    return True, DNNL_HEADER


def _dnnl_include_dir() -> str:
    """A directory whose oneapi/ is the system's: searched before torch's include directories,
    which carry torch's own (newer, incompatible) oneDNN headers under the same names. (-I
    /usr/include itself would be ignored: gcc keeps system directories last.)"""
    inc = os.path.join(ROOT, "build", "dnnl_include")
    link = os.path.join(inc, "oneapi")
    target = os.path.dirname(os.path.dirname(DNNL_HEADER))
    os.makedirs(inc, exist_ok=True)
    if os.path.realpath(link) != os.path.realpath(target):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
    return inc


def _extension():
    with_cuda, why = _want_cuda()
    print(f"fastres: building {'CPU + CUDA' if with_cuda else 'CPU only'} ({why})")
    with_dnnl, why_dnnl = _want_dnnl()
    print(f"fastres: own oneDNN primitives {'yes' if with_dnnl else 'no'} ({why_dnnl})")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [
        ("FASTRES_VERSION", f'"{VERSION}"'),
        ("FASTRES_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link = ["-fopenmp"]
    include_dirs = []
    if with_dnnl:
        define_macros.append(("FASTRES_HAVE_DNNL", None))
        extra_link.append("-ldnnl")
        include_dirs.append(_dnnl_include_dir())
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [
            ("FASTRES_WITH_CUDA", None),
            ("FASTRES_CUDA_ARCH_LIST", f'"{arch_list}"'),
            ("FASTRES_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "fastres._C",
            sources,
            define_macros=define_macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    return cpp_extension.CppExtension(
        "fastres._C",
        sources,
        define_macros=define_macros,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link,
    )


def _want_cudasim() -> tuple[bool, str]:
    """cudasim (csrc/cuda/cudasim): the CUDA backend's kernels and launchers compiled by the host
    C++ compiler against a SIMT shim, as fastres._C_cudasim. It needs no CUDA toolkit or header
    (the shim stands in for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and c10/cuda), only g++ or
    clang on Linux (x86-64: its own context switch; other CPUs: ucontext).
    FASTRES_CUDASIM=auto|0|1 (1 fails loudly when it cannot be built)."""
    mode = os.environ.get("FASTRES_CUDASIM", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTRES_CUDASIM must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTRES_CUDASIM=0"
    reasons = []
    if not sys.platform.startswith("linux"):
        reasons.append(f"cudasim's fibers are Linux-only, this is {sys.platform}")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "cudasim", "*.cpp")):
        reasons.append("no cudasim sources in csrc/cuda/cudasim")
    if reasons:
        if mode == "1":
            sys.exit("FASTRES_CUDASIM=1 but cudasim cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, "host compiler"


def _cudasim_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "cudasim", "*.cpp")))
    flags = [
        "-O2",  # -O3 only adds compile time: the fibers' switches dominate, not the arithmetic
        "-ffp-contract=off",  # __fmul_rn/__fadd_rn are separate roundings, as on the GPU
        "-fvisibility=hidden",  # kernels and launchers stay private to this module
        "-Wno-unknown-pragmas",  # #pragma unroll
    ]
    return cpp_extension.CppExtension(
        "fastres._C_cudasim",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cuda", "cudasim", "include")],
        extra_compile_args={"cxx": flags},
    )


def _extensions():
    exts = [_extension()]
    with_sim, why = _want_cudasim()
    print(f"fastres: cudasim {'yes' if with_sim else 'no'} ({why})")
    if with_sim:
        exts.append(_cudasim_extension())
    return exts


setup(
    version=VERSION,
    packages=["fastres", "fastres.backends", "fastres.nn", "fastres.harness",
              "fastres.experiments", "fastres.triton_kernels", "fastres.triton_kernels.lint"],
    package_dir={"fastres": "fastres", "fastres.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
