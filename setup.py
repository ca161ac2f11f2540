"""Build of ppap_fast and its extension ppap_fast._C.

The extension holds the op schemas and CPU kernels (csrc/) and, when torch is a
CUDA build and nvcc is found, the CUDA kernels (kernels/). Environment:
  PPAP_FAST_NO_CUDA=1      build the CPU part only
  PPAP_FAST_NO_EXTENSION=1 skip the extension (the package then runs its reference ops)
  CUDA_HOME                CUDA toolkit root (found automatically when unset)
  TORCH_CUDA_ARCH_LIST     GPU archs (default "9.0")
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """A CUDA root whose include/ has cuda_runtime.h (a wrapper nvcc on PATH misleads torch)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: look for the real path it executes
            with open(nvcc, "rb") as fh:
                head = fh.read(4096).decode("utf-8", "ignore")
            for word in head.replace('"', " ").split():
                if word.endswith("/bin/nvcc") and os.path.exists(word):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    try:
        import torch

        if torch.version.cuda:
            candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    except ImportError:
        pass
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _nvidia_wheel_includes():
    site = sysconfig.get_paths()["purelib"]
    dirs = glob.glob(os.path.join(site, "nvidia", "*", "include")) + glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extensions():
    if os.environ.get("PPAP_FAST_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = None if os.environ.get("PPAP_FAST_NO_CUDA") == "1" else _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    import torch
    from torch.utils import cpp_extension

    use_cuda = bool(cuda_home) and torch.version.cuda is not None
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not use_cuda:
        sources = [s for s in sources if not s.endswith("cuda_registration.cpp")]
    cxx = ["-O3"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if use_cuda:
        sources += sorted(glob.glob("kernels/*.cu"))
        include_dirs += _nvidia_wheel_includes()
        ext = cpp_extension.CUDAExtension(
            "ppap_fast._C", sources, include_dirs=include_dirs,
            define_macros=[("PPAP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = cpp_extension.CppExtension("ppap_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    print(f"ppap_fast: building _C with {'CUDA from ' + cuda_home if use_cuda else 'CPU only'}", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="ppap_fast",
    version="0.1.0",
    description="Practical Plug-and-Play (PPAP) guidance of diffusion models: reference, fused kernels, CLI",
    packages=find_packages(include=["ppap_fast", "ppap_fast.*"]),
    package_data={"ppap_fast": ["weights/*.safetensors", "weights/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "numpy", "safetensors", "tqdm", "pillow", "scikit-learn", "matplotlib",
        "diffusers", "peft", "timm",
    ],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["ppap-fast=ppap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
