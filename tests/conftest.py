import os
from pathlib import Path

import pytest

# Triton kernels run on CPU through its interpreter when no GPU is present.
if os.environ.get("PPAP_NO_TRITON_INTERPRET") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

REPO = Path(__file__).resolve().parents[1]


def _fixtures_dir() -> Path:
    candidates = [os.environ.get("PPAP_FIXTURES"), REPO.parent / "shared" / "fixtures", REPO / ".devcarry" / "fixtures"]
    for c in candidates:
        if c and (Path(c) / "guided_steps_golden.pt").exists():
            return Path(c)
    raise RuntimeError("golden fixtures not found: set PPAP_FIXTURES or place shared/fixtures beside the repo")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _fixtures_dir()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: with 2 OpenMP threads on shared cores each small op spins for tens of ms."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls/convs on CUDA for parity with fp32 goldens."""
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
