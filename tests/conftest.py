import os

# Tests never reach a model hub: everything they load is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # attn_impl="triton" on a CPU-only machine: its kernel runs in Triton's interpreter, which
    # must be chosen before anything imports triton (swinkit and timm do).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two threads (the benchmarks' setting), shared out among pytest-xdist's workers when `make test`
# runs the suite in several processes, so the workers together use the cores once. Tests about
# threading set their own count.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _workers))


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that a CPU batch splits over two image-parallel workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _native_kernel_cache(tmp_path_factory):
    """The native kernel is built into the test session's temporary directory, not the user's cache."""
    from swinkit import native

    native.CACHE_DIR = tmp_path_factory.mktemp("swinkit-cache")
    native.reset()
