"""How the compiled extension is linked (checks that need no GPU)."""
import shutil
import subprocess
import sys

import pytest

from ppap_fast.ops import _ext


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF / ldd")
def test_extension_links_the_shared_libstdcxx():
    """A private static libstdc++ in the extension (a compiler wrapper adding -static-libstdc++, as on
    the GPU image) breaks C++ errors raised inside it: torch cannot catch them (segfault there,
    truncated messages here). setup.py links the shared one explicitly."""
    if not _ext.extension_loaded():
        pytest.skip("extension not built")
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    from ppap_fast import _C

    deps = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++" in deps, f"{_C.__file__} does not link the shared libstdc++:\n{deps}"
