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

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extension():
    with_cuda, why = _want_cuda()
    print(f"fastres: building {'CPU + CUDA' if with_cuda else 'CPU only'} ({why})")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [
        ("FASTRES_VERSION", f'"{VERSION}"'),
        ("FASTRES_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link = ["-fopenmp"]
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
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    return cpp_extension.CppExtension(
        "fastres._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link,
    )


setup(
    version=VERSION,
    packages=["fastres", "fastres.experiments", "fastres.triton_kernels"],
    package_dir={"fastres": "fastres", "fastres.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
