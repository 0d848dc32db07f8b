"""Build contrastive_kernels and its compiled extension ``contrastive_kernels._C``.

The C++ CPU kernels are always built.  The CUDA kernels (``csrc/cuda``) are added
when torch was built with CUDA and nvcc is found.  Environment switches, in the
FlashAttention / torchvision style:

  CONTRASTIVE_KERNELS_FORCE_CUDA=1   build the CUDA kernels even if no GPU is visible
                                     (needs a CUDA torch and nvcc)
  CONTRASTIVE_KERNELS_SKIP_CUDA=1    never build the CUDA kernels
  CONTRASTIVE_KERNELS_SKIP_EXT=1     build no extension at all (reference + Triton only)
  TORCH_CUDA_ARCH_LIST               CUDA archs (default "8.0;9.0a": 9.0a is sm_90 with wgmma)
  MAX_JOBS                           parallel compile jobs (ninja)
  CONTRASTIVE_KERNELS_NVCC_FLAGS     extra nvcc flags
  CONTRASTIVE_KERNELS_BUILD_CUDA_EMU=1
                                     also build contrastive_kernels._C_cuda_emu: the CUDA
                                     kernels compiled as C++ for the CPU emulator in
                                     csrc/cuda/emu (for tests on machines without a GPU;
                                     run them with CONTRASTIVE_KERNELS_CUDA_EMULATE=1)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("CONTRASTIVE_KERNELS_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("contrastive_kernels: torch is not installed; building without _C "
              "(install torch first and use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

    want_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and (torch.cuda.is_available() or _flag("CONTRASTIVE_KERNELS_FORCE_CUDA")))
    if _flag("CONTRASTIVE_KERNELS_SKIP_CUDA"):
        want_cuda = False
    if _flag("CONTRASTIVE_KERNELS_FORCE_CUDA") and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        raise RuntimeError("CONTRASTIVE_KERNELS_FORCE_CUDA=1 but torch has no CUDA or nvcc was not found")
    with_cuda = want_cuda and bool(cuda_sources)

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", "-DTORCH_API_INCLUDE_EXTENSION_H"] + openmp
    define = [("CK_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define.append(("CK_CUDA_ARCHS", '"%s"' % archs))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc += os.environ.get("CONTRASTIVE_KERNELS_NVCC_FLAGS", "").split()
        ext = cpp_extension.CUDAExtension(
            "contrastive_kernels._C", cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=openmp)
    else:
        ext = cpp_extension.CppExtension(
            "contrastive_kernels._C", cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define,
            extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    exts = [ext]
    if _flag("CONTRASTIVE_KERNELS_BUILD_CUDA_EMU"):
        emu_dir = os.path.join("csrc", "cuda", "emu")
        exts.append(cpp_extension.CppExtension(
            "contrastive_kernels._C_cuda_emu", sorted(glob.glob(os.path.join(emu_dir, "*.cpp"))),
            # the emulator's cuda_runtime.h / cuda_fp16.h / cuda_bf16.h come first
            include_dirs=[os.path.join(ROOT, emu_dir), os.path.join(ROOT, "csrc")],
            define_macros=[("CK_CUDA_EMU", "1")],
            extra_compile_args={"cxx": ["-O2", "-std=c++17", "-DTORCH_API_INCLUDE_EXTENSION_H"]}))
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return exts, {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="contrastive-kernels",
    version=VERSION,
    description="Fused CUDA/Triton/C++ kernels for contrastive and redundancy-reduction losses",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["contrastive_kernels", "contrastive_kernels.compat", "contrastive_kernels.kernels"],
    package_dir={"contrastive_kernels": "python/contrastive_kernels",
                 "contrastive_kernels.compat": "python/contrastive_kernels/compat",
                 "contrastive_kernels.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib",
                      "triton>=3.0; platform_system=='Linux' and platform_machine=='x86_64'"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "pytorch-metric-learning>=2"]},
    zip_safe=False,
)
