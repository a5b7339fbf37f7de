"""Build of the optional CUDA extension ``vllm_quick._C`` (metadata lives in pyproject.toml).

The extension is built with ninja through torch's ``BuildExtension`` when this torch has CUDA and
nvcc is found; otherwise (CPU torch, no nvcc) the package installs without it and the
``quick::gemm`` op uses its reference path. ``QUICK_CUDA_ARCH_LIST`` overrides the GPU targets,
``QUICK_NVCC_FLAGS`` adds nvcc flags.
"""

import os

from setuptools import setup


def cuda_extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("QUICK_SKIP_CUDA") == "1":
        print("vllm-quick: no CUDA torch or nvcc; building without the kernel (reference path only)")
        return [], {}
    archs = os.environ.get("QUICK_CUDA_ARCH_LIST", "80;86;89;90").split(";")
    # sm_90 is built as sm_90a: the wgmma tiles use its arch-specific instructions (the cubin runs
    # on H100 / H200; other GPUs take their own targets).
    archs = [a + "a" if a == "90" else a for a in archs]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # QUICK_NVCC_FLAGS: extra nvcc flags, e.g. -DQUICK_WS_TIMELINE (benchmarks/ws_timeline.py).
    extra_nvcc = os.environ.get("QUICK_NVCC_FLAGS", "").split()
    ext = CUDAExtension(
        name="vllm_quick._C",
        sources=["csrc/quick_ops.cpp", "csrc/quick_gemm.cu", "csrc/quick_dequant.cu", "csrc/quick_act_scale.cu"],
        extra_compile_args={
            # C++20 like torch's own headers (>= 2.10): a C++17 binding crashed when it threw.
            "cxx": ["-O3", "-std=c++20"],
            # C++20 for templated lambdas in the launcher; the kernel file includes no torch headers.
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *gencode, *extra_nvcc],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
