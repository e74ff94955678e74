"""torch_ext: PyTorch custom operators in C++/CUDA, usable from Python and LibTorch alike.

Ops are registered with the dispatcher as ``torch.ops.torch_ext.*``; this package loads the
library and offers typed wrappers (``torch_ext.spp``, ``torch_ext.sppf``,
``torch_ext.dilated_conv2d``, ``torch_ext.confusion_matrix``, ...), modules (``torch_ext.nn``)
and streaming metrics (``torch_ext.metrics``). The model patches (``torch_ext.patch``) are
imported on first use, not with the package.
"""

from __future__ import annotations

from types import ModuleType

from torch_ext import _library

_BUILD_INFO = _library.load()

from torch_ext import checkpoint, conv, metrics, nn, varlen  # noqa: E402  (after loading)
from torch_ext.conv import dilated_conv2d  # noqa: E402
from torch_ext.metrics import confusion_matrix, segmentation_metrics  # noqa: E402
from torch_ext.spp import spp, sppf  # noqa: E402
from torch_ext.varlen import (  # noqa: E402
    cu_seqlens_from_position_ids,
    index_first_axis,
    index_put_first_axis,
    pad_input,
    plan_packing,
    unpad_input,
)

__version__: str = _BUILD_INFO["version"]

# Submodules imported on first use rather than with the package: ``torch_ext.patch`` (the model
# patches) is reached as an attribute, or by ``import torch_ext.patch``, only when wanted.
_LAZY_SUBMODULES = ("patch",)


def __getattr__(name: str) -> ModuleType:
    """Imports a lazy submodule (``torch_ext.patch``) on its first access as an attribute."""
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds it in this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's attributes, the lazy submodules included before their first import."""
    return sorted({*globals(), *_LAZY_SUBMODULES})


def build_info() -> dict:
    """What the loaded library was built with: version, torch, cuda, backends, path."""
    return dict(_BUILD_INFO)


def compiled_backends() -> list[str]:
    """Device backends with compiled kernels, e.g. ``["CPU"]`` or ``["CPU", "CUDA"]``."""
    return list(_BUILD_INFO["backends"])


def cpu_capability() -> str:
    """The instruction set of the CPU kernels in use: "default", "avx2", "avx512" or
    "avx512_bf16" (the AVX-512 copy, bfloat16 rounded by the CPU's own conversion).

    "avx2" unless the environment variable TORCH_EXT_CPU_CAPABILITY (or ATEN_CPU_CAPABILITY)
    asks for another, never more than the CPU supports; read once per process. The kernels
    that measured faster with AVX-512 (the channels_last depthwise convolution, and the NCHW
    depthwise forward at stride 1 with square kernels of width 3, 5, 7, which also computes the
    input gradient with multiplier 1) run the best AVX-512 copy the CPU supports unless the
    environment asks for another.
    """
    import torch

    return torch.ops.torch_ext._cpu_capability()


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``torch.ops.torch_ext.<op>`` has a kernel for a dispatch key ("CPU", "CUDA", ...).

    Asks the dispatcher itself, so it reflects what is registered, not what was intended.
    """
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_ext::{op}", backend)


__all__ = [
    "__version__",
    "build_info",
    "checkpoint",
    "compiled_backends",
    "conv",
    "confusion_matrix",
    "cpu_capability",
    "dilated_conv2d",
    "has_kernel",
    "metrics",
    "nn",
    "patch",
    "segmentation_metrics",
    "spp",
    "sppf",
    "varlen",
    "cu_seqlens_from_position_ids",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "plan_packing",
    "unpad_input",
]
