"""What the source distribution ships (checks that need no GPU and no network)."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdist_holds_what_setup_py_builds_from(tmp_path):
    """`python -m build` (and pip on an sdist) builds the wheel from the sdist: setup.py imports
    tools/build_env.py and the extension includes csrc/*.h and kernels/*.cuh, so they must be in it."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout")
    env = {**os.environ, "PPAP_FAST_NO_EXTENSION": "1"}  # sources must come from MANIFEST.in, not ext_modules
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                           "-d", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = tmp_path.glob("ppap_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = ["setup.py", "pyproject.toml", "tools/build_env.py"]
    needed += [str(p.relative_to(REPO)) for d in ("csrc", "kernels") for p in sorted((REPO / d).iterdir())]
    needed += [str(p.relative_to(REPO)) for p in sorted((REPO / "ppap_fast" / "weights").rglob("*")) if p.is_file()]
    missing = [n for n in needed if n not in names]
    assert not missing, f"the sdist lacks {missing}"


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's setup() call (read, not run: no build)."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require")}


def _dist_name(req: str) -> str:
    import re

    return re.match(r"[A-Za-z0-9_.\-]+", req.strip())[0].lower().replace("_", "-")


DIST_OF = {"PIL": "pillow", "sklearn": "scikit-learn"}  # import name -> distribution name


def _third_party_imports() -> dict:
    """Top-level third-party package -> where ppap_fast/ first imports it."""
    import ast

    imported = {}
    for path in sorted((REPO / "ppap_fast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ppap_fast":
                    imported.setdefault(top, f"{path.relative_to(REPO)}:{node.lineno}")
    return imported


def test_every_third_party_import_is_a_declared_dependency():
    """setup.py lacked torchvision (imported for every torchvision guide; timm happened to pull it in): every
    top-level package ppap_fast/ imports is in install_requires, an extra, or named here as optional; and
    requirements.txt pins every install_requires package."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout")
    optional = {"huggingface_hub": "guarded ImportError (comes with diffusers)"}
    kw = _setup_kwargs()
    required = {_dist_name(r) for r in kw["install_requires"]}
    extras = {_dist_name(r) for reqs in kw["extras_require"].values() for r in reqs}
    imported = _third_party_imports()
    assert "torch" in imported and "torchvision" in imported  # the scan sees the imports
    undeclared = {top: where for top, where in imported.items()
                  if top not in optional and DIST_OF.get(top, top).lower().replace("_", "-") not in required | extras}
    assert not undeclared, f"imported but not in setup.py's install_requires / extras_require: {undeclared}"
    pinned = {_dist_name(line) for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    assert required <= pinned, f"install_requires not in requirements.txt: {sorted(required - pinned)}"


def test_install_requires_holds_only_what_ppap_fast_imports():
    """peft was in install_requires though ppap_fast/ never imports it (export_peft writes the files without it; only
    loading them, and the tests, need it): an extra now, still pinned in requirements.txt for CI."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout")
    imported = {DIST_OF.get(top, top).lower().replace("_", "-") for top in _third_party_imports()}
    kw = _setup_kwargs()
    unused = sorted(_dist_name(r) for r in kw["install_requires"] if _dist_name(r) not in imported)
    assert not unused, f"install_requires packages ppap_fast/ never imports (make them extras): {unused}"
    assert "peft" in {_dist_name(r) for r in kw["extras_require"]["test"]}  # test_peft_export needs it
    pinned = {_dist_name(line) for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    assert "peft" in pinned  # .ci/run installs requirements.txt: the peft tests keep running
