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

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import find_cuda_home, nvidia_wheel_includes  # noqa: E402


def _extensions():
    if os.environ.get("PPAP_FAST_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = None if os.environ.get("PPAP_FAST_NO_CUDA") == "1" else find_cuda_home()
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
    # Link the shared libstdc++ even where the compiler finds a static one first (the GPU image's
    # /opt/gcc/bin/g++ is a script adding -B folders that hold libstdc++.a): with a private copy, a
    # C++ error raised in the extension is not caught by torch's libstdc++ and kills the process
    # (segfault) instead of raising. "-l:libstdc++.so.6" names the shared file; the pushed state
    # keeps it dynamic and needed whatever -Bstatic / --as-needed came before (verified on the H100 image).
    link = (["-Wl,--push-state,--no-as-needed,-Bdynamic", "-l:libstdc++.so.6", "-Wl,--pop-state"]
            if sys.platform.startswith("linux") else [])
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if use_cuda:
        # *_bind.cu are standalone JIT modules with their own PyInit; the extension registers ops in csrc/
        sources += sorted(s for s in glob.glob("kernels/*.cu") if not s.endswith("_bind.cu"))
        include_dirs += nvidia_wheel_includes()
        ext = cpp_extension.CUDAExtension(
            "ppap_fast._C", sources, include_dirs=include_dirs,
            define_macros=[("PPAP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("ppap_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    print(f"ppap_fast: building _C with {'CUDA from ' + cuda_home if use_cuda else 'CPU only'}", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="ppap_fast",
    version="0.1.0",
    description="Practical Plug-and-Play (PPAP) guidance of diffusion models: reference, fused kernels, CLI",
    packages=find_packages(include=["ppap_fast", "ppap_fast.*"]),
    package_data={"ppap_fast": ["weights/*.safetensors", "weights/*/*.safetensors", "weights/*/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "numpy", "safetensors", "tqdm", "pillow", "scikit-learn", "matplotlib",
        "diffusers", "timm", "torchvision>=0.19",  # torchvision: the registry's torchvision guides
    ],
    extras_require={
        "triton": ["triton"],
        "peft": ["peft"],  # to load export_peft's adapters (PeftModel); writing them needs no peft
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft"],
    },
    entry_points={"console_scripts": ["ppap-fast=ppap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
