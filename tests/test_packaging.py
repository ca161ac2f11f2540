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
