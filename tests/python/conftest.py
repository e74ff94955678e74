"""Shared fixtures of the torch_ext Python tests.

The tests import the ``torch_ext`` package the ordinary way, so they run against either

* an installed package (``pip install --no-build-isolation .``, or ``-e .``), whose library is
  ``torch_ext/lib/libtorch_ext.so``, or
* the source tree on ``PYTHONPATH`` with ``TORCH_EXT_LIBRARY`` pointing at a ``libtorch_ext.so``
  built by CMake.

CUDA cases are parametrized like the CPU ones and skip when no GPU is visible, so the very same
assertions run on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

try:
    import torch_ext  # noqa: F401  (loads the op library into torch)
except ImportError as error:  # pragma: no cover - a setup problem, not a test failure
    raise pytest.UsageError(
        f"cannot import torch_ext ({error}). Install the package "
        "(pip install --no-build-isolation .) or set PYTHONPATH to the repository root and "
        "TORCH_EXT_LIBRARY to a libtorch_ext.so built by CMake."
    ) from error

# Dense float32 convolutions on CUDA go to cuDNN (the vendor route), which PyTorch lets use TF32
# by default: ~1e-3 relative error, where the tests hold float32 to float64 references at ~1e-5.
# The tests ask for full float32 (the benchmarks keep PyTorch's default, for ours and the
# baselines alike).
torch.backends.cudnn.allow_tf32 = False

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

# Use as @pytest.mark.parametrize("device", DEVICES), or through the `device` fixture.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_SKIP)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device a kernel may run on; CUDA skips without a GPU."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: every test sees the same data on every run.

    Tensors are drawn on the CPU with it and then moved, so CPU and CUDA cases get equal data.
    """
    return torch.Generator().manual_seed(20240531)
