"""Where the CUDA toolkit and the nvidia wheel headers are (used by setup.py and CI).

`python tools/build_env.py cuda-home|includes|nvrtc` prints one of them.
"""
import glob
import os
import shutil
import sys
import sysconfig


def find_cuda_home():
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


def _nvidia_roots():
    """Folders of the `nvidia` namespace package (CUDA wheels), wherever pip put them."""
    import importlib.util

    roots = []
    try:
        spec = importlib.util.find_spec("nvidia")
        if spec and spec.submodule_search_locations:
            roots += list(spec.submodule_search_locations)
    except (ImportError, ValueError):
        pass
    roots.append(os.path.join(sysconfig.get_paths()["purelib"], "nvidia"))
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


def nvidia_wheel_includes():
    dirs = []
    for root in _nvidia_roots():
        dirs += glob.glob(os.path.join(root, "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def nvrtc_library():
    hits = []
    for root in _nvidia_roots():
        hits += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    cuda = find_cuda_home()
    if cuda:
        hits += sorted(glob.glob(os.path.join(cuda, "lib64", "libnvrtc.so*")))
    hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
    return hits[0] if hits else ""


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "cuda-home"
    if what == "cuda-home":
        print(find_cuda_home() or "")
    elif what == "includes":
        print(" ".join(nvidia_wheel_includes()))
    elif what == "nvrtc":
        print(nvrtc_library())
    else:
        sys.exit(f"unknown query {what!r}: cuda-home, includes or nvrtc")
