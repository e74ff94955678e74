"""Builds the torch_ext Python package by driving the one CMake build (CMakeLists.txt).

    pip install --no-build-isolation .        # or -e . for an editable install

The torch to build against is the one installed in the environment (hence no build isolation);
the package's version and requirement name it (``0.1.0+torch213``, ``torch==2.13.0``).
Environment knobs, passed on to CMake: TORCH_EXT_CUDA (AUTO/ON/OFF),
TORCH_EXT_CUDA_ARCHITECTURES (e.g. "80;90"), CMAKE_ARGS (extra -D flags), MAX_JOBS.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SUPPORTED_TORCH = ((2, 11), (2, 14))  # the releases CI builds and tests against
LIBRARY_EXT = "torch_ext.lib.libtorch_ext"


def read_version() -> str:
    for line in (ROOT / "CMakeLists.txt").read_text().splitlines():
        if line.startswith("project(torch_ext VERSION"):
            return line.split("VERSION")[1].split()[0]
    raise RuntimeError("project version not found in CMakeLists.txt")


def builds_cuda(torch) -> bool:
    """CMake's TORCH_EXT_CUDA rule: AUTO builds CUDA kernels for a CUDA torch when nvcc exists."""
    knob = os.environ.get("TORCH_EXT_CUDA", "AUTO").upper()
    if knob in ("OFF", "0", "FALSE", "NO"):
        return False
    return knob in ("ON", "1", "TRUE", "YES") or (
        torch.version.cuda is not None and shutil.which("nvcc") is not None
    )


def torch_pin() -> tuple[str, str]:
    """(local version label, requirement) for the installed torch the library compiles against.

    The library's C++ ABI is that torch's: the wheel says so in its version (``+torch213``,
    ``+torch213cu130`` with CUDA kernels) and requires exactly that torch release, so pip
    refuses to install it next to another instead of the import failing later.
    """
    import torch

    release = torch.__version__.split("+")[0]
    major, minor = release.split(".")[:2]
    if not SUPPORTED_TORCH[0] <= (int(major), int(minor)) <= SUPPORTED_TORCH[1]:
        low, high = (".".join(map(str, v)) for v in SUPPORTED_TORCH)
        raise RuntimeError(
            f"torch_ext supports torch {low} to {high}; the installed torch is {torch.__version__}"
        )
    label = f"torch{major}{minor}"
    if builds_cuda(torch) and torch.version.cuda:
        label += "cu" + torch.version.cuda.replace(".", "")
    return label, f"torch=={release}"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A plain shared library (no Python ABI tag): C++ programs link the very same file.
        if fullname == LIBRARY_EXT:
            return os.path.join("torch_ext", "lib", "libtorch_ext.so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DTORCH_EXT_BUILD_TESTS=OFF",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        for knob in ("TORCH_EXT_CUDA", "TORCH_EXT_CUDA_ARCHITECTURES"):
            if os.environ.get(knob):
                configure.append(f"-D{knob}={os.environ[knob]}")
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # An editable install copies the library into the source tree's torch_ext/lib.
        (ROOT / "torch_ext" / "lib").mkdir(exist_ok=True)
        subprocess.check_call(configure)
        subprocess.check_call(
            ["cmake", "--build", str(build_dir), "--target", "torch_ext", "-j", jobs]
        )


TORCH_LABEL, TORCH_REQUIREMENT = torch_pin()

setup(
    name="torch_ext",
    version=f"{read_version()}+{TORCH_LABEL}",
    description="PyTorch custom operators in C++/CUDA: SPP, dilated conv, varlen, metrics",
    packages=find_packages(include=["torch_ext", "torch_ext.*"]),
    ext_modules=[CMakeExtension(LIBRARY_EXT)],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=[TORCH_REQUIREMENT],
    zip_safe=False,
)
