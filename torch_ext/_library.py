"""Finding and loading libtorch_ext.so, and what it was built with.

The library's build information is read from the file's bytes before the library is loaded, so
that a library compiled against another torch gives a clear error asking for a rebuild instead of
an undefined-symbol trace from the dynamic loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_MARKER = b"torch_ext-build-info:"
_LIBRARY_NAME = "libtorch_ext.so"


def library_path() -> Path:
    """Where libtorch_ext.so is: $TORCH_EXT_LIBRARY, else the package's lib/ folder."""
    override = os.environ.get("TORCH_EXT_LIBRARY")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "lib" / _LIBRARY_NAME


def read_build_info(path: Path) -> dict:
    """The JSON that csrc/common/build_info.cpp embeds in the library."""
    data = path.read_bytes()
    start = data.find(_MARKER)
    if start < 0:
        raise ImportError(f"torch_ext: {path} carries no build information; rebuild torch_ext")
    start += len(_MARKER)
    end = data.index(b"\n", start)
    return json.loads(data[start:end].decode())


def _base_version(version: str) -> str:
    return version.split("+")[0]


def check_compatible(info: dict, path: Path) -> None:
    """Raise ImportError when the library was built for another torch than the running one."""
    built = info["torch"]
    running = torch.__version__
    rebuild = (
        "Rebuild torch_ext against the installed torch: "
        "pip install --no-build-isolation --force-reinstall --no-deps ."
    )
    if _base_version(built) != _base_version(running):
        raise ImportError(
            f"torch_ext: {path} was built against torch {built}, but torch {running} is "
            f"installed; the C++ ABI differs between torch releases. {rebuild}"
        )
    if info.get("cuda") and torch.version.cuda is None:
        raise ImportError(
            f"torch_ext: {path} has CUDA kernels (built against torch {built}), but the installed "
            f"torch {running} is a CPU-only build. {rebuild}"
        )


def load() -> dict:
    """Load the op library into torch (once) and return its build information."""
    path = library_path()
    if not path.exists():
        raise ImportError(
            f"torch_ext: the compiled library is missing ({path}). Build it with "
            "`pip install --no-build-isolation .` (or `-e .`), or point TORCH_EXT_LIBRARY at a "
            "libtorch_ext.so built by CMake."
        )
    info = read_build_info(path)
    check_compatible(info, path)
    torch.ops.load_library(str(path))
    info["path"] = str(path)
    return info
